"""Issue 12.4: every embedded Ray, and every control server's jobs, stay on their own
cluster while another Ray runs on the same machine.

The other Ray: ``ray start --head`` with its own temp dir and free ports, started and
stopped by this module (its session's processes only; never ``ray stop``). While it
runs, an embedded-cluster command (``opt-ray dedup``) and a dedup job submitted through
an embedded control server (``opt-ray control`` without ``--address``) give the same
kept documents as the library run in-process without Ray, and the job's driver is on the
control server's cluster: that cluster's job list has its driver, the other cluster has
no job at all. Before the pin, Ray's job supervisor auto-detected the address it gives a
job's driver among every GCS on the machine ("multiple active Ray instances").
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from opt_ray.v1 import control_pb2 as pb
from tests.conftest import free_port
from tests.integration.test_control_ray import OPT_RAY, VENV_BIN, Cluster

pytestmark = pytest.mark.slow


def _texts(out: Path) -> list[str]:
    import pyarrow.parquet as pq
    return sorted(t for f in sorted(out.glob("part-*.parquet")) for t in pq.read_table(f)["text"].to_pylist())


def _env() -> dict[str, str]:
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    return env


def _ray_headers() -> dict[str, str] | None:
    token = Path.home() / ".ray" / "auth_token"
    return {"Authorization": f"Bearer {token.read_text().strip()}"} if token.exists() else None


@pytest.fixture(scope="module")
def other_ray():
    c = Cluster()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    from opt_ray.data.dedup import DedupConfig, run_dedup
    work = tmp_path_factory.mktemp("pin")
    docs = [f"note {i} on subject {i % 5}: " + " ".join(f"t{i % 11}_{j}" for j in range(40))
            for i in range(60)]
    docs += docs[:6]
    (work / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    run_dedup([str(work / "corpus.jsonl")], str(work / "reference"), DedupConfig())
    return work, _texts(work / "reference")


def test_embedded_command_ignores_another_ray(other_ray, corpus):
    work, reference = corpus
    r = subprocess.run([OPT_RAY, "dedup", str(work / "corpus.jsonl"), "--output", str(work / "cli"),
                        "--workers", "1", "--buckets", "1", "--num-cpus", "2", "--no-progress"],
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _texts(work / "cli") == reference and len(reference) == 60
    assert "multiple active Ray instances" not in r.stdout + r.stderr


def test_ray_internals_find_their_own_cluster_without_an_address(other_ray, ray_local):
    """Ray's own actors look their cluster up without an address (Ray Train's
    placement-group cleaner calls the state API); in a pinned cluster that lookup is the
    cluster itself, not "multiple active Ray instances"."""
    from ray._private.services import canonicalize_bootstrap_address_or_die

    @ray_local.remote
    def lookup() -> str:
        return canonicalize_bootstrap_address_or_die(None)

    own = ray_local.get_runtime_context().gcs_address
    assert ray_local.get(lookup.remote()) == own != other_ray.address


def test_control_server_jobs_run_on_its_own_cluster(other_ray, corpus):
    from ray.job_submission import JobSubmissionClient

    from opt_ray.control.client import ControlClient
    work, reference = corpus
    token_file = work / "token"
    token_file.write_text("pinning-test-token-0123456789")
    port = free_port()
    log = open(work / "control.log", "w")
    proc = subprocess.Popen(
        [OPT_RAY, "control", "--port", str(port), "--dashboard-port", str(free_port()),
         "--num-cpus", "2", "--token-file", str(token_file), "--state-dir", str(work / "state"),
         "--allowed-root", str(work), "--poll-interval", "0.5"],
        env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        client = ControlClient(f"127.0.0.1:{port}", token_file.read_text(), timeout=30)
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, (work / "control.log").read_text()
            try:
                client.health()
                break
            except Exception:
                assert time.time() < deadline, (work / "control.log").read_text()
                time.sleep(0.5)
        job = client.submit(pb.JobSpec(dedup=pb.DedupSpec(
            inputs=[str(work / "corpus.jsonl")], output=str(work / "job"), workers=1)))
        final = client.wait(job.job_id, timeout=300)
        assert final.state == pb.SUCCEEDED, (final, (work / "control.log").read_text())
        assert _texts(work / "job") == reference
        dash = re.search(r"Ray dashboard (\S+);", (work / "control.log").read_text()).group(1)
        sid = final.attempts[-1].ray_submission_id
        own = JobSubmissionClient(dash, headers=_ray_headers())
        drivers = [j for j in own.list_jobs() if j.submission_id == sid]
        assert drivers and drivers[0].driver_info is not None, "the job's driver joined its own cluster"
        other = JobSubmissionClient(other_ray.dashboard,
                                    headers={"Authorization": f"Bearer {other_ray.ray_token}"})
        assert other.list_jobs() == [], "nothing ran on the other cluster"
        assert "multiple active Ray instances" not in own.get_job_logs(sid)
        client.close()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        log.close()
