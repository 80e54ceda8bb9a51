"""`opt-ray model info`: parameter count, FLOPs per token and memory needs of the presets."""

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
                    "KV cache). Without --preset, a table of every preset.")
    info.add_argument("--preset", help="a preset name (tiny, 125m, 350m, 1.3b, ... 175b); "
                                       "default: a table of all")
    info.add_argument("--seq-len", type=int, default=2048, help="sequence length (default 2048)")
    info.add_argument("--gpus", type=int, default=8,
                      help="FSDP data-parallel degree the training state is sharded over (default 8)")
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
    # Activations per sequence of seq_len in 16-bit (Korthikanti et al. 2022, no sequence
    # parallelism): s*h*(34 + 5*a*s/h) bytes per layer; with per-layer activation
    # checkpointing only each layer's input (2*s*h bytes) is kept, plus one layer's full set.
    s = seq_len
    act_layer = s * d * (34 + 5 * h * s / d)
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
            "activation_bytes_per_sequence": L * act_layer,
            "activation_bytes_per_sequence_checkpointed": L * 2 * s * d + act_layer,
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
    if args.json:
        print(json.dumps(infos[0] if args.preset else infos, indent=2))
    elif args.preset:
        _print_one(infos[0])
    else:
        _print_table(infos)
    return 0
