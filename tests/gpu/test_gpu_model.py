"""The model on CUDA: same logits as on CPU, bf16 training step with the fused loss,
KV-cache decoding. Skipped cleanly without CUDA (see tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from opt_ray.config import ModelConfig
from opt_ray.model import OPT

pytestmark = pytest.mark.gpu

CFG = ModelConfig(vocab_size=512, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                  ffn_dim=1024, max_position_embeddings=128, dropout=0.0)


def _model() -> OPT:
    torch.manual_seed(0)
    return OPT(CFG).eval()


def _ids(B: int = 2, T: int = 64) -> torch.Tensor:
    return torch.randint(3, CFG.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))


def test_cuda_logits_match_cpu():
    m = _model()
    ids = _ids()
    with torch.no_grad():
        ref = m(ids)
        got = m.cuda()(ids.cuda()).cpu()
    assert (got - ref).abs().max().item() < 1e-3


def test_cuda_bf16_fused_loss_and_step():
    m = _model().cuda().train()
    ids = _ids().cuda()
    targets = ids.roll(-1, dims=1)
    targets[:, -1] = -100
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True)
    losses = []
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = m(ids, targets=targets)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            logits = m(ids)
        ref = F.cross_entropy(logits.float().reshape(-1, CFG.vocab_size), targets.reshape(-1))
        assert abs(loss.item() - ref.item()) < 0.02 * ref.item()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0]  # the same batch three times: it must go down


def test_cuda_kv_cache_matches_full_forward():
    m = _model().cuda()
    ids = _ids(T=20).cuda()
    with torch.no_grad():
        full = m(ids)
        cache = m.new_cache()
        steps = [m(ids[:, :12], cache=cache)] + [m(ids[:, t:t + 1], cache=cache) for t in range(12, 20)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-3


def _head_loss_grads(dev: str, monkeypatch, fp32_gemm: bool | None):
    """The fused loss over 16 chunks of a (1024, 256) x (512, 256) head in bf16: the head's
    gradient summed over the chunks in fp32 (``acc``), by the fp32-output GEMM or the
    product-and-cast fallback, against cross-entropy over the whole logits."""
    import opt_ray.model.opt as O

    monkeypatch.setitem(O._LOSS_CHUNK_ELEMENTS, dev, 64 * 512)  # 64-row chunks
    if fp32_gemm is False:
        monkeypatch.setattr(O, "_fp32_accumulating_gemm", lambda d: False)
    g = torch.Generator().manual_seed(0)
    h0 = (torch.randn(1024, 256, generator=g) * 0.5).to(dev)
    w0 = (torch.randn(512, 256, generator=g) * 0.5).to(dev)
    t = torch.randint(0, 512, (1024,), generator=g).to(dev)
    t[::7] = O.IGNORE_INDEX
    h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    with torch.autocast(dev, dtype=torch.bfloat16):
        loss = O.lm_head_loss(h, w, t)
    loss.backward()
    hr, wr = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    ref = F.cross_entropy((hr.bfloat16() @ wr.bfloat16().t()).float(), t, ignore_index=O.IGNORE_INDEX)
    ref.backward()
    return loss, ref, h.grad, hr.grad, w.grad, wr.grad


@pytest.mark.parametrize("fp32_gemm", [None, False], ids=["fp32-output-gemm", "fallback"])
def test_cuda_fused_loss_head_gradient_summed_in_fp32(fp32_gemm, monkeypatch):
    import opt_ray.model.opt as O

    if fp32_gemm is None and not O._fp32_accumulating_gemm("cuda"):
        pytest.skip("this torch has no fp32-output addmm on CUDA: the fallback runs instead")
    loss, ref, gh, gh_ref, gw, gw_ref = _head_loss_grads("cuda", monkeypatch, fp32_gemm)
    assert O._whole_logit_grad(1024, 64, 256, 2) is False  # the chunked path, not the whole one
    assert abs(loss.item() - ref.item()) < 1e-3 * ref.item()
    assert gw.dtype == torch.float32
    for got, want in ((gh, gh_ref), (gw, gw_ref)):
        assert ((got - want).norm() / want.norm()).item() < 1e-2
