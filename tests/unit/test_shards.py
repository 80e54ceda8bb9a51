"""Token shards: packing reproduces the eos-separated stream, zero-copy reads, split by
document, tampered shards and foreign tokenizers refused, empty corpora refused."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from opt_ray.artifacts import ArtifactError
from opt_ray.data.shards import ShardDataset, encode_docs, is_valid_doc, token_dtype, write_shards
from opt_ray.data.tokenizer import train_tokenizer
from opt_ray.errors import UserError

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron "
         "pi rho sigma tau upsilon phi chi psi omega ünïcödé 日本 ").split()


def _docs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"id": f"d{i}", "text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60)))}
            for i in range(n)]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer((d["text"] for d in _docs(300, 1)), 400)


def _stream(tok, docs, eos=2):
    return encode_docs(tok, [d["text"] for d in docs], eos, np.uint16)


def test_packing_reproduces_stream(tok, tmp_path):
    docs = _docs(200)
    out = write_shards(iter(docs), tok, tmp_path / "s", seq_len=15, valid_fraction=0.0,
                       shard_tokens=16 * 7, batch_chars=300)   # many small shards and batches
    ds = ShardDataset(out)
    m = ds.manifest
    assert m["kind"] == "shards" and ds.seq_len == 15 and ds.vocab_size == tok.get_vocab_size()
    assert len(m["splits"]["train"]["shards"]) > 3
    stream = _stream(tok, docs)
    rows = np.stack([ds[i] for i in range(len(ds))])
    assert rows.shape == (len(stream) // 16, 16) and rows.dtype == np.uint16
    assert np.array_equal(rows.reshape(-1), stream[:rows.size])
    assert m["splits"]["train"]["dropped_tail_tokens"] == len(stream) - rows.size
    # eos separates documents: as many eos as documents in the stream
    assert int((stream == 2).sum()) == len(docs)
    assert tok.decode(stream[: list(stream).index(2)].tolist()) == docs[0]["text"]
    assert all(s["sha256"] == m["files"][s["name"]]["sha256"] for s in m["splits"]["train"]["shards"])
    assert ds.batch([0, len(ds) - 1]).dtype == np.int64
    assert np.array_equal(ds[-1], rows[-1])


def test_rows_are_zero_copy_views(tok, tmp_path):
    out = write_shards(iter(_docs(50)), tok, tmp_path / "s", seq_len=8, valid_fraction=0.0)
    ds = ShardDataset(out)
    r = ds[3]
    assert not r.flags.owndata and not r.flags.writeable  # a view into the mapped file


def test_split_by_document_is_deterministic(tok, tmp_path):
    docs = _docs(400)
    a = write_shards(iter(docs), tok, tmp_path / "a", seq_len=7, valid_fraction=0.2, seed=5,
                     id_field="id")
    b = write_shards(iter(docs), tok, tmp_path / "b", seq_len=7, valid_fraction=0.2, seed=5,
                     id_field="id", batch_chars=100)
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert ma["splits"]["valid"]["docs"] == mb["splits"]["valid"]["docs"]
    va, vb = ShardDataset(a, "valid"), ShardDataset(b, "valid")
    assert np.array_equal(np.stack(list(va)), np.stack(list(vb)))
    expect = [d for d in docs if is_valid_doc(d["id"], 5, 0.2)]
    assert ma["splits"]["valid"]["docs"] == len(expect) and 40 < len(expect) < 120
    stream = _stream(tok, expect)
    assert np.array_equal(np.stack(list(va)).reshape(-1), stream[:len(va) * 8])


def test_tampered_shard_refused(tok, tmp_path):
    out = write_shards(iter(_docs(200)), tok, tmp_path / "s", seq_len=15, valid_fraction=0.0,
                       shard_tokens=16 * 20)
    name = ShardDataset(out).shards[1]["name"]
    p = out / name
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=name.replace("/", ".")):
        ShardDataset(out)
    ShardDataset(out, verify=False)  # the caller may opt out explicitly


def test_mismatched_tokenizer_refused(tok, tmp_path):
    out = write_shards(iter(_docs(100)), tok, tmp_path / "s", seq_len=8, valid_fraction=0.0)
    ShardDataset(out, tokenizer=tok)
    other = train_tokenizer((d["text"] for d in _docs(300, 2)), 380)
    with pytest.raises(UserError, match="tokeniz"):
        ShardDataset(out, tokenizer=other)


def test_empty_corpus_is_an_error(tok, tmp_path):
    with pytest.raises(UserError, match="no documents"):
        write_shards(iter([]), tok, tmp_path / "e", seq_len=8)
    with pytest.raises(UserError, match="no documents"):
        write_shards(iter([{"text": ""}, {"other": "x"}]), tok, tmp_path / "e", seq_len=8)
    with pytest.raises(UserError, match="fewer than one row"):
        write_shards(iter([{"text": "alpha"}]), tok, tmp_path / "e", seq_len=512)
    assert not (tmp_path / "e").exists()  # atomic: nothing left behind
    assert not list(tmp_path.iterdir())


def test_uint32_when_vocab_is_large(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i + 4 for i in range(70000)})
    big = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    big.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    assert token_dtype(big.get_vocab_size()) == np.uint32 and token_dtype(50272) == np.uint16
    docs = [{"text": " ".join(f"w{69999 - (i * 50 + j)}" for j in range(50))} for i in range(20)]
    out = write_shards(iter(docs), big, tmp_path / "s", seq_len=9, valid_fraction=0.0)
    ds = ShardDataset(out)
    assert ds[0].dtype == np.uint32 and int(np.stack(list(ds)).max()) > 65535


def test_cli_tokenize_in_process_and_empty_corpus(tok, tmp_path, capsys):
    from opt_ray.cli import main
    from opt_ray.data.tokenizer import save_tokenizer

    tdir = save_tokenizer(tok, tmp_path / "tok")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in _docs(120)))
    rc = main(["tokenize", str(corpus), "--tokenizer", str(tdir), "--seq-len", "16",
               "--output", str(tmp_path / "s"), "--workers", "0", "--no-progress"])
    assert rc == 0
    ds = ShardDataset(tmp_path / "s", tokenizer=tdir)
    assert ds.manifest["source"]["inputs"][0]["path"] == str(corpus)

    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": "   "}) + "\n" + json.dumps({"id": 1}) + "\n")
    rc = main(["tokenize", str(empty), "--tokenizer", str(tdir), "--seq-len", "16",
               "--output", str(tmp_path / "e"), "--workers", "0", "--no-progress"])
    assert rc == 2
    assert "no documents" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_pickles_by_path_for_workers(tok, tmp_path):
    import pickle

    out = write_shards(iter(_docs(60)), tok, tmp_path / "s", seq_len=8, valid_fraction=0.0)
    ds = ShardDataset(out)
    again = pickle.loads(pickle.dumps(ds))
    assert len(pickle.dumps(ds)) < 1000          # a reference, not the data
    assert len(again) == len(ds) and np.array_equal(again[5], ds[5])
