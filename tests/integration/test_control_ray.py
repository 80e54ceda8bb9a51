"""The control plane against a real local Ray cluster started by this module.

The cluster: ``ray start --head`` on 127.0.0.1 with its own free ports and its own
``--temp-dir``, in a new session, with Ray's token authentication on. It is NOT stopped
with ``ray stop`` (that kills every Ray on the machine, including other people's): the
fixture kills only the processes of its session and those whose command line names its
temp dir, TERM then KILL.

What it shows: a pipeline submitted through the gRPC client runs as Ray jobs, is watched
to completion and has a logbook; the control server is killed (-9) while the pipeline
runs and a restarted server still lists it, watches it and submits its next stage; a
training run scaled and then rolled back after ``--keep`` pruned its first checkpoints;
the same stage runs with ``ray job submit -- opt-ray ...``; auth and spec errors on the
real server; ``opt_ray_`` metrics on the node's metrics export endpoint.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from opt_ray.control.client import ControlClient
from opt_ray.v1 import control_pb2 as pb
from tests.conftest import committed_steps, free_port

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
OPT_RAY = str(VENV_BIN / "opt-ray")


def _stage_available(name: str) -> bool:
    """A stage has landed when its CLI takes --output (the stubs take nothing)."""
    out = subprocess.run([OPT_RAY, *name.split(), "--help"], capture_output=True, text=True)
    return out.returncode == 0 and "--output" in out.stdout


def _session_pids(sid: int, marker: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        # Field 6 of /proc/PID/stat is the session id (after the ")" that ends comm).
        session = int(stat.rsplit(")", 1)[1].split()[3])
        if session == sid or marker in cmd:
            pids.append(int(d.name))
    return pids


def _kill_tree(sid: int, marker: str) -> None:
    # A throwaway test cluster: 3 s for TERM (the raylet and GCS exit at once; idle
    # workers linger for 10 s and more), then KILL and up to 10 s to see every one gone.
    for sig, grace in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
        pids = _session_pids(sid, marker)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace
        while pids and time.time() < deadline and _session_pids(sid, marker):
            time.sleep(0.2)


def _node_ports() -> list[str]:
    """Every fixed default port of a node, free ones instead: other people's clusters on
    this machine hold the defaults (52365 for the dashboard agent, ...), and an agent that
    cannot bind leaves the job server with "No available agent"."""
    return [arg for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                             "--runtime-env-agent-port", "--node-manager-port",
                             "--object-manager-port")
            for arg in (flag, str(free_port()))]


class Cluster:
    def __init__(self, *, num_cpus: int = 2, node_env: dict[str, str] | None = None):
        """``node_env``: environment of the head node's own processes (its raylet and
        workers), on top of the cluster's."""
        # Ray's unix socket paths must stay short: a temp dir under /tmp, not tmp_path.
        self.temp_dir = tempfile.mkdtemp(prefix="ort-ctl-", dir="/tmp")
        self.gcs_port, self.dash_port, self.metrics_port = free_port(), free_port(), free_port()
        self.ray_token = secrets.token_hex(16)
        self.env = {**os.environ,
                    "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    # Ray's own token authentication on, to show the control plane works
                    # with it: processes that share this environment carry the token.
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.ray_token,
                    "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
        self.env.pop("RAY_ADDRESS")
        cmd = [RAY, "start", "--head", "--node-ip-address", "127.0.0.1",
               "--port", str(self.gcs_port), "--dashboard-port", str(self.dash_port),
               "--dashboard-host", "127.0.0.1", "--include-dashboard", "true",
               "--num-cpus", str(num_cpus), "--temp-dir", self.temp_dir,
               "--metrics-export-port", str(self.metrics_port), *_node_ports(),
               "--ray-client-server-port", str(free_port()),
               "--system-config", json.dumps({"metrics_report_interval_ms": 1000}),
               "--disable-usage-stats"]
        # A new session: every daemon `ray start` leaves behind keeps this session id,
        # which is how teardown finds exactly this cluster's processes.
        self.sids: list[int] = []
        self._start(cmd, {**self.env, **(node_env or {})})
        self.sid = self.sids[0]
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dash_port}"

    def _start(self, cmd: list[str], env: dict[str, str]) -> None:
        p = subprocess.Popen(cmd, env=env, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.sids.append(p.pid)
        out, _ = p.communicate(timeout=180)
        if p.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed:\n{out}")

    def add_node(self, *, num_cpus: int = 1, node_env: dict[str, str] | None = None) -> None:
        """Another node on this machine (its own raylet, ports and environment), in its
        own session, stopped with the head by ``stop``."""
        self._start([RAY, "start", "--address", f"127.0.0.1:{self.gcs_port}",
                     "--node-ip-address", "127.0.0.1", "--num-cpus", str(num_cpus),
                     "--temp-dir", self.temp_dir,
                     "--metrics-export-port", str(free_port()), *_node_ports(),
                     "--disable-usage-stats"], {**self.env, **(node_env or {})})

    def stop(self) -> None:
        for sid in reversed(self.sids):
            _kill_tree(sid, self.temp_dir)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


class ControlServer:
    def __init__(self, cluster: Cluster, work: Path, state: Path):
        self.cluster, self.work, self.state = cluster, work, state
        self.token = secrets.token_urlsafe(24)
        self.token_file = work.parent / "control.token"
        self.token_file.write_text(self.token)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.log = open(self.work.parent / "control.log", "a")
        self.proc = subprocess.Popen(
            [OPT_RAY, "control", "--address", self.cluster.address, "--port", str(self.port),
             "--token-file", str(self.token_file), "--state-dir", str(self.state),
             "--allowed-root", str(self.work), "--poll-interval", "0.5"],
            env=self.cluster.env, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.proc.poll() is None, self.logs()
            try:
                with self.client() as c:
                    c.health()
                return
            except grpc.RpcError:
                time.sleep(0.5)
        raise AssertionError("control server did not come up:\n" + self.logs())

    def logs(self) -> str:
        return (self.work.parent / "control.log").read_text()

    def kill(self, sig=signal.SIGKILL) -> None:
        """Signal the server's process group; KILL if it has not exited in 20 s (a
        loaded machine can make Ray's shutdown slow)."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(20)
        self.log.close()

    def client(self, token: str | None = None) -> ControlClient:
        return ControlClient(f"127.0.0.1:{self.port}", token or self.token, timeout=30)


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    base = tmp_path_factory.mktemp("control")
    work = base / "work"
    work.mkdir()
    docs = [f"document {i} about topic {i % 7}: " + " ".join(f"w{i % 13}_{j}" for j in range(80))
            for i in range(150)]
    docs += docs[:10]  # exact duplicates for dedup to drop
    (work / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return work


@pytest.fixture(scope="module")
def server(cluster, work):
    s = ControlServer(cluster, work, work.parent / "state")
    s.start()
    yield s
    s.kill(signal.SIGTERM)


def _pipeline(work: Path) -> pb.JobSpec:
    """dedup -> tokenizer -> tokenize, with the stages that have landed (at least two)."""
    stages, corpus = [], str(work / "corpus.jsonl")
    if _stage_available("dedup"):
        stages.append(pb.StageSpec(dedup=pb.DedupSpec(inputs=[corpus], output=str(work / "p-dedup"),
                                                      workers=1)))
        corpus = str(work / "p-dedup")
    if _stage_available("tokenizer train") and _stage_available("tokenize"):
        stages += [
            pb.StageSpec(tokenizer=pb.TokenizerSpec(corpus=corpus, vocab_size=300,
                                                    output=str(work / "p-tok"))),
            pb.StageSpec(tokenize=pb.TokenizeSpec(input=corpus, tokenizer=str(work / "p-tok"),
                                                  seq_len=32, output=str(work / "p-shards"),
                                                  workers=1))]
    if len(stages) < 2:
        pytest.fail("fewer than two pipeline stages have landed; nothing real to chain")
    return pb.JobSpec(name="integration pipeline", pipeline=pb.PipelineSpec(stages=stages))


def test_pipeline_survives_a_control_server_restart_and_is_watched_to_the_end(server, work):
    with server.client() as c:
        job = c.submit(_pipeline(work))
        # Kill the control server (-9: no cleanup) while the first stage is a Ray job.
        deadline = time.time() + 120
        while c.get(job.job_id).state == pb.PENDING and time.time() < deadline:
            time.sleep(0.2)
        assert c.get(job.job_id).state == pb.RUNNING
    server.kill()
    server.start()
    with server.client() as c:
        assert job.job_id in [j.job_id for j in c.list()]
        events = list(c.watch(job.job_id, timeout=240))
        final = c.get(job.job_id)
    assert final.state == pb.SUCCEEDED, (final, server.logs())
    assert len(final.attempts) == final.stage_count >= 2, "the restarted server ran the next stage"
    statuses = [e.status for e in events if e.WhichOneof("event") == "status"]
    assert statuses[-1].state == pb.SUCCEEDED
    logs = "".join(e.log for e in events)
    assert logs, "the Ray job logs were streamed"
    for plan in final.plan:
        argv = list(plan.argv)
        out = argv[argv.index("--output") + 1]
        assert (Path(out) / "manifest.json").exists(), f"{plan.kind} wrote no artifact"
    with server.client() as c:
        lb = c.logbook(job_id=job.job_id)
    kinds = [json.loads(e)["event"] for e in lb.events]
    assert kinds[0] == "job_submitted" and kinds[-1] == "job_finished"
    assert kinds.count("stage_submitted") == final.stage_count


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
def test_scale_then_rollback_a_pruned_run(server, work):
    """`ctl scale` and `ctl rollback` on a real run whose early checkpoints were pruned.

    Both restart the training job as a new Ray job (`opt-ray train ... --workers` /
    `--resume-from`): the old driver gets SIGTERM from `ray job stop` and logs its
    interruption; the new one resumes from the newest valid checkpoint (scale) or rolls
    back to the asked one (rollback), although `--keep 2` pruned everything older.
    (Before a fix, both ended FAILED on Ray Train's CheckpointManagerInitializationError.)
    Watching the finished job replays both attempts' logs and the run's metrics."""
    from tests.integration.test_train_gang import make_shards

    # Rows of 256 tokens: 4k-token steps of a few seconds on a loaded 2-core machine,
    # room for the scale and the rollback to land before the run ends.
    shards = make_shards(work / "ckpt-shards", seq_len=256)
    run = work / "ckpt-run"
    # 32 steps, so that the run cannot finish before the rollback lands; milestones every
    # 4 steps, so that the target is still there when the request arrives (the newest
    # checkpoint may be pruned by then; the rollback pins its target, which must exist).
    steps = 32
    with server.client() as c:
        job = c.submit(pb.JobSpec(train=pb.TrainSpec(
            preset="tiny", data=str(shards), output=str(run), min_workers=1,
            max_workers=1, steps=steps, checkpoint_every=2, batch_tokens=4096,
            milestone_every=4)))
        # Scale once --keep 2 has pruned the first checkpoints.
        _wait_for(lambda: committed_steps(run) and committed_steps(run)[0] >= 4, "pruned checkpoints", c,
                  job.job_id)
        before_scale = committed_steps(run)[-1]
        resumes_before = len(_resumes(run))
        scaled = c.scale(job.job_id, 1, 2)
        assert scaled.attempts[0].state == pb.STOPPED
        assert "--workers 1:2" in scaled.attempts[-1].entrypoint
        # Roll back once the scaled attempt has committed past where it resumed. (Not past
        # the newest checkpoint at the scale: the stopped gang may still commit one more
        # while its driver exits, and the new attempt is then only starting.)
        _wait_for(lambda: len(_resumes(run)) > resumes_before, "the scaled attempt's resume", c,
                  job.job_id)
        resumed_at = _resumes(run)[-1]
        def milestones_after() -> list[int]:
            return [s for s in committed_steps(run) if s % 4 == 0 and s >= resumed_at + 2]

        _wait_for(milestones_after, "training after the scale", c, job.job_id)
        target = milestones_after()[0]
        # As the OPT team intervened by hand: back, with a lower peak LR and a tighter clip.
        rolled = c.rollback(job.job_id, target, peak_lr=1e-5, grad_clip=0.3)
        assert f"--resume-from {target}" in rolled.attempts[-1].entrypoint
        assert "--lr 1e-05" in rolled.attempts[-1].entrypoint
        final = c.wait(job.job_id, timeout=600)
        events = [json.loads(e) for e in c.logbook(job_id=job.job_id).events]
        # Watching a finished job replays it: every attempt's logs, the run's metrics.
        replay = list(c.watch(job.job_id, timeout=60))
    assert final.state == pb.SUCCEEDED, (final, server.logs()[-3000:])
    assert [a.state for a in final.attempts][:2] == [pb.STOPPED, pb.STOPPED]
    # The spec's batch reached the trainer: 4096 tokens per step whatever the workers.
    assert "--batch-tokens 4096" in final.attempts[-1].entrypoint
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
    # tiny's schedule (peak 1e-3, one warmup step, linear decay to a tenth by the last
    # step) never goes below 1e-4; from the rollback on, the peak is 1e-5.
    assert all(m["lr"] >= 1e-4 for m in metrics[:target])
    assert all(0 < m["lr"] <= 1e-5 for m in metrics[target:]), [m["lr"] for m in metrics]
    assert resumed[-1]["config"]["optim"]["grad_clip"] == 0.3
    assert committed_steps(run)[-1] == steps
    streamed = [json.loads(e.metrics_line) for e in replay if e.metrics_line]
    assert [m["step"] for m in streamed] == list(range(1, steps + 1)) and "loss" in streamed[-1]
    assert "".join(e.log for e in replay).count("Running entrypoint") >= 3


def test_the_same_stage_runs_with_ray_job_submit(cluster, work):
    out = work / "cli-stage"
    # The first stage that has landed, exactly as the control plane would submit it.
    stage = (["dedup", str(work / "corpus.jsonl"), "--output", str(out), "--workers", "1"]
             if _stage_available("dedup") else
             ["tokenizer", "train", str(work / "corpus.jsonl"), "--vocab-size", "300",
              "--output", str(out)])
    r = subprocess.run([RAY, "job", "submit", "--address", cluster.dashboard, "--",
                        "opt-ray", *stage],
                       env=cluster.env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "succeeded" in (r.stdout + r.stderr).lower()
    assert (out / "manifest.json").exists()


def test_real_server_refuses_bad_tokens_and_bad_specs(server, work):
    with server.client(token="not-the-token-at-all-0000") as c:
        with pytest.raises(grpc.RpcError) as ei:
            c.list()
        assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
    ch = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    from opt_ray.v1 import control_pb2_grpc as pb_grpc
    with pytest.raises(grpc.RpcError) as ei:
        pb_grpc.ControlServiceStub(ch).ListJobs(pb.ListJobsRequest(), timeout=10)
    assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
    ch.close()
    # Through the CLI: an input outside the allowed root is INVALID_ARGUMENT, exit 2.
    r = subprocess.run([OPT_RAY, "ctl", "--target", f"127.0.0.1:{server.port}", "--token-file",
                        str(server.token_file), "submit", "dedup", "/etc/hostname", "--output",
                        str(work / "nope")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "INVALID_ARGUMENT" in r.stderr and "allowed roots" in r.stderr
    r = subprocess.run([OPT_RAY, "ctl", "--target", f"127.0.0.1:{server.port}", "--token-file",
                        str(server.token_file), "health"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "nodes 1" in r.stdout, r.stdout + r.stderr


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def test_opt_ray_metrics_on_the_export_endpoint(server, cluster, work):
    # Where to scrape comes from Ray's node info (MetricsExportPort), via ClusterHealth;
    # scraped on 127.0.0.1 since the node may advertise another interface.
    with server.client() as c:
        endpoints = list(c.health().metrics_endpoints)
        assert [e.rsplit(":", 1)[1] for e in endpoints] == [str(cluster.metrics_port)]
        port = int(endpoints[0].rsplit(":", 1)[1])
        # A dedup job during this test: its workers report opt_ray_dedup_*; the control
        # server (a Ray driver of this cluster) reports opt_ray_control_*.
        c.submit(pb.JobSpec(dedup=pb.DedupSpec(inputs=[str(work / "corpus.jsonl")],
                                               output=str(work / "m-dedup"), workers=1)))
    want = ("ray_opt_ray_control_jobs_submitted_total", "ray_opt_ray_dedup_docs_total")
    found: set[str] = set()
    deadline = time.time() + 120
    while time.time() < deadline:
        text = _scrape(port)
        found = {ln.split("{")[0].split()[0] for ln in text.splitlines()
                 if "opt_ray_" in ln and not ln.startswith("#")}
        if all(w in found for w in want):
            break
        time.sleep(2)
    assert all(w in found for w in want), sorted(found)
    print("opt_ray_ metrics exported:", sorted(found))
