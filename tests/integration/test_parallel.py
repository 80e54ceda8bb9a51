"""Tensor parallelism (fairscale layers) and FSDP2 over real gloo processes on CPU.

Each worker builds the same seeded model, computes the single-process reference itself,
then parallelises a copy and compares logits, loss, gradients and post-step parameters.
Workers are plain ``torch.multiprocessing`` processes on 127.0.0.1 (no Ray)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F

from opt_ray.config import ModelConfig
from opt_ray.model import OPT
from opt_ray.model import parallel as par
from tests.conftest import free_port

pytestmark = pytest.mark.slow


def _cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                ffn_dim=64, max_position_embeddings=32, dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


def _batch(cfg: ModelConfig, B: int = 4, T: int = 12):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :3] = 0                     # a left-padded row
    ids[1, :3] = cfg.pad_token_id       # whose pad tokens hit the embedding's padding_idx
    return ids, mask


def _loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), ids[:, 1:].reshape(-1))


def _targets(ids: torch.Tensor) -> torch.Tensor:
    """The next-token targets ``_loss`` uses, for ``model(ids, targets=...)``."""
    t = ids.roll(-1, dims=1)
    t[:, -1] = -100
    return t


def _init(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def _gather_tp(t: torch.Tensor, dim: int | None, tp_group) -> torch.Tensor:
    """Reassemble a tensor-parallel tensor from every rank of the tensor group."""
    if dim is None:
        return t
    world = torch.distributed.get_world_size(tp_group)
    parts = [torch.empty_like(t) for _ in range(world)]
    torch.distributed.all_gather(parts, t.contiguous(), group=tp_group)
    return torch.cat(parts, dim=dim)


def _tp_worker(rank: int, world: int, port: int) -> None:
    _init(rank, world, port)
    try:
        cfg = _cfg()
        torch.manual_seed(0)
        ref = OPT(cfg)
        model = copy.deepcopy(ref)
        ids, mask = _batch(cfg)

        ref_logits = ref(ids, attention_mask=mask)
        _loss(ref_logits, ids).backward()

        _, tp_group = par.init_model_parallel(world)
        par.apply_tensor_parallel(model, tp_group)
        # Tying survives: one parameter shared by the vocab-parallel embedding and head.
        assert model.lm_head.weight is model.decoder.embed_tokens.weight
        assert model.decoder.layers[0].self_attn.q_proj.weight.shape[0] == cfg.hidden_size // world
        with torch.no_grad():  # asked for logits, the head gathers the whole vocabulary
            torch.testing.assert_close(model(ids, attention_mask=mask), ref_logits, atol=1e-5, rtol=1e-5)
        # The training loss: the fused loss on each rank's vocabulary shard; the gathering
        # head is never called, so no rank holds (tokens, vocab) logits.
        def gathered(*a, **k):
            raise AssertionError("the TP loss gathered the full logits")
        model.lm_head.forward = gathered
        loss = model(ids, attention_mask=mask, targets=_targets(ids))
        del model.lm_head.forward
        torch.testing.assert_close(loss, _loss(ref_logits, ids).detach(), atol=1e-5, rtol=1e-5)
        loss.backward()

        dims = par.tp_partition_dims(cfg)
        ref_params = dict(ref.named_parameters())
        n = 0
        for name, p in model.named_parameters():
            g = _gather_tp(p.grad, dims.get(name), tp_group)
            torch.testing.assert_close(g, ref_params[name].grad, atol=1e-6, rtol=1e-5, msg=name)
            n += 1
        assert n == len(ref_params)

        # The TP state dict reassembles into the full one, and splits back.
        shards = [None] * world
        torch.distributed.all_gather_object(shards, {k: v.detach() for k, v in model.state_dict().items()})
        merged = par.merge_tp_shards(shards)
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(merged[k], v, msg=k)
        mine = par.split_tp_state(merged, world, rank)
        for k, v in model.state_dict().items():
            assert torch.equal(mine[k], v), k
    finally:
        torch.distributed.destroy_process_group()


def _fsdp_worker(rank: int, world: int, port: int, tp: int, ac: bool) -> None:
    """FSDP2 over dp = world / tp data ranks (x tensor parallel tp, with or without
    activation checkpointing) vs one process."""
    _init(rank, world, port)
    try:
        cfg = _cfg()
        torch.manual_seed(0)
        ref = OPT(cfg)
        model = copy.deepcopy(ref)
        ids, mask = _batch(cfg, B=4)
        dp = world // tp

        ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
        ref_loss = _loss(ref(ids, attention_mask=mask), ids)
        ref_loss.backward()
        ref_opt.step()

        dp_group, tp_group = par.init_model_parallel(tp)
        par.parallelize(model, tp_size=tp, dp_group=dp_group, tp_group=tp_group, activation_checkpointing=ac)
        assert model.lm_head.weight is model.decoder.embed_tokens.weight  # still tied
        # Each data rank takes its rows; tensor ranks of one group see the same rows.
        dp_rank = torch.distributed.get_rank(dp_group)
        rows = slice(dp_rank * (4 // dp), (dp_rank + 1) * (4 // dp))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
        # Equal token counts per rank, so the mean of rank means is the global mean. The
        # model's own (fused, chunked) loss against the reference's plain cross-entropy.
        loss = model(ids[rows], attention_mask=mask[rows], targets=_targets(ids[rows]))
        loss.backward()
        opt.step()

        global_loss = loss.detach().clone()
        torch.distributed.all_reduce(global_loss, group=dp_group)
        torch.testing.assert_close(global_loss / dp, ref_loss.detach(), atol=1e-5, rtol=1e-5)

        dims = par.tp_partition_dims(cfg)
        ref_params = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            full = _gather_tp(_full(p.detach()), dims.get(name) if tp > 1 else None, tp_group)
            torch.testing.assert_close(full, ref_params[name].detach(), atol=2e-5, rtol=1e-4, msg=name)
    finally:
        torch.distributed.destroy_process_group()


def _spawn(fn, world: int, *args) -> None:
    torch.multiprocessing.spawn(fn, args=(world, free_port(), *args), nprocs=world, join=True)


@pytest.mark.timeout(120)
def test_tensor_parallel_2_matches_single_process():
    _spawn(_tp_worker, 2)


@pytest.mark.timeout(120)
def test_fsdp2_over_2_processes_matches_single_process():
    _spawn(_fsdp_worker, 2, 1, False)


@pytest.mark.timeout(120)
def test_fsdp2_dp2_x_tp2_matches_single_process():
    _spawn(_fsdp_worker, 4, 2, True)


def test_tp_split_merge_roundtrip():
    cfg = _cfg()
    torch.manual_seed(0)
    full = OPT(cfg).state_dict()
    for tp in (2, 4):
        shards = [par.split_tp_state(full, tp, r) for r in range(tp)]
        assert shards[0]["model.decoder.layers.0.fc1.weight"].shape == (cfg.ffn_dim // tp, cfg.hidden_size)
        assert shards[1]["model.decoder.layers.0.fc2.weight"].shape == (cfg.hidden_size, cfg.ffn_dim // tp)
        assert shards[0]["model.decoder.layers.0.fc2.bias"].shape == (cfg.hidden_size,)
        merged = par.merge_tp_shards(shards)
        assert merged.keys() == full.keys()
        for k in full:
            assert torch.equal(merged[k], full[k]), k
    # Re-shard 4 -> 2 through the full state.
    four = [par.split_tp_state(full, 4, r) for r in range(4)]
    two = [par.split_tp_state(par.merge_tp_shards(four), 2, r) for r in range(2)]
    assert torch.equal(par.merge_tp_shards(two)["lm_head.weight"], full["lm_head.weight"])


def test_tp_partition_dims_names():
    dims = par.tp_partition_dims(_cfg(num_hidden_layers=1))
    assert dims == {
        "model.decoder.embed_tokens.weight": 0,
        "lm_head.weight": 0,
        "model.decoder.layers.0.self_attn.q_proj.weight": 0,
        "model.decoder.layers.0.self_attn.q_proj.bias": 0,
        "model.decoder.layers.0.self_attn.k_proj.weight": 0,
        "model.decoder.layers.0.self_attn.k_proj.bias": 0,
        "model.decoder.layers.0.self_attn.v_proj.weight": 0,
        "model.decoder.layers.0.self_attn.v_proj.bias": 0,
        "model.decoder.layers.0.self_attn.out_proj.weight": 1,
        "model.decoder.layers.0.fc1.weight": 0,
        "model.decoder.layers.0.fc1.bias": 0,
        "model.decoder.layers.0.fc2.weight": 1,
    }


def test_split_rejects_bad_rank():
    with pytest.raises(par.ParallelConfigError):
        par.split_tp_state({}, 2, 2)


def _build_tp_worker(rank: int, world: int, port: int) -> None:
    _init(rank, world, port)
    try:
        cfg = _cfg()
        dp_group, tp_group = par.init_model_parallel(2)
        model = par.build_sharded(cfg, device="cpu", seed=3, tp_size=2, dp_group=dp_group,
                                  tp_group=tp_group, fsdp=False)
        ids, _ = _batch(cfg)
        loss = model(ids, targets=_targets(ids))
        shards: list = [None, None]
        torch.distributed.all_gather_object(shards, {k: v.detach().clone()
                                                     for k, v in model.state_dict().items()})
        # The tensor-parallel build holds exactly the slices of the one-rank build.
        ref = par.build_sharded(cfg, device="cpu", seed=3, fsdp=False)
        full = par.merge_tp_shards(shards)
        for k, v in ref.state_dict().items():
            assert torch.equal(full[k], v), k
        torch.testing.assert_close(loss, ref(ids, targets=_targets(ids)), atol=1e-5, rtol=1e-5)
    finally:
        from fairscale.nn.model_parallel import initialize as mpu
        mpu.destroy_model_parallel()
        torch.distributed.destroy_process_group()


@pytest.mark.timeout(180)
def test_build_sharded_with_tensor_parallel_equals_the_one_rank_build():
    _spawn(_build_tp_worker, 2)
