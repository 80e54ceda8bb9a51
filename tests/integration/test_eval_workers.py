"""`opt-ray eval --workers 2`: requests split across two Ray actors give the same
per-request scores, metrics and generations as one process. Scores agree to float
rounding, not bit for bit: a request batched with other neighbours is padded to another
length, and the matmuls then sum in another order (~1e-6)."""

from __future__ import annotations

import pytest

pytest.importorskip("lm_eval")

from tests.eval_helpers import TEXTS, build_hf_checkpoint, mc_rows, write_mc_task, write_rolling_task  # noqa: E402


@pytest.mark.slow
def test_two_workers_equal_one(ray_local, tmp_path):
    from lm_eval.api.instance import Instance

    from opt_ray.commands.eval import evaluate_tasks
    from opt_ray.eval.lm import OptLM

    ckpt = build_hf_checkpoint(tmp_path / "ckpt", max_positions=32)
    write_mc_task(tmp_path / "tasks", "mc_workers", mc_rows(8))
    write_rolling_task(tmp_path / "tasks", "rolling_workers", [" ".join(TEXTS[i:] + TEXTS[:i]) for i in range(3)])
    names = ["mc_workers", "rolling_workers"]
    runs = [evaluate_tasks(ckpt, tasks=names, include_path=str(tmp_path / "tasks"), workers=w,
                           batch_size=2, log_samples=True) for w in (1, 2)]
    for task in names:
        one, two = ([[x[0] for x in s["resps"]] for s in sorted(r["samples"][task], key=lambda s: s["doc_id"])]
                    for r in runs)
        assert len(one) == len(two) > 0
        for a, b in zip(one, two):   # per document, per request, in order
            flat_a = [v for x in a for v in (x if isinstance(x, (list, tuple)) else [x])]
            flat_b = [v for x in b for v in (x if isinstance(x, (list, tuple)) else [x])]
            assert flat_b == pytest.approx(flat_a, abs=1e-5, rel=0)
        metrics = {k: v for k, v in runs[0]["results"][task].items() if isinstance(v, float)}
        assert metrics and {k: runs[1]["results"][task][k] for k in metrics} == pytest.approx(metrics, rel=1e-6)

    reqs = [Instance(request_type="generate_until", doc={}, idx=0,
                     arguments=(p, {"until": ["."], "max_gen_toks": 6}))
            for p in ("The quick brown", "Paris is", "Ray runs actors")]
    local = OptLM.from_checkpoint(ckpt, batch_size=2).generate_until(reqs, disable_tqdm=True)
    pooled = OptLM.from_checkpoint(ckpt, batch_size=2, workers=2).generate_until(reqs, disable_tqdm=True)
    assert pooled == local
