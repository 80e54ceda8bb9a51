"""Job-level recovery through the CLI, as a user runs it (local Ray, CPU, tiny model).

- The driver of a `--deterministic` run is SIGKILLed after `--keep 2` has pruned its early
  checkpoints; the same command run again resumes from the newest valid checkpoint, logs
  the interruption, and ends bit-identical to an uninterrupted run.
- A finished run gets more `--steps`; then `--resume-from` rolls that pruned run back to
  a kept checkpoint and replays the same step bit for bit.
- A user error inside a worker (a crafted checkpoint that must not be unpickled) stops
  the gang at once: exit 2, one line, no restart, and the payload never runs.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import committed_steps
from tests.integration.test_train_gang import events, final_params, make_shards, metrics

pytestmark = pytest.mark.slow
OPT_RAY = str(Path(sys.executable).parent / "opt-ray")


def _args(shards: Path, out: Path, steps: int) -> list[str]:
    return ["train", "--preset", "tiny", "--data", str(shards), "--output", str(out),
            "--steps", str(steps), "--batch-tokens", "256", "--micro-batch", "2",
            "--checkpoint-every", "1", "--keep", "2", "--deterministic", "--lr", "2e-3",
            "--warmup-steps", "1", "--no-guard", "--no-progress", "--collective-timeout", "60"]


def _session_pids(sid: int) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[3]) == sid:  # field 6: the session id
            pids.append(int(d.name))
    return pids


def _kill_session(sid: int) -> None:
    """SIGKILL every process left in the session the test started (the killed driver's
    embedded Ray: raylet, GCS, workers); by PID, nothing else on the machine."""
    deadline = time.time() + 20
    while (pids := _session_pids(sid)) and time.time() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.3)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("resume") / "shards")


@pytest.fixture(scope="module")
def reference(ray_local, shards, tmp_path_factory) -> Path:
    """An uninterrupted 6-step run through the CLI."""
    from opt_ray.cli import main

    out = tmp_path_factory.mktemp("resume-ref") / "run"
    assert main(_args(shards, out, 6)) == 0
    return out


def test_killed_driver_then_same_command_resumes_bit_identical(reference, shards, tmp_path):
    from opt_ray.cli import main

    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "driver.log", "w")
    proc = subprocess.Popen([OPT_RAY, *_args(shards, out, 6), "--num-cpus", "2"], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while True:
            assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.time() < deadline, "the run never reached step 3"
            if committed_steps(out) and max(committed_steps(out)) >= 3:
                break
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)  # the driver, by PID
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        _kill_session(proc.pid)
        log.close()
    kept = committed_steps(out)
    assert 1 not in kept and (out / "driver.json").exists()  # pruned by --keep 2
    newest = max(kept)

    # The same command again.
    assert main(_args(shards, out, 6)) == 0
    a, b = final_params(reference), final_params(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in metrics(out)] == [m["loss"] for m in metrics(reference)]
    ev = events(out)
    intr = [e for e in ev if e["event"] == "interrupted"]
    assert len(intr) == 1 and intr[0]["step"] == newest and "killed" in intr[0]["reason"]
    assert intr[0]["resume"].startswith("opt-ray train") and str(out) in intr[0]["resume"]
    resumed = [e for e in ev if e["event"] == "resume"]
    assert resumed and resumed[-1]["step"] == newest
    assert not (out / "driver.json").exists()


def test_more_steps_then_resume_from_on_a_pruned_run(reference, shards, tmp_path, capsys):
    from opt_ray.cli import main

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    # A finished run, more steps: continues from step 6.
    assert main(_args(shards, out, 8)) == 0
    assert [m["step"] for m in metrics(out)] == list(range(1, 9))
    assert [e for e in events(out) if e["event"] == "resume"][-1]["step"] == 6
    step8 = final_params(out)
    # --resume-from on a run whose checkpoints 1-6 were pruned: back to 7, replay 8.
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == [
        "step_00000007", "step_00000008"]
    assert main([*_args(shards, out, 8), "--resume-from", "7"]) == 0
    again = final_params(out)
    assert all(torch.equal(step8[k], again[k]) for k in step8)
    assert [p.name.split("-")[0] for p in (out / "abandoned").iterdir()] == ["step_00000008"]
    rb = [e for e in events(out) if e["event"] == "rollback"]
    assert rb[-1]["to_step"] == 7 and rb[-1]["moved_aside"] == [8]
    assert [m["step"] for m in metrics(out)] == list(range(1, 9))


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_user_error_in_a_worker_is_not_retried(reference, shards, tmp_path, capsys):
    """Resuming a crafted run directory: every worker refuses the checkpoint (a UserError);
    the gang stops at once (no restart although --max-failures 3), exit 2, one line."""
    from opt_ray.artifacts import sha256_file
    from opt_ray.cli import main

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    marker = tmp_path / "PWNED"
    ckpt = out / "checkpoints" / "step_00000006"
    (ckpt / "tp0" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["tp0/.metadata"] = {"sha256": sha256_file(ckpt / "tp0" / ".metadata"),
                                          "bytes": (ckpt / "tp0" / ".metadata").stat().st_size}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    t0 = time.time()
    rc = main([*_args(shards, out, 8), "--max-failures", "3"])
    err = capsys.readouterr().err
    assert rc == 2, err
    line = [l for l in err.splitlines() if l.startswith("opt-ray train: error:")]
    assert len(line) == 1 and "refusing to load" in line[0] and "Traceback" not in line[0]
    assert not marker.exists()
    ev = events(out)
    assert not [e for e in ev if e["event"] in ("restart", "worker_lost", "failure_budget_exceeded")]
    assert [e for e in ev if e["event"] == "failure"][-1]["reason"].startswith("stopped without a retry")
    print(f"user error reported after {time.time() - t0:.1f} s")
