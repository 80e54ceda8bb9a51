"""The OPT model against transformers' OPTForCausalLM, its KV cache, init, checkpointing
and dropout. All on a small config on CPU in fp32."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from opt_ray.config import ModelConfig
from opt_ray.model import OPT, KVCache

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
             num_attention_heads=4, max_position_embeddings=40)


def _pair(seed: int = 0, **kw) -> tuple[OPT, "transformers.OPTForCausalLM"]:
    """Our model and transformers' with the same random weights (every parameter random,
    LayerNorm gains and biases included, so a misplaced norm or bias shows)."""
    torch.manual_seed(seed)
    hf = transformers.OPTForCausalLM(transformers.OPTConfig(**{**SMALL, **kw})).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.05)
    ours = OPT(ModelConfig(**{**SMALL, **kw})).eval()
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=True)
    assert not missing and not unexpected
    return ours, hf


def _ids(B: int = 3, T: int = 13, seed: int = 7) -> torch.Tensor:
    return torch.randint(3, SMALL["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


POST_LN = dict(do_layer_norm_before=False, word_embed_proj_dim=16)  # the 350m shape, scaled down


@pytest.mark.parametrize("kw", [{}, POST_LN], ids=["pre_ln", "post_ln_proj"])
def test_logits_match_transformers(kw):
    ours, hf = _pair(**kw)
    assert (ours.decoder.project_in is not None) == bool(kw)
    ids = _ids()
    with torch.no_grad():
        diff = (ours(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4


@pytest.mark.parametrize("kw", [{}, POST_LN], ids=["pre_ln", "post_ln_proj"])
def test_left_padded_batch_matches_transformers(kw):
    ours, hf = _pair(**kw)
    ids = _ids(B=3, T=10)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :1] = 0
    ids[mask == 0] = 1  # pad id
    with torch.no_grad():
        a = ours(ids, attention_mask=mask)
        b = hf(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (a[real] - b[real]).abs().max().item() <= 1e-4
    # And a left-padded row equals the same row unpadded (positions do not shift).
    with torch.no_grad():
        alone = ours(ids[0:1, 4:])
    assert (a[0, 4:] - alone[0]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kw", [{}, POST_LN], ids=["pre_ln", "post_ln_proj"])
def test_kv_cache_incremental_equals_full_forward(kw):
    ours, _ = _pair(**kw)
    ids = _ids(B=2, T=12)
    with torch.no_grad():
        full = ours(ids)
        cache = ours.new_cache()
        assert isinstance(cache, KVCache)
        steps = [ours(ids[:, :5], cache=cache)]          # prefill
        steps.append(ours(ids[:, 5:8], cache=cache))     # a chunk on top of the cache
        for t in range(8, 12):                           # one token at a time
            steps.append(ours(ids[:, t:t + 1], cache=cache))
    inc = torch.cat(steps, dim=1)
    assert cache.length == 12
    assert (inc - full).abs().max().item() <= 1e-5


def test_kv_cache_with_left_padding_equals_full_forward():
    ours, hf = _pair()
    ids = _ids(B=2, T=9)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        full = ours(ids, attention_mask=mask)
        cache = ours.new_cache()
        steps = [ours(ids[:, :6], attention_mask=mask[:, :6], cache=cache)]
        for t in range(6, 9):
            steps.append(ours(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache))
        ref = hf(ids, attention_mask=mask).logits
    inc = torch.cat(steps, dim=1)
    real = mask.bool()
    assert (inc[real] - full[real]).abs().max().item() <= 1e-5
    assert (inc[real] - ref[real]).abs().max().item() <= 1e-4


def test_init_statistics():
    """N(0, 0.006); out_proj and fc2 scaled by 1/sqrt(2L); biases 0; LayerNorm 1/0."""
    cfg = ModelConfig(vocab_size=2000, hidden_size=256, num_hidden_layers=8, num_attention_heads=4,
                      ffn_dim=1024, max_position_embeddings=256)
    torch.manual_seed(0)
    m = OPT(cfg)
    std, out_std = 0.006, 0.006 / math.sqrt(2 * 8)

    def check(t: torch.Tensor, want: float, name: str) -> None:
        n = t.numel()
        # The sample std of n normals has relative standard error ~1/sqrt(2n); allow 6 of them.
        assert abs(t.std().item() - want) <= 6 * want / math.sqrt(2 * n), name
        assert abs(t.mean().item()) <= 6 * want / math.sqrt(n), name

    seen_out = 0
    for name, p in m.named_parameters():
        if name.endswith("bias"):  # linear and LayerNorm biases alike
            assert torch.count_nonzero(p) == 0, name
        elif "layer_norm" in name:
            assert torch.all(p == 1), name
        elif name.endswith(("out_proj.weight", "fc2.weight")):
            check(p, out_std, name)
            seen_out += 1
        else:
            check(p, std, name)
    assert seen_out == 2 * cfg.num_hidden_layers
    assert m.lm_head.weight is m.decoder.embed_tokens.weight


def _loss_and_grads(m: OPT, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    m.zero_grad()
    logits = m(ids)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}


def test_activation_checkpointing_same_loss_and_grads():
    ours, _ = _pair(**POST_LN)
    ours.train()
    ids = _ids(B=2, T=10)
    torch.manual_seed(3)
    loss_a, grads_a = _loss_and_grads(ours, ids)
    ours.activation_checkpointing = True
    torch.manual_seed(3)  # dropout is on: the recompute must replay the same masks
    loss_b, grads_b = _loss_and_grads(ours, ids)
    assert torch.equal(loss_a, loss_b)
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], atol=1e-7, rtol=1e-6, msg=n)


def test_dropout_only_in_train_mode():
    cfg = ModelConfig(**SMALL, dropout=0.1)
    torch.manual_seed(0)
    m = OPT(cfg)
    ids = _ids(B=2, T=8)
    with torch.no_grad():
        m.eval()
        e1, e2 = m(ids), m(ids)
        m.train()
        t1, t2 = m(ids), m(ids)
    assert torch.equal(e1, e2)
    assert not torch.allclose(t1, t2)
    assert not torch.allclose(t1, e1)
    # dropout=0 makes train and eval identical: the difference above is dropout alone.
    m0 = OPT(cfg.replace(dropout=0.0))
    m0.load_state_dict(m.state_dict())
    with torch.no_grad():
        assert torch.equal(m0.train()(ids), m0.eval()(ids))


def test_bf16_autocast_close_to_fp32():
    ours, _ = _pair()
    ids = _ids()
    with torch.no_grad():
        ref = ours(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = ours(ids)
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max().item() < 0.05 * ref.abs().max().item()


@pytest.mark.parametrize("kw", [{}, POST_LN], ids=["pre_ln", "post_ln_proj"])
def test_fused_loss_matches_cross_entropy_on_logits(kw, monkeypatch):
    """model(ids, targets=t): same loss and grads as cross-entropy over full logits,
    with ignored targets and more than one chunk."""
    import opt_ray.model.opt as opt_mod
    monkeypatch.setitem(opt_mod._LOSS_CHUNK_ELEMENTS, "cpu", 7 * SMALL["vocab_size"])  # 7-row chunks, 14 in fp32
    ours, _ = _pair(**kw)
    ids = _ids(B=3, T=10)
    targets = ids.roll(-1, dims=1)
    targets[:, -1] = -100
    targets[1, :4] = -100

    ours.zero_grad()
    logits = ours(ids)
    ref = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in ours.named_parameters()}

    ours.zero_grad()
    loss = ours(ids, targets=targets)
    loss.backward()
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    for n, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], atol=1e-7, rtol=1e-5, msg=n)

    with torch.no_grad():  # eval: no gradient pass, same value
        torch.testing.assert_close(ours(ids, targets=targets), ref.detach(), atol=1e-6, rtol=1e-6)
    ours.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = ours(ids, targets=targets)
    assert abs(low.item() - ref.item()) < 0.02 * ref.item()
    low.backward()   # bf16 chunks, the head's gradient summed over chunks in fp32
    head = ours.lm_head.weight                   # tied: listed under the embedding's name
    ref_head = next(ref_grads[n] for n, p in ours.named_parameters() if p is head)
    assert head.grad.dtype == torch.float32
    err = (head.grad - ref_head).norm() / ref_head.norm()
    assert err < 0.04, err.item()   # bf16 activations alone: ~0.022 (before and after chunking)


def test_fused_loss_exact_for_very_wrong_predictions():
    """A target whose probability underflows fp32 still gets the exact (finite) loss."""
    from opt_ray.model.opt import lm_head_loss
    torch.manual_seed(0)
    h = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(20, 8)
    w[3] = 0.0
    w[5] = h.detach()[0] * 30  # row 0: logit 5 dwarfs the rest by hundreds of nats
    targets = torch.tensor([3, 1, 2, 3, -100, 7])
    loss = lm_head_loss(h, w, targets)
    ref = F.cross_entropy(h @ w.t(), targets, ignore_index=-100)
    assert torch.isfinite(loss) and ref.item() > 50
    torch.testing.assert_close(loss, ref)
    loss.backward()
    g = h.grad.clone()
    h.grad = None
    ref.backward()
    torch.testing.assert_close(g, h.grad)


def test_fused_loss_refuses_a_second_backward():
    """Its gradients are made in forward and scaled in place by the first backward: a second
    backward (retain_graph) is refused, not silently wrong."""
    from opt_ray.model.opt import lm_head_loss
    torch.manual_seed(0)
    h = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(20, 8, requires_grad=True)
    loss = lm_head_loss(h, w, torch.tensor([1, 2, 3, -100, 7]))
    loss.backward(retain_graph=True)
    ref = F.cross_entropy(h @ w.t(), torch.tensor([1, 2, 3, -100, 7]), ignore_index=-100)
    gh, gw = torch.autograd.grad(ref, (h, w))
    torch.testing.assert_close(h.grad, gh)
    torch.testing.assert_close(w.grad, gw)
    with pytest.raises(RuntimeError, match="one backward pass"):
        loss.backward()


def test_compiled_blocks_match_transformers_and_compile_once():
    """``--compile`` (``compile_blocks``): the compiled model's training loss and every
    gradient match transformers' eager model; the three layers share one compiled graph
    (a 96-layer model must not recompile per layer, nor hit dynamo's recompile limit and
    fall back to eager), and the parameter names are the checkpoints' names."""
    from torch._dynamo.utils import counters

    from opt_ray.model.parallel import compile_blocks

    torch._dynamo.reset()
    counters.clear()
    # The tiny preset's block at the gang tests' micro-batch (2 x 32): the same graph, so
    # a suite run compiles it once (inductor's on-disk cache) for both.
    ours, hf = _pair(num_hidden_layers=3, dropout=0.0, hidden_size=128, ffn_dim=512,
                     max_position_embeddings=64)
    names = [n for n, _ in ours.named_parameters()]
    compile_blocks(ours)
    assert [n for n, _ in ours.named_parameters()] == names
    ours.train(), hf.train()
    ids = _ids(B=2, T=33)
    loss = ours(ids[:, :-1], targets=ids[:, 1:])
    loss.backward()
    ref = hf(input_ids=ids, labels=ids).loss
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    grads = dict(hf.named_parameters())
    scale = max(float(p.grad.abs().max()) for p in grads.values())
    for n, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, grads[n].grad, atol=1e-5 * scale, rtol=1e-4, msg=n)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
