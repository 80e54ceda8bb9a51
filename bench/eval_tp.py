"""Evaluation with the model split across actors (`opt-ray eval --tp N`) against one
actor holding all of it (`--tp 1`), side by side in one run on one Ray cluster.

What --tp exists for is memory: a model larger than one GPU (66b, 175b) is evaluated with
each actor holding 1/N of the split weights. Measured per actor: the parameters it holds,
its resident memory after loading (``VmRSS``) and its peak (``VmHWM``), both read in the
actor, and the wall time of loading and of scoring the same log-likelihood requests
(the user's path: ``OptLM`` over ``actors.eval.WorkerPool``). Reported as ratios
tp N / tp 1. On this CPU machine the ranks all-reduce over gloo on shared cores, so the
scoring time says what the communication costs here, not what NVLink costs.

Workload: the 125m shape (12 x 768, vocab 50272) with random weights in HF format
(safetensors, fp32), ``--requests`` (context, continuation) pairs of about 100-200 tokens.

Run: ``python -m bench.eval_tp [--tp 2] [--requests 64] [--rounds 2]`` (prints JSON;
record it in bench/RESULTS.md with the machine and its load average).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def proc_memory(pid: int | str = "self") -> dict[str, float]:
    """A process's resident and peak memory (GB): ``VmRSS`` and ``VmHWM``."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    kb = {ln.split(":")[0]: int(ln.split()[1]) for ln in status if ln.startswith(("VmRSS", "VmHWM"))}
    return {"rss_gb": kb["VmRSS"] / 1e6, "peak_gb": kb["VmHWM"] / 1e6}


def _memory(worker) -> dict[str, float]:
    """The actor's (``__ray_call__``: run in the actor)."""
    return proc_memory()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp", type=int, default=2, help="the split side's tensor-parallel degree")
    ap.add_argument("--requests", type=int, default=64, help="log-likelihood requests scored")
    ap.add_argument("--rounds", type=int, default=2, help="timed scoring rounds per side (best kept)")
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()

    import ray

    from opt_ray.eval.lm import OptLM
    from opt_ray.ray_util import local_ray_kwargs
    from tests.eval_helpers import TEXTS, build_hf_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="bench-eval-tp-", dir=os.environ.get("BENCH_TMP")))
    ckpt = build_hf_checkpoint(tmp / "ckpt", texts=TEXTS * 3, vocab_size=600, model_vocab=50272,
                               hidden=768, layers=12, heads=12, max_positions=2048, init_std=0.02)
    rng = random.Random(0)
    pairs = [([rng.randrange(3, 600) for _ in range(rng.randrange(100, 200))],
              [rng.randrange(3, 600) for _ in range(rng.randrange(1, 8))]) for _ in range(args.requests)]
    ray.init(**local_ray_kwargs(), num_cpus=max(2, args.tp), include_dashboard=False, log_to_driver=False)
    sides = {}
    try:
        for tp in (1, args.tp):
            t0 = time.perf_counter()
            lm = OptLM.from_checkpoint(ckpt, batch_size=args.batch_size, workers=tp, tp=tp, actors=True)
            load = time.perf_counter() - t0
            pool = lm.engine
            mem = ray.get([a.__ray_call__.remote(_memory) for a in pool.actors])
            times, scores = [], None
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                scores = pool.loglikelihood(pairs)
                times.append(time.perf_counter() - t0)
            pool.close()
            sides[tp] = {"load_s": load, "score_s": min(times), "params_per_actor": pool.params_per_actor,
                         "params": pool.num_params,
                         "rss_gb_per_actor": max(m["rss_gb"] for m in mem),
                         "peak_gb_per_actor": max(m["peak_gb"] for m in mem), "scores": scores}
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    one, split = sides[1], sides[args.tp]
    diff = max(abs(a[0] - b[0]) for a, b in zip(one.pop("scores"), split.pop("scores")))
    out = {
        "bench": "eval_tp", "tp": args.tp, "requests": args.requests, "batch_size": args.batch_size,
        "model": "125m shape, fp32, random weights", "tp1": one, f"tp{args.tp}": split,
        "ratio_params_per_actor": split["params_per_actor"] / one["params_per_actor"],
        "ratio_rss_per_actor": split["rss_gb_per_actor"] / one["rss_gb_per_actor"],
        "ratio_peak_per_actor": split["peak_gb_per_actor"] / one["peak_gb_per_actor"],
        "ratio_load_s": split["load_s"] / one["load_s"],
        "ratio_score_s": split["score_s"] / one["score_s"],
        "max_abs_logprob_diff": diff,
        "machine": f"{platform.node()} {os.cpu_count()} cpus", "loadavg": os.getloadavg(),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
