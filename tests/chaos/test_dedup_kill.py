"""A dedup worker (or bucket actor) killed with SIGKILL mid-run: the run completes and
its output is identical to a clean run."""

from __future__ import annotations

import json
import os
import random
import signal
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "unit"))
from test_dedup_lib import write_jsonl  # noqa: E402

from opt_ray.data.dedup import DedupConfig, LocalBackend, run_dedup


def corpus(n: int = 2400) -> list[dict]:
    rng = random.Random(3)
    vocab = [f"v{i}" for i in range(5000)]
    docs = []
    for i in range(n):
        if docs and rng.random() < 0.3:
            words = rng.choice(docs)["text"].split()
            words[rng.randrange(len(words))] = rng.choice(vocab)   # a near-duplicate
        else:
            words = rng.choices(vocab, k=rng.randint(80, 200))
        docs.append({"text": " ".join(words), "i": i})
    return docs


def output_of(path: Path) -> tuple:
    report = json.loads((path / "dedup_report.json").read_text())
    rows = pq.read_table(sorted(path.glob("part-*.parquet"))).to_pylist()
    return report["counts"], report["clusters"], rows


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["worker", "bucket"])
def test_killed_actor_is_retried_and_output_identical(ray_local, tmp_path, victim):
    import ray

    from actors.dedup import RayBackend
    write_jsonl(tmp_path / "in.jsonl", corpus())
    cfg = DedupConfig(threshold=0.85, batch_docs=40, num_buckets=2)
    clean = run_dedup([str(tmp_path / "in.jsonl")], str(tmp_path / "clean"), cfg,
                      LocalBackend(cfg))
    assert clean["counts"]["duplicates_removed"] > 100

    backend = RayBackend(cfg, num_workers=2)
    actor = backend.workers[0] if victim == "worker" else backend.buckets[0]
    pid = ray.get(actor.pid.remote())
    killed = []

    def kill_once(n_done: int) -> None:
        # After the first batch, so that the victim has work in flight (or state).
        if not killed and n_done >= (1 if victim == "worker" else 10):
            os.kill(pid, signal.SIGKILL)
            killed.append(n_done)

    try:
        run_dedup([str(tmp_path / "in.jsonl")], str(tmp_path / "killed"), cfg, backend,
                  on_batch=kill_once)
        new_pid = ray.get(actor.pid.remote())
    finally:
        backend.close()
    assert killed and new_pid != pid          # it really died and was restarted
    # A restarted bucket actor comes back empty; the driver must have re-filled it.
    assert backend.repairs == (1 if victim == "bucket" else 0)
    assert output_of(tmp_path / "killed") == output_of(tmp_path / "clean")
