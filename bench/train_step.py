"""Training-step benchmark: opt-ray's OPT vs transformers.OPTForCausalLM, side by side.

One step = forward + backward + AdamW step on one batch, in ``--dtype`` (bf16 on CUDA and
on a CPU with native bf16, else fp32), for both models built with the same weights, in one process, steps interleaved (the
order alternates every repeat) so that machine noise hits both alike. Both sides use the
same optimizer settings (the paper's AdamW; torch's fused kernel where available).

- ``trainer``: the real trainer step, ``opt_ray.train.loop.Trainer.train_step()`` (sampler,
  shard reads, LR schedule, micro-batches through the model's chunked LM-head loss, the
  reduced step statistics, clipping, AdamW), on shards of random tokens written here,
  loaded with the same weights as the other sides. Its precision is the trainer's own: in
  bf16/fp16 FSDP2's mixed precision (16-bit compute weights gathered from fp32 master
  weights, gradients reduced into fp32, no autocast) on one rank as on many
- ``ours``: ``loss = model(inputs, targets=targets)`` (the fused, chunked LM-head loss),
  fp32 parameters under autocast: the same precision recipe as the transformers side
- ``hf``: ``loss = model(input_ids=ids, labels=ids).loss`` (its own loss path)
- ``ours_bf16`` (optional, ``--sides``): the paper's mixed precision, 16-bit compute
  weights with fp32 master weights, gradients and Adam state, as FSDP2 does it
  (``apply_fsdp(param_dtype=bf16)``, here over a one-process group)

Each step's wall time and process CPU time are recorded: on a shared machine the CPU
time is the steadier figure (time-slicing by other tenants inflates wall time).

Peak memory is measured fairly in separate child processes, one per side, each building
only its own model: the RSS high-water mark (``ru_maxrss``) over the steps, minus the RSS
after set-up (CPU), or ``torch.cuda.max_memory_allocated`` (GPU). Achieved FLOP/s use
``flops_per_token`` (6N + 12 L d T) against a big bf16 matmul timed in the same run.

    python bench/train_step.py                                   # 125m, 4 x 512, CPU, bf16
    python bench/train_step.py --preset 1.3b --seq-len 2048 --device cuda --batch 4

Prints one JSON object.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path, and bench/tokenize.py
# would shadow the standard library's tokenize: put the repository root there instead.
_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
sys.path.insert(0, str(_BENCH.parent))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from opt_ray.config import flops_per_token, preset  # noqa: E402
from opt_ray.train.loop import _compute_dtype, cpu_has_native_bf16, fused_adamw_ok  # noqa: E402

# Dense bf16 tensor-core peaks (no sparsity), for MFU on GPUs.
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="125m")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="autocast dtype (fp16 on CUDA only; fp32: no autocast); default: bf16 "
                        "on CUDA and on a CPU with native bf16 (AVX512-BF16/AMX), else fp32")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per side first")
    p.add_argument("--sides", default="trainer,hf",
                   help="comma list of trainer, ours, hf, ours_bf16 (default trainer,hf)")
    p.add_argument("--no-hf", action="store_true", help="time opt-ray only (drop hf from --sides)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the opt-ray sides' decoder blocks (the trainer's --compile; "
                        "opt_ray.model.parallel.compile_blocks); transformers stays eager")
    p.add_argument("--no-memory", action="store_true", help="skip the per-side memory children")
    p.add_argument("--dropout", type=float, default=None,
                   help="override the preset's dropout (default: the preset's 0.1, both sides)")
    p.add_argument("--child", choices=list(SIDES), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bf16" if args.device == "cuda" or cpu_has_native_bf16() else "fp32"
    args.side_list = [x for x in args.sides.split(",") if x and not (args.no_hf and x == "hf")]
    bad = [x for x in args.side_list if x not in SIDES]
    if bad or not args.side_list:
        p.error(f"--sides: unknown {bad}; choose from {', '.join(SIDES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


SIDES = ("trainer", "ours", "hf", "ours_bf16")


# -- the two sides -----------------------------------------------------------------------

def build(args: argparse.Namespace, sides: list[str]) -> dict:
    """Models (same weights), optimizers and the batch for the requested sides."""
    from opt_ray.model import OPT
    from opt_ray.model.hf import config_to_hf

    cfg = preset(args.preset).model
    if args.dropout is not None:
        cfg = cfg.replace(dropout=args.dropout)
    if args.seq_len > cfg.max_position_embeddings:
        raise SystemExit(f"--seq-len {args.seq_len} exceeds the preset's {cfg.max_position_embeddings} positions")
    dev = torch.device(args.device)
    torch.manual_seed(0)
    models = {}
    with dev:  # built where it runs (a 1.3b init on the CPU first costs more than the steps)
        ours = OPT(cfg)
    if "trainer" in sides:
        models["trainer"] = _trainer(args, cfg, ours, dev)
    if "ours_bf16" in sides:
        import copy
        models["ours_bf16"] = _fsdp_bf16(_compiled(copy.deepcopy(ours), args), dev)
    if "ours" in sides:
        models["ours"] = _compiled(ours, args)
    if "hf" in sides:
        import transformers
        hcfg = transformers.OPTConfig(**config_to_hf(cfg))
        hcfg._attn_implementation = "sdpa"  # transformers' fastest built-in path
        with dev:
            hf = transformers.OPTForCausalLM(hcfg)
        hf.load_state_dict(ours.state_dict())
        models["hf"] = hf
    del ours  # only the requested sides stay resident (the memory children build one)
    fused = fused_adamw_ok(dev)
    opts = {k: torch.optim.AdamW(m.parameters(), lr=6e-4, betas=(0.9, 0.95), eps=1e-8,
                                 weight_decay=0.1, fused=fused) for k, m in models.items()
            if k != "trainer"}
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, cfg.vocab_size, (args.batch, args.seq_len), generator=g).to(dev)
    targets = ids.roll(-1, dims=1)
    targets[:, -1] = -100  # the same T-1 predictions per row that HF's labels shift gives
    for k, m in models.items():
        if k != "trainer":
            m.train()
    return {"cfg": cfg, "models": models, "opts": opts, "ids": ids, "targets": targets,
            "fused_adamw": fused,
            "autocast": _compute_dtype(args.dtype) or torch.float32}


def _compiled(model, args: argparse.Namespace):
    """The model with its decoder blocks compiled as the trainer's --compile does."""
    if args.compile:
        from opt_ray.model.parallel import compile_blocks
        compile_blocks(model)
    return model


def _random_shards(out: Path, vocab: int, seq_len: int, rows: int) -> Path:
    """A shards artifact (opt_ray.data.shards layout) of uniformly random tokens."""
    import pyarrow as pa

    from opt_ray.artifacts import sha256_file, write_json_atomic
    from opt_ray.data.shards import COLUMN

    (out / "train").mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(2)
    toks = torch.randint(3, vocab, (rows, seq_len + 1), generator=g).to(torch.int32).numpy().astype("uint16")
    arr = pa.FixedSizeListArray.from_arrays(pa.array(toks.reshape(-1)), seq_len + 1)
    name = "train/shard-00000.arrow"
    with pa.OSFile(str(out / name), "wb") as f, pa.ipc.new_file(f, pa.schema([(COLUMN, arr.type)])) as w:
        w.write_table(pa.table({COLUMN: arr}))
    info = {"name": name, "rows": rows, "tokens": rows * (seq_len + 1), "sha256": sha256_file(out / name)}
    write_json_atomic(out / "manifest.json", {
        "kind": "shards", "seq_len": seq_len, "dtype": "uint16",
        "tokenizer": {"vocab_size": vocab, "hash": "random-tokens"},
        "splits": {"train": {"rows": rows, "shards": [info]}},
        "files": {name: {"sha256": info["sha256"], "bytes": (out / name).stat().st_size}}})
    return out


def _trainer(args: argparse.Namespace, cfg, weights, dev: torch.device):
    """The real trainer for one rank (a one-process group), with ``weights``' values."""
    import tempfile

    from opt_ray.train.loop import TrainConfig, Trainer, _ensure_process_group

    work = Path(tempfile.mkdtemp(prefix="bench-train-step-"))
    shards = _random_shards(work / "shards", cfg.vocab_size - 7, args.seq_len, args.batch * 64)
    _ensure_process_group(args.device)  # NCCL beside gloo on CUDA, as a GPU gang has
    tcfg = TrainConfig(data=str(shards), output=str(work / "run"), preset=args.preset, steps=10_000,
                       batch_tokens=args.batch * args.seq_len, micro_batch=args.batch, lr=6e-4,
                       precision=args.dtype, device=args.device, guard=False, dropout=cfg.dropout,
                       num_threads=args.threads, compile=args.compile)
    t = Trainer(tcfg)
    assert t.model_cfg.vocab_size == cfg.vocab_size, (t.model_cfg.vocab_size, cfg.vocab_size)
    # Full tensors into the trainer's (FSDP2-sharded in a half dtype) parameters.
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    set_model_state_dict(t.model, weights.state_dict(), options=StateDictOptions(full_state_dict=True))
    return t


def _fsdp_bf16(model, dev: torch.device):
    """FSDP2 mixed precision over a one-process group: bf16 compute weights gathered from
    fp32 master shards, gradients reduced into fp32."""
    import torch.distributed as dist

    from opt_ray.model.parallel import apply_fsdp
    if not dist.is_initialized():
        import socket
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    return apply_fsdp(model, param_dtype=torch.bfloat16, reshard_after_forward=False)


def step(side: str, s: dict) -> float:
    """One training step; returns the loss."""
    if side == "trainer":
        return s["models"]["trainer"].train_step()["loss"]  # the loop's own step, whole
    m, opt, ids = s["models"][side], s["opts"][side], s["ids"]
    with torch.autocast(ids.device.type, dtype=s["autocast"],
                        enabled=s["autocast"] != torch.float32):
        if side != "hf":
            loss = m(ids, targets=s["targets"])
        else:
            loss = m(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()  # also a device sync point


def _sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def matmul_peak(dev: str, dtype: torch.dtype, seconds: float = 2.0) -> float:
    """Achieved FLOP/s of a big square matmul in ``dtype`` (the machine's practical peak)."""
    n = 8192 if dev == "cuda" else 2048
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    a @ b
    _sync(dev)
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t = time.perf_counter()
        for _ in range(10 if dev == "cuda" else 1):
            a @ b
        _sync(dev)
        best = max(best, (10 if dev == "cuda" else 1) * 2 * n ** 3 / (time.perf_counter() - t))
    return best


# -- memory children -----------------------------------------------------------------------

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_rss_peak() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) so that it covers the steps only,
    not imports or model construction. Linux >= 4.0."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_peak_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def child(args: argparse.Namespace) -> None:
    """Build one side only, run warmup + 2 steps, report its peak memory."""
    import transformers  # noqa: F401  (same libraries resident on both sides)
    s = build(args, [args.child])
    if args.device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_bytes()
        if not _reset_rss_peak():
            raise SystemExit("cannot reset the RSS high-water mark (/proc/self/clear_refs)")
    for _ in range(args.warmup + 2):
        step(args.child, s)
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else _rss_peak_bytes()
    print(json.dumps({"side": args.child, "base_bytes": base, "peak_bytes": peak,
                      "step_peak_bytes": peak - base}))


def measure_memory(args: argparse.Namespace, side: str) -> dict:
    cmd = [sys.executable, __file__, "--child", side, "--preset", args.preset, "--batch", str(args.batch),
           "--seq-len", str(args.seq_len), "--device", args.device, "--dtype", args.dtype,
           "--warmup", str(args.warmup), "--sides", side]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.compile:
        cmd += ["--compile"]
    if args.dropout is not None:
        cmd += ["--dropout", str(args.dropout)]
    # The parent's one-process group set MASTER_PORT: a child that inherited it would try
    # to bind the port the parent's store still holds.
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"memory child for {side} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# -- main ----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        return child(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    sides = args.side_list
    s = build(args, sides)
    cfg, tokens = s["cfg"], args.batch * args.seq_len
    fpt = flops_per_token(cfg, args.seq_len)
    peak = matmul_peak(args.device, s["autocast"])

    first_step_s = {}
    for w in range(args.warmup):
        for side in sides:
            t = time.perf_counter()
            step(side, s)
            if w == 0:
                first_step_s[side] = round(time.perf_counter() - t, 1)  # includes compile
    times: dict[str, list[float]] = {k: [] for k in sides}
    cpu: dict[str, list[float]] = {k: [] for k in sides}
    losses: dict[str, list[float]] = {k: [] for k in sides}
    for r in range(args.repeats):
        for side in (sides if r % 2 == 0 else sides[::-1]):
            _sync(args.device)
            t, c = time.perf_counter(), time.process_time()
            losses[side].append(step(side, s))
            # Whatever a side left queued (an update launched after its last host read)
            # belongs to its step.
            _sync(args.device)
            times[side].append(time.perf_counter() - t)
            cpu[side].append(time.process_time() - c)
            print(f"repeat {r} {side}: {times[side][-1]:.2f} s wall, {cpu[side][-1]:.2f} s CPU",
                  file=sys.stderr, flush=True)
    peak = max(peak, matmul_peak(args.device, s["autocast"]))

    result: dict = {
        "bench": "train_step", "load_avg": [round(x, 2) for x in os.getloadavg()], "preset": args.preset, "batch": args.batch, "seq_len": args.seq_len,
        "tokens_per_step": tokens, "device": args.device, "autocast": args.dtype,
        "dropout": cfg.dropout, "fused_adamw": s["fused_adamw"], "repeats": args.repeats,
        "compile": args.compile,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": _machine(args.device), "flops_per_token": fpt,
        "matmul_peak_gflops": round(peak / 1e9, 1),
    }
    for side in sides:
        med = statistics.median(times[side])
        tps = tokens / med
        cmed = statistics.median(cpu[side])
        result[side] = {"step_s": [round(t, 3) for t in times[side]], "step_s_median": round(med, 3),
                        "step_cpu_s": [round(t, 3) for t in cpu[side]], "step_cpu_s_median": round(cmed, 3),
                        "first_step_s": first_step_s.get(side),
                        "tokens_per_s": round(tps, 1), "tokens_per_cpu_s": round(tokens / cmed, 1),
                        "achieved_gflops": round(tps * fpt / 1e9, 1),
                        "fraction_of_matmul_peak": round(tps * fpt / peak, 3),
                        "loss_first": round(losses[side][0], 4), "loss_last": round(losses[side][-1], 4)}
        if args.device == "cuda":
            name = torch.cuda.get_device_name()
            nominal = next((v for k, v in GPU_PEAK_BF16.items() if k in name), None)
            if nominal:
                result[side]["mfu"] = round(tps * fpt / nominal, 3)
    if "hf" in sides:
        for side in sides:
            if side == "hf":
                continue
            result[f"speedup_{side}_vs_hf"] = {
                "wall_median": round(statistics.median(times["hf"]) / statistics.median(times[side]), 3),
                "cpu_median": round(statistics.median(cpu["hf"]) / statistics.median(cpu[side]), 3),
                "wall_per_repeat": [round(h / o, 3) for o, h in zip(times[side], times["hf"])],
                "cpu_per_repeat": [round(h / o, 3) for o, h in zip(cpu[side], cpu["hf"])],
            }
    if not args.no_memory:
        # After the timing, one child per side, one at a time.
        del s
        for side in sides:
            mem = measure_memory(args, side)
            result[side]["peak_mem_mib"] = round(mem["peak_bytes"] / 2 ** 20, 1)
            result[side]["step_peak_mem_mib"] = round(mem["step_peak_bytes"] / 2 ** 20, 1)
        if "hf" in sides:
            for side in sides:
                if side != "hf":
                    result[f"memory_ratio_{side}_vs_hf"] = round(
                        result[side]["step_peak_mem_mib"] / result["hf"]["step_peak_mem_mib"], 3)
    print(json.dumps(result, indent=2))


def _machine(dev: str) -> str:
    if dev == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
