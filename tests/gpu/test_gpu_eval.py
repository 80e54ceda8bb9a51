"""`opt-ray eval` scoring on CUDA (``--device cuda``, the default on GPUs): the same
log-likelihoods as on the CPU; and the serving engine's defaults there (bf16 on the GPU).
Skipped cleanly without CUDA (see tests/conftest.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from opt_ray.config import ModelConfig
from opt_ray.eval.scoring import Scorer
from opt_ray.model import OPT

pytestmark = pytest.mark.gpu

CFG = ModelConfig(vocab_size=512, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                  ffn_dim=1024, max_position_embeddings=128, dropout=0.0)


def _pairs(n: int = 12):
    g = torch.Generator().manual_seed(2)
    out = []
    for _ in range(n):
        ctx = torch.randint(3, CFG.vocab_size, (int(torch.randint(4, 60, (1,), generator=g)),), generator=g)
        cont = torch.randint(3, CFG.vocab_size, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g)
        out.append((ctx.tolist(), cont.tolist()))
    return out


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.bfloat16, 0.1)])
def test_scorer_on_cuda_matches_cpu(dtype, tol):
    torch.manual_seed(0)
    model = OPT(CFG).eval()
    pairs = _pairs()
    ref = Scorer(copy.deepcopy(model), batch_size=4).loglikelihood(pairs)
    got = Scorer(model.to(dtype), batch_size=4, device="cuda").loglikelihood(pairs)
    assert next(model.parameters()).device.type == "cuda"
    for (a, ga), (b, gb) in zip(ref, got):
        assert abs(a - b) <= tol * max(1.0, abs(a)), (a, b)
    if dtype == torch.float32:
        assert [g for _, g in ref] == [g for _, g in got]


def test_serving_engine_defaults_to_bf16_on_the_gpu(tmp_path):
    from opt_ray.serve.engine import EngineConfig, engine_from_checkpoint
    from tests.serve_helpers import build_checkpoint
    e = engine_from_checkpoint(build_checkpoint(tmp_path / "ckpt"), EngineConfig(max_num_seqs=2))
    assert (e.config.dtype, e.config.device) == ("bfloat16", "cuda")
    assert {p.dtype for p in e.model.parameters()} == {torch.bfloat16}
    assert next(e.model.parameters()).device.type == "cuda"
