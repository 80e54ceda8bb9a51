"""`ctl scale` and `ctl rollback` on a run whose early checkpoints were pruned, on a real
`ray start --head` cluster (own temp dir, free ports, token auth; torn down by PID).

Both restart the training job as a new Ray job (`opt-ray train ... --workers` /
`--resume-from`): the old driver gets SIGTERM from `ray job stop` and logs its
interruption; the new one resumes from the newest valid checkpoint (scale) or rolls
back to the asked one (rollback), although `--keep 2` pruned everything older.
Before the fix, both ended FAILED on Ray Train's CheckpointManagerInitializationError.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from opt_ray.v1 import control_pb2 as pb
from tests.integration.test_control_ray import Cluster, ControlServer
from tests.integration.test_train_gang import make_shards

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def server(cluster, tmp_path_factory):
    base = tmp_path_factory.mktemp("ckpt-control")
    work = base / "work"
    work.mkdir()
    # Rows of 256 tokens: the tiny preset's 16k-token batch in 8 micro-batches (the spec
    # has no batch flag), a few seconds a step on a loaded 2-core machine.
    make_shards(work / "shards", seq_len=256)
    s = ControlServer(cluster, work, base / "state")
    s.start()
    yield s
    s.kill(signal.SIGTERM)


def _committed(run: Path) -> list[int]:
    return sorted(int(p.parent.name[5:]) for p in (run / "checkpoints").glob("step_*/manifest.json"))


def _resumes(run: Path) -> list[int]:
    """The step each attempt resumed from, as the run's logbook records it."""
    book = run / "logbook.jsonl"
    events = [json.loads(line) for line in book.read_text().splitlines() if line.strip()] if book.exists() else []
    return [e["step"] for e in events if e.get("event") == "resume"]


def _wait_for(cond, what: str, c, job_id: str, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"timed out waiting for {what}"
        state = c.get(job_id).state
        assert state in (pb.PENDING, pb.RUNNING), (what, c.get(job_id))
        time.sleep(0.3)


@pytest.mark.timeout(1200)  # three Ray jobs of 4k-token steps; minutes on a loaded 2-core VM
def test_scale_then_rollback_a_pruned_run(server):
    work = server.work
    run = work / "run"
    steps = 16
    with server.client() as c:
        job = c.submit(pb.JobSpec(train=pb.TrainSpec(
            preset="tiny", data=str(work / "shards"), output=str(run), min_workers=1,
            max_workers=1, steps=steps, checkpoint_every=2, batch_tokens=4096)))
        # Scale once --keep 2 has pruned the first checkpoints.
        _wait_for(lambda: _committed(run) and _committed(run)[0] >= 4, "pruned checkpoints", c,
                  job.job_id)
        before_scale = _committed(run)[-1]
        resumes_before = len(_resumes(run))
        scaled = c.scale(job.job_id, 1, 2)
        assert "--workers 1:2" in scaled.attempts[-1].entrypoint
        # Roll back once the scaled attempt has committed past where it resumed. (Not past
        # the newest checkpoint at the scale: the stopped gang may still commit one more
        # while its driver exits, and the new attempt is then only starting.)
        _wait_for(lambda: len(_resumes(run)) > resumes_before, "the scaled attempt's resume", c,
                  job.job_id)
        resumed_at = _resumes(run)[-1]
        _wait_for(lambda: _committed(run)[-1] >= resumed_at + 2, "training after the scale", c,
                  job.job_id)
        target = _committed(run)[-1]
        rolled = c.rollback(job.job_id, target)
        assert f"--resume-from {target}" in rolled.attempts[-1].entrypoint
        final = c.wait(job.job_id, timeout=600)
        events = [json.loads(e) for e in c.logbook(job_id=job.job_id).events]
    assert final.state == pb.SUCCEEDED, (final, server.logs()[-3000:])
    assert [a.state for a in final.attempts][:2] == [pb.STOPPED, pb.STOPPED]
    kinds = [e["event"] for e in events]
    assert "job_scaled" in kinds and "job_rolled_back" in kinds, kinds
    # Each stopped driver logged its interruption and the command that resumes.
    intr = [e for e in events if e["event"] == "interrupted"]
    assert len(intr) == 2 and all("SIGTERM" in e["reason"] for e in intr), intr
    assert all(e["resume"].startswith("opt-ray train") and "--resume-from" not in e["resume"]
               for e in intr)
    resumed = [e for e in events if e["event"] == "resume"]
    assert resumed[0]["step"] >= before_scale
    # The scaled gang resumes from the very checkpoint the interruption named: the stopped
    # gang was gone before the driver logged it (no commit slipped in after).
    after = events[events.index(intr[0]) + 1:]
    assert [e for e in after if e["event"] == "resume"][0]["step"] == intr[0]["step"], intr[0]
    rb = [e for e in events if e["event"] == "rollback" and e.get("requested")]
    assert rb and rb[-1]["to_step"] == target
    metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert _committed(run)[-1] == steps
