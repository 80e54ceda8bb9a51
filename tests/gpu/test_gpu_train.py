"""The trainer's real step on CUDA: one GPU in bf16 and fp16 (dynamic loss scaling), and a
2-GPU NCCL gang (FSDP2) taking identical decisions; ``bench/train_step.py --device cuda``
on the 1.3b shape. Skipped cleanly without CUDA (see tests/conftest.py)."""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import pytest
import torch

from tests.conftest import free_port

pytestmark = pytest.mark.gpu
WORDS = "the quick brown fox jumps over lazy dog and runs far away from home".split()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from opt_ray.data.shards import write_shards
    from opt_ray.data.tokenizer import train_tokenizer

    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30))) for _ in range(400)]
    return write_shards(({"text": t} for t in texts), train_tokenizer(texts, 300),
                        tmp_path_factory.mktemp("gpu") / "s", seq_len=64, valid_fraction=0.05)


def _cfg(shards, out, precision, world=1):
    from opt_ray.train.loop import TrainConfig

    return TrainConfig(data=str(shards), output=str(out), preset="tiny", steps=4, workers=world,
                       batch_tokens=16 * 64, micro_batch=4, lr=1e-3, warmup_steps=0, guard=False,
                       precision=precision, device="cuda")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_trainer_step_on_one_gpu(shards, tmp_path, precision, monkeypatch):
    from opt_ray.train.loop import Trainer, _ensure_process_group

    monkeypatch.setenv("MASTER_PORT", str(free_port()))  # a fresh store for each world

    # A world of one with NCCL for CUDA tensors, as a GPU gang has: the step's reductions
    # (loss, grad-norm pieces, the fp16 overflow vote) and FSDP2's collectives go through it.
    made = _ensure_process_group("cuda")
    t = Trainer(_cfg(shards, tmp_path / precision, precision))
    try:
        assert made and "nccl" in str(torch.distributed.get_backend()).lower()
        assert t.device.type == "cuda"
        assert all(p.device.type == "cuda" for p in t.model.parameters())
        # FSDP2's mixed precision on one GPU as on many: 16-bit blocks, fp32 masters.
        outs: set[torch.dtype] = set()
        hooks = [layer.register_forward_hook(lambda m, a, o: outs.add(o.dtype))
                 for layer in t.model.decoder.layers]
        recs = [t.train_step() for _ in range(4)]
        for h in hooks:
            h.remove()
        assert outs == {torch.bfloat16 if precision == "bf16" else torch.float16}
        assert {p.dtype for p in t.model.parameters()} == {torch.float32}
        assert all(math.isfinite(r["loss"]) for r in recs)
        assert recs[-1]["loss"] < recs[0]["loss"]
        assert (recs[0]["loss_scale"] is not None) == (precision == "fp16")
    finally:
        t.close()
        if made:
            torch.distributed.destroy_process_group()


def test_compiled_trainer_step_on_one_gpu_matches_eager(shards, tmp_path, monkeypatch):
    """``--compile`` on CUDA (Triton kernels for the blocks): without dropout, four bf16
    steps give the eager trainer's losses to bf16 tolerance, from the same weights."""
    import dataclasses

    from opt_ray.train.loop import Trainer, _ensure_process_group

    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    made = _ensure_process_group("cuda")
    losses = {}
    try:
        for compiled in (False, True):
            cfg = dataclasses.replace(_cfg(shards, tmp_path / f"c{int(compiled)}", "bf16"),
                                      dropout=0.0, compile=compiled)
            t = Trainer(cfg)
            try:
                losses[compiled] = [t.train_step()["loss"] for _ in range(4)]
            finally:
                t.close()
    finally:
        if made:
            torch.distributed.destroy_process_group()
    assert losses[True] == pytest.approx(losses[False], rel=2e-2), losses
    assert losses[True][-1] < losses[True][0]


def _gang_worker(rank: int, world: int, port: int, shards: str, out: str, precision: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    torch.cuda.set_device(rank)
    torch.distributed.init_process_group("nccl", rank=rank, world_size=world)
    from opt_ray.train.loop import Trainer

    t = Trainer(_cfg(shards, out, precision, world))
    try:
        recs = [t.train_step() for _ in range(3)]
        Path(out, f"rank{rank}.json").write_text(json.dumps(
            [{k: r[k] for k in ("loss", "grad_norm", "loss_scale")} for r in recs]))
    finally:
        t.close()
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_nccl_gang_of_two_agrees(shards, tmp_path, precision):
    out = tmp_path / precision
    out.mkdir()
    torch.multiprocessing.spawn(_gang_worker, args=(2, free_port(), str(shards), str(out), precision),
                                nprocs=2, join=True)
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1 and all(math.isfinite(r["loss"]) for r in r0)


def test_bench_train_step_cuda_1_3b():
    """The real trainer step vs transformers on the 1.3b shape at seq 2048 (MFU reported)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    for dtype in ("bf16", "fp16"):
        out = subprocess.run([sys.executable, str(root / "bench" / "train_step.py"), "--device", "cuda",
                              "--preset", "1.3b", "--seq-len", "2048", "--batch", "2", "--repeats", "3",
                              "--dtype", dtype, "--sides", "trainer,hf"],
                             capture_output=True, text=True, timeout=900, check=True).stdout
        res = json.loads(out[out.index("{"):])
        print(json.dumps({dtype: {k: res[k] for k in res if k.startswith(("trainer", "hf", "speedup", "memory"))}}))
        assert res["trainer"]["mfu"] > 0 and math.isfinite(res["trainer"]["loss_last"])
