"""The trainer's real step on a 2-process gloo gang (data parallel, FSDP2), no Ray:
gradients are reduce-scattered after every micro-batch (not only the last), and an fp16
overflow injected into one rank's gradient shard makes every rank take the same skip
and the same loss-scale decision."""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import pytest
import torch

from tests.conftest import free_port

pytestmark = pytest.mark.slow
WORDS = "the quick brown fox jumps over lazy dog and runs far away from home".split()


def _shards(out: Path) -> Path:
    """200 short sentences over a 14-word vocabulary, as shards of 32-token rows."""
    from opt_ray.data.shards import write_shards
    from opt_ray.data.tokenizer import train_tokenizer

    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30))) for _ in range(200)]
    return write_shards(({"text": t} for t in texts), train_tokenizer(texts, 300), out,
                        seq_len=32, valid_fraction=0.05)


def _worker(rank: int, world: int, port: int, shards: str, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from opt_ray.train.loop import DynamicLossScaler, TrainConfig, Trainer

    cfg = TrainConfig(data=shards, output=out, preset="tiny", steps=3, batch_tokens=8 * 32,
                      micro_batch=2, lr=1e-3, warmup_steps=0, guard=False, dropout=0.0,
                      precision="fp32", device="cpu", workers=world)
    t = Trainer(cfg)
    try:
        # Loss scaling on in fp32 (CPU has no fp16 autocast): the decisions are the same code.
        t.scaler = DynamicLossScaler(True, init_scale=16.0, growth_interval=100)
        calls = {"n": 0}
        state = {"step": 0}

        def hook(p):  # FSDP2 runs it after each reduce-scatter into the sharded gradient
            calls["n"] += 1
            if rank == 1 and state["step"] == 2 and p.grad.to_local().numel():
                p.grad.to_local().view(-1)[0] = math.inf  # an overflow in this rank's shard only

        params = list(t.model.parameters())
        for p in params:
            p.register_post_accumulate_grad_hook(hook)
        recs = []
        for step in (1, 2, 3):
            state["step"] = step
            calls["n"] = 0
            before = [p.detach().to_local().clone() for p in params]
            r = t.train_step()
            changed = any(not torch.equal(b, p.detach().to_local()) for b, p in zip(before, params))
            recs.append({"loss_scale": r["loss_scale"], "grad_norm": r["grad_norm"],
                         "changed": changed, "reduce_scatters_per_param": calls["n"] / len(params),
                         "adam_steps": float(t.optimizer.state[params[0]]["step"]),
                         "accum": t.accum})
        Path(out, f"rank{rank}.json").write_text(json.dumps(recs))
    finally:
        t.close()
        torch.distributed.destroy_process_group()


@pytest.mark.timeout(240)
def test_per_micro_batch_reduce_scatter_and_same_overflow_decision(tmp_path):
    shards = _shards(tmp_path / "s")
    out = tmp_path / "run"
    torch.multiprocessing.spawn(_worker, args=(2, free_port(), str(shards), str(out)), nprocs=2, join=True)
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    # 8 rows / 2 ranks / micro 2 = 2 micro-batches, each reduce-scattered.
    assert all(s["accum"] == 2 and s["reduce_scatters_per_param"] == 2 for s in r0 + r1)
    # Step 2 overflowed on rank 1's shard only: both ranks skip it and halve the scale.
    assert [s["loss_scale"] for s in r0] == [s["loss_scale"] for s in r1] == [16.0, 8.0, 8.0]
    assert [s["changed"] for s in r0] == [s["changed"] for s in r1] == [True, False, True]
    # The skipped step left AdamW's step count (its bias correction) where it was, too.
    assert [s["adam_steps"] for s in r0] == [s["adam_steps"] for s in r1] == [1.0, 1.0, 2.0]
    assert math.isinf(r0[1]["grad_norm"]) and math.isinf(r1[1]["grad_norm"])


def _compile_worker(rank: int, world: int, port: int, shards: str, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from opt_ray.train.loop import TrainConfig, train

    try:
        for name, kw in (("eager", {}), ("fsdp_compiled", {"compile": True}),
                         ("tp_compiled", {"compile": True, "tp": 2, "activation_checkpointing": True})):
            train(TrainConfig(data=shards, output=str(Path(out) / name), preset="tiny", steps=3,
                              batch_tokens=8 * 32, micro_batch=2, lr=1e-3, warmup_steps=0,
                              guard=False, dropout=0.0, precision="fp32", device="cpu",
                              workers=world, checkpoint_every=3, **kw))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.timeout(300)
def test_compiled_blocks_under_fsdp2_and_tensor_parallel_match_eager(tmp_path):
    """``--compile`` where it runs at scale: FSDP2's hooks around compiled blocks (2 data
    ranks) and fairscale's tensor-parallel layers inside them (tp 2, with activation
    checkpointing recomputing the compiled blocks) train to the eager gang's losses and
    weights (no dropout, so the masks cannot differ)."""
    from opt_ray.train.checkpoint import load_model_state, resolve

    shards = _shards(tmp_path / "s")
    out = tmp_path / "runs"
    torch.multiprocessing.spawn(_compile_worker, args=(2, free_port(), str(shards), str(out)),
                                nprocs=2, join=True)

    def losses(name: str) -> list[float]:
        return [json.loads(l)["loss"] for l in (out / name / "metrics.jsonl").read_text().splitlines()]

    eager = load_model_state(resolve(out / "eager"))
    assert len(losses("eager")) == 3 and losses("eager")[-1] < losses("eager")[0]
    for name in ("fsdp_compiled", "tp_compiled"):
        assert losses(name) == pytest.approx(losses("eager"), rel=1e-5), name
        got = load_model_state(resolve(out / name))
        assert got.keys() == eager.keys(), name
        for k in eager:
            torch.testing.assert_close(got[k], eager[k], atol=1e-5, rtol=1e-4, msg=f"{name}: {k}")


def _precision_worker(rank: int, world: int, port: int, shards: str, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from opt_ray.train.loop import TrainConfig, Trainer

    t = Trainer(TrainConfig(data=shards, output=out, preset="tiny", steps=3, batch_tokens=8 * 32,
                            micro_batch=2, lr=1e-3, warmup_steps=0, guard=False, dropout=0.0,
                            precision="bf16", device="cpu", workers=world))
    try:
        seen: dict[str, set[str]] = {"layer_out": set(), "weight": set()}

        def pre(module, args):  # after FSDP2's own pre-hook: the weights the block computes with
            seen["weight"].add(str(module.fc1.weight.dtype))

        def post(module, args, output):
            seen["layer_out"].add(str(output.dtype))

        handles = [h for layer in t.model.decoder.layers
                   for h in (layer.register_forward_pre_hook(pre), layer.register_forward_hook(post))]
        recs = [t.train_step() for _ in range(3)]
        for h in handles:
            h.remove()
        masters = sorted({str(p.dtype) for p in t.model.parameters()})
        if rank == 0:
            Path(out, "precision.json").write_text(json.dumps({
                "loss": [r["loss"] for r in recs], "grad_norm": [r["grad_norm"] for r in recs],
                "layer_out": sorted(seen["layer_out"]), "weight": sorted(seen["weight"]),
                "masters": masters}))
    finally:
        t.close()
        torch.distributed.destroy_process_group()


@pytest.mark.timeout(240)
def test_step_precision_does_not_depend_on_the_data_parallel_width(tmp_path):
    """bf16 is FSDP2's mixed precision at every width: a gang of one computes as a gang of
    two does (bf16 weights and residual stream, fp32 master weights), so a gang that
    shrinks to one rank keeps its numerics. The first step (the same weights, the same
    8 rows, before any update) gives the same loss at both widths; before, one rank ran
    fp32 weights under autocast (an fp32 residual stream) and its loss differed by 1e-5."""
    shards = _shards(tmp_path / "s")
    got = {}
    for world in (1, 2):
        out = tmp_path / f"dp{world}"
        torch.multiprocessing.spawn(_precision_worker, args=(world, free_port(), str(shards), str(out)),
                                    nprocs=world, join=True)
        got[world] = json.loads((out / "precision.json").read_text())
    for world in (1, 2):
        assert got[world]["layer_out"] == got[world]["weight"] == ["torch.bfloat16"], got[world]
        assert got[world]["masters"] == ["torch.float32"], got[world]
    one, two = got[1], got[2]
    assert one["loss"][0] == pytest.approx(two["loss"][0], rel=1e-7, abs=0), (one, two)
    # Then the updates differ only by the order of the gradient sums (one rank or two).
    assert one["loss"] == pytest.approx(two["loss"], rel=1e-4)
    assert one["grad_norm"] == pytest.approx(two["grad_norm"], rel=1e-4)
    assert one["loss"][-1] < one["loss"][0]
