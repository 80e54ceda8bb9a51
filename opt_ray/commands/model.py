"""`opt-ray model info`: parameter count, FLOPs per token and memory needs of the presets.

With ``--preset`` it also prints the training plan of ``opt_ray.model.plan``: what one rank
holds under FSDP2 x tensor parallelism on ``--gpus`` GPUs, whether it fits, the fix when it
does not, and the step time at ``--mfu``."""

from __future__ import annotations

import argparse
import json

from opt_ray.errors import UserError

GIB = 1 << 30


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="inspect model presets: parameter count, FLOPs per token, memory",
                       description="Inspect model presets.")
    msub = p.add_subparsers(dest="model_command", metavar="SUBCOMMAND")
    info = msub.add_parser(
        "info", help="parameters, FLOPs per token and memory for training and inference",
        description="Parameters, FLOPs per token, and memory: training (fp32 weights, grads and "
                    "Adam state, sharded by FSDP over --gpus) and inference (bf16/fp16 weights + "
                    "KV cache). With --preset, the training plan: what one rank holds under FSDP2 "
                    "x tensor parallelism (--gpus, --tp), whether it fits --gpu-memory (and the fix "
                    "when not), and the step time at --mfu (deploy/SCALING.md is made of these). "
                    "Without --preset, a table of every preset.")
    info.add_argument("--preset", help="a preset name (tiny, 125m, 350m, 1.3b, ... 175b); "
                                       "default: a table of all")
    info.add_argument("--seq-len", type=int, default=2048, help="sequence length (default 2048)")
    info.add_argument("--gpus", type=int, default=8,
                      help="GPUs in the training gang; the state is sharded over gpus/tp "
                           "data-parallel ranks (default 8)")
    info.add_argument("--tp", type=int, default=1,
                      help="tensor-parallel degree; must divide --gpus and the model's heads, FFN and "
                           "vocabulary (default 1)")
    info.add_argument("--micro-batch", type=int, default=1,
                      help="sequences per forward/backward on one rank (default 1)")
    info.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction,
                      default=False, help="recompute each decoder layer in backward, keeping only "
                                          "its input (default off)")
    info.add_argument("--precision", choices=["bf16", "fp16"], default="bf16",
                      help="compute dtype of the gathered parameters (default bf16)")
    info.add_argument("--gpu-memory", default="80GB",
                      help="memory of one GPU, e.g. 80GB (A100/H100), 141GB (H200); GB is read as "
                           "GiB, as vendors mean it (default 80GB)")
    info.add_argument("--mfu", type=float, default=0.47,
                      help="model FLOPs utilisation the step time assumes (default 0.47, the "
                           "paper's 147 of 312 TFLOP/s per A100)")
    info.add_argument("--peak-tflops", type=float, default=312.0,
                      help="dense bf16/fp16 peak of one GPU in TFLOP/s (default 312, A100; H100 "
                           "SXM 989)")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(func=run)
    p.set_defaults(func=run)


def model_info(name: str, seq_len: int = 2048, gpus: int = 8) -> dict:
    """The figures ``opt-ray model info`` prints for one preset."""
    from opt_ray.config import flops_per_token, num_params, preset

    p = preset(name)
    cfg = p.model
    n = num_params(cfg)
    L, d, h = cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads
    # Training state, all fp32 as OPT kept it: weights 4 + grads 4 + Adam m and v 8 bytes.
    train_state = 16 * n
    # Activations of one sequence in bf16 without tensor parallelism, as the planner counts
    # them (SDPA's flash kernel: no T x T matrix); with per-layer checkpointing each layer's
    # input is kept and one layer's full set recomputed.
    from opt_ray.model.plan import Setup, activation_bytes, layer_activation_bytes

    s = seq_len
    act = activation_bytes(cfg, Setup(seq_len=s, micro_batch=1))
    act_ck = activation_bytes(cfg, Setup(seq_len=s, micro_batch=1, activation_checkpointing=True))
    act_layer = layer_activation_bytes(cfg, s, 1, 2, 1)
    kv_per_token = 2 * L * d * 2  # k and v, every layer, 16-bit
    return {
        "preset": name,
        "layers": L, "heads": h, "d_model": d, "ffn_dim": cfg.ffn_dim,
        "word_embed_proj_dim": cfg.word_embed_proj_dim, "pre_ln": cfg.do_layer_norm_before,
        "params": n,
        "seq_len": seq_len,
        "flops_per_token_train": flops_per_token(cfg, seq_len),
        "flops_per_token_infer": flops_per_token(cfg, seq_len, training=False),
        "peak_lr": p.peak_lr, "batch_tokens": p.batch_tokens,
        "train": {
            "state_bytes": train_state,
            "gpus": gpus,
            "state_bytes_per_gpu": train_state / gpus,
            "activation_bytes_per_sequence": act.saved,
            "activation_bytes_per_sequence_checkpointed": act_ck.saved + act_layer,
        },
        "infer": {
            "weight_bytes_16bit": 2 * n,
            "kv_cache_bytes_per_token": kv_per_token,
            "kv_cache_bytes_per_sequence": kv_per_token * seq_len,
        },
    }


def _fmt_n(x: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def _fmt_b(x: float) -> str:
    for unit, div in (("TiB", 1 << 40), ("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if x >= div:
            return f"{x / div:.2f} {unit}"
    return f"{x:.0f} B"


def _print_one(i: dict) -> None:
    t, f = i["train"], i["infer"]
    lines = [
        ("preset", i["preset"]),
        ("shape", f"{i['layers']} layers, {i['heads']} heads, d_model {i['d_model']}, ffn {i['ffn_dim']}"
                  + ("" if i["pre_ln"] else f", post-LN, embed {i['word_embed_proj_dim']}")),
        ("parameters", f"{i['params']:,} ({_fmt_n(i['params'])})"),
        ("FLOPs/token", f"train {_fmt_n(i['flops_per_token_train'])}, inference "
                        f"{_fmt_n(i['flops_per_token_infer'])} (seq {i['seq_len']})"),
        ("recipe", f"peak LR {i['peak_lr']:g}, batch {_fmt_n(i['batch_tokens'])} tokens"),
        ("train state", f"{_fmt_b(t['state_bytes'])} fp32 weights+grads+Adam; "
                        f"{_fmt_b(t['state_bytes_per_gpu'])} per GPU with FSDP over {t['gpus']}"),
        ("activations", f"{_fmt_b(t['activation_bytes_per_sequence'])} per sequence, "
                        f"{_fmt_b(t['activation_bytes_per_sequence_checkpointed'])} with checkpointing"),
        ("inference", f"{_fmt_b(f['weight_bytes_16bit'])} bf16 weights + KV cache "
                      f"{_fmt_b(f['kv_cache_bytes_per_token'])}/token "
                      f"({_fmt_b(f['kv_cache_bytes_per_sequence'])} per {i['seq_len']}-token sequence)"),
    ]
    w = max(len(k) for k, _ in lines)
    for k, v in lines:
        print(f"{k:<{w}}  {v}")


def _print_table(infos: list[dict]) -> None:
    head = ["preset", "layers", "heads", "d_model", "params", "train GFLOP/tok",
            "train state", "per GPU", "infer weights", "KV/token"]
    rows = [[i["preset"], str(i["layers"]), str(i["heads"]), str(i["d_model"]), _fmt_n(i["params"]),
             f"{i['flops_per_token_train'] / 1e9:.2f}",
             _fmt_b(i["train"]["state_bytes"]), _fmt_b(i["train"]["state_bytes_per_gpu"]), _fmt_b(i["infer"]["weight_bytes_16bit"]),
             _fmt_b(i["infer"]["kv_cache_bytes_per_token"])] for i in infos]
    widths = [max(len(r[c]) for r in [head, *rows]) for c in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(v.rjust(w) if c else v.ljust(w) for c, (v, w) in enumerate(zip(r, widths))))
    g = infos[0]["train"]["gpus"]
    print(f"(seq {infos[0]['seq_len']}; train state = fp32 weights+grads+Adam sharded over {g} GPUs)")


def run(args: argparse.Namespace) -> int:
    from opt_ray.config import PRESETS

    if getattr(args, "model_command", None) != "info":
        raise UserError("say what to do: 'opt-ray model info [--preset NAME]'")
    if args.seq_len < 1:
        raise UserError(f"--seq-len must be >= 1, got {args.seq_len}")
    if args.gpus < 1:
        raise UserError(f"--gpus must be >= 1, got {args.gpus}")
    names = [args.preset] if args.preset else list(PRESETS)
    infos = [model_info(n, args.seq_len, args.gpus) for n in names]
    if not args.preset:
        if args.json:
            print(json.dumps(infos, indent=2))
        else:
            _print_table(infos)
        return 0
    from opt_ray.model.plan import format_plan, parse_memory, plan_preset

    p = plan_preset(args.preset, gpus=args.gpus, tp=args.tp, seq_len=args.seq_len,
                    micro_batch=args.micro_batch,
                    activation_checkpointing=args.activation_checkpointing,
                    precision=args.precision, gpu_memory_gib=parse_memory(args.gpu_memory),
                    mfu=args.mfu, peak_tflops=args.peak_tflops)
    if args.json:
        infos[0]["plan"] = p.to_dict()
        print(json.dumps(infos[0], indent=2))
    else:
        _print_one(infos[0])
        print(format_plan(p))
    return 0
