"""Training gang pieces without a gang: LR schedule, chaos specs, checkpoint commit and
verification, config validation."""

from __future__ import annotations

import json
import math

import pytest

from opt_ray.errors import UserError
from opt_ray.train.chaos import Chaos, parse_chaos
from opt_ray.train.checkpoint import committed, resolve, verify
from opt_ray.train.schedule import LRSchedule


def test_schedule_warmup_then_linear_decay_to_ten_percent():
    s = LRSchedule(1e-3, warmup_steps=10, decay_steps=110)
    assert s.lr(1) == pytest.approx(1e-4)
    assert s.lr(10) == pytest.approx(1e-3)
    assert s.lr(60) == pytest.approx(1e-3 * (1 - 0.9 * 0.5))
    assert s.lr(110) == pytest.approx(1e-4)
    assert s.lr(500) == pytest.approx(1e-4)  # stays at the floor past the end
    s.lr_factor = 0.5  # the guard's cut, checkpointed with the schedule
    assert s.lr(10) == pytest.approx(5e-4)
    t = LRSchedule(1e-3, 10, 110)
    t.load_state_dict(s.state_dict())
    assert t.lr(10) == s.lr(10)


def test_chaos_spec_parsing():
    evs = parse_chaos("kill:rank=1:step=5, hang:rank=0:step=8,corrupt:step=6,spike:step=3:factor=4")
    assert [(e.kind, e.rank, e.step) for e in evs] == [("kill", 1, 5), ("hang", 0, 8), ("corrupt", 0, 6),
                                                       ("spike", 0, 3)]
    assert evs[-1].factor == 4.0
    assert parse_chaos("") == []
    for bad in ("explode:step=1", "kill:rank=1", "kill:step=x", "kill:when=3:step=2"):
        with pytest.raises(UserError, match="--chaos"):
            parse_chaos(bad)


def test_chaos_fires_once_per_run(tmp_path):
    a = Chaos.from_spec("nan:step=2,spike:step=3:factor=10", tmp_path, rank=0)
    assert a.loss_factor(1) == 1.0
    assert math.isnan(a.loss_factor(2))                   # fires now
    assert a.loss_factor(2) == 1.0                        # not again in this process
    b = Chaos.from_spec("nan:step=2,spike:step=3:factor=10", tmp_path, rank=0)
    assert b.loss_factor(2) == 1.0                        # nor after a restart
    assert b.loss_factor(3) == 10.0
    assert (tmp_path / "chaos" / "nan-rank0-step2.fired").exists()


def _fake_ckpt(root, step, payload=b"weights"):
    from opt_ray.artifacts import sha256_file

    d = root / f"step_{step:08d}"
    (d / "tp0").mkdir(parents=True)
    (d / "tp0" / "0.distcp").write_bytes(payload)
    (d / "train_state.json").write_text(json.dumps({"step": step}))
    files = {str(p.relative_to(d)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
             for p in d.rglob("*") if p.is_file()}
    (d / "manifest.json").write_text(json.dumps({"step": step, "files": files}))
    return d


def test_checkpoint_verification_and_fallback(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    _fake_ckpt(root, 2)
    newest = _fake_ckpt(root, 4)
    (root / ".tmp-step_00000006").mkdir()  # a save killed midway: not a checkpoint
    assert [s for s, _ in committed(root)] == [2, 4]
    assert resolve(tmp_path / "run") == newest
    (newest / "tp0" / "0.distcp").write_bytes(b"garbage")
    assert "sha256" in verify(newest)
    assert resolve(tmp_path / "run").name == "step_00000002"
    with pytest.raises(UserError, match="corrupt"):
        resolve(newest)
    with pytest.raises(UserError, match="no valid checkpoint"):
        resolve(tmp_path / "nothing")


def test_train_config_validation(tmp_path):
    from opt_ray.train.loop import TrainConfig

    ok = TrainConfig(data="d", output="o", workers=(1, 2))
    assert (ok.min_workers, ok.max_workers) == (1, 2)
    for kw, needle in ((dict(workers=(3, 2)), "MIN:MAX"), (dict(keep=1), "--keep"),
                       (dict(precision="fp8"), "--precision"), (dict(chaos="boom:step=1"), "--chaos"),
                       (dict(preset="7b"), "preset")):
        with pytest.raises(UserError, match=needle):
            TrainConfig(data="d", output="o", **kw)


def test_dynamic_loss_scaler():
    from opt_ray.train.loop import DynamicLossScaler

    s = DynamicLossScaler(True, init_scale=8.0, growth_interval=2, min_scale=1.0)
    s.update(False)
    assert s.scale == 4.0          # overflow: halve
    s.update(True)
    s.update(True)
    assert s.scale == 8.0          # growth_interval clean steps: double
    for _ in range(5):
        s.update(False)
    assert s.scale == 1.0          # never below the floor
    t = DynamicLossScaler(True)
    t.load_state_dict(s.state_dict())
    assert t.scale == 1.0
    off = DynamicLossScaler(False)
    off.update(False)
    assert off.scale == 1.0        # bf16/fp32: no scaling at all


def test_loss_scaler_floor_lets_the_guard_verdict_fire():
    """Overflow after overflow halves the scale down past the guard's floor (1e-4): the
    guard's loss-scale verdict fires; the scaler's own floor (2^-24) lies below it."""
    from opt_ray.train.guard import DivergenceGuard, GuardConfig
    from opt_ray.train.loop import DynamicLossScaler

    s, g = DynamicLossScaler(True), DivergenceGuard(GuardConfig())
    assert s.min_scale < GuardConfig().loss_scale_floor
    verdict = None
    for step in range(1, 60):
        s.update(False)
        verdict = g.observe(step, 3.0, float("inf"), s.scale)
        if verdict:
            break
    assert verdict is not None and verdict.reason == "loss_scale_floor"
    assert s.scale <= GuardConfig().loss_scale_floor


def test_recipe_keeps_the_global_batch_and_the_papers_warmup():
    from opt_ray.config import TrainConfig
    from opt_ray.errors import UserError
    from opt_ray.train.loop import plan_recipe

    cfg = TrainConfig(data="d", output="o", preset="125m", steps=100_000, micro_batch=8)
    for dp in (1, 2, 4, 8):
        r = plan_recipe(cfg, 2048, dp)
        # 0.5M tokens = 256 rows of 2048 whatever the data-parallel width.
        assert r.global_rows == 256 and r.rows_per_rank * dp == 256 and r.accum == 256 // (8 * dp)
    assert plan_recipe(cfg, 2048, 1).warmup_steps == -(-375_000_000 // (256 * 2048))  # 716 steps
    big = TrainConfig(data="d", output="o", preset="175b", steps=140_000)
    assert plan_recipe(big, 2048, 8).warmup_steps == 2000 and plan_recipe(big, 2048, 8).peak_lr == 1.2e-4
    with pytest.raises(UserError, match="do not split over 3"):
        plan_recipe(cfg, 2048, 3)


def test_the_gang_module_imports_no_torch():
    """The driver and the Ray Train controller (which unpickles the gang's callbacks)
    load actors.train on every gang start: ~2 s of a core each if it pulled torch in."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", "import sys, actors.train; "
                        "print(sorted(m for m in ('torch', 'ray.train') if m in sys.modules))"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
