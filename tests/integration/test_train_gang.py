"""The training gang end to end on a local Ray: a tiny OPT on tiny shards, CPU, gloo.

Shards are made here with the real tokenizer trainer and shard writer. Runs are kept to a
handful of steps (2 cores shared by the suite); every Ray test is marked slow.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

WORDS = ("the cat sat on a mat and the dog ran to the park while birds sang over green hills "
         "near a quiet river under the old stone bridge").split()


def make_shards(out: Path, *, docs: int = 400, seq_len: int = 32, seed: int = 0) -> Path:
    """A small, learnable corpus (short sentences over a 30-word vocabulary) as shards."""
    from opt_ray.data.shards import write_shards
    from opt_ray.data.tokenizer import train_tokenizer

    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))) for _ in range(docs)]
    tok = train_tokenizer(texts, 300)
    return write_shards(({"text": t} for t in texts), tok, out, seq_len=seq_len, valid_fraction=0.05)


def tiny_cfg(data: Path, out: Path, **kw):
    from opt_ray.train.loop import TrainConfig

    base = dict(data=str(data), output=str(out), preset="tiny", steps=6, batch_tokens=8 * 32,
                micro_batch=2, checkpoint_every=2, keep=2, deterministic=True, lr=2e-3,
                warmup_steps=1, max_failures=3, collective_timeout=30, guard=False)
    base.update(kw)
    return TrainConfig(**base)


def final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    from opt_ray.train.checkpoint import load_model_state, resolve
    return load_model_state(resolve(run_dir))


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def events(run_dir: Path) -> list[dict]:
    from opt_ray.logbook import Logbook
    return list(Logbook(run_dir).events())


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("train") / "shards")
