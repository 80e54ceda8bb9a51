"""The trainer's real step, in one process: every tensor of it on the model's device
(checked with the model on ``meta``, where a stray CPU tensor fails), and the fp16 loss
scaler's unscale factor across a growth step."""

from __future__ import annotations

import random

import pytest
import torch

WORDS = "the quick brown fox jumps over lazy dog and runs far away from home".split()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from opt_ray.data.shards import write_shards
    from opt_ray.data.tokenizer import train_tokenizer

    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30))) for _ in range(200)]
    tok = train_tokenizer(texts, 300)
    return write_shards(({"text": t} for t in texts), tok, tmp_path_factory.mktemp("d") / "s",
                        seq_len=32, valid_fraction=0.05)


def _trainer(shards, out, **kw):
    from opt_ray.train.loop import TrainConfig, Trainer, _ensure_process_group

    _ensure_process_group()
    cfg = TrainConfig(data=str(shards), output=str(out), preset="tiny", steps=4, batch_tokens=4 * 32,
                      micro_batch=2, lr=1e-3, warmup_steps=0, guard=False, dropout=0.0,
                      precision="fp32", device="cpu", **kw)
    return Trainer(cfg)


def test_step_tensors_live_on_the_model_device(shards, tmp_path):
    """With model and data on ``meta`` the whole device part of the step (micro-batch
    forward/backward, loss accumulator, grad-norm pieces, overflow flag) and the update
    (unscale/clip, AdamW) run: any tensor made on the CPU would fail to mix with them."""
    t = _trainer(shards, tmp_path / "run")
    try:
        t.model.to("meta")
        t.optimizer = torch.optim.AdamW(t.model.parameters(), lr=1e-3)
        t.device = torch.device("meta")
        rows = t.sampler.next_batch(t.global_rows, t.dp_rank, t.dp_size)
        stats = t.forward_backward(rows, 1)
        assert stats.device.type == "meta" and stats.shape == (4,) and stats.dtype == torch.float64
        grads = [p.grad for p in t.model.parameters()]
        assert all(g is not None and g.device.type == "meta" for g in grads)
        t.apply_update(stats, used_scale=1.0)
        assert all(p.device.type == "meta" for p in t.model.parameters())
        with pytest.raises((NotImplementedError, RuntimeError)):
            stats.tolist()  # the step's one host read: the only place values leave the device
    finally:
        t.close()


def test_growth_step_unscales_by_the_scale_the_backward_used(shards, tmp_path):
    """fp32 with loss scaling by powers of two is exact: a scaled run whose scale grows
    after every step must update exactly like an unscaled one (the old code unscaled a
    growth step by the new, doubled scale)."""
    from opt_ray.train.loop import DynamicLossScaler

    params = []
    for scaled in (False, True):
        t = _trainer(shards, tmp_path / f"run{scaled}")
        try:
            if scaled:
                t.scaler = DynamicLossScaler(True, init_scale=4.0, growth_interval=1)
            recs = [t.train_step() for _ in range(3)]
            params.append({k: v.detach().clone() for k, v in t.model.state_dict().items()})
            if scaled:
                assert [r["loss_scale"] for r in recs] == [8.0, 16.0, 32.0]
        finally:
            t.close()
    assert all(torch.equal(params[0][k], params[1][k]) for k in params[0])


def test_clipped_update_equals_adamw_on_clipped_gradients(shards, tmp_path):
    """The clip factor rides in the fused AdamW kernel (its ``grad_scale``): the update
    must equal a plain (for-loop) AdamW applied to gradients scaled to the clip norm."""
    import math

    t = _trainer(shards, tmp_path / "run")
    try:
        assert t.optimizer.defaults.get("fused"), "this CPU build has torch's fused AdamW"
        t.clip = 1e-3  # far below the first step's gradient norm: clipping is on
        t.schedule.apply(t.optimizer, 1)
        stats = t.forward_backward(t.sampler.next_batch(t.global_rows, t.dp_rank, t.dp_size), 1)
        _, tp_sq, rep_sq, _ = stats.tolist()
        norm = math.sqrt(tp_sq + rep_sq)
        assert norm > 100 * t.clip
        names = [n for n, p in t.model.named_parameters() if p.grad is not None]
        params = dict(t.model.named_parameters())
        ref = {n: params[n].detach().clone().requires_grad_(True) for n in names}
        factor = t.clip / (norm + 1e-6)
        for n in names:
            ref[n].grad = params[n].grad.detach() * factor
        g = t.optimizer.param_groups[0]
        torch.optim.AdamW(list(ref.values()), lr=g["lr"], betas=g["betas"], eps=g["eps"],
                          weight_decay=g["weight_decay"], foreach=False).step()
        t.apply_update(stats, 1.0)
        for n in names:
            assert torch.allclose(params[n].detach(), ref[n].detach(), rtol=1e-5, atol=1e-7), n
        # Nothing left behind for a later step().
        assert t.optimizer.grad_scale is None and t.optimizer.found_inf is None
    finally:
        t.close()


def test_compile_without_a_cpp_compiler_is_a_user_error(shards, tmp_path):
    """`--compile` on a CPU worker without a C++ compiler: a UserError (never retried) that
    names the fix, before the model is built, instead of a failure inside dynamo at the
    first forward."""
    from torch._inductor import config as inductor_config

    from opt_ray.errors import UserError

    # inductor's own patch: monkeypatch's undo leaves its config module without the
    # attribute, which broke every later compile in the process.
    with inductor_config.patch({"cpp.cxx": ("no-such-c++-compiler",)}), \
            pytest.raises(UserError, match=r"--compile on the CPU needs a C\+\+ compiler .*install g\+\+"):
        _trainer(shards, tmp_path / "run", compile=True)


def test_resume_takes_the_optimizer_flags_of_the_resumed_run(shards, tmp_path):
    """A resume with the run's flags keeps what the checkpoint carries (a clip the guard
    lowered); one that asks for another --grad-clip, --weight-decay or --betas (what
    `opt-ray ctl rollback --grad-clip` submits) trains with those from the checkpoint on,
    instead of the saved optimizer's param groups silently winning."""
    t = _trainer(shards, tmp_path / "run")
    try:
        t.train_step()
        t.clip = 0.3  # as the divergence guard sets it after a rollback
        path = t.save()
    finally:
        t.close()
    same = _trainer(shards, tmp_path / "run")
    try:
        same.restore(path)
        g = same.optimizer.param_groups[0]
        assert (same.step, same.clip, g["weight_decay"], tuple(g["betas"])) == (1, 0.3, 0.1, (0.9, 0.95))
    finally:
        same.close()
    changed = _trainer(shards, tmp_path / "run", grad_clip=0.05, weight_decay=0.0,
                       optim={"betas": (0.8, 0.9)})
    try:
        changed.restore(path)
        g = changed.optimizer.param_groups[0]
        assert (changed.step, changed.clip, g["weight_decay"], tuple(g["betas"])) == (1, 0.05, 0.0, (0.8, 0.9))
        # The moments came from the checkpoint: only the hyperparameters changed.
        assert all(s["step"].item() == 1 for s in changed.optimizer.state.values())
    finally:
        changed.close()


def test_read_ahead_gives_the_steps_own_rows_after_a_skip_or_a_restore(shards, tmp_path):
    """The trainer reads the next step's rows during a step; when the guard skips a batch
    or a checkpoint is restored, the rows a step trains on are its own, not the ones
    read ahead."""
    import numpy as np

    t = _trainer(shards, tmp_path / "run")
    try:
        def rows():
            return t.sampler.next_batch(t.global_rows, t.dp_rank, t.dp_size)

        first = rows()
        assert np.array_equal(t._step_rows(first), t.data.batch(first))
        ahead = t._ahead[0]
        second = rows()
        assert tuple(second) == ahead  # read during the first step
        assert np.array_equal(t._step_rows(second), t.data.batch(second))
        t.sampler.skip(t.global_rows)  # the guard's data skip
        third = rows()
        assert tuple(third) != t._ahead[0]
        assert np.array_equal(t._step_rows(third), t.data.batch(third))
        t.sampler.load_state_dict({**t.sampler.state_dict(), "consumed": 0})  # a restore
        again = rows()
        assert again == first and np.array_equal(t._step_rows(again), t.data.batch(first))
    finally:
        t.close()
