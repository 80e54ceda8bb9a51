"""Dedup survives failures: a worker killed with SIGKILL mid-run (Ray retries its task)
and a driver killed mid-run (the command run again resumes from the completed splits);
either way the output equals an uninterrupted run's."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "unit"))
from test_dedup_lib import write_jsonl  # noqa: E402

from opt_ray.data.dedup import DedupConfig, run_dedup, work_dir

ROOT = Path(__file__).parents[2]


def corpus(tmp_path: Path, files: int = 6, per_file: int = 300) -> list[str]:
    rng = random.Random(3)
    vocab = [f"v{i}" for i in range(5000)]
    docs: list[dict] = []
    for i in range(files * per_file):
        if docs and rng.random() < 0.3:
            words = rng.choice(docs)["text"].split()
            words[rng.randrange(len(words))] = rng.choice(vocab)   # a near-duplicate
        else:
            words = rng.choices(vocab, k=rng.randint(80, 200))
        docs.append({"text": " ".join(words), "i": i})
    paths = []
    for k in range(files):
        write_jsonl(tmp_path / f"in-{k}.jsonl", docs[k * per_file:(k + 1) * per_file])
        paths.append(str(tmp_path / f"in-{k}.jsonl"))
    return paths


def output_of(path: Path) -> tuple:
    report = json.loads((path / "dedup_report.json").read_text())
    rows = pq.read_table(sorted(path.glob("part-*.parquet"))).to_pylist()
    clusters = pq.read_table(path / "clusters.parquet").to_pylist()
    return report["counts"], report["clusters"], rows, clusters


@pytest.mark.slow
def test_killed_worker_task_is_retried_and_output_identical(ray_local, tmp_path):
    from actors.dedup import RayExecutor
    inputs = corpus(tmp_path)
    cfg = DedupConfig(threshold=0.85, batch_docs=40, num_buckets=2)
    clean = run_dedup(inputs, str(tmp_path / "clean"), cfg)
    assert clean["counts"]["duplicates_removed"] > 100

    sign = work_dir(tmp_path / "killed") / "sign"
    killed: list[int] = []

    def kill_once(phase: str, n_done: int) -> None:
        # A split that is signing now: its worker dies mid-task.
        if killed or phase != "sign":
            return
        for running in sorted(sign.glob("*.running")):
            if not (sign / running.name[:-len(".running")]).exists():
                pid = json.loads(running.read_text())["pid"]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return

    run_dedup(inputs, str(tmp_path / "killed"), cfg, RayExecutor(2), on_progress=kill_once)
    assert killed
    assert output_of(tmp_path / "killed") == output_of(tmp_path / "clean")


def test_killed_driver_resumes_with_identical_output(tmp_path):
    inputs = corpus(tmp_path, files=8)
    clean = run_dedup(inputs, str(tmp_path / "clean"), DedupConfig(threshold=0.85))
    cmd = [sys.executable, "-c", "import sys; from opt_ray.cli import main; sys.exit(main())",
           "dedup", *inputs, "--output", str(tmp_path / "out"), "--threshold", "0.85",
           "--workers", "0", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    marker = work_dir(tmp_path / "out") / "sign" / "s00002" / "done.json"
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, proc.stderr.read()     # still running: kill it mid-run
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "out").exists()
    done_before = len(list((work_dir(tmp_path / "out") / "sign").glob("s*/done.json")))
    assert 3 <= done_before < 8

    rerun = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    report = json.loads((tmp_path / "out" / "dedup_report.json").read_text())
    assert report["resumed"] is True
    steps = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert {"phase": "sign", "reused": done_before} in steps
    assert output_of(tmp_path / "out") == output_of(tmp_path / "clean")
    assert clean["counts"] == report["counts"]
    assert not work_dir(tmp_path / "out").exists()
