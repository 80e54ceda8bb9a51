"""Where a training step's GPU waits: a ``torch.profiler`` trace of the trainer's real step
and of transformers' step (``bench/train_step.py``'s sides, same weights, same batch),
reduced to what it says about idle time.

Per side: wall time per step (timed without the profiler), GPU busy time per step (the
union of kernel, memcpy and memset intervals), the idle remainder, and the idle gaps
grouped by the CPU op that launched the kernel ending each gap: the host work the GPU
waited for. The traces themselves are written gzipped beside the summary (open them in
Perfetto or chrome://tracing).

    python bench/step_trace.py OUTDIR --preset 125m --seq-len 2048 --batch 8   # CUDA only

Prints one JSON object (also written to OUTDIR/step_trace.json).
"""

from __future__ import annotations

import sys
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
sys.path.insert(0, str(_BENCH.parent))

import argparse  # noqa: E402
import bisect  # noqa: E402
import collections  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

_DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
_HOST_CATS = ("cpu_op", "user_annotation", "python_function")


def idle_report(events: list[dict], steps: int, top: int = 12, min_gap_us: float = 5.0) -> dict:
    """GPU busy and idle time per step from chrome-trace ``events`` (complete events,
    ``ph == "X"``, times in microseconds), with the idle gaps before each device event
    grouped by the innermost host op that launched it (matched through the CUDA runtime
    call's ``correlation``; "?" when the trace has none)."""
    dev = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in _DEVICE_CATS),
                 key=lambda e: e["ts"])
    if not dev:
        raise ValueError("the trace has no GPU events (kernels, copies): was it taken on CUDA?")
    launches = {e.get("args", {}).get("correlation"): e for e in events
                if e.get("ph") == "X" and e.get("cat") == "cuda_runtime"}
    host = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in _HOST_CATS),
                  key=lambda e: e["ts"])
    starts = [e["ts"] for e in host]
    longest = max((e["dur"] for e in host), default=0.0)

    def launcher(t: float) -> str:
        # The shortest host op containing t (the innermost); only ops that start within
        # the longest op's duration before t can contain it.
        lo = bisect.bisect_left(starts, t - longest)
        hi = bisect.bisect_right(starts, t)
        inside = [e for e in host[lo:hi] if e["ts"] + e["dur"] >= t]
        return min(inside, key=lambda e: e["dur"])["name"] if inside else "?"

    busy = idle = 0.0
    end = dev[0]["ts"]
    gaps: collections.Counter[str] = collections.Counter()
    counts: collections.Counter[str] = collections.Counter()
    for e in dev:
        start, stop = e["ts"], e["ts"] + e["dur"]
        if start > end:
            gap = start - end
            idle += gap
            if gap >= min_gap_us:
                call = launches.get(e.get("args", {}).get("correlation"))
                name = launcher(call["ts"]) if call else "?"
                gaps[name] += gap
                counts[name] += 1
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    ms = 1000.0 * steps
    return {"gpu_busy_ms_per_step": round(busy / ms, 3), "gpu_idle_ms_per_step": round(idle / ms, 3),
            "device_events_per_step": round(len(dev) / steps, 1),
            "idle_by_launching_op": [{"op": k, "ms_per_step": round(v / ms, 3), "gaps": counts[k]}
                                     for k, v in gaps.most_common(top)]}


def main(argv: list[str] | None = None) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench import train_step as ts

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="folder for the summary and the gzipped traces")
    p.add_argument("--preset", default="125m")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--sides", default="trainer,hf", help="comma list of bench/train_step.py sides")
    p.add_argument("--steps", type=int, default=3, help="profiled steps per side")
    p.add_argument("--timed", type=int, default=8, help="unprofiled steps per side for wall time")
    p.add_argument("--compile", action="store_true",
                   help="the opt-ray sides' decoder blocks compiled (the trainer's --compile)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/step_trace.py needs CUDA: the trace's GPU idle time is its point")
    sides = [s for s in args.sides.split(",") if s]
    targs = ts.parse_args(["--device", "cuda", "--preset", args.preset, "--batch", str(args.batch),
                           "--seq-len", str(args.seq_len), "--dtype", args.dtype,
                           "--sides", ",".join(sides), "--no-memory", *(["--compile"] * args.compile)])
    s = ts.build(targs, sides)
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {"bench": "step_trace", "compile": args.compile, "preset": args.preset, "batch": args.batch,
                    "seq_len": args.seq_len, "dtype": args.dtype, "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(), "load_avg": [round(x, 2) for x in os.getloadavg()]}
    for side in sides:
        for _ in range(2):
            ts.step(side, s)
        wall = []
        for _ in range(args.timed):
            torch.cuda.synchronize()
            t = time.perf_counter()
            ts.step(side, s)
            torch.cuda.synchronize()
            wall.append(time.perf_counter() - t)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                ts.step(side, s)
            torch.cuda.synchronize()
        raw = args.out / f"trace_{side}.json"
        prof.export_chrome_trace(str(raw))
        events = json.loads(raw.read_text())["traceEvents"]
        with raw.open("rb") as a, gzip.open(f"{raw}.gz", "wb") as b:
            shutil.copyfileobj(a, b)
        raw.unlink()
        result[side] = {"wall_ms_per_step": round(1000 * statistics.median(wall), 2),
                        **idle_report(events, args.steps)}
    text = json.dumps(result, indent=2)
    (args.out / "step_trace.json").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
