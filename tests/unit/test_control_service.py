"""The control service over real gRPC on 127.0.0.1, with a fake job backend (no Ray).

The fake records submissions and lets the test move each Ray job through its states,
so pipelines, cancel, scale, rollback, restart-reattach and watch are checked exactly.
"""

from __future__ import annotations

import json
import threading
import time

import grpc
import pytest

from opt_ray.control.client import ControlClient
from opt_ray.control.ray_jobs import JobNotFound, RayJobStatus
from opt_ray.control.registry import Registry
from opt_ray.control.server import build_server, stop_server
from opt_ray.control.service import ControlService
from opt_ray.control.specs import SpecValidator
from opt_ray.v1 import control_pb2 as pb

TOKEN = "test-token-0123456789abcdef"


class FakeBackend:
    def __init__(self):
        self.jobs: dict[str, dict] = {}
        self.order: list[str] = []
        self.lock = threading.Lock()
        self.refuse = 0  # refuse this many submissions, as a job server without an agent

    def submit(self, entrypoint, submission_id, metadata):
        with self.lock:
            if self.refuse:
                self.refuse -= 1
                raise RuntimeError("No available agent to submit job, please try again later.")
            assert submission_id not in self.jobs, "submission ids must be unique"
            self.jobs[submission_id] = {"entrypoint": entrypoint, "state": pb.PENDING,
                                        "logs": "", "metadata": metadata}
            self.order.append(submission_id)
        return submission_id

    def set(self, sid, state, logs=""):
        with self.lock:
            self.jobs[sid]["state"] = state
            self.jobs[sid]["logs"] += logs

    def status(self, sid):
        with self.lock:
            if sid not in self.jobs:
                raise JobNotFound(sid)
            return RayJobStatus(self.jobs[sid]["state"])

    def stop(self, sid):
        self.set(sid, pb.STOPPED)

    def logs(self, sid):
        with self.lock:
            return self.jobs[sid]["logs"]

    def health(self):
        return {"dashboard_url": "http://fake", "job_api": (True, "fake")}

    def shutdown_serve(self):
        self.serve_shutdowns = getattr(self, "serve_shutdowns", 0) + 1

    def last(self):
        return self.order[-1]


@pytest.fixture
def env(tmp_path):
    """A running server over a fake backend; ``env.restart()`` replaces the server
    process state (new registry, service, port) while keeping the state dir."""
    class Env:
        pass
    e = Env()
    e.root = tmp_path / "data"
    e.root.mkdir()
    (e.root / "corpus.jsonl").write_text('{"text": "hello"}\n')
    e.state = tmp_path / "state"
    e.backend = FakeBackend()

    def start():
        e.service = ControlService(Registry(e.state), SpecValidator([e.root]), e.backend,
                                   opt_ray_bin="opt-ray", poll_interval=0.05, stop_timeout=5)
        e.server, e.port = build_server(e.service, token=TOKEN, port=0)
        e.client = ControlClient(f"127.0.0.1:{e.port}", TOKEN, timeout=10)

    def stop():
        e.client.close()
        stop_server(e.server, e.service, grace=0)

    e.start, e.stop = start, stop
    e.restart = lambda: (stop(), start())
    start()
    yield e
    stop()


def wait_for(pred, timeout=5.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError("condition not reached")


def dedup_spec(e, out="dedup"):
    return pb.JobSpec(dedup=pb.DedupSpec(inputs=[str(e.root / "corpus.jsonl")],
                                         output=str(e.root / out), workers=2))


def test_submit_builds_the_opt_ray_command_and_tracks_ray_state(env):
    job = env.client.submit(dedup_spec(env))
    assert job.state == pb.PENDING and job.kind == "dedup"
    sid = env.backend.last()
    assert sid == job.attempts[0].ray_submission_id
    ep = env.backend.jobs[sid]["entrypoint"]
    assert ep == (f"opt-ray dedup {env.root / 'corpus.jsonl'} --output {env.root / 'dedup'} "
                  f"--no-progress --workers 2")
    assert env.backend.jobs[sid]["metadata"]["opt_ray_job"] == job.job_id
    env.backend.set(sid, pb.RUNNING)
    wait_for(lambda: env.client.get(job.job_id).state == pb.RUNNING)
    env.backend.set(sid, pb.SUCCEEDED)
    assert wait_for(lambda: env.client.get(job.job_id).state == pb.SUCCEEDED)
    assert [j.job_id for j in env.client.list()] == [job.job_id]
    assert env.client.list(active_only=True) == []


def test_pipeline_submits_each_stage_after_the_previous_succeeds(env):
    r = env.root
    spec = pb.JobSpec(pipeline=pb.PipelineSpec(stages=[
        pb.StageSpec(dedup=pb.DedupSpec(inputs=[str(r / "corpus.jsonl")], output=str(r / "d"))),
        pb.StageSpec(tokenizer=pb.TokenizerSpec(corpus=str(r / "d"), vocab_size=512,
                                                output=str(r / "tok"))),
        pb.StageSpec(tokenize=pb.TokenizeSpec(input=str(r / "d"), tokenizer=str(r / "tok"),
                                              seq_len=64, output=str(r / "shards"))),
        pb.StageSpec(train=pb.TrainSpec(preset="tiny", data=str(r / "shards"),
                                        output=str(r / "run"), min_workers=1, max_workers=2,
                                        steps=10)),
    ]))
    job = env.client.submit(spec)
    assert job.stage_count == 4 and job.run_dir == str(r / "run")
    kinds = []
    for i in range(4):
        sid = wait_for(lambda: len(env.backend.order) == i + 1 and env.backend.last())
        kinds.append(env.backend.jobs[sid]["entrypoint"].split()[1])
        env.backend.set(sid, pb.SUCCEEDED)
    assert kinds == ["dedup", "tokenizer", "tokenize", "train"]
    assert "--workers 1:2 --steps 10 --no-progress" in env.backend.jobs[env.backend.last()]["entrypoint"]
    done = wait_for(lambda: (j := env.client.get(job.job_id)).state == pb.SUCCEEDED and j)
    assert len(done.attempts) == 4 and done.stage_index == 3


def test_failed_stage_fails_the_pipeline_and_stops_it(env):
    r = env.root
    spec = pb.JobSpec(pipeline=pb.PipelineSpec(stages=[
        pb.StageSpec(dedup=pb.DedupSpec(inputs=[str(r / "corpus.jsonl")], output=str(r / "d"))),
        pb.StageSpec(tokenizer=pb.TokenizerSpec(corpus=str(r / "d"), vocab_size=512,
                                                output=str(r / "tok")))]))
    job = env.client.submit(spec)
    env.backend.set(env.backend.last(), pb.FAILED)
    done = wait_for(lambda: (j := env.client.get(job.job_id)).state == pb.FAILED and j)
    assert len(env.backend.order) == 1 and "dedup" in done.message


def test_cancel_stops_the_ray_job(env):
    job = env.client.submit(dedup_spec(env))
    sid = env.backend.last()
    env.backend.set(sid, pb.RUNNING)
    out = env.client.cancel(job.job_id)
    assert out.state == pb.STOPPED
    assert env.backend.jobs[sid]["state"] == pb.STOPPED
    wait_for(lambda: env.client.get(job.job_id).attempts[0].state == pb.STOPPED)


def _train_job(env):
    (env.root / "shards").mkdir()
    return env.client.submit(pb.JobSpec(train=pb.TrainSpec(
        preset="tiny", data=str(env.root / "shards"), output=str(env.root / "run"),
        min_workers=1, max_workers=1, steps=100)))


def test_scale_stops_and_resubmits_the_run_with_the_new_range(env):
    job = _train_job(env)
    first = env.backend.last()
    env.backend.set(first, pb.RUNNING)
    out = env.client.scale(job.job_id, 2, 4)
    assert env.backend.jobs[first]["state"] == pb.STOPPED
    assert len(out.attempts) == 2 and out.attempts[1].reason.startswith("scaled 1:1 -> 2:4")
    ep = env.backend.jobs[env.backend.last()]["entrypoint"]
    assert "--workers 2:4" in ep and "--resume-from" not in ep
    assert out.spec.train.min_workers == 2 and out.spec.train.max_workers == 4
    # The old attempt's STOPPED must not end the job: the new attempt is what counts.
    env.backend.set(env.backend.last(), pb.RUNNING)
    wait_for(lambda: env.client.get(job.job_id).state == pb.RUNNING)
    events = [e for e in env.client.logbook(job_id=job.job_id).events if "job_scaled" in e]
    assert events, "the scale is recorded in the job's logbook"


def _commit(env, *steps):
    """Committed checkpoints (a manifest each) of the run ``_train_job`` submitted."""
    ckpts = env.root / "run" / "checkpoints"
    for step in steps:
        (ckpts / f"step_{step:08d}").mkdir(parents=True)
        (ckpts / f"step_{step:08d}" / "manifest.json").write_text('{"milestone": false}')
    return ckpts


def test_rollback_resubmits_with_resume_from(env):
    from opt_ray.train.checkpoint import PIN, Checkpointer, committed
    job = _train_job(env)
    first = env.backend.last()
    env.backend.set(first, pb.RUNNING)
    with pytest.raises(grpc.RpcError) as ei:   # no checkpoint saved yet
        env.client.rollback(job.job_id, 50)
    assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "(committed: none)" in ei.value.details()
    ckpts = _commit(env, 48, 50)
    # A step with no committed checkpoint (pruned, or never saved) is refused before the
    # running gang is stopped, naming the steps there are.
    with pytest.raises(grpc.RpcError) as ei:
        env.client.rollback(job.job_id, 49)
    assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no committed checkpoint of step 49" in ei.value.details()
    assert "(committed: [48, 50])" in ei.value.details()
    assert env.backend.jobs[first]["state"] == pb.RUNNING and len(env.backend.jobs) == 1
    pinned_before_stop = []
    stop = env.backend.stop

    def spy_stop(sid):   # the target is pinned before the running gang is stopped
        pinned_before_stop.append((ckpts / "step_00000050" / PIN).is_file())
        return stop(sid)

    env.backend.stop = spy_stop
    out = env.client.rollback(job.job_id, 50)
    assert out.attempts[-1].entrypoint.endswith("--resume-from 50")
    assert pinned_before_stop == [True] and env.backend.jobs[first]["state"] == pb.STOPPED
    # The stopped gang's last saves cannot prune it (--keep 2): it stays for good.
    for step in (52, 54, 56):
        _commit(env, step)
        Checkpointer(ckpts, keep=2)._retain()
    assert [s for s, _ in committed(ckpts)] == [50, 54, 56]
    with pytest.raises(grpc.RpcError) as ei:
        env.client.rollback(job.job_id, 500)  # beyond the run's steps
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_rollback_by_hand_lowers_the_lr_and_the_clip(env, monkeypatch, capsys):
    """As the OPT team intervened: back to a checkpoint with a lower peak LR and a tighter
    clip. The changes join the job's spec, so a later rollback or scale keeps them; a bad
    value is refused before the running attempt is stopped."""
    import shlex

    from opt_ray.cli import build_parser
    from opt_ray.commands.train import config_from_args
    job = _train_job(env)
    _commit(env, 30, 40, 50)
    env.backend.set(env.backend.last(), pb.RUNNING)
    with pytest.raises(grpc.RpcError) as ei:
        env.client.rollback(job.job_id, 50, grad_clip=-1.0)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ei.value.details().startswith("spec.train.optim.grad_clip: --grad-clip")
    assert env.client.get(job.job_id).attempts[-1].state == pb.RUNNING
    out = env.client.rollback(job.job_id, 50, peak_lr=3e-5, grad_clip=0.3)
    cfg = config_from_args(build_parser().parse_args(shlex.split(out.attempts[-1].entrypoint)[1:]))
    assert (cfg.resume_from, cfg.optim.peak_lr, cfg.optim.grad_clip) == (50, 3e-5, 0.3)
    assert out.attempts[-1].reason == "rolled_back step latest -> step 50 (peak_lr 3e-05, grad_clip 0.3)"
    env.backend.set(env.backend.last(), pb.RUNNING)
    again = env.client.rollback(job.job_id, 40, grad_clip=0.2)
    cfg = config_from_args(build_parser().parse_args(shlex.split(again.attempts[-1].entrypoint)[1:]))
    assert (cfg.resume_from, cfg.optim.peak_lr, cfg.optim.grad_clip) == (40, 3e-5, 0.2)
    # The same from the command line.
    from opt_ray.cli import main
    monkeypatch.setenv("OPT_RAY_TOKEN", TOKEN)
    env.backend.set(env.backend.last(), pb.RUNNING)
    assert main(["ctl", "--target", f"127.0.0.1:{env.port}", "--json", "rollback", job.job_id,
                 "--checkpoint", "30", "--lr", "2e-5"]) == 0
    sent = json.loads(capsys.readouterr().out)["spec"]["train"]
    assert (sent["resume_from"], sent["optim"]) == ("30", {"peak_lr": 2e-5, "grad_clip": 0.2})


def test_scale_rejects_a_job_that_is_not_training(env):
    job = env.client.submit(dedup_spec(env))
    with pytest.raises(grpc.RpcError) as ei:
        env.client.scale(job.job_id, 2, 2)
    assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as ei:
        env.client.scale("no-such-job", 2, 2)
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND


def test_restart_keeps_jobs_and_reattaches(env):
    job = env.client.submit(dedup_spec(env))
    sid = env.backend.last()
    env.backend.set(sid, pb.RUNNING)
    wait_for(lambda: env.client.get(job.job_id).state == pb.RUNNING)
    env.restart()  # a new server process state over the same state dir
    assert [j.job_id for j in env.client.list(active_only=True)] == [job.job_id]
    env.backend.set(sid, pb.SUCCEEDED)
    # The reconciler of the new server follows the same Ray job to its end.
    wait_for(lambda: env.client.get(job.job_id).state == pb.SUCCEEDED)


def test_submission_is_retried_until_ray_accepts_it(env):
    env.backend.refuse = 3
    job = env.client.submit(dedup_spec(env))
    assert job.state == pb.PENDING and "waiting for Ray's job server" in job.message
    assert not job.attempts[0].submitted
    # The reconciler keeps trying with the same submission id; the job then runs.
    sid = wait_for(lambda: env.backend.order and env.backend.last())
    assert sid == job.attempts[0].ray_submission_id
    assert wait_for(lambda: env.client.get(job.job_id).attempts[0].submitted)
    env.backend.set(sid, pb.SUCCEEDED)
    wait_for(lambda: env.client.get(job.job_id).state == pb.SUCCEEDED)


def test_submission_fails_the_job_after_the_submit_timeout(env):
    env.service.submit_timeout = 0.2
    env.backend.refuse = 10 ** 6
    job = env.client.submit(dedup_spec(env))
    done = wait_for(lambda: (j := env.client.get(job.job_id)).state == pb.FAILED and j)
    assert "Ray refused the job" in done.message and env.backend.order == []


def test_a_ray_job_lost_with_its_cluster_fails_with_a_clear_message(env):
    job = env.client.submit(dedup_spec(env))
    del env.backend.jobs[env.backend.last()]
    done = wait_for(lambda: (j := env.client.get(job.job_id)).state == pb.FAILED and j)
    assert "Ray has no job" in done.message


def test_watch_streams_status_logs_metrics_and_logbook_until_the_end(env):
    job = _train_job(env)
    sid = env.backend.last()
    run = env.root / "run"
    run.mkdir()
    events: list[pb.JobEvent] = []

    def consume():
        events.extend(env.client.watch(job.job_id, timeout=20))

    t = threading.Thread(target=consume)
    t.start()
    env.backend.set(sid, pb.RUNNING, logs="step 1\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.5}\n{"step": 2, "lo')  # torn line
    (run / "logbook.jsonl").write_text('{"time": 1, "event": "run_started"}\n')
    time.sleep(0.3)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('ss": 9.1}\n')
    env.backend.set(sid, pb.SUCCEEDED, logs="done\n")
    t.join(20)
    assert not t.is_alive(), "the stream ends when the job is final"
    states = [e.status.state for e in events if e.WhichOneof("event") == "status"]
    assert states[-1] == pb.SUCCEEDED and pb.RUNNING in states
    assert "".join(e.log for e in events) == "step 1\ndone\n"
    assert [e.metrics_line for e in events if e.metrics_line] == [
        '{"step": 1, "loss": 9.5}', '{"step": 2, "loss": 9.1}']
    lb = [e.logbook_line for e in events if e.logbook_line]
    assert any("run_started" in ln for ln in lb) and any("stage_submitted" in ln for ln in lb)


def test_logbook_merges_control_events_with_the_run_dir(env):
    job = _train_job(env)
    run = env.root / "run"
    run.mkdir()
    (run / "logbook.jsonl").write_text('{"time": 1.0, "event": "run_started"}\n')
    r = env.client.logbook(job_id=job.job_id)
    assert r.run_dir == str(run)
    assert '"run_started"' in r.events[0] and any("job_submitted" in e for e in r.events)
    r2 = env.client.logbook(run_dir=str(run))
    assert len(r2.events) == 1
    with pytest.raises(grpc.RpcError) as ei:
        env.client.logbook(run_dir="/etc")
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_serve_deploy_update_remove(env):
    (env.root / "hf").mkdir()
    spec = pb.ServeSpec(name="opt", checkpoint=str(env.root / "hf"), replicas=2, http_port=8001,
                        tensor_parallel_size=2)
    app = env.client.deploy_serve(spec)
    first = env.backend.last()
    assert env.backend.jobs[first]["entrypoint"] == (
        f"opt-ray serve --checkpoint {env.root / 'hf'} --model-name opt --replicas 2 "
        f"--http-port 8001 --tensor-parallel-size 2")
    with pytest.raises(grpc.RpcError) as ei:
        env.client.deploy_serve(spec)
    assert ei.value.code() == grpc.StatusCode.ALREADY_EXISTS
    spec.replicas = 3
    app2 = env.client.update_serve(spec)
    assert app2.job_id != app.job_id and env.backend.jobs[first]["state"] == pb.STOPPED
    assert env.backend.serve_shutdowns == 1, "a killed serve driver leaves Serve up: shut it"
    assert [a.name for a in env.client.list_serve()] == ["opt"]
    env.client.remove_serve("opt")
    assert env.backend.jobs[env.backend.last()]["state"] == pb.STOPPED
    assert env.client.list_serve() == []


def test_health(env):
    h = env.client.health()
    assert h.ok and {c.name for c in h.components} >= {"job_api", "registry", "reconciler"}


def test_registry_survives_and_is_written_atomically(env):
    job = env.client.submit(dedup_spec(env))
    files = list((env.state / "jobs").iterdir())
    assert [f.name for f in files] == [f"{job.job_id}.json"], "no temporary files left behind"
    reg = Registry(env.state)
    assert reg.get_job(job.job_id).attempts[0].ray_submission_id == env.backend.last()


def test_export_and_eval_command_lines(env):
    run = env.root / "run"
    (run / "checkpoints" / "step_00000040").mkdir(parents=True)
    job = env.client.submit(pb.JobSpec(export=pb.ExportSpec(run_dir=str(run), output=str(env.root / "hf"),
                                                            step=40)))
    assert job.attempts[0].entrypoint == (f"opt-ray export {run}/checkpoints/step_00000040 "
                                          f"--output {env.root / 'hf'}")
    with pytest.raises(grpc.RpcError) as ei:
        env.client.submit(pb.JobSpec(export=pb.ExportSpec(run_dir=str(run),
                                                          output=str(env.root / "hf2"), step=7)))
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "step=7" in ei.value.details()
    (env.root / "shards").mkdir()
    job = env.client.submit(pb.JobSpec(eval=pb.EvalSpec(checkpoint=str(run), data=str(env.root / "shards"),
                                                        max_rows=64, tp=2)))
    assert job.attempts[0].entrypoint == (f"opt-ray eval {run} --data {env.root / 'shards'} --tp 2 "
                                          f"--max-rows 64")


def test_ctl_cli_against_the_server(env, capsys, monkeypatch):
    """`opt-ray ctl` end to end on the fake backend: submit, status, list, watch, logbook,
    health, cancel; a wrong token exits 2 with UNAUTHENTICATED."""
    from opt_ray.cli import main
    monkeypatch.setenv("OPT_RAY_TOKEN", TOKEN)
    monkeypatch.chdir(env.root)  # relative paths become absolute on the client side
    base = ["ctl", "--target", f"127.0.0.1:{env.port}"]
    assert main(base + ["submit", "dedup", "corpus.jsonl", "--output", "cli-out",
                        "--name", "from-cli"]) == 0
    out = capsys.readouterr().out
    job_id = out.split()[0]
    assert (f"opt-ray dedup {env.root / 'corpus.jsonl'} --output {env.root / 'cli-out'} "
            f"--no-progress") in out
    assert main(base + ["--json", "list"]) == 0
    assert json.loads(capsys.readouterr().out)["jobs"][0]["name"] == "from-cli"
    sid = env.backend.last()
    env.backend.set(sid, pb.SUCCEEDED, logs="dedup: kept 1 of 1\n")
    assert main(base + ["watch", job_id]) == 0
    out = capsys.readouterr().out
    assert "SUCCEEDED" in out and "dedup: kept 1 of 1" in out
    assert main(base + ["status", job_id]) == 0 and sid in capsys.readouterr().out
    assert main(base + ["logbook", job_id]) == 0
    assert "job_finished" in capsys.readouterr().out
    assert main(base + ["health"]) == 0 and "reconciler" in capsys.readouterr().out
    assert main(base + ["cancel", job_id]) == 0  # already final: unchanged
    assert "SUCCEEDED" in capsys.readouterr().out
    monkeypatch.setenv("OPT_RAY_TOKEN", "a-wrong-token-of-enough-length")
    assert main(base + ["list"]) == 2
    assert "UNAUTHENTICATED" in capsys.readouterr().err
