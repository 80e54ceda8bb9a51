"""`opt-ray export`'s peak memory: the streaming export against a whole-state load.

A training checkpoint of the ``--preset`` shape (one step of `opt-ray train --workers
2`, so it holds the fp32 weights and AdamW's two moments, as every checkpoint does, in a
file per rank) is exported to an HF
directory in fp16, each side in its own process, trials
interleaved (peak RSS is the child's ``VmHWM``):

* ``whole_state`` (the reference: what ``opt-ray export`` did before, and what loading
  the checkpoint into a model and saving it does): every tensor of the checkpoint read
  (``read_full_tensors``: weights and optimizer state), the model built from it, cast and
  written (``to_hf``);
* ``export``: the CLI as users run it, default ``--max-shard-size 5GB`` (one file for a
  model this small: the whole fp32 weights pass through memory once);
* ``export_sharded``: the CLI with ``--max-shard-size`` ``--shard`` (files of that size,
  one in memory at a time: what bounds a 175b export).

Also timed, in this process: ``checkpoint.verify`` of the checkpoint (every file's
sha256, what export and eval run first) hashing its files one at a time against
concurrently (``VERIFY_THREADS``).

Reported: peak RSS per side, its ratio to the reference, seconds, and the bytes written
(equal on every side: the same tensors). A process that only imports torch and the
project is measured too (``baseline``), so the weights' share can be read off.

Run: ``python -m bench.export [--preset 125m] [--shard 20MB] [--trials 2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import sys, time, json
side, ckpt, out, shard = sys.argv[1:5]
import torch
t0 = time.perf_counter()
if side == "baseline":
    import opt_ray.train.checkpoint, opt_ray.model.hf  # noqa: F401
elif side == "whole_state":
    from opt_ray.config import ModelConfig
    from opt_ray.model.hf import to_hf
    from opt_ray.model.opt import OPT
    from opt_ray.train.checkpoint import read_full_tensors, read_train_state
    cfg = ModelConfig.from_dict(read_train_state(ckpt)["model"])
    flat = read_full_tensors(ckpt + "/tp0")
    sd = {k[len("model."):]: v for k, v in flat.items() if k.startswith("model.")}
    with torch.device("meta"):
        model = OPT(cfg)
    model.load_state_dict(sd, strict=False, assign=True)
    model.lm_head.weight = model.decoder.embed_tokens.weight
    to_hf(model.to(torch.float16), out)
else:
    from opt_ray.cli import main
    argv = ["export", ckpt, "--output", out, "--dtype", "fp16"]
    if side == "export_sharded":
        argv += ["--max-shard-size", shard]
    assert main(argv) == 0
dt = time.perf_counter() - t0
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork + exec, so a child would report
# its parent's peak (the bench's own, after training the checkpoint).
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"peak_rss_mb": hwm / 1024, "seconds": dt}))
"""


def make_checkpoint(preset: str, work: Path, workers: int) -> str:
    """One step of the real trainer at ``preset``'s shape on a small corpus, as `opt-ray
    train --workers N` runs it (its own embedded Ray; N ranks write N files); the
    checkpoint."""
    from opt_ray.train.checkpoint import committed
    from tests.integration.test_train_gang import make_shards

    shards = make_shards(work / "shards", docs=200, seq_len=32)
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    subprocess.run([str(Path(sys.executable).parent / "opt-ray"), "train", "--data", str(shards),
                    "--output", str(work / "run"), "--preset", preset, "--steps", "1",
                    "--workers", str(workers), "--batch-tokens", str(2 * 32 * workers),
                    "--micro-batch", "2", "--checkpoint-every", "1", "--warmup-steps", "1",
                    "--no-guard", "--no-progress", "--num-cpus", str(max(2, workers))],
                   check=True, env=env, capture_output=True)
    return str(committed(work / "run" / "checkpoints")[-1][1])


def _verify_times(ckpt: str, trials: int) -> dict:
    """``checkpoint.verify`` (every file's sha256, what export and eval run first) with its
    files hashed one at a time against concurrently (``VERIFY_THREADS``), interleaved;
    the page cache is warm for both (the checkpoint was just written and read)."""
    from opt_ray.train import checkpoint

    threads, best = checkpoint.VERIFY_THREADS, {"serial": 1e9, "threads": 1e9}
    try:
        for t in range(trials + 1):
            for side in (("serial", "threads") if t % 2 == 0 else ("threads", "serial")):
                checkpoint.VERIFY_THREADS = 1 if side == "serial" else threads
                t0 = time.perf_counter()
                assert checkpoint.verify(ckpt) is None
                if t:             # the first round warms the page cache
                    best[side] = min(best[side], time.perf_counter() - t0)
    finally:
        checkpoint.VERIFY_THREADS = threads
    files = len(json.loads((Path(ckpt) / "manifest.json").read_text())["files"])
    return {f"{k}_s": round(v, 3) for k, v in best.items()} | {"threads": threads, "files": files}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="125m", help="model shape (default 125m)")
    ap.add_argument("--shard", default="20MB", help="--max-shard-size of the sharded side")
    ap.add_argument("--trials", type=int, default=2, help="trials per side (default 2)")
    ap.add_argument("--workers", type=int, default=2,
                    help="ranks of the run that writes the checkpoint (one file each; default 2)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-export-"))
    try:
        t0 = time.perf_counter()
        ckpt = make_checkpoint(args.preset, work, args.workers)
        ckpt_mb = sum(p.stat().st_size for p in Path(ckpt).rglob("*") if p.is_file()) / 1e6
        build_s = time.perf_counter() - t0
        verify_s = _verify_times(ckpt, args.trials)
        sides = ["baseline", "whole_state", "export", "export_sharded"]
        runs: dict[str, list[dict]] = {s: [] for s in sides}
        for t in range(args.trials):
            for side in (sides if t % 2 == 0 else sides[::-1]):
                out = work / f"out-{side}-{t}"
                r = subprocess.run([sys.executable, "-c", CHILD, side, ckpt, str(out), args.shard],
                                   capture_output=True, text=True, cwd=Path(__file__).parent.parent)
                if r.returncode != 0:
                    raise SystemExit(f"{side} failed:\n{r.stderr[-3000:]}")
                res = json.loads(r.stdout.strip().splitlines()[-1])
                if out.exists():
                    res["written_mb"] = round(sum(p.stat().st_size for p in out.glob("*.safetensors")) / 1e6, 1)
                    res["files"] = len(list(out.glob("*.safetensors")))
                    shutil.rmtree(out)
                runs[side].append(res)
        best = {s: min(v, key=lambda r: r["peak_rss_mb"]) for s, v in runs.items()}
        ref = best["whole_state"]["peak_rss_mb"]
        print(json.dumps({
            "bench": "export", "preset": args.preset, "checkpoint_mb": round(ckpt_mb, 1),
            "checkpoint_build_s": round(build_s, 1), "shard": args.shard, "trials": args.trials,
            "verify_s": verify_s,
            "verify_threads_vs_serial": round(verify_s["serial_s"] / verify_s["threads_s"], 3),
            "sides": {s: {**{k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()},
                          "peak_vs_whole_state": round(r["peak_rss_mb"] / ref, 3)}
                      for s, r in best.items()},
            "machine": f"{platform.machine()} {os.cpu_count()} cores",
            "load_1m_end": round(os.getloadavg()[0], 2)}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
