"""Bad input to the data stages: each case is a counted bad record with its reason, or
with --strict / when nothing is usable one line naming the input (exit 2), never a crash
or a silently shortened corpus."""

from __future__ import annotations

import gzip
import json
import os

import pytest
import zstandard

from opt_ray.cli import main
from opt_ray.data.dedup import DedupConfig, run_dedup
from opt_ray.data.readers import ID_KEY, InputErrors, iter_records
from opt_ray.errors import UserError

DOCS = [{"text": f"document number {i} has a few words of its own {i * 7}"} for i in range(400)]
RAW = b"".join(json.dumps(d).encode() + b"\n" for d in DOCS)
HEAD = b"".join(json.dumps(d).encode() + b"\n" for d in DOCS[:30])   # whole lines


def _truncated_inputs(tmp_path):
    z = zstandard.ZstdCompressor().compress(RAW)
    g = gzip.compress(RAW)
    cases = {
        "cut.jsonl.zst": (z[: len(z) // 2], "truncated_file"),
        "cut.jsonl.gz": (g[: len(g) // 2], "truncated_file"),
        "plain.jsonl.zst": (RAW, "corrupt_file"),           # not zstd at all
        "plain.jsonl.gz": (RAW, "corrupt_file"),            # not gzip at all
    }
    for name, (data, _) in cases.items():
        (tmp_path / name).write_bytes(data)
    return {name: kind for name, (_, kind) in cases.items()}


def test_truncated_and_corrupt_compressed_files(tmp_path):
    for name, kind in _truncated_inputs(tmp_path).items():
        p = str(tmp_path / name)
        errs = InputErrors()
        got = list(iter_records([p], errors=errs))
        assert len(got) < len(DOCS), name                  # never taken for whole
        assert errs.to_dict()["by_kind"] == {kind: 1}, name
        # The records before the damage are kept, in order.
        assert [r["text"] for r in got] == [d["text"] for d in DOCS[:len(got)]]
        with pytest.raises(UserError, match=rf"{name}:\d+: {kind.replace('_', ' ')}"):
            list(iter_records([p], errors=InputErrors(strict=True)))
    # A multi-frame .zst (e.g. concatenated files) is read whole.
    c = zstandard.ZstdCompressor()
    (tmp_path / "multi.jsonl.zst").write_bytes(c.compress(RAW[:1000]) + c.compress(RAW[1000:]))
    assert len(list(iter_records([str(tmp_path / "multi.jsonl.zst")]))) == len(DOCS)


def test_dedup_counts_damaged_files_and_strict_names_the_file(tmp_path, capsys):
    _truncated_inputs(tmp_path)
    (tmp_path / "ok.jsonl").write_bytes(HEAD)
    inputs = [str(tmp_path / n) for n in ("ok.jsonl", "cut.jsonl.zst", "cut.jsonl.gz",
                                          "plain.jsonl.zst")]
    report = run_dedup(inputs, str(tmp_path / "out"), DedupConfig())
    by_kind = report["input_errors"]["by_kind"]
    assert by_kind == {"truncated_file": 2, "corrupt_file": 1}
    rc = main(["dedup", *inputs, "--output", str(tmp_path / "o2"), "--workers", "0",
               "--strict", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "cut.jsonl.zst" in err
    assert not (tmp_path / "o2").exists()


def test_lone_surrogate_counted_not_a_crash(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_bytes(b'{"text": "a lone \\ud83d escape in some words here"}\n'
                  b'{"text": "a paired \\ud83d\\ude00 escape in some words"}\n'
                  b'{"text": "plain words in a plain document"}\n')
    report = run_dedup([str(p)], str(tmp_path / "out"), DedupConfig())
    assert report["input_errors"]["by_kind"] == {"lone_surrogate": 1}
    assert report["counts"]["docs_kept"] == 2
    assert "\U0001F600" in [r["text"] for r in iter_records([str(tmp_path / "out")])][0]


def test_same_file_names_in_different_directories_get_distinct_ids(tmp_path):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "part-0.jsonl").write_bytes(HEAD)
    inputs = [str(tmp_path / "a" / "part-0.jsonl"), str(tmp_path / "b" / "part-0.jsonl")]
    ids = [r[ID_KEY] for r in iter_records(inputs)]
    assert len(ids) == len(set(ids)) and ids[0] == "a/part-0:1"
    report = run_dedup(inputs, str(tmp_path / "out"), DedupConfig())
    # The second file is an exact copy of the first: every one of its documents goes.
    n = len(ids) // 2
    assert report["counts"]["bad_records"] == 0
    assert report["counts"]["duplicates_removed"] == n and report["counts"]["docs_kept"] == n


def test_no_usable_document_exits_2(tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_bytes(b'not json\n{"text": "   "}\n')
    rc = main(["dedup", str(tmp_path / "bad.jsonl"), "--output", str(tmp_path / "o"),
               "--workers", "0", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "no usable document" in err and "bad.jsonl" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_output_refused_before_work(tmp_path, capsys):
    _unwritable_output_refused(tmp_path, capsys)


def test_output_under_a_file_refused_before_work(tmp_path, capsys):
    (tmp_path / "in.jsonl").write_bytes(HEAD)
    (tmp_path / "afile").write_text("x")
    bad = str(tmp_path / "afile" / "out")
    for argv in (["dedup", str(tmp_path / "in.jsonl"), "--workers", "0"],
                 ["tokenizer", "train", str(tmp_path / "in.jsonl"), "--vocab-size", "300"],
                 ["tokenize", str(tmp_path / "in.jsonl"), "--tokenizer", str(tmp_path / "nope"),
                  "--seq-len", "8", "--workers", "0"]):
        rc = main([*argv, "--output", bad])
        err = capsys.readouterr().err
        assert rc == 2 and "afile" in err and "not a directory" in err, (argv, err)


def _unwritable_output_refused(tmp_path, capsys):
    (tmp_path / "in.jsonl").write_bytes(HEAD)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        for argv in (["dedup", str(tmp_path / "in.jsonl"), "--workers", "0"],
                     ["tokenizer", "train", str(tmp_path / "in.jsonl"), "--vocab-size", "300"]):
            rc = main([*argv, "--output", str(ro / "out")])
            err = capsys.readouterr().err
            assert rc == 2 and "not writable" in err, (argv, err)
    finally:
        ro.chmod(0o700)
