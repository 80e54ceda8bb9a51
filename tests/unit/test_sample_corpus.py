"""The built-in sample corpus: real text, deterministic, and a planted set of
near-duplicates that is exactly the set of near-duplicates in it."""

from __future__ import annotations

import itertools
import json
import re

import pytest

from opt_ray.data.sample import write_sample_corpus


def _shingles(text: str, n: int = 5) -> set[str]:
    # Written out again here (not imported) so that a bug in the module is not mirrored.
    words = [w for w in re.split(r"\W+", text.lower()) if w]
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)} or {" ".join(words)}


def _j(a: str, b: str) -> float:
    x, y = _shingles(a), _shingles(b)
    return len(x & y) / len(x | y)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = tmp_path_factory.mktemp("sample")
    path = write_sample_corpus(d, n_docs=150, seed=3)
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    side = json.loads((d / "sample.dups.json").read_text())
    return path, recs, side


def test_deterministic(small, tmp_path):
    path, _, _ = small
    again = write_sample_corpus(tmp_path, n_docs=150, seed=3)
    assert again.read_bytes() == path.read_bytes()
    other = write_sample_corpus(tmp_path / "o", n_docs=150, seed=4)
    assert other.read_bytes() != path.read_bytes()


def test_records_and_planted_variants(small):
    _, recs, side = small
    by_id = {r["id"]: r for r in recs}
    assert len(by_id) == len(recs) == side["records"]
    assert all(set(r) >= {"id", "text", "source"} and r["text"].strip() for r in recs)
    originals = [r for r in recs if r["dup_of"] is None]
    variants = [r for r in recs if r["dup_of"] is not None]
    assert len(originals) == 150 == side["originals"]
    assert {v["id"] for v in variants} == {d["id"] for d in side["duplicates"]}
    assert {v["variant"] for v in variants} == {"exact", "case_whitespace", "word_edit"}
    for v in variants:
        orig = by_id[v["dup_of"]]
        j = _j(orig["text"], v["text"])
        assert j >= 0.95, (v["id"], j)
        if v["variant"] == "exact":
            assert v["text"] == orig["text"]
        else:
            assert v["text"] != orig["text"]
    pos = {r["id"]: i for i, r in enumerate(recs)}
    assert all(pos[v["dup_of"]] < pos[v["id"]] for v in variants)   # originals come first
    assert max(pos[v["id"]] - pos[v["dup_of"]] for v in variants) > 10  # but not adjacent
    assert any(r["source"].startswith("pydoc:") for r in recs)
    assert any(r["source"].startswith("stdlib:") for r in recs)


def test_no_unplanned_near_duplicates(small):
    """Every pair of originals is far below the dedup threshold, so a correct dedup
    removes exactly the planted variants."""
    _, recs, _ = small
    originals = [r for r in recs if r["dup_of"] is None]
    sh = [_shingles(r["text"]) for r in originals]
    worst = max(len(a & b) / len(a | b) for a, b in itertools.combinations(sh, 2))
    assert worst < 0.95


def test_default_size_is_a_few_megabytes(tmp_path):
    path = write_sample_corpus(tmp_path)
    side = json.loads((tmp_path / "sample.dups.json").read_text())
    assert 1_000_000 < path.stat().st_size < 8_000_000
    assert side["variants"] >= 50
