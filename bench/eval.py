"""Evaluation throughput: opt-ray's in-process lm-eval adapter (``OptLM``) vs lm-eval's own
``hf`` backend (``HFLM`` over transformers), side by side in one process (issue 14).

Workload: the 125m shape (12 x 768, vocab 50272, context 2048) with random weights
written by ``transformers.OPTForCausalLM.save_pretrained``, fp32, and a local
multiple-choice task in lm-eval's YAML format (``dataset_path: json``): ``--docs``
questions x 4 choices = the log-likelihood requests. Both sides run the same
``lm_eval.simple_evaluate`` on the same task and batch size; the sides alternate round by
round so load drift hits both. Throughput is requests per wall-clock second and per
CPU-second of this process (``time.process_time``; the development machines are shared
and time-slicing inflates wall time). The per-request scores of the two sides are
compared too (max absolute difference).

Prints one JSON object (last line).
``python -m bench.eval [--docs 50] [--rounds 2] [--num-fewshot 0]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=50, help="multiple-choice questions (x4 requests)")
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds per side (alternating)")
    ap.add_argument("--num-fewshot", type=int, default=0,
                    help="few-shot examples per prompt (longer contexts, as in the paper's few-shot runs)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a loaded machine)")
    args = ap.parse_args()

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch
    torch.set_num_threads(args.threads)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from opt_ray.eval.lm import OptLM
    from tests.eval_helpers import TEXTS, build_hf_checkpoint, mc_rows, write_mc_task

    tmp = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    texts = TEXTS * 3
    ckpt = build_hf_checkpoint(tmp / "ckpt", texts=texts, vocab_size=600, model_vocab=50272,
                               hidden=768, layers=12, heads=12, max_positions=2048, init_std=0.02)
    write_mc_task(tmp / "tasks", "mc_bench", mc_rows(args.docs), fewshot_rows=mc_rows(20, seed=7))
    tm = TaskManager(include_path=str(tmp / "tasks"), include_defaults=False)

    sides = {
        "opt_ray": OptLM.from_checkpoint(ckpt, batch_size=args.batch_size),
        "lm_eval_hf": HFLM(pretrained=str(ckpt), device="cpu", dtype="float32", batch_size=args.batch_size),
    }

    def run(lm):
        return simple_evaluate(model=lm, tasks=["mc_bench"], task_manager=tm, log_samples=True,
                               num_fewshot=args.num_fewshot, bootstrap_iters=0, verbosity="ERROR")

    times: dict[str, list[tuple[float, float]]] = {k: [] for k in sides}
    scores: dict[str, list[float]] = {}
    n_req = None
    run(sides["opt_ray"])  # warm-up: datasets cache, first-call allocations
    for r in range(args.rounds):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for name in order:
            w0, c0 = time.perf_counter(), time.process_time()
            res = run(sides[name])
            times[name].append((time.perf_counter() - w0, time.process_time() - c0))
            samples = sorted(res["samples"]["mc_bench"], key=lambda s: s["doc_id"])
            scores[name] = [x[0][0] for s in samples for x in s["resps"]]
            n_req = len(scores[name])
            print(f"# round {r} {name}: {times[name][-1][0]:.1f} s wall, {times[name][-1][1]:.1f} s CPU",
                  file=sys.stderr, flush=True)

    def best(name, i):
        return min(t[i] for t in times[name])

    out = {"bench": "eval", "requests": n_req, "docs": args.docs, "num_fewshot": args.num_fewshot,
           "batch_size": args.batch_size,
           "threads": args.threads, "shape": "125m (12 x 768, vocab 50272), fp32, random weights",
           "load_avg": os.getloadavg(), "machine": platform.processor() or platform.machine()}
    for name in sides:
        out[name] = {"wall_s": [round(t[0], 2) for t in times[name]],
                     "cpu_s": [round(t[1], 2) for t in times[name]],
                     "req_per_wall_s": round(n_req / best(name, 0), 2),
                     "req_per_cpu_s": round(n_req / best(name, 1), 2)}
    out["speedup_wall"] = round(best("lm_eval_hf", 0) / best("opt_ray", 0), 3)
    out["speedup_cpu"] = round(best("lm_eval_hf", 1) / best("opt_ray", 1), 3)
    out["max_abs_score_diff"] = max(abs(a - b) for a, b in zip(scores["opt_ray"], scores["lm_eval_hf"]))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
