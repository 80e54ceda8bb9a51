"""The dedup pipeline without Ray: bands, groups, verification, components, output, bad
input, resume."""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest

from opt_ray.artifacts import read_manifest
from opt_ray.data.dedup import (REPORT, DedupConfig, candidate_probability, choose_bands,
                                connected_components, natural_key, run_dedup, work_dir)
from opt_ray.data.minhash import jaccard, shingle_set
from opt_ray.data.readers import ID_KEY, iter_records
from opt_ray.errors import UserError

N_WORDS = 204          # 200 shingles of 5 words


class Words:
    """Globally unique words, so every shingle is unique and Jaccard is known exactly."""

    def __init__(self) -> None:
        self.n = 0

    def take(self, k: int) -> list[str]:
        out = [f"w{self.n + i}z" for i in range(k)]
        self.n += k
        return out


def tail_variant(words: list[str], k: int, fresh: Words) -> list[str]:
    # Replacing the last k of 204 words leaves 200 - k shared shingles of 200:
    # J = (200 - k) / (200 + k): k=2 -> 0.980, 4 -> 0.961, 5 -> 0.951, 6 -> 0.942, 10 -> 0.905.
    return words[:-k] + fresh.take(k)


def planted_corpus(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    fresh = Words()
    docs: list[list[str]] = []
    for g in range(40):
        base = fresh.take(N_WORDS)
        docs.append(base)
        for k in rng.sample([2, 4, 5, 6, 10], rng.randint(1, 4)):
            docs.append(tail_variant(base, k, fresh))
    for _ in range(30):                      # singletons
        docs.append(fresh.take(rng.randint(3, 300)))
    texts = [" ".join(d) for d in docs]
    # Exact duplicates up to case and punctuation: same word sequence, same shingle set.
    texts.append(texts[3].upper().replace(" ", ", "))
    texts.append(texts[3])
    # The chain: A ~ B (0.951), B ~ C (0.951), A vs C 0.905 < 0.95.
    a = fresh.take(N_WORDS)
    b = a[:-5] + fresh.take(5)
    c = fresh.take(5) + b[5:]
    texts += [" ".join(a), " ".join(b), " ".join(c)]
    order = list(range(len(texts)))
    rng.shuffle(order)
    return [{"text": texts[i], "doc": f"d{n}", "extra": {"n": n}} for n, i in enumerate(order)]


def write_jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_choose_bands_meets_target():
    for t in (0.95, 0.9, 0.85, 0.8):
        b, r = choose_bands(t, 128)
        assert b * r <= 128 and candidate_probability(t, b, r) >= 0.99
        # The next larger r would miss the target: we took the most selective one.
        assert candidate_probability(t, 128 // (r + 1), r + 1) < 0.99
    assert choose_bands(0.95, 128) == (8, 16)
    assert DedupConfig().probability_at_threshold >= 0.99
    with pytest.raises(UserError, match="--bands and --rows"):
        DedupConfig(bands=4)
    with pytest.raises(UserError, match="--num-perm"):
        DedupConfig(bands=20, rows=10)


def test_connected_components_and_natural_key():
    u = np.array([5, 7, 1 << 33, 9], dtype=np.int64)
    v = np.array([7, 3, 5, 10], dtype=np.int64)
    nodes, label = connected_components(u, v)
    assert dict(zip(nodes.tolist(), label.tolist())) == {
        3: 3, 5: 3, 7: 3, 1 << 33: 3, 9: 9, 10: 9}
    # A long chain given in the worst order still converges to one label.
    chain = np.arange(2000, dtype=np.int64)[::-1]
    nodes, label = connected_components(chain[:-1], chain[1:])
    assert (label == 0).all() and len(nodes) == 2000
    assert sorted(["a:10", "a:9", "a:100", "b:1"], key=natural_key) == ["a:9", "a:10", "a:100", "b:1"]


def test_natural_ranks_order_ids_as_natural_key_does():
    """The Arrow-computed order (what the components phase sorts tens of millions of ids
    by) equals sorting by ``natural_key`` (equal keys: by position), on the cases that
    matter (a number against text at the same place, leading zeros, prefixes) and on
    random ids; ids with numbers past 64 digits take the Python key."""
    import random

    import pyarrow as pa

    from opt_ray.data.dedup import natural_ranks

    def natural_order(ids):
        return [ids[i] for i in np.argsort(natural_ranks(pa.array(ids, pa.string())))]

    cases = ["a:10", "a:9", "a:100", "b:1", "7", "12", "a1", "a-", "ab", "a", "07", "a01b", "a1b",
             "x:0", "x:00", "", "é:3", "é:20", "f12.jsonl:99", "f12.jsonl:100", "f2.jsonl:5", "a 1", "a\t2"]
    assert natural_order(cases) == sorted(cases, key=natural_key)
    rng = random.Random(0)
    for _ in range(200):
        ids = ["".join(rng.choice("ab-:.0123456789é") for _ in range(rng.randint(0, 8))) for _ in range(40)]
        assert natural_order(ids) == sorted(ids, key=natural_key)
    big = ["a" + "9" * 25, "a" + "1" * 22, "a" + "5" * 20, "a" + "0" * 30 + "4", "a" + "7" * 70, "a8"]
    assert natural_order(big) == sorted(big, key=natural_key)


def test_spanning_forest_is_the_union_find_forest_in_edge_order():
    """The report's edges: in (u, v) order, each edge that joins two clusters, as a
    union-find over the edges keeps them; with repeated pairs, both orientations and
    self-loops, as partitions that verify independently produce them."""
    from opt_ray.data.dedup import _spanning_forest

    def reference(u, v, sim):
        order = np.lexsort((v, u))
        parent: dict[int, int] = {}

        def find(x):
            while parent.get(x, x) != x:
                x = parent[x]
            return x
        keep = []
        for k in order.tolist():
            ra, rb = find(int(u[k])), find(int(v[k]))
            if ra != rb:
                parent[rb] = ra
                keep.append(k)
        return u[keep], v[keep], sim[keep]

    rng = np.random.default_rng(0)
    for n, m in ((1, 0), (5, 12), (40, 60), (300, 900)):
        u = rng.integers(0, n, m).astype(np.int64) << 20
        v = rng.integers(0, n, m).astype(np.int64) << 20
        if m:
            u, v = np.concatenate([u, v[:3], u[:2]]), np.concatenate([v, u[:3], v[:2]])
        sim = rng.random(len(u))
        for got, want in zip(_spanning_forest(u, v, sim), reference(u, v, sim)):
            assert np.array_equal(got, want)


def check_output(recs, report, threshold, ngram=5):
    """The two guarantees, checked against brute-force exact Jaccard."""
    by_id = {r["doc"]: r for r in recs}
    sets = {d: shingle_set(r["text"], ngram) for d, r in by_id.items()}
    removed = {m for c in report["clusters"] for m in c["members"][1:]}
    kept = set(by_id) - removed
    # 1. no kept pair at >= threshold remains
    for x, y in itertools.combinations(sorted(kept), 2):
        assert jaccard(sets[x], sets[y]) < threshold, (x, y)
    # 2. every removed doc has a verified partner >= threshold in its own cluster
    for c in report["clusters"]:
        assert c["keep"] == min(c["members"], key=natural_key)
        partners = {m: [] for m in c["members"]}
        for x, y, s in c["edges"]:
            assert abs(jaccard(sets[x], sets[y]) - s) < 1e-6 and s >= threshold
            partners[x].append(y)
            partners[y].append(x)
        for m in c["members"][1:]:
            assert partners[m], m
    return kept, removed


@pytest.mark.parametrize("threshold", [0.95, 0.9])
def test_planted_near_duplicates(tmp_path, threshold):
    recs = planted_corpus()
    write_jsonl(tmp_path / "in.jsonl", recs)
    cfg = DedupConfig(threshold=threshold, batch_docs=16, num_buckets=3)
    report = run_dedup([str(tmp_path / "in.jsonl")], str(tmp_path / "out"), cfg,
                       id_field="doc")
    kept, removed = check_output(recs, report, threshold)
    c = report["counts"]
    assert c["docs"] == len(recs) and c["docs_kept"] == len(kept) and c["exact_duplicates"] == 2
    assert c["duplicates_removed"] == len(removed) > 40
    # Output: exactly the kept records, every field preserved, readable by iter_records.
    out = list(iter_records([str(tmp_path / "out")]))
    assert sorted(r["doc"] for r in out) == sorted(kept)
    orig = {r["doc"]: r for r in recs}
    for r in out:
        assert r["text"] == orig[r["doc"]]["text"] and r["extra"] == orig[r["doc"]]["extra"]
        assert r[ID_KEY] == r["doc"]
    m = read_manifest(tmp_path / "out", kind="dedup", verify=True)
    assert REPORT in m["files"] and "metrics.jsonl" in m["files"]
    assert m["counts"]["docs_kept"] == len(kept)
    steps = [json.loads(ln) for ln in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert sum(s.get("docs", 0) for s in steps if s["phase"] == "sign") == len(recs)
    assert not work_dir(tmp_path / "out").exists()      # intermediates removed when done


def test_chain_removes_only_through_verified_edges(tmp_path):
    fresh = Words()
    a = fresh.take(N_WORDS)
    b = a[:-5] + fresh.take(5)
    c = fresh.take(5) + b[5:]
    recs = [{"text": " ".join(w), "doc": n} for n, w in zip("abc", (a, b, c))]
    assert jaccard(shingle_set(recs[0]["text"]), shingle_set(recs[2]["text"])) < 0.95
    write_jsonl(tmp_path / "in.jsonl", recs)
    cfg = DedupConfig()
    report = run_dedup([str(tmp_path / "in.jsonl")], str(tmp_path / "out"), cfg,
                       id_field="doc")
    [cluster] = report["clusters"]
    assert cluster["keep"] == "a" and cluster["members"] == ["a", "b", "c"]
    assert sorted(tuple(sorted(e[:2])) for e in cluster["edges"]) == [("a", "b"), ("b", "c")]


def test_below_threshold_pair_is_kept(tmp_path):
    fresh = Words()
    a = fresh.take(N_WORDS)
    recs = [{"text": " ".join(a)}, {"text": " ".join(tail_variant(a, 6, fresh))}]  # J 0.942
    write_jsonl(tmp_path / "in.jsonl", recs)
    cfg = DedupConfig()
    report = run_dedup([str(tmp_path / "in.jsonl")], str(tmp_path / "out"), cfg)
    assert report["counts"]["docs_kept"] == 2 and report["clusters"] == []


def test_bad_input_reported_and_strict(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_bytes(b'{"text": "one two three four five six"}\n{"text": \n'
                  b'{"text": "\xff\xfe"}\n{"no_text": 1}\n{"text": ""}\n'
                  b'{"text": "one two three four five six"}\n')
    cfg = DedupConfig()
    report = run_dedup([str(p)], str(tmp_path / "out"), cfg)
    errs = report["input_errors"]
    assert errs["total"] == 4
    assert [(e["line"], e["kind"]) for e in errs["files"][str(p)]["examples"]] == [
        (2, "malformed_json"), (3, "non_utf8"), (4, "missing_text"), (5, "empty_text")]
    assert report["counts"]["docs_kept"] == 1 and report["counts"]["exact_duplicates"] == 1
    with pytest.raises(UserError, match=r"in.jsonl:2"):
        run_dedup([str(p)], str(tmp_path / "out2"), cfg, strict=True)
    assert not (tmp_path / "out2").exists()          # atomic: nothing left behind
    assert not list(tmp_path.glob(".out2*"))


def test_duplicate_ids_are_bad_records_and_existing_output(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [{"text": "a b", "k": 1}, {"text": "c d", "k": 1},
                                        {"text": "e f", "k": 2}])
    cfg = DedupConfig()
    report = run_dedup([str(tmp_path / "in.jsonl")], str(tmp_path / "out"), cfg, id_field="k")
    errs = report["input_errors"]["files"][str(tmp_path / "in.jsonl")]
    assert errs["by_kind"] == {"duplicate_id": 1} and errs["examples"][0]["line"] == 2
    assert [r["text"] for r in iter_records([str(tmp_path / "out")])] == ["a b", "e f"]
    assert report["counts"]["docs"] == 2 and report["counts"]["bad_records"] == 1
    with pytest.raises(UserError, match="duplicate id"):
        run_dedup([str(tmp_path / "in.jsonl")], str(tmp_path / "o2"), cfg, id_field="k",
                  strict=True)
    with pytest.raises(UserError, match="--overwrite"):
        run_dedup([str(tmp_path / "in.jsonl")], str(tmp_path / "out"), cfg)


def test_a_field_only_later_records_have_is_kept(tmp_path):
    # Arrow's from_pylist takes the first record's fields: "url" and "meta" were dropped.
    recs = [{"text": "first record here"}, {"text": "second one", "url": "http://x"},
            {"text": "third and last", "meta": {"lang": "en"}, "url": 7}]
    write_jsonl(tmp_path / "in.jsonl", recs)
    run_dedup([str(tmp_path / "in.jsonl")], str(tmp_path / "out"), DedupConfig())
    out = list(iter_records([str(tmp_path / "out")]))
    assert [r["text"] for r in out] == [r["text"] for r in recs]
    assert [r.get("url") for r in out] == [None, '"http://x"', "7"]   # mixed types: JSON text
    assert out[2]["meta"] == {"lang": "en"} and out[0]["meta"] is None


def test_inputs_changing_mid_run_fail_cleanly(tmp_path):
    p = tmp_path / "in.jsonl"
    write_jsonl(p, [{"text": f"document number {i} with some words"} for i in range(10)])
    cfg = DedupConfig()

    def append_once(phase: str, n_done: int) -> None:
        with open(p, "a") as f:
            f.write(json.dumps({"text": "a late arrival"}) + "\n")

    with pytest.raises(UserError, match="in.jsonl changed while dedup ran"):
        run_dedup([str(p)], str(tmp_path / "out"), cfg, on_progress=append_once)
    assert not (tmp_path / "out").exists()


def test_partitions_follow_the_corpus_size(tmp_path):
    # Two partitions (the old fixed default) of 800 GB would each sort ~13 GB of band keys
    # on one core; the number now follows the text's size, estimated from the files'.
    from opt_ray.data.dedup import BUCKET_TEXT_BYTES, auto_buckets
    from opt_ray.data.readers import InputFile

    def sparse(name: str, size: int, kind: str = "jsonl") -> InputFile:
        p = tmp_path / name
        with open(p, "wb") as f:
            f.truncate(size)
        return InputFile(p, kind, name)

    small = [sparse("a.jsonl", 1000)]
    assert auto_buckets(small) == 2
    big = [sparse(f"{i}.jsonl", 400 << 30) for i in range(2)]            # 800 GB of text
    assert auto_buckets(big) == 50 == 800 * (1 << 30) // BUCKET_TEXT_BYTES
    assert auto_buckets([sparse("p.jsonl.zst", 100 << 30)]) == 25       # ~x4 of text
    assert auto_buckets([sparse("t.parquet", 100 << 30, "parquet")]) == 13
    write_jsonl(tmp_path / "in.jsonl", planted_corpus())
    report = run_dedup([str(tmp_path / "in.jsonl")], str(tmp_path / "out"), DedupConfig())
    assert report["params"]["num_buckets"] == 2
