"""`opt-ray tokenize` on Ray tasks: the shards equal an in-process run byte for byte (also
when an encoder worker is killed mid-task), load through ShardDataset, and feed the
sampler."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import numpy as np
import pytest

from opt_ray.cli import main
from opt_ray.data.sample import write_sample_corpus
from opt_ray.data.sampler import ResumableSampler
from opt_ray.data.shards import ShardDataset
from opt_ray.data.tokenize_pipeline import work_dir

pytestmark = pytest.mark.slow


def _killer(work, stop: threading.Event, killed: list) -> None:
    """SIGKILL the first worker seen encoding a file (by its .running marker)."""
    while not stop.is_set() and not killed:
        for running in sorted(work.glob("s*.running")):
            if not (work / running.name[:-len(".running")]).exists():
                try:
                    os.kill(json.loads(running.read_text())["pid"], signal.SIGKILL)
                    killed.append(running.name)
                except (OSError, ValueError):
                    continue
                return
        time.sleep(0.005)


def test_tokenize_on_ray_matches_in_process(ray_local, tmp_path):
    corpus = write_sample_corpus(tmp_path / "corpus", n_docs=300)
    lines = corpus.read_text().splitlines(keepends=True)
    parts = []
    for k in range(4):           # four input files: four tasks
        p = tmp_path / "corpus" / f"part-{k}.jsonl"
        p.write_text("".join(lines[k::4]))
        parts.append(str(p))
    tok = tmp_path / "tok"
    assert main(["tokenizer", "train", str(corpus), "--vocab-size", "1000", "--output", str(tok)]) == 0

    common = [*parts, "--tokenizer", str(tok), "--seq-len", "32", "--no-progress",
              "--valid-fraction", "0.1", "--shard-tokens", str(33 * 500),
              "--batch-chars", "8000"]
    stop, killed = threading.Event(), []
    t = threading.Thread(target=_killer, args=(work_dir(tmp_path / "ray"), stop, killed))
    t.start()
    try:
        assert main(["tokenize", *common, "--output", str(tmp_path / "ray"), "--workers", "2"]) == 0
    finally:
        stop.set()
        t.join()
    assert killed                # a worker died mid-file; Ray re-ran its task
    assert main(["tokenize", *common, "--output", str(tmp_path / "local"), "--workers", "0"]) == 0

    mr = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    ml = json.loads((tmp_path / "local" / "manifest.json").read_text())
    assert {k: v["sha256"] for k, v in mr["files"].items()} == \
           {k: v["sha256"] for k, v in ml["files"].items()}
    assert len(mr["splits"]["train"]["shards"]) >= 4 and mr["splits"]["valid"]["rows"] > 0

    train = ShardDataset(tmp_path / "ray", tokenizer=tok)
    valid = ShardDataset(tmp_path / "ray", "valid")
    assert train.seq_len == 32 and len(train) == mr["splits"]["train"]["rows"]
    s = ResumableSampler(len(train), seed=0)
    batch = train.batch(s.next_batch(8, rank=1, world_size=2))
    assert batch.shape == (4, 33) and int(batch.max()) < train.vocab_size
    assert len(valid) == mr["splits"]["valid"]["rows"]
    assert np.array_equal(valid[0], ShardDataset(tmp_path / "local", "valid")[0])
