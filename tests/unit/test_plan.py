"""The training plan on paper (opt_ray/model/plan.py) against the real model and code.

- parameter counts: against ``config.num_params`` for every preset, against the real
  ``OPT`` module's parameters (meta device) and ``parallel.tp_partition_dims``, and the
  per-rank shard sizes against what FSDP2 + fairscale TP really allocate (a fake process
  group of 8 ranks in this process: no communication, real sharding);
- activations: the planner's terms against the bytes a real bf16 forward/backward of the
  project's model keeps alive, measured with a dispatch mode that follows every storage
  the ops create until it is freed (held by autograd or by checkpointing alike);
- the 175b plans: 992 A100s with TP 8 fit, 8 GPUs do not and name the fix;
- deploy/SCALING.md equals the generator's output.
"""

from __future__ import annotations

import json
import math
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from opt_ray.config import PRESETS, ModelConfig, num_params, preset
from opt_ray.model import opt as opt_mod
from opt_ray.model import plan as P
from opt_ray.model.opt import OPT

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", list(PRESETS))
def test_param_count_is_configs(name):
    cfg = preset(name).model
    assert sum(s.numel for s in P.param_specs(cfg)) == num_params(cfg)
    # One rank of one: the whole model.
    assert P.plan_preset(name, gpus=1, tp=1, seq_len=cfg.max_position_embeddings).params_per_rank \
        == num_params(cfg)


# The pre-LN, post-LN (350m: project_in/out) and largest layouts.
@pytest.mark.parametrize("name", ["tiny", "350m", "175b"])
def test_param_specs_are_the_real_modules_parameters(name):
    cfg = preset(name).model
    specs = P.param_specs(cfg)
    with torch.device("meta"):
        model = OPT(cfg)
    assert {s.name: s.shape for s in specs} == {n: tuple(p.shape) for n, p in model.named_parameters()}


def test_tp_split_dims_are_parallels():
    from opt_ray.model.parallel import tp_partition_dims

    for name in ("350m", "1.3b"):
        cfg = preset(name).model
        want = {k: v for k, v in tp_partition_dims(cfg).items() if k != "lm_head.weight"}  # tied
        assert {s.name: s.tp_dim for s in P.param_specs(cfg) if s.tp_dim is not None} == want


def test_per_rank_shards_are_what_fsdp2_and_tp_allocate():
    """Rank 0 of 8 (tp 2 x dp 4) with sizes that do not divide evenly, so FSDP2's padding
    counts: the planner's per-tensor shard equals FSDP2's padded sharded size. And the
    activations a tensor-parallel rank keeps: the split ones / tp, the rest whole."""
    import torch.distributed as dist
    from fairscale.nn.model_parallel.initialize import destroy_model_parallel
    from torch.distributed.fsdp._fully_shard._fsdp_state import _get_module_fsdp_state
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from opt_ray.model.parallel import init_model_parallel, parallelize

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    cfg = ModelConfig(hidden_size=72, num_hidden_layers=2, num_attention_heads=6, ffn_dim=200,
                      vocab_size=1002, max_position_embeddings=61)
    tp, dp = 2, 4
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=tp * dp)
    try:
        dp_group, tp_group = init_model_parallel(tp)
        model = OPT(cfg)
        parallelize(model, tp_size=tp, dp_group=dp_group, tp_group=tp_group, param_dtype=torch.bfloat16)
        names = {id(p): n for n, p in model.named_parameters()}
        allocated = {}
        for unit in [model, *model.decoder.layers]:
            for fp in _get_module_fsdp_state(unit)._fsdp_param_group.fsdp_params:
                allocated[names[id(fp.sharded_param)]] = math.prod(fp.padded_sharded_param_size)
        # Tensor parallelism alone (the fake group's collectives return uninitialised
        # buffers of the right size, which is all that counting bytes needs).
        B, T = 2, 48
        tp_model = parallelize(OPT(cfg), tp_size=tp, tp_group=tp_group, fsdp=False)
        tp_model = tp_model.to(torch.bfloat16).train()
        ids = torch.randint(0, cfg.vocab_size, (B, T))
        with _LiveBytes({p.untyped_storage()._cdata for p in tp_model.parameters()}) as m:
            h = tp_model.hidden_states(ids)
            kept = m.cur
        del h
    finally:
        destroy_model_parallel()
        dist.destroy_process_group()
    want = {s.name: s.shard_numel(tp, dp) for s in P.param_specs(cfg)}
    assert allocated == want
    assert P.plan(cfg, P.Setup(gpus=tp * dp, tp=tp, seq_len=T)).params_per_rank == sum(want.values())
    a = P.activation_bytes(cfg, P.Setup(gpus=tp * dp, tp=tp, seq_len=T, micro_batch=B,
                                        dropout_mask_bytes=2))
    # Kept activations + the returned hidden states (B x T x d, bf16); fairscale's vocab-
    # parallel embedding also keeps its masked ids (int64) and mask: within 3%.
    planned = a.saved + B * T * cfg.hidden_size * 2
    assert abs(planned - kept) <= 0.03 * kept, (planned, kept)


class _LiveBytes(TorchDispatchMode):
    """Bytes of every storage an op creates, followed until it is freed (weakref on the
    storage); storages that existed before (parameters, inputs) are not counted."""

    def __init__(self, known: set[int]):
        super().__init__()
        self.known, self.live, self.cur, self.peak = known, {}, 0, 0

    def _free(self, key: int) -> None:
        self.cur -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = st._cdata
                if key in self.live or key in self.known or st.nbytes() == 0:
                    continue
                self.live[key] = st.nbytes()
                self.cur += st.nbytes()
                weakref.finalize(st, self._free, key)
                self.peak = max(self.peak, self.cur)
        return out


def _measure(cfg: ModelConfig, B: int, T: int, ckpt: bool) -> dict[str, int]:
    torch.manual_seed(0)
    # bf16 parameters, as FSDP2's param_dtype gathers them for compute.
    model = OPT(cfg).to(torch.bfloat16).train()
    model.activation_checkpointing = ckpt
    for p in model.parameters():
        # FSDP2 reduce-scatters and frees each unsharded gradient as it is made.
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    targets = torch.randint(0, cfg.vocab_size, (B, T))
    with _LiveBytes({p.untyped_storage()._cdata for p in model.parameters()}) as m:
        loss = model(ids, targets=targets)
        after_forward, forward_peak = m.cur, m.peak
        m.peak = 0
        loss.backward()
        backward_peak = m.peak
    return {"after_forward": after_forward, "forward_peak": forward_peak, "backward_peak": backward_peak}


SHAPES = {
    # pre-LN, the tiny preset's widths; post-LN with a narrower embedding (the 350m's layout).
    "pre-ln": ModelConfig(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, ffn_dim=512,
                          vocab_size=4096, max_position_embeddings=512),
    "post-ln": ModelConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, ffn_dim=512,
                           vocab_size=4096, max_position_embeddings=512, word_embed_proj_dim=64,
                           do_layer_norm_before=False),
}


@pytest.mark.parametrize("ckpt", [False, True], ids=["no-ckpt", "ckpt"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_activation_terms_match_a_measured_forward_backward(shape, ckpt, monkeypatch):
    cfg = SHAPES[shape]
    B, T = 2, 128
    # A chunk of 128 rows, so that the loss runs in two chunks as it does at scale.
    # (Measured on the CPU; the plan counts the CUDA chunk: both the same size here.)
    for dev in ("cpu", "cuda"):
        monkeypatch.setitem(opt_mod._LOSS_CHUNK_ELEMENTS, dev, 128 * cfg.vocab_size)
    got = _measure(cfg, B, T, ckpt)
    # The CPU dropout kernel keeps its noise in the compute dtype (CUDA: a bool mask).
    setup = P.Setup(seq_len=T, micro_batch=B, activation_checkpointing=ckpt, dropout_mask_bytes=2)
    a = P.activation_bytes(cfg, setup)
    # Gradients alive in this measurement (the test frees each as it is accumulated): the
    # tied head's, summed with the embedding's at the end of backward, and one tensor's.
    # (FSDP2 keeps a whole block's until its reduce-scatter: the planner's unsharded_grads.)
    grads = 2 * (cfg.vocab_size * cfg.word_embed_proj_dim + cfg.hidden_size * cfg.ffn_dim)
    # Kept from forward to backward: exact up to a few small tensors (scalars, masks).
    assert abs(a.saved + a.loss_saved - got["after_forward"]) <= 0.01 * got["after_forward"]
    # The loss's forward peak on top of the kept activations: within 2%.
    assert abs(a.saved + a.loss_forward - got["forward_peak"]) <= 0.02 * got["forward_peak"]
    # Backward: the loss's backward, or one layer's (recompute + gradients in flight) with
    # the head's gradient: within 15%.
    planned_bwd = a.saved + max(a.loss_backward, a.layer_working + grads)
    print(shape, ckpt, planned_bwd / got["backward_peak"], got)
    assert abs(planned_bwd - got["backward_peak"]) <= 0.15 * got["backward_peak"], (planned_bwd, got)
    # The planner's sum of component peaks bounds the real peak from above.
    assert a.total + grads >= max(got["forward_peak"], got["backward_peak"])


def test_175b_on_992_a100s_fits_and_on_8_gpus_does_not():
    ok = P.plan_preset("175b", gpus=992, tp=8, gpu_memory_gib=P.parse_memory("80GB"))
    assert ok.fits and ok.total_bytes < 80 * P.GIB
    assert ok.setup.dp == 124
    # Parameters per rank: total / (tp x dp), plus the replicated pieces and FSDP2's padding;
    # 16 bytes each (fp32 master, fp32 gradient, Adam m and v).
    even = num_params(preset("175b").model) / 992
    assert even < ok.params_per_rank < 1.05 * even
    assert ok.memory["params_fp32"] + ok.memory["grads_fp32"] + ok.memory["adam_fp32"] == 16 * ok.params_per_rank
    # The paper's 147 TFLOP/s per GPU on 992 GPUs (47% MFU) and a 2M-token batch.
    assert ok.step_time_s == pytest.approx(
        ok.flops_per_token * 2 * 2**20 / (992 * 312e12 * 0.47))
    assert 14 < ok.step_time_s < 17 and 20 < ok.time_to_recipe_days < 30
    bad = P.plan_preset("175b", gpus=8, tp=8)
    assert not bad.fits
    assert "does NOT fit" in bad.verdict() and "--gpus" in bad.verdict()
    # The suggested setup does fit.
    assert P.plan_preset("175b", gpus=48, tp=8, activation_checkpointing=True).fits
    # The fused loss never holds the full B x T x V logits in fp32 (cross_entropy(logits.float())).
    assert ok.memory["loss"] < 2048 * preset("175b").model.vocab_size * 4
    # A plan that only needs checkpointing / a smaller micro-batch says so.
    mb = P.plan_preset("13b", gpus=64, tp=4, micro_batch=16)
    assert not mb.fits and "--activation-checkpointing" in mb.verdict()


def test_cli_plan_json_and_errors(capsys):
    from opt_ray.cli import main

    assert main(["model", "info", "--preset", "175b", "--gpus", "992", "--tp", "8", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["plan"]["fits"] is True and info["plan"]["dp"] == 124
    assert info["plan"]["params_per_rank"] == P.plan_preset("175b", gpus=992, tp=8).params_per_rank
    assert main(["model", "info", "--preset", "175b", "--gpus", "8", "--tp", "8"]) == 0
    assert "does NOT fit" in capsys.readouterr().out
    assert main(["model", "info", "--preset", "13b", "--gpus", "12", "--tp", "5"]) == 2
    assert "--tp 5 must divide --gpus 12" in capsys.readouterr().err
    assert main(["model", "info", "--preset", "175b", "--gpus", "64", "--tp", "64"]) == 2
    assert "must divide model.num_attention_heads" in capsys.readouterr().err
    assert main(["model", "info", "--preset", "1.3b", "--gpu-memory", "lots"]) == 2
    assert "--gpu-memory" in capsys.readouterr().err
    assert main(["model", "info", "--preset", "1.3b", "--seq-len", "4096"]) == 2
    assert "exceeds the model's 2048 positions" in capsys.readouterr().err
    assert main(["model", "info", "--preset", "1.3b", "--micro-batch", "0"]) == 2
    assert "--micro-batch must be a positive integer" in capsys.readouterr().err


def test_scaling_md_is_fresh():
    committed = (ROOT / "deploy" / "SCALING.md").read_text()
    assert committed == P.scaling_markdown(), (
        "deploy/SCALING.md is stale: python -m opt_ray.model.plan --markdown > deploy/SCALING.md")
    assert "| 175b | 992 | 8 x 124 |" in committed
