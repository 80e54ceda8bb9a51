"""Fault drills on the training gang (local Ray, CPU, gloo, tiny model).

One deterministic 2-worker run (a checkpoint every step) survives, in order: a hung rank
(its peer's collective times out and the gang restarts), a rank killed while saving the
step-4 checkpoint after the step-3 one was corrupted (the partial save is ignored, the
corrupt one skipped, step 2's used), and a SIGKILL sent from outside to a worker process
(pid from the file the worker writes). It must end bit-identical to an uninterrupted run.
A run past its failure budget must stop with a clear reason and a non-zero exit.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.integration.test_train_gang import events, final_params, make_shards, metrics, tiny_cfg

pytestmark = pytest.mark.slow
STEPS = 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("faults") / "shards")


@pytest.fixture(scope="module")
def reference(ray_local, shards, tmp_path_factory) -> Path:
    """An uninterrupted deterministic 2-worker run."""
    from actors.train import run_gang

    out = tmp_path_factory.mktemp("ref") / "run"
    run_gang(tiny_cfg(shards, out, workers=2, steps=STEPS, checkpoint_every=1), progress=False)
    return out


def test_gang_trains_and_reports(reference):
    ms = metrics(reference)
    assert [m["step"] for m in ms] == list(range(1, STEPS + 1))
    assert all(m["world_size"] == 2 for m in ms)
    kinds = [e["event"] for e in events(reference)]
    assert kinds[0] == "start" and kinds[-1] == "finish"
    assert kinds.count("checkpoint_saved") == STEPS
    start = events(reference)[0]
    assert start["versions"]["torch"] and start["hardware"]["cpus"] and start["config"]["workers"] == 2
    # Checkpoints belong to the loop alone: no Ray Train snapshot that could refer to a
    # pruned one is left in the run dir (the next invocation would refuse to start).
    assert not list(reference.rglob("checkpoint_manager_snapshot.json"))
    assert not (reference / "driver.json").exists()
    # Retention: the newest two only.
    assert sorted(p.name for p in (reference / "checkpoints").iterdir()) == [
        f"step_{STEPS - 1:08d}", f"step_{STEPS:08d}"]


def _kill_from_outside(run_dir: Path, *, after_restarts: int, at_step: int, done: threading.Event,
                       killed: list) -> None:
    """SIGKILL rank 1's process (pid from the file the worker writes) once the gang has
    restarted ``after_restarts`` times and then reached ``at_step``."""
    while not done.is_set():
        time.sleep(0.1)
        try:
            restarts = sum(e["event"] == "restart" for e in events(run_dir))
            if restarts < after_restarts:
                continue
            if max((m["step"] for m in metrics(run_dir)), default=0) < at_step:
                continue
            pid = int((run_dir / "pids" / "rank1.pid").read_text())
        except (OSError, ValueError, KeyError):
            continue
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
        return


def test_survives_every_fault_bit_identical(reference, shards, tmp_path):
    from actors.train import run_gang

    out = tmp_path / "run"
    chaos = "hang:rank=1:step=2,corrupt:step=3,killsave:rank=0:step=4"
    done, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_from_outside, args=(out,),
                              kwargs=dict(after_restarts=2, at_step=5, done=done, killed=killed))
    killer.start()
    try:
        run_gang(tiny_cfg(shards, out, workers=2, steps=STEPS, checkpoint_every=1, chaos=chaos,
                          max_failures=3, collective_timeout=10), progress=False)
    finally:
        done.set()
        killer.join()
    assert killed, "the outside SIGKILL never fired"

    # Bit for bit what the uninterrupted run computed.
    a, b = final_params(reference), final_params(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in metrics(out)] == [m["loss"] for m in metrics(reference)]

    ev = events(out)
    kinds = [e["event"] for e in ev]
    assert kinds.count("restart") == 3 and kinds.count("worker_lost") >= 3
    assert not (out / ".attempts").exists()  # the gang-start counter went with its driver
    assert [e["kind"] for e in ev if e["event"] == "chaos"] == ["hang", "corrupt", "killsave"]
    restarts = [e["step"] for e in ev if e["event"] == "restart"]
    # hang at step 2 -> from 1; killed saving 4 with 3 corrupt -> from 2; outside kill
    # at step >= 5 -> from the step before it. Work lost <= the checkpoint interval.
    assert restarts[:2] == [1, 2] and restarts[2] >= 4
    # The hang was ended by the collective timeout, not by chance.
    lost = [e for e in ev if e["event"] == "worker_lost"]
    assert "Timed out" in str(lost[0]["errors"])
    # The save killed midway left a partial directory that was removed, never loaded.
    assert "checkpoint_partial_removed" in kinds
    # The corrupted step-3 checkpoint was skipped for step 2's.
    corrupt = [e for e in ev if e["event"] == "checkpoint_corrupt"]
    assert corrupt and corrupt[0]["step"] == 3 and "sha256" in corrupt[0]["reason"]
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_failure_budget_exceeded(ray_local, shards, tmp_path, capsys):
    """--max-failures 0 and a killed worker: the command fails with the reason, exit 1."""
    from opt_ray.cli import main

    out = tmp_path / "run"
    rc = main(["train", "--preset", "tiny", "--data", str(shards), "--output", str(out),
               "--workers", "2", "--steps", "4", "--batch-tokens", "256", "--micro-batch", "2",
               "--checkpoint-every", "2", "--max-failures", "0", "--no-progress",
               "--chaos", "kill:rank=1:step=2"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "more than --max-failures 0" in err and "logbook.jsonl" in err
    budget = [e for e in events(out) if e["event"] == "failure_budget_exceeded"]
    assert len(budget) == 1 and budget[0]["max_failures"] == 0
