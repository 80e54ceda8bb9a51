"""Nothing from a run directory is unpickled with code execution.

A crafted run directory: a real training checkpoint whose DCP ``.metadata`` is replaced by
a pickle that runs ``os.system`` (writing a marker file) when loaded, its manifest
re-sealed so the checksums pass (a manifest beside the files proves nothing). ``opt-ray
eval``, ``opt-ray export`` and a resuming training loop must refuse it, and the marker
must never appear. DCP's non-tensor values get the same treatment, and the RNG state is
JSON that restores the exact streams.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.integration.test_train_gang import make_shards, tiny_cfg


class _Payload:
    """Pickles to ``os.system("touch MARKER")``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _reseal(ckpt: Path) -> None:
    from opt_ray.artifacts import sha256_file

    manifest = json.loads((ckpt / "manifest.json").read_text())
    for name in manifest["files"]:
        p = ckpt / name
        manifest["files"][name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("safety") / "shards", docs=120)


@pytest.fixture(scope="module")
def good_run(shards, tmp_path_factory) -> Path:
    from opt_ray.train.loop import train

    out = tmp_path_factory.mktemp("safety") / "run"
    train(tiny_cfg(shards, out, steps=2, checkpoint_every=2))
    return out


@pytest.fixture
def crafted(good_run, tmp_path) -> tuple[Path, Path]:
    """A copy of the run whose checkpoint metadata carries the payload; (run, marker)."""
    from opt_ray.train.checkpoint import resolve

    run = tmp_path / "crafted"
    shutil.copytree(good_run, run)
    marker = tmp_path / "PWNED"
    ckpt = Path(resolve(run))
    (ckpt / "tp0" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    _reseal(ckpt)
    # The payload is live: a plain pickle.load of that file would run it.
    assert not marker.exists()
    return run, marker


def test_eval_refuses_a_crafted_checkpoint(crafted, shards, capsys):
    from opt_ray.cli import main

    run, marker = crafted
    assert main(["eval", str(run), "--data", str(shards), "--max-rows", "4"]) == 2
    err = capsys.readouterr().err
    assert "posix.system" in err or "os.system" in err, err
    assert "refusing to load" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()


def test_export_refuses_a_crafted_checkpoint(crafted, tmp_path, capsys):
    from opt_ray.cli import main

    run, marker = crafted
    assert main(["export", str(run), "--output", str(tmp_path / "hf")]) == 2
    assert "refusing to load" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "hf").exists()


def test_resume_refuses_a_crafted_checkpoint(crafted, shards):
    """What every worker of `opt-ray train` runs when it resumes (the gang turns this
    UserError into exit 2 without a retry: tests/chaos/test_resume_cli.py)."""
    from opt_ray.train.loop import train
    from opt_ray.train.safe_pickle import UnsafeCheckpointError

    run, marker = crafted
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        train(tiny_cfg(shards, run, steps=4, checkpoint_every=2))
    assert not marker.exists()


def test_non_tensor_values_are_read_without_code(tmp_path):
    """DCP stores non-tensor values (the optimizer's param_groups) as pickles that its
    default planner loads with weights_only=False; ours refuses code in them."""
    import torch.distributed.checkpoint as dcp

    from opt_ray.train.safe_pickle import SafeLoadPlanner, UnsafeCheckpointError, dcp_load, reader

    marker = tmp_path / "PWNED"
    dcp.save({"w": torch.ones(3), "groups": [{"lr": 0.1, "betas": (0.9, 0.95)}]},
             checkpoint_id=tmp_path / "ok", no_dist=True)
    sd = {"w": torch.zeros(3), "groups": [{"lr": 0.0, "betas": (0.0, 0.0)}]}
    dcp.load(sd, storage_reader=reader(str(tmp_path / "ok")), planner=SafeLoadPlanner(), no_dist=True)
    assert torch.equal(sd["w"], torch.ones(3)) and sd["groups"] == [{"lr": 0.1, "betas": (0.9, 0.95)}]

    dcp.save({"w": torch.ones(3), "lr": _Payload(marker)}, checkpoint_id=tmp_path / "bad",
             no_dist=True)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError):
        dcp_load({"w": torch.zeros(3), "lr": 0.0}, storage_reader=reader(str(tmp_path / "bad")),
                 no_dist=True)
    assert not marker.exists()


def test_metadata_of_a_real_checkpoint_reads_the_same(good_run):
    """The restricted unpickler reads exactly what pickle reads for a real checkpoint."""
    from opt_ray.train.checkpoint import resolve
    from opt_ray.train.safe_pickle import load_dcp_metadata

    meta_file = Path(resolve(good_run)) / "tp0" / ".metadata"
    with open(meta_file, "rb") as f:
        ours = load_dcp_metadata(f)
    with open(meta_file, "rb") as f:
        theirs = pickle.load(f)  # trusted here: we wrote it in this test
    assert ours.state_dict_metadata == theirs.state_dict_metadata
    assert ours.storage_data == theirs.storage_data


def test_rng_state_round_trips_through_json():
    from opt_ray.train.checkpoint import rng_from_json, rng_to_json, rng_state, set_rng_state

    torch.manual_seed(3), np.random.seed(4), random.seed(5)
    np.random.standard_normal()  # a cached gaussian in numpy's state
    saved = json.loads(json.dumps(rng_to_json(rng_state())))
    expected = (torch.rand(4), np.random.standard_normal(3), random.random())
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    set_rng_state(rng_from_json(saved))
    got = (torch.rand(4), np.random.standard_normal(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1])
    assert expected[2] == got[2]
