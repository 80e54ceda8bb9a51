"""The phased dedup keeps exactly the documents the previous (single-process, all-pairs)
implementation kept, on the sample corpus and on planted pairs.

``reference_clusters`` is the previous algorithm (opt_ray/data/dedup.py before the phased
pipeline, condensed to the in-memory path, not changed otherwise): datasketch-identical
signatures, band keys into buckets, exact duplicates by digest, *every* pair of a bucket
as a candidate, exact Jaccard on shingle sets of strings, union-find, lowest natural id
kept. It is frozen here as the parity reference; the pipeline must never be compared
with itself.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_dedup_lib import N_WORDS, Words, planted_corpus, write_jsonl  # noqa: E402

from opt_ray.data import minhash
from opt_ray.data.dedup import DedupConfig, band_keys, natural_key, run_dedup
from opt_ray.data.readers import ID_KEY, iter_records


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))
        self.size = [1] * n

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a: int, b: int) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]
        return True


def _bucket_pairs(keys: np.ndarray, ords: np.ndarray, drop: np.ndarray) -> np.ndarray:
    keep = ~np.isin(ords, drop)
    keys, ords = keys[keep], ords[keep]
    order = np.lexsort((ords, keys))
    keys, ords = keys[order], ords[order]
    edge = np.flatnonzero(np.diff(keys) != 0) + 1
    starts = np.concatenate([[0], edge])
    ends = np.concatenate([edge, [len(keys)]])
    out = [np.empty((0, 2), np.int64)]
    for s, e in zip(starts.tolist(), ends.tolist()):
        if e - s >= 2:
            i, j = np.triu_indices(e - s, k=1)
            out.append(np.stack([ords[s:e][i], ords[s:e][j]], axis=1))
    p = np.sort(np.concatenate(out).astype(np.int64), axis=1)
    p = p[p[:, 0] != p[:, 1]]
    return np.unique(p, axis=0)


def _reference_candidates(texts: list[str], cfg: DedupConfig):
    """(exact-duplicate edges, candidate pairs) as the previous algorithm found them."""
    n = len(texts)
    sig, dig = minhash.signatures_and_digests(texts, cfg.num_perm, cfg.seed, cfg.ngram)
    keys = band_keys(sig, cfg.bands, cfg.rows).ravel()
    ords = np.repeat(np.arange(n, dtype=np.int64), cfg.bands)
    keyed = dig.view(np.dtype((np.void, 16))).ravel()
    _, first, inverse = np.unique(keyed, return_index=True, return_inverse=True)
    rep = first[inverse.ravel()]
    dup = np.flatnonzero(rep != np.arange(n))
    edges = [(int(rep[o]), int(o)) for o in dup]
    return edges, _bucket_pairs(keys, ords, dup.astype(np.int64))


def reference_clusters(ids: list[str], texts: list[str], cfg: DedupConfig) -> list[list[str]]:
    """The previous algorithm's clusters (members sorted naturally; [0] is kept)."""
    n = len(texts)
    edges, pairs = _reference_candidates(texts, cfg)
    uf = _UnionFind(n)
    for i, j in edges:
        uf.union(i, j)
    sets: dict[int, set] = {}
    for i, j in pairs.tolist():
        if uf.find(i) == uf.find(j):
            continue
        a = sets.setdefault(i, minhash.shingle_set(texts[i], cfg.ngram))
        b = sets.setdefault(j, minhash.shingle_set(texts[j], cfg.ngram))
        if minhash.jaccard(a, b) >= cfg.threshold and uf.union(i, j):
            edges.append((i, j))
    members: dict[int, set] = {}
    for i, j in edges:
        members.setdefault(uf.find(i), set()).update((ids[i], ids[j]))
    return sorted((sorted(m, key=natural_key) for m in members.values()),
                  key=lambda c: natural_key(c[0]))


def reference_output_order(ids: list[str], texts: list[str], cfg: DedupConfig) -> list[str]:
    """The kept ids of one split in the order the output holds them: the documents in no
    candidate pair and no exact-duplicate pair first (fetch writes them), then the kept
    rest (filter), each part in input order."""
    edges, pairs = _reference_candidates(texts, cfg)
    undecided = {i for e in edges for i in e} | set(pairs.ravel().tolist())
    removed = {m for c in reference_clusters(ids, texts, cfg) for m in c[1:]}
    return ([ids[i] for i in range(len(ids)) if i not in undecided]
            + [ids[i] for i in sorted(undecided) if ids[i] not in removed])


def _pipeline_clusters(report: dict) -> list[list[str]]:
    return [c["members"] for c in report["clusters"]]


@pytest.mark.parametrize("threshold", [0.95, 0.9, 0.8])
def test_planted_pairs_same_clusters_as_previous(tmp_path, threshold):
    recs = planted_corpus(seed=5)
    # Split over three files, so that groups span splits and partitions.
    for k in range(3):
        write_jsonl(tmp_path / f"in{k}.jsonl", recs[k::3])
    files = [str(tmp_path / f"in{k}.jsonl") for k in range(3)]
    cfg = DedupConfig(threshold=threshold, num_buckets=3, batch_docs=7)
    report = run_dedup(files, str(tmp_path / "out"), cfg, id_field="doc")
    ordered = [r for f in files for r in iter_records([f], id_field="doc")]
    ref = reference_clusters([r[ID_KEY] for r in ordered], [r["text"] for r in ordered], cfg)
    assert _pipeline_clusters(report) == ref
    assert len(ref) >= 30
    kept = sorted(r["doc"] for r in iter_records([str(tmp_path / "out")]))
    assert kept == sorted(set(r["doc"] for r in recs) - {m for c in ref for m in c[1:]})


def test_group_whose_lowest_member_matches_no_one(tmp_path):
    """A bucket {A, B, C} where only B~C is similar: a star to the lowest member (A) alone
    would miss B~C; the previous all-pairs algorithm removed C, and so must this one."""
    fresh = Words()
    b = fresh.take(N_WORDS)
    c = b[:-2] + fresh.take(2)                    # J(B, C) = 0.98
    a = b[:-12] + fresh.take(12)                  # J(A, B) ~ 0.89, J(A, C) ~ 0.87
    recs = [{"text": " ".join(w), "doc": f"d{k}"} for k, w in enumerate([a, b, c])]
    write_jsonl(tmp_path / "in.jsonl", recs)
    cfg = DedupConfig(threshold=0.95, bands=1, rows=1)   # one band: a single bucket of 3
    report = run_dedup([str(tmp_path / "in.jsonl")], str(tmp_path / "out"), cfg, id_field="doc")
    ref = reference_clusters(["d0", "d1", "d2"], [r["text"] for r in recs], cfg)
    assert _pipeline_clusters(report) == ref == [["d1", "d2"]]


def test_sample_corpus_same_kept_set_as_previous(tmp_path):
    from opt_ray.data.sample import write_sample_corpus
    path = write_sample_corpus(tmp_path / "sample", n_docs=600)
    cfg = DedupConfig(num_buckets=2)
    report = run_dedup([str(path)], str(tmp_path / "out"), cfg)
    recs = list(iter_records([str(path)]))
    ref = reference_clusters([r[ID_KEY] for r in recs], [r["text"] for r in recs], cfg)
    assert _pipeline_clusters(report) == ref and len(ref) > 10
    kept = [r[ID_KEY] for r in iter_records([str(tmp_path / "out")])]
    expect = reference_output_order([r[ID_KEY] for r in recs], [r["text"] for r in recs], cfg)
    assert kept == expect
    # The input was read twice (sign, fetch); filter read only fetch's stash of the
    # undecided documents.
    edges, pairs = _reference_candidates([r["text"] for r in recs], cfg)
    steps = [json.loads(ln) for ln in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    [fetch] = [st for st in steps if st["phase"] == "fetch" and "kept" in st]
    [filt] = [st for st in steps if st["phase"] == "filter" and "kept" in st]
    undecided = len({i for e in edges for i in e} | set(pairs.ravel().tolist()))
    assert fetch["stashed"] == undecided and fetch["kept"] == len(recs) - undecided
    assert filt["kept"] == len(kept) - fetch["kept"] > 0


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "jsonl.zst"])
def test_large_files_split_same_output_as_whole_file(tmp_path, fmt):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    recs = planted_corpus(seed=7)
    src = tmp_path / f"in.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(recs), src, row_group_size=40)
        small = 1                                      # one task per row group
    else:
        write_jsonl(tmp_path / "in.jsonl", recs)
        small = (tmp_path / "in.jsonl").stat().st_size // 6   # six runs of lines
        if fmt == "jsonl.zst":                         # (of the decompressed text)
            src.write_bytes(zstandard.ZstdCompressor().compress((tmp_path / "in.jsonl").read_bytes()))
    whole = run_dedup([str(src)], str(tmp_path / "whole"), DedupConfig())
    split = run_dedup([str(src)], str(tmp_path / "split"), DedupConfig(split_bytes=small))
    assert split["counts"] == whole["counts"]
    assert split["clusters"] == whole["clusters"] and len(whole["clusters"]) > 10
    recs = list(iter_records([str(src)]))
    expect = reference_output_order([r[ID_KEY] for r in recs], [r["text"] for r in recs],
                                    DedupConfig())
    assert [r[ID_KEY] for r in iter_records([str(tmp_path / "whole")])] == expect
    # Split: the same records; the order is per split (undecided ones at each split's end).
    got = [r[ID_KEY] for r in iter_records([str(tmp_path / "split")])]
    assert sorted(got) == sorted(expect) and len(set(got)) == len(got)
    assert len(list((tmp_path / "split").glob("part-*.parquet"))) >= 5   # one per split
