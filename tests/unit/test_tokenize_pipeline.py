"""The per-file tokenize pipeline: each file's shards hold exactly its own packed stream,
long documents encode in pieces to the same ids, an interrupted run resumes with
identical output, and ShardDataset opens shards lazily and verifies once."""

from __future__ import annotations

import json
import os
import random
import time

import numpy as np
import pytest

from opt_ray.artifacts import ArtifactError
from opt_ray.data.dedup import LocalExecutor
from opt_ray.data.readers import resolve_inputs
from opt_ray.data.shards import ShardDataset, encode_docs, is_valid_doc
from opt_ray.data.tokenize_pipeline import split_long, tokenize_files, work_dir
from opt_ray.data.tokenizer import train_tokenizer

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron "
         "pi rho sigma tau upsilon phi chi psi omega ünïcödé 日本 don't 12 345 , !").split()


def _docs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 80)))}
            for _ in range(n)]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer((d["text"] for d in _docs(300, 1)), 400)


def _write(tmp_path, files: int = 4, per: int = 120) -> list[str]:
    paths = []
    for k in range(files):
        docs = _docs(per, 10 + k)
        if k == 1:   # one long document, encoded in pieces
            docs.append({"text": " ".join(random.Random(5).choice(WORDS) for _ in range(3000))})
        p = tmp_path / f"part-{k}.jsonl"
        p.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
        paths.append(str(p))
    return paths


def test_each_file_packs_its_own_stream_and_long_docs_keep_their_ids(tok, tmp_path):
    paths = _write(tmp_path)
    files = resolve_inputs(paths)
    out = tokenize_files(files, tok, tmp_path / "s", seq_len=15, valid_fraction=0.2, seed=3,
                         shard_tokens=16 * 20, batch_chars=500, max_doc_chars=300)
    m = json.loads((out / "manifest.json").read_text())
    assert m["long_doc_pieces"] > 10
    for split in ("train", "valid"):
        ds = ShardDataset(out, split)
        rows = np.stack([ds[i] for i in range(len(ds))]).reshape(-1)
        # Reference: each file's documents of this split, whole, encoded in one piece.
        expect = []
        for f in files:
            texts = [json.loads(x)["text"] for x in f.path.read_text().splitlines()]
            keys = [f"{f.name}:{n}" for n in range(1, len(texts) + 1)]
            mine = [t for t, k in zip(texts, keys)
                    if is_valid_doc(k, 3, 0.2) == (split == "valid")]
            stream = encode_docs(tok, mine, 2, np.uint16)
            expect.append(stream[: len(stream) // 16 * 16])
        assert np.array_equal(rows, np.concatenate(expect)), split
    assert all(p == "".join(split_long(p, 50)) for p in ["a " * 100, "x" * 120])


class _DiesAfter(LocalExecutor):
    """Runs ``n`` tasks, then the 'driver' dies (as SIGKILL would: nothing cleaned up)."""

    def __init__(self, n: int):
        self.n = n

    def map(self, fn, args):
        for k, a in enumerate(args):
            if k == self.n:
                raise KeyboardInterrupt
            yield fn(*a)


def test_interrupted_run_resumes_with_identical_output(tok, tmp_path):
    files = resolve_inputs(_write(tmp_path))
    kw = dict(seq_len=15, valid_fraction=0.1, shard_tokens=16 * 30, batch_chars=800)
    clean = tokenize_files(files, tok, tmp_path / "clean", **kw)
    with pytest.raises(KeyboardInterrupt):
        tokenize_files(files, tok, tmp_path / "out", executor=_DiesAfter(2), **kw)
    done = sorted(p.parent.name for p in work_dir(tmp_path / "out").glob("s*/done.json"))
    assert done == ["s00000", "s00001"] and not (tmp_path / "out").exists()
    ran: list[int] = []

    class Counting(LocalExecutor):
        def map(self, fn, args):
            for a in args:
                ran.append(a[1])
                yield fn(*a)

    out = tokenize_files(files, tok, tmp_path / "out", executor=Counting(), **kw)
    assert ran == [2, 3]                        # the completed files were kept
    mc = json.loads((clean / "manifest.json").read_text())
    mo = json.loads((out / "manifest.json").read_text())
    assert mc["files"] == mo["files"] and mc["splits"] == mo["splits"]
    assert not work_dir(tmp_path / "out").exists()


def test_shards_open_lazily_with_bounded_descriptors(tok, tmp_path):
    files = resolve_inputs(_write(tmp_path, files=3))
    out = tokenize_files(files, tok, tmp_path / "s", seq_len=7, valid_fraction=0.0,
                         shard_tokens=8 * 10, batch_chars=400)
    ds = ShardDataset(out, max_open=2)
    assert len(ds.shards) > 10 and ds.open_shards == 0
    fds = len(os.listdir("/proc/self/fd"))
    rows = [ds[i].copy() for i in range(len(ds))]   # copies: no view pins a mapping
    assert ds.open_shards == 2 and len(os.listdir("/proc/self/fd")) <= fds + 2
    eager = ShardDataset(out, verify=False, max_open=1000)
    assert all(np.array_equal(r, eager[i]) for i, r in enumerate(rows))


def test_verification_runs_once_per_dataset(tok, tmp_path):
    files = resolve_inputs(_write(tmp_path, files=2))
    out = tokenize_files(files, tok, tmp_path / "s", seq_len=7, valid_fraction=0.0,
                         shard_tokens=8 * 40, batch_chars=400)
    name = ShardDataset(out, verify=False).shards[1]["name"]
    old = time.time() - 3600
    for p in out.rglob("*.arrow"):
        os.utime(p, (old, old))
    ShardDataset(out)                                   # verifies, leaves the marker
    assert (out / ".verified-train.json").is_file()
    # The marker vouches for files of the same size and mtime: no re-hash. (Proof: a
    # change that keeps both is not looked at; the marker is a cache, not a defence.)
    p = out / name
    data = bytearray(p.read_bytes())
    data[-200] ^= 0xFF
    p.write_bytes(bytes(data))
    os.utime(p, (old, old))
    ShardDataset(out)
    # Any ordinary modification (new mtime) is hashed again and refused.
    p.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256"):
        ShardDataset(out)
