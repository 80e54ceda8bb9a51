"""`opt-ray tokenize` on Ray actors: the shards equal an in-process run byte for byte,
load through ShardDataset, and feed the sampler."""

from __future__ import annotations

import json

import numpy as np
import pytest

from opt_ray.cli import main
from opt_ray.data.sample import write_sample_corpus
from opt_ray.data.sampler import ResumableSampler
from opt_ray.data.shards import ShardDataset

pytestmark = pytest.mark.slow


def test_tokenize_on_ray_matches_in_process(ray_local, tmp_path):
    corpus = write_sample_corpus(tmp_path / "corpus", n_docs=300)
    tok = tmp_path / "tok"
    assert main(["tokenizer", "train", str(corpus), "--vocab-size", "1000", "--output", str(tok)]) == 0

    common = [str(corpus), "--tokenizer", str(tok), "--seq-len", "32", "--no-progress",
              "--valid-fraction", "0.1", "--shard-tokens", str(33 * 500),
              "--batch-chars", "8000"]  # dozens of batches: order across actors matters
    assert main(["tokenize", *common, "--output", str(tmp_path / "ray"), "--workers", "2"]) == 0
    assert main(["tokenize", *common, "--output", str(tmp_path / "local"), "--workers", "0"]) == 0

    mr = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    ml = json.loads((tmp_path / "local" / "manifest.json").read_text())
    assert {k: v["sha256"] for k, v in mr["files"].items()} == \
           {k: v["sha256"] for k, v in ml["files"].items()}
    assert len(mr["splits"]["train"]["shards"]) >= 2 and mr["splits"]["valid"]["rows"] > 0

    train = ShardDataset(tmp_path / "ray", tokenizer=tok)
    valid = ShardDataset(tmp_path / "ray", "valid")
    assert train.seq_len == 32 and len(train) == mr["splits"]["train"]["rows"]
    s = ResumableSampler(len(train), seed=0)
    batch = train.batch(s.next_batch(8, rank=1, world_size=2))
    assert batch.shape == (4, 33) and int(batch.max()) < train.vocab_size
    assert len(valid) == mr["splits"]["valid"]["rows"]
    assert np.array_equal(valid[0], ShardDataset(tmp_path / "local", "valid")[0])
