"""The divergence guard on synthetic loss streams: what it detects, where it rolls back
to, what it changes, when it gives up, and that its state survives a restart."""

from __future__ import annotations

import json
import math

import pytest

from opt_ray.config import ConfigError
from opt_ray.errors import UserError
from opt_ray.train.guard import DivergenceError, DivergenceGuard, GuardConfig, Verdict


def feed(guard: DivergenceGuard, steps, loss=lambda s: 4.0 - 0.001 * s, grad=1.0,
         scale=None, save_every=None):
    """Feed healthy steps; save a checkpoint every ``save_every`` steps. Returns any verdict."""
    for s in steps:
        v = guard.observe(s, loss(s), grad, scale)
        if v is not None:
            return v
        if save_every and s % save_every == 0:
            guard.record_checkpoint(s, scale)
    return None


def small_cfg(**kw) -> GuardConfig:
    return GuardConfig(**{"window": 10, "min_steps": 5, **kw})


# --- configuration ------------------------------------------------------------------

@pytest.mark.parametrize("field,value,hint", [
    ("spike_factor", 1.0, "spike_factor must be > 1"),
    ("lr_factor", 0.0, "lr_factor must be in (0, 1]"),
    ("lr_factor", 1.5, "lr_factor must be in (0, 1]"),
    ("max_rollbacks", -1, "max_rollbacks"),
    ("window", 0, "window"),
    ("clip_after_rollback", 0.0, "clip_after_rollback"),
    ("onset_factor", 2.0, "onset_factor"),
    ("skip_batches", -2, "skip_batches"),
])
def test_config_errors_name_the_field_and_fix(field, value, hint):
    with pytest.raises(ConfigError, match=hint.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")) as e:
        GuardConfig(**{field: value})
    assert isinstance(e.value, UserError)


def test_defaults_are_the_papers_interventions():
    cfg = GuardConfig()
    assert cfg.enabled and cfg.check_nan
    assert cfg.clip_after_rollback == 0.3          # OPT tightened clipping 1.0 -> 0.3
    assert cfg.min_checkpoint_loss_scale == 1.0    # rolled back to scale >= 1.0
    assert 0 < cfg.lr_factor < 1 and cfg.skip_batches >= 1 and cfg.max_rollbacks >= 1


# --- detection ----------------------------------------------------------------------

def test_healthy_noisy_decreasing_stream_is_quiet():
    g = DivergenceGuard(small_cfg())
    # +-8% alternating noise on a falling curve: never a spike.
    v = feed(g, range(1, 300), loss=lambda s: (6.0 - 0.01 * s) * (1.08 if s % 2 else 0.92))
    assert v is None


@pytest.mark.parametrize("factor,fires", [(1.4, False), (1.6, True)])
def test_spike_threshold_is_factor_of_running_mean(factor, fires):
    g = DivergenceGuard(small_cfg(spike_factor=1.5))
    assert feed(g, range(1, 21), loss=lambda s: 4.0) is None
    v = g.observe(21, 4.0 * factor, 1.0)
    assert (v is not None) == fires
    if fires:
        assert v.reason == "spike" and v.step == 21
        assert v.running_mean == pytest.approx(4.0)


def test_no_spike_judged_before_min_steps():
    g = DivergenceGuard(small_cfg(min_steps=10))
    feed(g, range(1, 5), loss=lambda s: 4.0)
    assert g.observe(5, 40.0, 1.0) is None  # only 4 healthy steps seen so far


@pytest.mark.parametrize("loss,grad", [(math.nan, 1.0), (math.inf, 1.0), (None, 1.0), (3.0, math.nan)])
def test_non_finite_loss_or_grad_is_nan(loss, grad):
    g = DivergenceGuard(small_cfg())
    feed(g, range(1, 3))
    v = g.observe(3, loss, grad)
    assert v is not None and v.reason == "nan"
    json.dumps(v.to_dict(), allow_nan=False)  # JSON-clean for the logbook


def test_inf_grad_under_fp16_is_the_scalers_business():
    g = DivergenceGuard(small_cfg())
    feed(g, range(1, 10), scale=1024.0)
    assert g.observe(10, 3.9, math.inf, loss_scale=512.0) is None


def test_loss_scale_floor_and_onset_at_first_low_scale():
    g = DivergenceGuard(small_cfg(loss_scale_floor=1e-4))
    assert feed(g, range(1, 31), scale=8.0, save_every=10) is None
    # The scale collapses from step 31 on while the loss still looks fine.
    scale = 0.5
    for s in range(31, 60):
        v = g.observe(s, 3.9, 1.0, loss_scale=scale)
        if v:
            break
        if s % 10 == 0:
            g.record_checkpoint(s, scale)  # step 40 and 50: scale < 1, not usable
        scale /= 2
    assert v.reason == "loss_scale_floor" and v.onset_step == 31
    assert g.pick_checkpoint([10, 20, 30, 40, 50]) == 30


def test_disabled_guard_never_fires():
    g = DivergenceGuard(small_cfg(enabled=False))
    assert g.observe(1, math.nan, math.nan) is None


# --- rollback target ----------------------------------------------------------------

def test_picks_checkpoint_before_the_rise_not_the_newest():
    g = DivergenceGuard(small_cfg(onset_factor=1.1, spike_factor=1.5))
    assert feed(g, range(1, 41), loss=lambda s: 4.0, save_every=10) is None
    # The loss creeps up from step 41 (elevated, not yet a spike), a checkpoint is saved
    # at 50 mid-rise, then it spikes at 55.
    for s, loss in zip(range(41, 55), [4.5, 4.7, 4.9, 5.0, 5.1, 5.2, 5.3, 5.4, 5.5, 5.6, 5.7, 5.8, 5.8, 5.9]):
        assert g.observe(s, loss, 1.0) is None
        if s == 50:
            g.record_checkpoint(50)
    v = g.observe(55, 7.0, 1.0)
    assert v.reason == "spike" and v.onset_step == 41
    assert g.pick_checkpoint([10, 20, 30, 40, 50]) == 40
    assert v.rollback_to == 40 and v.invalidate_checkpoints == [50]


def test_nan_out_of_the_blue_rolls_back_to_newest_before_it():
    g = DivergenceGuard(small_cfg())
    feed(g, range(1, 36), save_every=10)
    v = g.observe(36, math.nan, 1.0)
    assert v.onset_step == 36
    assert g.pick_checkpoint([10, 20, 30]) == 30
    assert v.lr_scale == 0.5 and v.new_clip == 0.3 and v.skip_steps == [36]
    assert g.should_skip(36) and not g.should_skip(35)


def test_checkpoint_at_the_onset_step_is_not_healthy_enough():
    # The checkpoint at step s is the state after step s; if trouble began at step 30 the
    # checkpoint at 30 already contains it.
    g = DivergenceGuard(small_cfg())
    feed(g, range(1, 30), save_every=10)
    g.record_checkpoint(30)
    v = g.observe(30, math.nan, 1.0)
    assert g.pick_checkpoint([10, 20, 30]) == 20 and v.invalidate_checkpoints == [30]


def test_skip_batches_cover_the_steps_up_to_detection_with_batch_ids():
    g = DivergenceGuard(small_cfg(skip_batches=3))
    for s in range(1, 26):
        g.observe(s, 4.0, 1.0, batch={"epoch": 0, "index": s * 8})
        if s % 10 == 0:
            g.record_checkpoint(s)
    v = g.observe(26, 40.0, 1.0, batch={"epoch": 0, "index": 208})
    g.pick_checkpoint([10, 20])
    assert v.skip_steps == [24, 25, 26]
    assert v.skip_batches == [{"epoch": 0, "index": i} for i in (192, 200, 208)]
    assert g.skip_batches == v.skip_batches


def test_no_checkpoint_before_trouble_gives_up_with_report():
    g = DivergenceGuard(small_cfg())
    feed(g, range(1, 8))
    v = g.observe(8, math.nan, 1.0)
    assert g.pick_checkpoint([]) is None
    assert v.give_up and "no healthy checkpoint before step 8" in v.report


# --- escalation, give-up ------------------------------------------------------------

def test_rollbacks_compound_then_give_up_with_report():
    g = DivergenceGuard(small_cfg(max_rollbacks=2, lr_factor=0.5))
    feed(g, range(1, 21), save_every=10)
    scales = []
    for attempt in (1, 2, 3):
        v = g.observe(25, math.nan, 1.0)   # replay diverges again at the same step
        target = g.pick_checkpoint([10, 20])
        if attempt <= 2:
            assert target == 20 and v.attempt == attempt and not v.give_up
            scales.append(v.lr_scale)
            feed(g, range(21, 25))
        else:
            assert target is None and v.give_up
    assert scales == [0.5, 0.25] and g.lr_scale == 0.25
    assert "limit of 2 rollback(s)" in v.report and "tried 2 rollback(s)" in v.report
    assert "rolled back to step 20" in v.report
    with pytest.raises(DivergenceError, match="non-finite loss") as e:
        raise DivergenceError(v)
    assert isinstance(e.value, UserError) and e.value.verdict is v


def test_max_rollbacks_zero_gives_up_at_first_sign():
    g = DivergenceGuard(small_cfg(max_rollbacks=0))
    feed(g, range(1, 21), save_every=10)
    v = g.observe(21, math.nan, 1.0)
    assert v.give_up and g.pick_checkpoint([10, 20]) is None
    assert "no rollback was tried" in v.report


def test_replay_after_rollback_uses_the_pre_trouble_baseline():
    g = DivergenceGuard(small_cfg())
    feed(g, range(1, 31), loss=lambda s: 4.0, save_every=10)
    for s, loss in [(31, 4.5), (32, 4.6)]:
        g.observe(s, loss, 1.0)
    g.observe(33, 9.0, 1.0)
    assert g.pick_checkpoint([10, 20, 30]) == 30
    assert g.running_mean() == pytest.approx(4.0)
    # Replayed steps at the old baseline are healthy again.
    assert feed(g, range(31, 40), loss=lambda s: 4.0) is None


# --- persistence --------------------------------------------------------------------

def test_state_round_trip_remembers_rollbacks(tmp_path):
    g = DivergenceGuard(small_cfg(max_rollbacks=1))
    feed(g, range(1, 21), save_every=10)
    g.observe(21, math.nan, 1.0)
    g.pick_checkpoint([10, 20])
    sd = json.loads(json.dumps(g.state_dict()))  # must survive JSON (it goes in checkpoints)

    g2 = DivergenceGuard(small_cfg(max_rollbacks=1))
    g2.load_state_dict(sd)
    assert g2.state_dict() == sd
    assert g2.lr_scale == 0.5 and g2.clip == 0.3 and g2.should_skip(21) and g2.rollbacks == 1
    v = g2.observe(22, math.nan, 1.0)    # a restart does not reset the retry budget
    assert v.give_up

    g.save(tmp_path / "guard.json")
    g3 = DivergenceGuard(small_cfg(max_rollbacks=1))
    assert g3.load(tmp_path / "guard.json") and g3.state_dict() == g.state_dict()
    assert not DivergenceGuard().load(tmp_path / "missing.json")


def test_malformed_state_says_where_it_must_come_from():
    with pytest.raises(ValueError, match="state_dict"):
        DivergenceGuard().load_state_dict({"losses": []})


def test_verdict_dict_round_trip():
    g = DivergenceGuard(small_cfg())
    feed(g, range(1, 21), save_every=10)
    v = g.observe(21, 50.0, 1.0)
    g.pick_checkpoint([10, 20])
    assert Verdict.from_dict(json.loads(json.dumps(v.to_dict()))) == v


def test_a_lasting_plateau_becomes_the_new_baseline():
    g = DivergenceGuard(small_cfg(onset_patience=15))
    feed(g, range(1, 21), loss=lambda s: 4.0)
    # The loss settles 25% higher and stays there (not a spike): after onset_patience
    # steps it is the new normal, so a checkpoint then counts as healthy.
    assert feed(g, range(21, 60), loss=lambda s: 5.0) is None
    assert g.running_mean() == pytest.approx(5.0)
    g.record_checkpoint(60)
    assert g.is_usable(60)


def test_a_give_up_survives_a_restart(tmp_path):
    g = DivergenceGuard(small_cfg(max_rollbacks=0))
    feed(g, range(1, 11), save_every=5)
    g.raise_if_gave_up()                      # healthy: nothing to raise
    v = g.observe(11, math.nan, 1.0)
    g.pick_checkpoint([5, 10])
    g.save(tmp_path / "guard.json")
    restarted = DivergenceGuard(small_cfg(max_rollbacks=0))
    restarted.load(tmp_path / "guard.json")
    assert restarted.gave_up == v
    with pytest.raises(DivergenceError, match="limit of 0 rollback"):
        restarted.raise_if_gave_up()
