"""A serving replica split across processes (`opt-ray serve --tensor-parallel-size N`)
against one process holding the whole model (N = 1), side by side in one run: the same
app (`actors.serve.build_app`, Ray Serve on a local Ray), the same requests through its
HTTP API.

What the split exists for is memory: a model larger than one GPU is served with each
process holding 1/N of the split weights and of the KV cache. Measured per process of
the replica (its actors' ``VmRSS`` / ``VmHWM`` read from /proc after the load and the
requests) and the KV cache bytes per process (the engine's stats); and the output tokens
per second of ``--requests`` concurrent greedy completions. On this CPU machine the ranks
all-reduce over gloo on the same two cores, so the speed says what the split costs
here, not what NVLink costs on a GPU node.

Workload: the 125m shape (12 x 768, vocab 50272) with random weights (fp32),
``--max-num-seqs`` KV slots of ``--max-model-len`` tokens, no prepacked weight copy on
either side (``--no-prepack-weights``: a CPU-only second copy that split layers do not
use and GPUs do not have).

Run: ``python -m bench.serve_tp [--tp 2] [--requests 8] [--max-tokens 32]`` (prints JSON;
record it in bench/RESULTS.md with the machine and its load average).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp", type=int, default=2, help="the split side's --tensor-parallel-size")
    ap.add_argument("--requests", type=int, default=8, help="concurrent completions")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--max-model-len", type=int, default=512)
    args = ap.parse_args()

    import httpx
    import ray
    from ray import serve

    from actors.serve import build_app, start
    from bench.eval_tp import proc_memory
    from bench.serve import build_125m
    from opt_ray.ray_util import local_ray_kwargs
    from opt_ray.serve.engine import EngineConfig
    from tests.conftest import free_port
    from tests.integration.test_serve_ray import PROMPTS, _wait_ready
    from tests.serve_helpers import actor_pids

    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-tp-", dir=os.environ.get("BENCH_TMP")))
    ckpt = tmp / "ckpt"
    build_125m(ckpt, "float32")
    prompts = [(PROMPTS[i % len(PROMPTS)] + " ") * 4 for i in range(args.requests)]
    ray.init(**local_ray_kwargs(), num_cpus=args.tp + 1, include_dashboard=False, log_to_driver=False)
    sides = {}
    try:
        for tp in (1, args.tp):
            port = free_port()
            # No prepacked second copy of the weights on either side (a CPU-only copy that
            # split layers never use; GPUs have none): the split is what is compared.
            cfg = EngineConfig(max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                               device="cpu", tensor_parallel_size=tp, prepack_weights=False)
            t0 = time.perf_counter()
            start(build_app(ckpt, model_name="bench", replicas=1, grpc_port=None, engine_config=cfg),
                  host="127.0.0.1", http_port=port)
            base = f"http://127.0.0.1:{port}"
            _wait_ready(base, timeout=600)
            load = time.perf_counter() - t0

            def one(p: str) -> int:
                r = httpx.post(f"{base}/v1/completions", timeout=600, json={
                    "model": "bench", "prompt": p, "max_tokens": args.max_tokens, "temperature": 0,
                    "ignore_eos": True})
                r.raise_for_status()
                return r.json()["usage"]["completion_tokens"]

            one(prompts[0])                                   # warm-up
            t0 = time.perf_counter()
            with cf.ThreadPoolExecutor(len(prompts)) as pool:
                tokens = sum(pool.map(one, prompts))
            wall = time.perf_counter() - t0
            stats = httpx.get(f"{base}/v1/stats", timeout=30).json()
            # The replica (rank 0; Serve names its actor class after the deployment) and its ranks.
            mem = [proc_memory(pid) for pid in actor_pids("ServeReplica:opt-ray:GenerationEngine", "_EngineRank")]
            sides[tp] = {"start_s": load, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
                         "processes": len(mem), "kv_cache_bytes_per_process": stats["kv_cache_bytes"],
                         "rss_gb_per_process": max(m["rss_gb"] for m in mem),
                         "peak_gb_per_process": max(m["peak_gb"] for m in mem)}
            serve.shutdown()
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    one_, split = sides[1], sides[args.tp]
    out = {
        "bench": "serve_tp", "tp": args.tp, "requests": args.requests, "max_tokens": args.max_tokens,
        "model": "125m shape, fp32, random weights", "tp1": one_, f"tp{args.tp}": split,
        "ratio_kv_per_process": split["kv_cache_bytes_per_process"] / one_["kv_cache_bytes_per_process"],
        "ratio_rss_per_process": split["rss_gb_per_process"] / one_["rss_gb_per_process"],
        "ratio_peak_per_process": split["peak_gb_per_process"] / one_["peak_gb_per_process"],
        "ratio_tokens_per_s": split["tokens_per_s"] / one_["tokens_per_s"],
        "machine": f"{platform.node()} {os.cpu_count()} cpus", "loadavg": os.getloadavg(),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
