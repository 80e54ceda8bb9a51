"""Readers: formats, ids, bad input with file and line, bounded streaming."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from opt_ray.data.readers import ID_KEY, InputErrors, iter_records, resolve_inputs
from opt_ray.errors import UserError

RECS = [{"text": "hello world one", "meta": {"k": 1}}, {"text": "second doc here", "n": 2}]


def _jsonl(recs) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in recs)


def test_jsonl_plain_gz_zst_same_records(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(_jsonl(RECS))
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(_jsonl(RECS)))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(_jsonl(RECS)))
    for name, stem in [("a.jsonl", "a"), ("b.jsonl.gz", "b"), ("c.jsonl.zst", "c")]:
        out = list(iter_records([str(tmp_path / name)]))
        assert [{k: v for k, v in r.items() if k != ID_KEY} for r in out] == RECS
        assert [r[ID_KEY] for r in out] == [f"{stem}:1", f"{stem}:2"]


def test_parquet_and_id_field(tmp_path):
    pq.write_table(pa.Table.from_pylist([{"text": "x y z", "doc": 7}, {"text": "u v", "doc": 9}]),
                   tmp_path / "p.parquet")
    out = list(iter_records([str(tmp_path / "p.parquet")]))
    assert [r[ID_KEY] for r in out] == ["p:1", "p:2"] and out[0]["doc"] == 7
    out = list(iter_records([str(tmp_path / "p.parquet")], id_field="doc"))
    assert [r[ID_KEY] for r in out] == ["7", "9"]


def test_directory_of_txt_and_existing_id_kept(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "one.txt").write_text("first file")
    (d / "sub" / "two.txt").write_text("second file")
    (d / ".hidden.txt").write_text("skip me")
    (d / "manifest.json").write_text("{}")
    out = list(iter_records([str(d)], text_field="body"))
    assert [(r[ID_KEY], r["body"]) for r in out] == [("corpus/one", "first file"),
                                                     ("corpus/sub/two", "second file")]
    # A record that already carries an id (e.g. a dedup output read back) keeps it.
    pq.write_table(pa.Table.from_pylist([{"text": "a b", ID_KEY: "orig:5"}]),
                   tmp_path / "s.parquet")
    assert next(iter(iter_records([str(tmp_path / "s.parquet")])))[ID_KEY] == "orig:5"


def test_bad_records_reported_with_lines(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"text": "good one"}\n'
                  b'{"text": "broken\n'
                  b'{"text": "caf\xe9 latin1"}\n'
                  b'{"other": 1}\n'
                  b'{"text": "   ...  "}\n'
                  b'\n'
                  b'[1, 2]\n'
                  b'{"text": 5}\n'
                  b'{"text": "good two"}\n')
    errs = InputErrors()
    out = list(iter_records([str(p)], errors=errs))
    assert [r["text"] for r in out] == ["good one", "good two"]
    assert [r[ID_KEY] for r in out] == ["bad:1", "bad:9"]
    f = errs.to_dict()["files"][str(p)]
    assert [(e["line"], e["kind"]) for e in f["examples"]] == [
        (2, "malformed_json"), (3, "non_utf8"), (4, "missing_text"), (5, "empty_text"),
        (7, "malformed_json"), (8, "text_not_string")]
    assert errs.total == 6 and f["by_kind"]["malformed_json"] == 2
    with pytest.raises(UserError, match=r"bad.jsonl:2: malformed json"):
        list(iter_records([str(p)], errors=InputErrors(strict=True)))
    with pytest.raises(UserError, match=r"bad.jsonl:2"):
        list(iter_records([str(p)]))


def test_unreadable_inputs_fail_before_reading(tmp_path):
    (tmp_path / "ok.jsonl").write_bytes(_jsonl(RECS))
    with pytest.raises(UserError, match="does not exist"):
        iter_records([str(tmp_path / "ok.jsonl"), str(tmp_path / "missing.jsonl")])
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(UserError, match="unsupported format"):
        resolve_inputs([str(tmp_path / "x.csv")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no supported files"):
        resolve_inputs([str(tmp_path / "empty")])


def test_streaming_is_lazy(tmp_path):
    # A generator: the second file is not opened until the first is consumed.
    p = tmp_path / "big.jsonl"
    p.write_bytes(_jsonl({"text": f"doc {i}"} for i in range(10000)))
    it = iter_records([str(p)])
    assert next(it)[ID_KEY] == "big:1"


def test_jsonl_split_by_lines_reads_the_same_records_and_errors(tmp_path):
    import random

    from opt_ray.data.readers import iter_file, plan_splits
    rng = random.Random(0)
    lines = []
    for i in range(1500):
        r = rng.random()
        lines.append("\n" if r < 0.05 else "not json\n" if r < 0.07 else
                     json.dumps({"text": "w " * rng.randint(1, 300) + str(i)}) + "\n")
    p = tmp_path / "big.jsonl"
    p.write_text("".join(lines)[:-1])                    # no final newline
    [whole] = resolve_inputs([str(p)])
    e0 = InputErrors()
    expect = [(r[ID_KEY], r["text"]) for r in iter_file(whole, errors=e0)]
    for max_bytes in (700, 9000, 10**9):
        splits = plan_splits([whole], max_bytes)
        assert (len(splits) > 1) == (max_bytes < p.stat().st_size)
        e1 = InputErrors()
        got = [(r[ID_KEY], r["text"]) for f in splits for r in iter_file(f, errors=e1)]
        assert got == expect and e1.to_dict() == e0.to_dict()



@pytest.mark.parametrize("codec", ["gz", "zst", "zst-truncated", "gz-truncated"])
def test_compressed_jsonl_split_by_lines_reads_the_same_records_and_errors(tmp_path, codec):
    # A compressed file used to be one split whatever its size (the Pile: 30 files of
    # ~45 GB of text, so 30 tasks at most). Now: runs of lines, each reader skipping the
    # lines before its own; ids, records and errors as the whole file's.
    import random

    from opt_ray.data.readers import COMPRESSED_SPLITS, iter_file, plan_splits
    rng = random.Random(1)
    lines = []
    for i in range(3000):
        r = rng.random()
        words = " ".join(f"{rng.getrandbits(24):x}" for _ in range(rng.randint(1, 60)))
        lines.append("\n" if r < 0.05 else "not json\n" if r < 0.07 else
                     json.dumps({"text": f"{words} {i}"}) + "\n")
    raw = "".join(lines)[:-1].encode()                  # no final newline
    packed = gzip.compress(raw) if codec.startswith("gz") else zstandard.ZstdCompressor().compress(raw)
    if codec.endswith("truncated"):
        packed = packed[: len(packed) * 2 // 3]
    p = tmp_path / f"big.jsonl.{codec.split('-')[0]}"
    p.write_bytes(packed)
    [whole] = resolve_inputs([str(p)])
    e0 = InputErrors()
    expect = [(r[ID_KEY], r["text"]) for r in iter_file(whole, errors=e0)]
    assert len(expect) > 500
    if codec.endswith("truncated"):
        assert e0.total > 0 and "truncated_file" in json.dumps(e0.to_dict()) or \
            "corrupt_file" in json.dumps(e0.to_dict())
    for max_bytes in (-(-len(raw) // 5), 1, 10**9):
        splits = plan_splits([whole], max_bytes)
        n = {1: COMPRESSED_SPLITS, 10**9: 1}.get(max_bytes, 5)    # of the text, at most 16
        assert len(splits) == n or codec.endswith("truncated") and 1 < len(splits) < n
        e1 = InputErrors()
        got = [(r[ID_KEY], r["text"]) for f in splits for r in iter_file(f, errors=e1)]
        assert got == expect and e1.to_dict() == e0.to_dict()
