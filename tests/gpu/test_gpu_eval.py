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


def _tp_rank(rank: int, port: int, ckpt: str, pairs, out: str) -> None:
    import json
    from pathlib import Path

    from opt_ray.model.hf import from_hf_sharded
    from opt_ray.model.parallel import init_model_parallel

    torch.cuda.set_device(rank)
    torch.distributed.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=2)
    try:
        init_model_parallel(2)
        model = from_hf_sharded(ckpt, dtype=torch.bfloat16)
        got = Scorer(model, batch_size=4, device="cuda").loglikelihood(pairs)
        Path(out, f"rank{rank}.json").write_text(json.dumps(got))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tensor_parallel_scoring_over_nccl_matches_one_gpu(tmp_path):
    """`opt-ray eval --tp 2` on GPUs: two ranks, each with half the split weights read
    from the checkpoint, all-reducing over NCCL, score as the whole model on one GPU
    (bf16 tolerance), and both ranks compute the same results."""
    import json

    import torch.multiprocessing as mp

    from opt_ray.model.hf import from_hf, to_hf
    from tests.conftest import free_port

    torch.manual_seed(0)
    to_hf(OPT(CFG).eval(), tmp_path / "ckpt")
    pairs = _pairs()
    ref = Scorer(from_hf(tmp_path / "ckpt", dtype=torch.bfloat16), batch_size=4,
                 device="cuda").loglikelihood(pairs)
    mp.spawn(_tp_rank, args=(free_port(), str(tmp_path / "ckpt"), pairs, str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    for (a, _), (b, _) in zip(ref, ranks[0]):
        assert abs(a - b) <= 0.1 * max(1.0, abs(a)), (a, b)
