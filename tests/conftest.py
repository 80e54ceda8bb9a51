"""Shared fixtures. Tests that start Ray use ``ray_local`` (one local cluster for the
session, shut down at the end) and are marked ``slow``; GPU tests skip without CUDA."""

from __future__ import annotations

import os
import socket

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller polls its workers every 2 s and advances its state machine one
# poll at a time: a gang start, a failure and a finish each wait a few polls. Every Ray the
# suite starts (in process, `ray start`, the CLI's embedded one) inherits this: a tiny
# 2-worker run with one restart took 54 s instead of 63 s. Users keep Ray's default.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Ray Train also starts a PreemptionWatcher actor (one more Ray worker process, ~2 s of a
# core) on every gang start and restart; no test preempts a node. Users keep it.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# The node's fetch cache (exports fetched, runs built for serving and eval) of every process
# the suite starts, Ray workers included: one of the session's, not the user's ~/.cache.
if "OPT_RAY_FETCH_DIR" not in os.environ:
    import tempfile
    os.environ["OPT_RAY_FETCH_DIR"] = tempfile.mkdtemp(prefix="opt-ray-test-fetched-")


def committed_steps(run) -> list[int]:
    """The steps of a run directory's complete checkpoints (those with a manifest), read
    straight off the filesystem."""
    from pathlib import Path
    return sorted(int(p.parent.name[5:]) for p in (Path(run) / "checkpoints").glob("step_*/manifest.json"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray cluster for the whole session. Logical CPUs exceed the 2 real cores so
    that a handful of small actors can be scheduled at once."""
    import ray
    from opt_ray.ray_util import start_local_ray
    if not ray.is_initialized():
        # Pinned to itself (opt_ray.ray_util.start_local_ray): another Ray on the machine
        # changes nothing in the suite.
        start_local_ray(num_cpus=4, include_dashboard=False, log_to_driver=False,
                        _system_config={"metrics_report_interval_ms": 1000})
    yield ray
    ray.shutdown()


def pytest_collection_modifyitems(config, items):
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture
def no_ray(monkeypatch):
    """Starting Ray at all means a check came too late."""
    import opt_ray.commands.serve as cmd

    def tripwire(*a, **kw):
        raise AssertionError("Ray was started before the input was checked")
    monkeypatch.setattr(cmd, "init_ray", tripwire)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
