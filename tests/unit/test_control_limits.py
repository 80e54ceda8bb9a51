"""Control-plane limits (issue 12.5) and the eval stage (issue 14.3), over real gRPC on
127.0.0.1 with the real client and a fake job backend (no Ray): spec sizes bounded so a
stage's command line fits a Ray job's entrypoint, paged listing, DeleteJob, symlinks
resolved before the root check, bad paths as INVALID_ARGUMENT; the eval spec's command
line parsed by the real `opt-ray eval` parser."""

from __future__ import annotations

import json
import shlex

import grpc
import pytest

from opt_ray.v1 import control_pb2 as pb
from tests.unit.test_control_service import (TOKEN, _train_job, dedup_spec,  # noqa: F401
                                             env, wait_for)


def _invalid(call) -> str:
    with pytest.raises(grpc.RpcError) as ei:
        call()
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (ei.value.code(), ei.value.details())
    return ei.value.details()


# ------------------------------------------------------------------------- spec sizes

def test_ten_thousand_inputs_are_refused_naming_the_field_and_the_limit(env):
    inputs = [str(env.root / "corpus.jsonl")] * 10_000
    msg = _invalid(lambda: env.client.submit(pb.JobSpec(dedup=pb.DedupSpec(
        inputs=inputs, output=str(env.root / "out")))))
    assert "spec.dedup.inputs has 10000 entries" in msg and "limit of 1000" in msg
    assert "directory" in msg
    assert env.backend.jobs == {}, "nothing reached Ray"


def test_a_command_line_too_long_for_a_ray_job_is_refused(env):
    # 600 inputs of ~230 bytes: under the input count limit, over the command-line bound.
    d = env.root / "many"
    d.mkdir()
    inputs = []
    for i in range(600):
        f = d / (f"{i:04d}-" + "x" * 200 + ".jsonl")
        f.write_text('{"text": "a"}\n')
        inputs.append(str(f))
    msg = _invalid(lambda: env.client.submit(pb.JobSpec(pipeline=pb.PipelineSpec(stages=[
        pb.StageSpec(dedup=pb.DedupSpec(inputs=inputs, output=str(env.root / "out")))]))))
    assert "spec.pipeline.stages[0]: the stage's command line would be" in msg
    assert "limit of 100000" in msg and "directories" in msg
    # The directory that holds them is the fix, and goes through.
    job = env.client.submit(pb.JobSpec(dedup=pb.DedupSpec(inputs=[str(d)],
                                                          output=str(env.root / "out"))))
    assert job.attempts[0].entrypoint.startswith(f"opt-ray dedup {d} --output")


@pytest.mark.parametrize("bad, says", [
    ("/" + "a" * 300 + "/x", "path segment of 300 bytes"),
    ("/tmp/a\x00b", "NUL byte"),
    ("/tmp/a\nb", "control character"),
    ("/" + "a/" * 2100, "bytes long (max 4096)"),
    ("relative/path", "must be an absolute path"),
])
def test_bad_paths_are_invalid_argument_never_unavailable(env, bad, says):
    root_bad = bad if not bad.startswith("/") else str(env.root) + bad
    msg = _invalid(lambda: env.client.submit(pb.JobSpec(dedup=pb.DedupSpec(
        inputs=[root_bad], output=str(env.root / "out")))))
    assert "spec.dedup.inputs[0]" in msg and says in msg
    msg = _invalid(lambda: env.client.logbook(run_dir=root_bad))
    assert says in msg


# ------------------------------------------------------------------------- symlinks

def test_read_logbook_refuses_a_symlink_out_of_the_roots(env, tmp_path):
    secret = tmp_path / "outside" / "secret.jsonl"
    secret.parent.mkdir()
    secret.write_text('{"time": 1, "event": "secret", "password": "hunter2"}\n')
    run = env.root / "run"
    run.mkdir()
    (run / "logbook.jsonl").symlink_to(secret)
    for md in (False, True):
        msg = _invalid(lambda: env.client.logbook(run_dir=str(run), markdown=md))
        assert "outside the allowed roots" in msg and "hunter2" not in msg
    # The same run directory reached through a job.
    (env.root / "shards").mkdir()
    job = env.client.submit(pb.JobSpec(train=pb.TrainSpec(
        preset="tiny", data=str(env.root / "shards"), output=str(run), min_workers=1, steps=10)))
    assert "outside the allowed roots" in _invalid(lambda: env.client.logbook(job_id=job.job_id))
    # A symlinked metrics.jsonl is refused for the chronicle; the events alone are fine.
    (run / "logbook.jsonl").unlink()
    (run / "logbook.jsonl").write_text('{"time": 1, "event": "finish", "step": 3}\n')
    (run / "metrics.jsonl").symlink_to(secret)
    assert len(env.client.logbook(run_dir=str(run)).events) == 1
    assert "outside the allowed roots" in _invalid(
        lambda: env.client.logbook(run_dir=str(run), markdown=True))
    # A symlinked run directory out of the roots is refused at the path check.
    (env.root / "link").symlink_to(secret.parent)
    assert "outside the allowed roots" in _invalid(
        lambda: env.client.logbook(run_dir=str(env.root / "link")))


# ------------------------------------------------------------------------- paging, delete

def _submit_many(env, n):
    return [env.client.submit(dedup_spec(env, out=f"out{i}")).job_id for i in range(n)]


def test_list_is_paged_and_ctl_list_walks_every_page(env, capsys, monkeypatch):
    ids = _submit_many(env, 7)
    pages, token = [], ""
    while True:
        r = env.client._call("ListJobs", pb.ListJobsRequest(page_size=3, page_token=token))
        pages.append([j.job_id for j in r.jobs])
        token = r.next_page_token
        if not token:
            break
    assert [len(p) for p in pages] == [3, 3, 1]
    assert sum(pages, []) == ids, "oldest first, each job once"
    assert "page_size=5000" in _invalid(
        lambda: env.client._call("ListJobs", pb.ListJobsRequest(page_size=5000)))
    assert "page_token" in _invalid(
        lambda: env.client._call("ListJobs", pb.ListJobsRequest(page_token="garbage")))
    # A page also ends before it passes its byte budget (always at least one job).
    import opt_ray.control.service as service
    monkeypatch.setattr(service, "PAGE_BYTES", 1)
    r = env.client._call("ListJobs", pb.ListJobsRequest())
    assert len(r.jobs) == 1 and r.next_page_token
    monkeypatch.setattr(service, "PAGE_BYTES", 2 * 1024 * 1024)
    # `opt-ray ctl list` with a server whose pages hold two jobs prints all seven.
    monkeypatch.setattr(service, "DEFAULT_PAGE_SIZE", 2)
    from opt_ray.cli import main
    monkeypatch.setenv("OPT_RAY_TOKEN", TOKEN)
    assert main(["ctl", "--target", f"127.0.0.1:{env.port}", "list"]) == 0
    printed = [ln.split()[0] for ln in capsys.readouterr().out.splitlines()]
    assert printed == ids


def test_delete_forgets_finished_jobs_and_refuses_running_ones(env, capsys, monkeypatch):
    a, b = _submit_many(env, 2)
    with pytest.raises(grpc.RpcError) as ei:
        env.client.delete(a)
    assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "cancel it first" in ei.value.details()
    sid = env.client.get(a).attempts[-1].ray_submission_id
    env.backend.set(sid, pb.SUCCEEDED)
    wait_for(lambda: env.client.get(a).state == pb.SUCCEEDED)
    logbook = env.state / "logbooks" / f"{a}.jsonl"
    assert logbook.exists()
    assert env.client.delete(a).job_id == a
    with pytest.raises(grpc.RpcError) as ei:
        env.client.get(a)
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND
    assert [j.job_id for j in env.client.list()] == [b]
    assert not logbook.exists() and not (env.state / "jobs" / f"{a}.json").exists()
    assert (env.root / "corpus.jsonl").exists(), "artifacts stay"
    env.restart()
    assert [j.job_id for j in env.client.list()] == [b], "still gone after a restart"
    # Through the CLI: cancel, then delete.
    from opt_ray.cli import main
    monkeypatch.setenv("OPT_RAY_TOKEN", TOKEN)
    base = ["ctl", "--target", f"127.0.0.1:{env.port}"]
    assert main(base + ["delete", b]) == 2
    assert "FAILED_PRECONDITION" in capsys.readouterr().err
    assert main(base + ["cancel", b]) == 0
    wait_for(lambda: env.client.get(b).attempts[-1].state == pb.STOPPED)
    wait_for(lambda: main(base + ["delete", b]) == 0, timeout=10)
    assert f"deleted {b}" in capsys.readouterr().out
    assert env.client.list() == []


# ------------------------------------------------------------------------- eval stage

def _parse_eval(entrypoint: str):
    from opt_ray.cli import build_parser
    argv = shlex.split(entrypoint)
    assert argv[0] == "opt-ray"
    return build_parser().parse_args(argv[1:])


def test_eval_spec_becomes_an_opt_ray_eval_command(env):
    run = env.root / "run"
    (run / "checkpoints" / "step_00000040").mkdir(parents=True)
    tasks_dir = env.root / "tasks"
    tasks_dir.mkdir()
    spec = pb.EvalSpec(checkpoint=str(run), tasks=["copa", "arc_easy", "my-task*"],
                       num_fewshot=5, has_num_fewshot=True, limit=100,
                       include_path=str(tasks_dir), output=str(env.root / "results.json"),
                       workers=4, tp=2)
    job = env.client.submit(pb.JobSpec(eval=spec))
    ep = job.attempts[0].entrypoint
    assert ep == (f"opt-ray eval {run} --tasks 'copa,arc_easy,my-task*' --num-fewshot 5 "
                  f"--limit 100 --include-path {tasks_dir} --output {env.root / 'results.json'} "
                  f"--workers 4 --tp 2")
    args = _parse_eval(ep)  # the real `opt-ray eval` takes exactly this
    tasks = args.tasks if isinstance(args.tasks, str) else ",".join(args.tasks)
    assert (tasks, args.num_fewshot, args.limit, args.include_path, args.workers, args.tp) == (
        "copa,arc_easy,my-task*", 5, 100, str(tasks_dir), 4, 2)
    # Zero-shot is said explicitly; a fraction stays a fraction; defaults add nothing.
    job = env.client.submit(pb.JobSpec(eval=pb.EvalSpec(
        checkpoint=str(run), tasks=["copa"], has_num_fewshot=True, limit=0.25)))
    args = _parse_eval(job.attempts[0].entrypoint)
    assert args.num_fewshot == 0 and args.limit == 0.25 and args.output is None
    job = env.client.submit(pb.JobSpec(eval=pb.EvalSpec(checkpoint=str(run), tasks=["copa"])))
    assert job.attempts[0].entrypoint == f"opt-ray eval {run} --tasks copa"


@pytest.mark.parametrize("fields, says", [
    ({}, "set either tasks"),
    ({"tasks": ["copa"], "data": "SHARDS"}, "set either tasks"),
    ({"tasks": ["copa; rm -rf /"]}, "spec.eval.tasks[0]"),
    ({"tasks": ["copa"], "limit": 1.5}, "spec.eval.limit=1.5"),
    ({"tasks": ["copa"], "limit": -1}, "spec.eval.limit=-1"),
    ({"tasks": ["copa"], "num_fewshot": 1000, "has_num_fewshot": True}, "spec.eval.num_fewshot=1000"),
    ({"tasks": ["copa"], "include_path": "/nonexistent/tasks"}, "spec.eval.include_path"),
    ({"tasks": ["copa"], "output": "EXISTS"}, "already exists"),
    ({"tasks": ["copa"], "max_rows": 5}, "max_rows applies to data"),
    ({"data": "SHARDS", "limit": 3}, "spec.eval.limit applies to lm-eval tasks only"),
    ({"tasks": ["copa"], "workers": 3, "tp": 2}, "spec.eval.workers=3 is not a multiple of spec.eval.tp=2"),
    ({"tasks": ["copa"], "tp": 4}, "use workers=4"),
    ({"data": "SHARDS", "tp": -1}, "spec.eval.tp=-1 is out of bounds"),
])
def test_eval_spec_validation(env, fields, says):
    run = env.root / "run"
    run.mkdir(exist_ok=True)
    (env.root / "shards").mkdir(exist_ok=True)
    (env.root / "done.json").write_text("{}")
    subst = {"SHARDS": str(env.root / "shards"), "EXISTS": str(env.root / "done.json")}
    fields = {k: subst.get(v, v) if isinstance(v, str) else v for k, v in fields.items()}
    msg = _invalid(lambda: env.client.submit(pb.JobSpec(eval=pb.EvalSpec(checkpoint=str(run),
                                                                          **fields))))
    assert says in msg, msg


def test_ctl_eval_submits_and_watches_an_eval_job(env, capsys, monkeypatch):
    from opt_ray.cli import main
    run = env.root / "run"
    run.mkdir()
    monkeypatch.setenv("OPT_RAY_TOKEN", TOKEN)
    monkeypatch.chdir(env.root)
    base = ["ctl", "--target", f"127.0.0.1:{env.port}"]
    assert main(base + ["eval", "run", "--tasks", "copa,piqa", "--num-fewshot", "0",
                        "--limit", "20", "--output", "res.json", "--eval-workers", "4",
                        "--eval-tp", "2"]) == 0
    out = capsys.readouterr().out
    assert (f"opt-ray eval {run} --tasks copa,piqa --num-fewshot 0 --limit 20 "
            f"--output {env.root / 'res.json'} --workers 4 --tp 2") in out
    job_id = out.split()[0]
    sid = env.backend.last()
    env.backend.set(sid, pb.SUCCEEDED, logs="copa acc 0.55\n")
    assert main(base + ["watch", job_id]) == 0
    out = capsys.readouterr().out
    assert "SUCCEEDED" in out and "copa acc 0.55" in out
    # `ctl submit eval` is the same spec.
    assert main(base + ["--json", "submit", "eval", "run", "--tasks", "copa"]) == 0
    assert json.loads(capsys.readouterr().out)["spec"]["eval"]["tasks"] == ["copa"]


# ------------------------------------------------------------------------- one set of rules

def test_train_spec_is_validated_by_the_train_config_itself(env):
    """The control plane builds opt-ray train's own TrainConfig: its rules and messages,
    named by the spec field (issue 11.7)."""
    from opt_ray.config import ConfigError, TrainConfig
    (env.root / "shards").mkdir()

    def spec(**kw):
        base = dict(preset="tiny", data=str(env.root / "shards"), output=str(env.root / "run"),
                    min_workers=1, steps=10)
        return pb.JobSpec(train=pb.TrainSpec(**{**base, **kw}))

    with pytest.raises(ConfigError) as direct:
        TrainConfig(data="d", output="o", steps=10, resume_from=20)
    msg = _invalid(lambda: env.client.submit(spec(resume_from=20)))
    assert msg == f"spec.train.resume_from: {direct.value}"
    msg = _invalid(lambda: env.client.submit(spec(preset="huge")))
    assert msg.startswith("spec.train.preset: unknown preset 'huge'; choose one of tiny")
    job = env.client.submit(spec(min_workers=1, max_workers=2, checkpoint_every=5))
    assert job.attempts[0].entrypoint.endswith("--workers 1:2 --steps 10 --no-progress "
                                               "--checkpoint-every 5")


def test_train_spec_carries_what_a_run_past_one_gpu_needs(env, capsys, monkeypatch):
    """TrainSpec's tp, precision, device, activation checkpointing and compile reach the
    trainer: the entrypoint parsed by the real `opt-ray train` parser rebuilds them; bad
    values are INVALID_ARGUMENT with TrainConfig's own message, named by the spec field;
    a scale to a range that is not whole TP groups is refused before the run is stopped;
    `opt-ray ctl submit train` sets the same fields."""
    from opt_ray.cli import build_parser, main
    from opt_ray.commands.train import config_from_args
    from opt_ray.config import ConfigError, TrainConfig
    (env.root / "shards").mkdir()
    base = dict(preset="tiny", data=str(env.root / "shards"), output=str(env.root / "run"), steps=10)

    def spec(**kw):
        return pb.JobSpec(train=pb.TrainSpec(**{**base, "min_workers": 2, "max_workers": 4, **kw}))

    job = env.client.submit(spec(tp=2, precision="bf16", device="cpu",
                                 activation_checkpointing=True, compile=True))
    argv = shlex.split(job.attempts[0].entrypoint)
    cfg = config_from_args(build_parser().parse_args(argv[1:]))
    assert (cfg.tp, cfg.precision, cfg.device, cfg.activation_checkpointing, cfg.compile,
            cfg.workers) == (2, "bf16", "cpu", True, True, (2, 4))
    # Unset, they are train's defaults and not on the command line.
    plain = env.client.submit(spec(output=str(env.root / "run2")))
    assert not {"--tp", "--precision", "--device", "--compile"} & set(shlex.split(plain.attempts[0].entrypoint))

    for kw, field in ((dict(tp=2, min_workers=3, max_workers=3), "tp"),
                      (dict(precision="fp16", device="cpu"), "precision"),
                      (dict(device="tpu"), "device"), (dict(precision="fp8"), "precision")):
        with pytest.raises(ConfigError) as direct:
            TrainConfig(data="d", output="o", steps=10, workers=kw.get("min_workers", 2),
                        **{k: v for k, v in kw.items() if k not in ("min_workers", "max_workers")})
        assert _invalid(lambda: env.client.submit(spec(**kw))) == f"spec.train.{field}: {direct.value}"

    first = env.backend.last()
    env.backend.set(job.attempts[0].ray_submission_id, pb.RUNNING)
    msg = _invalid(lambda: env.client.scale(job.job_id, 1, 3))
    assert msg.startswith("spec.train.min_workers: --workers 1:3: MIN and MAX must be multiples of --tp 2"), msg
    assert env.backend.jobs[job.attempts[0].ray_submission_id]["state"] == pb.RUNNING
    assert env.backend.last() == first
    scaled = env.client.scale(job.job_id, 2, 6)
    assert "--workers 2:6" in scaled.attempts[-1].entrypoint and "--tp 2" in scaled.attempts[-1].entrypoint

    monkeypatch.setenv("OPT_RAY_TOKEN", TOKEN)
    ctl = ["ctl", "--target", f"127.0.0.1:{env.port}", "--json", "submit", "train",
           "--data", str(env.root / "shards"), "--output", str(env.root / "run3"), "--workers", "2",
           "--tp", "2", "--precision", "fp32", "--compile"]
    assert main(ctl) == 0
    sent = json.loads(capsys.readouterr().out)["spec"]["train"]
    assert (sent["tp"], sent["precision"], sent["compile"]) == (2, "fp32", True)


def test_train_spec_carries_the_recipe_and_the_guard_policy(env, capsys, monkeypatch):
    """TrainSpec's seed, dropout, optim and guard reach the trainer: the entrypoint parsed
    by the real `opt-ray train` parser rebuilds them, a set zero (dropout 0) included;
    unset, they stay off the command line; a bad value is INVALID_ARGUMENT with the
    config's own message named by the nested spec field; `opt-ray ctl submit train` takes
    train's own flags for them and checks them before sending anything."""
    import dataclasses

    from opt_ray.cli import build_parser, main
    from opt_ray.commands.train import config_from_args
    from opt_ray.config import ConfigError, GuardConfig, OptimConfig, TrainConfig
    # The messages carry the configs' fields by the same names, no more and no fewer.
    from opt_ray.control.specs import TRAIN_NESTED, TRAIN_OPTIONAL
    for msg, cls in ((pb.OptimSpec, OptimConfig), (pb.GuardSpec, GuardConfig)):
        assert set(msg.DESCRIPTOR.fields_by_name) == {f.name for f in dataclasses.fields(cls)}
    # TrainSpec's presence fields are TrainConfig's, by name; unset means train's default.
    spec_fields = pb.TrainSpec.DESCRIPTOR.fields_by_name
    config_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert {n for n, f in spec_fields.items() if f.has_presence} == {*TRAIN_OPTIONAL, *TRAIN_NESTED}
    assert {*TRAIN_OPTIONAL, *TRAIN_NESTED} <= config_fields

    (env.root / "shards").mkdir()
    base = dict(preset="tiny", data=str(env.root / "shards"), steps=10, min_workers=1)

    def spec(out, **kw):
        return pb.JobSpec(train=pb.TrainSpec(**base, output=str(env.root / out), **kw))

    faults = dict(keep=3, milestone_every=10, async_checkpoint=True, mirror_every=0.0,
                  deterministic=True, max_failures=-1, collective_timeout=900.0)
    job = env.client.submit(spec("run", seed=7, dropout=0.0, optim=pb.OptimSpec(
        peak_lr=3e-4, betas=[0.9, 0.98], warmup_steps=2, grad_clip=0.5), guard=pb.GuardSpec(
        spike_factor=2.0, clip_after_rollback=0.2, max_rollbacks=5, check_nan=False), **faults))
    cfg = config_from_args(build_parser().parse_args(shlex.split(job.attempts[0].entrypoint)[1:]))
    assert (cfg.seed, cfg.dropout) == (7, 0.0)
    assert {k: getattr(cfg, k) for k in faults} == faults
    assert (cfg.optim.peak_lr, cfg.optim.betas, cfg.optim.warmup_steps, cfg.optim.grad_clip) == \
        (3e-4, (0.9, 0.98), 2, 0.5)
    assert dataclasses.replace(cfg.guard) == GuardConfig(
        spike_factor=2.0, clip_after_rollback=0.2, max_rollbacks=5, check_nan=False)
    plain = shlex.split(env.client.submit(spec("run2")).attempts[0].entrypoint)
    assert not [a for a in plain if a in ("--seed", "--dropout", "--lr", "--grad-clip", "--keep",
                                          "--async-checkpoint", "--max-failures")
                or a.startswith(("--guard", "--no-guard"))]

    for kw, fld, direct in (
            (dict(optim=pb.OptimSpec(peak_lr=-1.0)), "optim.peak_lr", lambda: OptimConfig(peak_lr=-1.0)),
            (dict(optim=pb.OptimSpec(warmup_steps=20)), "optim.warmup_steps",
             lambda: TrainConfig(data="d", output="o", steps=10, warmup_steps=20)),
            (dict(guard=pb.GuardSpec(spike_factor=0.5)), "guard.spike_factor",
             lambda: GuardConfig(spike_factor=0.5)),
            (dict(seed=-1), "seed", lambda: TrainConfig(data="d", output="o", seed=-1)),
            (dict(dropout=1.0), "dropout", lambda: TrainConfig(data="d", output="o", dropout=1.0)),
            (dict(keep=1), "keep", lambda: TrainConfig(data="d", output="o", keep=1)),
            (dict(collective_timeout=0.0), "collective_timeout",
             lambda: TrainConfig(data="d", output="o", collective_timeout=0.0))):
        with pytest.raises(ConfigError) as e:
            direct()
        assert _invalid(lambda: env.client.submit(spec("bad", **kw))) == f"spec.train.{fld}: {e.value}"

    monkeypatch.setenv("OPT_RAY_TOKEN", TOKEN)
    ctl = ["ctl", "--target", f"127.0.0.1:{env.port}", "--json", "submit", "train",
           "--data", str(env.root / "shards"), "--output", str(env.root / "run3")]
    assert main(ctl + ["--seed", "3", "--lr", "1e-4", "--guard-clip", "0.2", "--no-guard-check-nan",
                       "--async-checkpoint", "--collective-timeout", "900"]) == 0
    sent = json.loads(capsys.readouterr().out)["spec"]["train"]
    assert (sent["seed"], sent["optim"], sent["guard"]) == \
        ("3", {"peak_lr": 1e-4}, {"clip_after_rollback": 0.2, "check_nan": False})
    assert (sent["async_checkpoint"], sent["collective_timeout"]) == (True, 900.0)
    assert "keep" not in sent and "max_failures" not in sent
    jobs = len(env.client.list())
    assert main(ctl + ["--lr", "-1"]) == 2
    assert "--lr (optim.peak_lr) must be > 0" in capsys.readouterr().err
    assert len(env.client.list()) == jobs, "a bad flag sends nothing"
