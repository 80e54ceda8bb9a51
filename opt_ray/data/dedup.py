"""MinHash-LSH near-duplicate removal: the algorithm, without Ray.

The stage, in order (``run_dedup`` drives it; a ``Backend`` says where the work runs):

1. **Signatures.** Documents are read in batches; a worker computes each batch's MinHash
   signatures and per-document content digests (``process_batch``), cuts each signature
   into ``bands`` bands of ``rows`` values, hashes each band to a 64-bit key and routes
   ``(key, doc)`` to bucket table ``key % num_buckets``. A batch id makes a bucket's add
   idempotent, so a retried batch replaces, never duplicates, its entries.
2. **Exact duplicates.** Documents with equal digests have equal word sequences, hence
   equal shingle sets (Jaccard 1): each group keeps its lowest ordinal as representative,
   the others are joined to it and left out of the buckets, so a thousand copies of a
   licence make a thousand edges, not half a million candidate pairs.
3. **Candidates.** Each bucket table sorts its keys; documents sharing a key in any band
   form candidate pairs. Bands and rows default to the largest ``rows`` whose candidate
   probability ``1 - (1 - s**rows)**bands`` at the threshold is >= 0.99 (``choose_bands``).
4. **Verification.** Every candidate pair is checked by the exact Jaccard similarity of
   the two shingle sets (texts re-read for just the candidate documents); only pairs
   >= threshold become edges. Pairs whose ends are already connected are skipped: the
   components cannot change. Windows are processed in a fixed order, so which pairs are
   skipped, and thus the report, is deterministic.
5. **Clusters.** Connected components of the verified edges (union-find). Only verified
   edges are unioned, so in a chain A~B~C with A, C below threshold, C is removed because
   of its verified partner B, never because of A. Each cluster keeps its lowest id
   (natural order: ``doc9`` < ``doc10``); every removed document has a verified partner
   >= threshold in its cluster, which the report lists.
6. **Output.** Kept records, all input fields, as Parquet shards, with ``dedup_report.json``,
   ``metrics.jsonl`` (one line per signature batch and per phase) and ``manifest.json``,
   through ``ArtifactWriter`` (atomic).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

import numpy as np

from opt_ray import metrics
from opt_ray.data import minhash
from opt_ray.data.readers import ID_KEY, InputErrors, InputFile, iter_file, resolve_inputs
from opt_ray.errors import UserError

REPORT = "dedup_report.json"
_U64 = np.uint64


def candidate_probability(s: float, bands: int, rows: int) -> float:
    """P(a pair with Jaccard ``s`` shares at least one band) = 1 - (1 - s**rows)**bands."""
    return 1.0 - (1.0 - s ** rows) ** bands


def choose_bands(threshold: float, num_perm: int, target: float = 0.99) -> tuple[int, int]:
    """``(bands, rows)`` with ``bands * rows <= num_perm`` and candidate probability at
    ``threshold`` >= ``target``, taking the largest ``rows`` (fewest false candidates).

    datasketch's own optimum (which weighs false positives and negatives equally) picks
    b=3, r=42 at 0.95 with 128 permutations and finds only ~31% of the pairs there; here
    recall comes first and exact verification removes the false candidates.
    """
    best = None
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        if candidate_probability(threshold, bands, rows) >= target:
            best = (bands, rows)
    if best is None:
        raise UserError(f"no bands/rows reach {target:.0%} candidate probability at threshold "
                        f"{threshold} with {num_perm} permutations; raise --num-perm")
    return best


@dataclass(frozen=True)
class DedupConfig:
    """Parameters of the stage; ``bands``/``rows`` are filled in by ``choose_bands``."""

    threshold: float = 0.95
    ngram: int = 5
    num_perm: int = 128
    seed: int = 1
    bands: int | None = None
    rows: int | None = None
    verify: bool = True          # exact Jaccard; False = MinHash estimate (faster, approximate)
    batch_docs: int = 512        # documents per signature task, at most
    batch_bytes: int = 1 << 20   # text bytes per signature task, at most (long documents)
    num_buckets: int = 2         # bucket tables (actors)
    verify_chunk: int = 2048     # candidate pairs per verification task
    shard_rows: int = 50_000     # kept records per output Parquet shard

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise UserError(f"--threshold must be in (0, 1], got {self.threshold}")
        if self.ngram < 1:
            raise UserError(f"--ngram must be >= 1, got {self.ngram}")
        if self.num_perm < 1:
            raise UserError(f"--num-perm must be >= 1, got {self.num_perm}")
        if (self.bands is None) != (self.rows is None):
            raise UserError("give both --bands and --rows, or neither (then they are chosen "
                            "for >= 99% candidate probability at the threshold)")
        if self.bands is None:
            b, r = choose_bands(self.threshold, self.num_perm)
            object.__setattr__(self, "bands", b)
            object.__setattr__(self, "rows", r)
        if self.bands < 1 or self.rows < 1 or self.bands * self.rows > self.num_perm:
            raise UserError(f"--bands x --rows ({self.bands} x {self.rows}) must be between 1 "
                            f"and --num-perm ({self.num_perm})")
        for name in ("batch_docs", "batch_bytes", "num_buckets", "verify_chunk", "shard_rows"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def probability_at_threshold(self) -> float:
        return candidate_probability(self.threshold, self.bands, self.rows)


# ---------------------------------------------------------------------------- batches

def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n, bands) uint64 keys: a 64-bit mix of each band's ``rows`` values and its index.

    Two documents share a key iff (up to a 64-bit collision, which only adds a candidate
    that verification rejects) they agree on every value of that band.
    """
    n = sig.shape[0]
    keys = np.empty((n, bands), dtype=_U64)
    mul = _U64(0x9E3779B97F4A7C15)
    for j in range(bands):
        h = np.full(n, ((j + 1) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF, dtype=_U64)
        for c in range(j * rows, (j + 1) * rows):
            h ^= sig[:, c]
            h *= mul                       # wrapping multiply: a good 64-bit mix
            h ^= h >> _U64(31)
        keys[:, j] = h
    return keys


def process_batch(texts: list[str], base: int, cfg: DedupConfig
                  ) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """The worker's job for one batch: ``(digests (n, 16) uint8, parts)`` where
    ``parts[k] = (keys, ordinals)`` are the band entries routed to bucket table ``k``.
    Ordinals are global: ``base + i`` for the batch's i-th document."""
    sig, dig = minhash.signatures_and_digests(texts, cfg.num_perm, cfg.seed, cfg.ngram)
    keys = band_keys(sig, cfg.bands, cfg.rows).ravel()
    ords = np.repeat(np.arange(base, base + len(texts), dtype=np.int64), cfg.bands)
    route = keys % _U64(cfg.num_buckets)
    parts = [(keys[route == k], ords[route == k]) for k in range(cfg.num_buckets)]
    return dig, parts


class BucketTable:
    """One partition of the LSH buckets: band keys -> documents, idempotent per batch."""

    def __init__(self) -> None:
        self._parts: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def add(self, batch_id: int, keys: np.ndarray, ords: np.ndarray) -> None:
        self._parts[batch_id] = (keys, ords)   # a retried batch replaces its entries

    def __len__(self) -> int:
        return len(self._parts)

    def candidate_pairs(self, drop: np.ndarray | None = None) -> np.ndarray:
        """Unique pairs ``(i, j)``, i < j, of documents sharing a key; (m, 2) int64,
        sorted. ``drop``: ordinals to leave out (exact duplicates of a representative)."""
        if not self._parts:
            return np.empty((0, 2), dtype=np.int64)
        keys = np.concatenate([p[0] for p in self._parts.values()])
        ords = np.concatenate([p[1] for p in self._parts.values()])
        if drop is not None and len(drop):
            keep = ~np.isin(ords, drop)
            keys, ords = keys[keep], ords[keep]
        order = np.lexsort((ords, keys))
        keys, ords = keys[order], ords[order]
        edge = np.flatnonzero(np.diff(keys) != 0) + 1
        starts = np.concatenate([[0], edge])
        ends = np.concatenate([edge, [len(keys)]])
        multi = np.flatnonzero(ends - starts >= 2)
        out: list[np.ndarray] = []
        for s, e in zip(starts[multi].tolist(), ends[multi].tolist()):
            members = ords[s:e]
            if e - s == 2:
                out.append(members[None, :])
            else:
                i, j = np.triu_indices(e - s, k=1)
                out.append(np.stack([members[i], members[j]], axis=1))
        return unique_pairs(out)


def unique_pairs(chunks: Iterable[np.ndarray]) -> np.ndarray:
    """Concatenate (m, 2) pair arrays, drop self-pairs and repeats, sort; i < j."""
    chunks = [c for c in chunks if len(c)]
    if not chunks:
        return np.empty((0, 2), dtype=np.int64)
    p = np.concatenate(chunks).astype(np.int64)
    p = np.sort(p, axis=1)
    p = p[p[:, 0] != p[:, 1]]
    return np.unique(p, axis=0)


# ----------------------------------------------------------------------- verification

def verify_pairs(pairs: np.ndarray, texts: dict[int, str], ngram: int, *,
                 exact: bool = True, num_perm: int = 128, seed: int = 1) -> np.ndarray:
    """Similarity of each pair: exact Jaccard of the shingle sets (``exact``), else the
    MinHash estimate (fraction of equal signature values). float64 array (m,)."""
    if not exact:
        ords = sorted({int(o) for o in pairs.ravel()})
        sig = minhash.signatures([texts[o] for o in ords], num_perm, seed, ngram)
        row = {o: k for k, o in enumerate(ords)}
        return np.array([float(np.mean(sig[row[int(i)]] == sig[row[int(j)]])) for i, j in pairs])
    sets: dict[int, set[str]] = {}

    def get(o: int) -> set[str]:
        s = sets.get(o)
        if s is None:
            s = sets[o] = minhash.shingle_set(texts[o], ngram)
        return s

    return np.array([minhash.jaccard(get(int(i)), get(int(j))) for i, j in pairs],
                    dtype=np.float64)


class UnionFind:
    """Disjoint sets over ordinals 0..n-1 with path halving and union by size."""

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


_DIGITS = re.compile(r"(\d+)")


def natural_key(doc_id: str) -> tuple:
    """Sort key that orders embedded numbers by value: ``a:9`` < ``a:10``, ``7`` < ``12``."""
    parts = _DIGITS.split(doc_id)
    return tuple(int(p) if k % 2 else p for k, p in enumerate(parts))


def clusters_from_edges(ids: list[str], edges: list[tuple[int, int, float]]
                        ) -> list[dict[str, Any]]:
    """Connected components of ``edges`` (ordinal pairs with their verified similarity),
    each as ``{"keep", "members", "edges"}`` with ids; the kept member is the lowest id.
    Clusters are sorted by their kept id."""
    uf = UnionFind(len(ids))
    for i, j, _ in edges:
        uf.union(i, j)
    members: dict[int, set[int]] = {}
    comp_edges: dict[int, list] = {}
    for i, j, s in edges:
        r = uf.find(i)
        members.setdefault(r, set()).update((i, j))
        comp_edges.setdefault(r, []).append([ids[i], ids[j], round(float(s), 6)])
    out = []
    for r, ms in members.items():
        ordered = sorted(ms, key=lambda o: natural_key(ids[o]))
        out.append({"keep": ids[ordered[0]], "members": [ids[o] for o in ordered],
                    "edges": comp_edges[r]})
    out.sort(key=lambda c: natural_key(c["keep"]))
    return out


# -------------------------------------------------------------------------- backends

class Backend(Protocol):
    """Where the work runs. ``LocalBackend`` runs it in this process; ``actors.dedup``
    provides the Ray one (worker actors, bucket actors)."""

    num_workers: int

    def start(self) -> None:
        """Begin a run (a backend may serve several runs in turn)."""

    def submit_batch(self, batch_id: int, base: int, texts: list[str]) -> None: ...
    def done_batches(self, block: bool) -> list[tuple[int, np.ndarray]]:
        """Finished batches ``(batch_id, digests)``; ``block``: wait for at least one."""
    def in_flight(self) -> int: ...
    def candidate_pairs(self, drop: np.ndarray) -> np.ndarray: ...
    def verify(self, chunks: list[tuple[np.ndarray, dict[int, str]]]) -> list[np.ndarray]: ...
    def close(self) -> None: ...


class LocalBackend:
    """Everything in the calling process: the reference and the test double for Ray."""

    def __init__(self, cfg: DedupConfig) -> None:
        self.cfg = cfg
        self.num_workers = 1
        self.tables = [BucketTable() for _ in range(cfg.num_buckets)]
        self._done: list[tuple[int, np.ndarray]] = []

    def start(self) -> None:
        self.tables = [BucketTable() for _ in range(self.cfg.num_buckets)]
        self._done = []

    def submit_batch(self, batch_id: int, base: int, texts: list[str]) -> None:
        dig, parts = process_batch(texts, base, self.cfg)
        for table, (keys, ords) in zip(self.tables, parts):
            table.add(batch_id, keys, ords)
        self._done.append((batch_id, dig))

    def done_batches(self, block: bool) -> list[tuple[int, np.ndarray]]:
        out, self._done = self._done, []
        return out

    def in_flight(self) -> int:
        return 0

    def candidate_pairs(self, drop: np.ndarray) -> np.ndarray:
        return unique_pairs(t.candidate_pairs(drop) for t in self.tables)

    def verify(self, chunks: list[tuple[np.ndarray, dict[int, str]]]) -> list[np.ndarray]:
        c = self.cfg
        return [verify_pairs(p, t, c.ngram, exact=c.verify, num_perm=c.num_perm, seed=c.seed)
                for p, t in chunks]

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------- the stage

_M_DOCS = metrics.counter("dedup_docs", "documents signed by the dedup stage")
_M_BYTES = metrics.counter("dedup_bytes", "text bytes signed by the dedup stage")
_M_PAIRS = metrics.counter("dedup_candidate_pairs", "LSH candidate pairs (before verification)")
_M_DUPS = metrics.counter("dedup_duplicates", "documents removed as near-duplicates")


@dataclass
class _Corpus:
    """What the driver keeps per document: its id and text size (ordinal = index)."""
    ids: list[str] = field(default_factory=list)
    nbytes: int = 0


def _good_records(files: list[InputFile], text_field: str, id_field: str | None,
                  errors: InputErrors) -> Iterator[dict]:
    for f in files:
        yield from iter_file(f, text_field=text_field, id_field=id_field, errors=errors)


def _progress(total: int | None, unit: str, desc: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, unit=unit, desc=desc, disable=not enabled, unit_scale=True,
                dynamic_ncols=True, leave=False)


def _write_shards(out_dir: Path, records: Iterable[dict], shard_rows: int,
                  text_field: str) -> list[dict[str, Any]]:
    """Write ``records`` as Parquet shards ``part-00000.parquet``...; returns their info.

    Records keep every field. A column whose values Arrow cannot type together (e.g. an
    int in one record and a string in another) is stored as JSON text in that shard.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    shards: list[dict[str, Any]] = []

    def flush(rows: list[dict]) -> None:
        try:
            table = pa.Table.from_pylist(rows)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            cols = list(dict.fromkeys(k for r in rows for k in r))
            arrays = {}
            for c in cols:
                vals = [r.get(c) for r in rows]
                try:
                    arrays[c] = pa.array(vals)
                except (pa.ArrowInvalid, pa.ArrowTypeError):
                    arrays[c] = pa.array([None if v is None else json.dumps(v) for v in vals])
            table = pa.table(arrays)
        name = f"part-{len(shards):05d}.parquet"
        pq.write_table(table, out_dir / name, compression="zstd")
        shards.append({"file": name, "rows": table.num_rows})

    buf: list[dict] = []
    for rec in records:
        buf.append(rec)
        if len(buf) >= shard_rows:
            flush(buf)
            buf = []
    if buf or not shards:
        if not buf:  # an empty corpus still gets one (empty) shard with the key columns
            import pyarrow as pa
            import pyarrow.parquet as pq
            pq.write_table(pa.table({text_field: pa.array([], pa.string()),
                                     ID_KEY: pa.array([], pa.string())}),
                           out_dir / "part-00000.parquet")
            shards.append({"file": "part-00000.parquet", "rows": 0})
        else:
            flush(buf)
    return shards


def _changed(ordinal: int) -> UserError:
    return UserError(f"the inputs changed while dedup ran (document {ordinal} differs from "
                     f"the first read); re-run on inputs that stay put")


def run_dedup(inputs: list[str], output: str, cfg: DedupConfig, backend: Backend, *,
              text_field: str = "text", id_field: str | None = None, strict: bool = False,
              overwrite: bool = False, progress: bool = False,
              on_batch: Callable[[int], None] | None = None,
              files: list[InputFile] | None = None) -> dict[str, Any]:
    """Deduplicate ``inputs`` into the artifact directory ``output``; returns the report.

    ``files``: the already-resolved inputs (``resolve_inputs``), when the caller checked
    them before starting its backend. ``on_batch(n_done)`` is called as signature batches
    complete (the chaos test kills a worker from there).
    """
    from opt_ray.artifacts import ArtifactWriter

    files = files if files is not None else resolve_inputs(inputs)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    writer = ArtifactWriter(output, kind="dedup", overwrite=overwrite)
    with writer:
        # 1. signatures, band keys -> buckets ------------------------------------------
        t0 = time.perf_counter()
        backend.start()
        errors = InputErrors(strict=strict)
        corpus = _Corpus()
        seen: dict[str, int] = {}
        digests: dict[int, np.ndarray] = {}
        batch_bases: list[int] = []
        max_in_flight = 2 * max(1, backend.num_workers)
        bar = _progress(None, "doc", "dedup: signatures", progress)

        steps: list[dict[str, Any]] = []   # -> metrics.jsonl, one line per batch / phase

        def collect(block: bool) -> None:
            for batch_id, dig in backend.done_batches(block):
                digests[batch_id] = dig
                bar.update(len(dig))
                _M_DOCS.inc(len(dig))
                steps.append({"phase": "signature_batch", "batch": batch_id, "docs": len(dig),
                              "batches_done": len(digests),
                              "elapsed_s": round(time.perf_counter() - t_start, 4)})
                if on_batch is not None:
                    on_batch(len(digests))

        texts: list[str] = []
        batch_bytes = 0
        for rec in _good_records(files, text_field, id_field, errors):
            doc_id = rec[ID_KEY]
            if doc_id in seen:
                raise UserError(f"document id {doc_id!r} occurs twice (records "
                                f"{seen[doc_id]} and {len(corpus.ids)}); ids must be unique: "
                                f"fix --id-field, or omit it to generate ids")
            seen[doc_id] = len(corpus.ids)
            corpus.ids.append(doc_id)
            text = rec[text_field]
            texts.append(text)
            batch_bytes += len(text.encode("utf-8"))
            if len(texts) >= cfg.batch_docs or batch_bytes >= cfg.batch_bytes:
                batch_bases.append(len(corpus.ids) - len(texts))
                backend.submit_batch(len(batch_bases) - 1, batch_bases[-1], texts)
                corpus.nbytes += batch_bytes
                _M_BYTES.inc(batch_bytes)
                texts, batch_bytes = [], 0
                # Keep every worker busy (two batches each) without unbounded queues.
                while backend.in_flight() >= max_in_flight:
                    collect(block=True)
                collect(block=False)
        if texts:
            batch_bases.append(len(corpus.ids) - len(texts))
            backend.submit_batch(len(batch_bases) - 1, batch_bases[-1], texts)
            corpus.nbytes += batch_bytes
            _M_BYTES.inc(batch_bytes)
        while len(digests) < len(batch_bases):
            collect(block=True)
        bar.close()
        del seen, texts
        n = len(corpus.ids)
        timings["signatures_s"] = time.perf_counter() - t0

        # 2. exact duplicates ---------------------------------------------------------
        t0 = time.perf_counter()
        edges: list[tuple[int, int, float]] = []
        drop = np.empty(0, dtype=np.int64)
        if n:
            dig = np.concatenate([digests[b] for b in range(len(batch_bases))])
            keyed = dig.view(np.dtype((np.void, 16))).ravel()
            _, first, inverse = np.unique(keyed, return_index=True, return_inverse=True)
            rep = first[inverse.ravel()]   # lowest ordinal with the same digest
            dup = np.flatnonzero(rep != np.arange(n))
            drop = dup.astype(np.int64)
            edges.extend((int(rep[o]), int(o), 1.0) for o in dup)
            del dig, keyed
        digests.clear()

        # 3. candidates ---------------------------------------------------------------
        pairs = backend.candidate_pairs(drop)
        _M_PAIRS.inc(len(pairs))
        timings["buckets_s"] = time.perf_counter() - t0

        # 4. verification -------------------------------------------------------------
        t0 = time.perf_counter()
        uf = UnionFind(n)
        for i, j, _ in edges:
            uf.union(i, j)
        verified = similar = skipped = 0
        if len(pairs):
            needed = set(np.unique(pairs).tolist())
            texts_by_ord: dict[int, str] = {}
            for o, rec in enumerate(_good_records(files, text_field, id_field, InputErrors())):
                if o < n and corpus.ids[o] != rec[ID_KEY]:
                    raise _changed(o)
                if o in needed:
                    texts_by_ord[o] = rec[text_field]
            bar = _progress(len(pairs), "pair", "dedup: verify", progress)
            # A fixed window (not a function of the worker count) keeps the report, which
            # pairs were skipped as already connected, identical for any --workers.
            window = cfg.verify_chunk * 8
            for w0 in range(0, len(pairs), window):
                win = pairs[w0:w0 + window]
                live = np.array([uf.find(int(i)) != uf.find(int(j)) for i, j in win], dtype=bool)
                skipped += int((~live).sum())
                win = win[live]
                chunks = []
                for c0 in range(0, len(win), cfg.verify_chunk):
                    cp = win[c0:c0 + cfg.verify_chunk]
                    chunks.append((cp, {o: texts_by_ord[o] for o in np.unique(cp).tolist()}))
                for (cp, _), sims in zip(chunks, backend.verify(chunks)):
                    verified += len(cp)
                    for (i, j), s in zip(cp.tolist(), sims.tolist()):
                        if s >= cfg.threshold:
                            similar += 1
                            if uf.union(i, j):
                                edges.append((i, j, s))
                bar.update(len(pairs[w0:w0 + window]))
            bar.close()
            del texts_by_ord
        timings["verify_s"] = time.perf_counter() - t0

        # 5. clusters -----------------------------------------------------------------
        clusters = clusters_from_edges(corpus.ids, edges)
        removed = {m for c in clusters for m in c["members"][1:]}   # members[0] is kept
        _M_DUPS.inc(len(removed))

        # 6. output -------------------------------------------------------------------
        t0 = time.perf_counter()
        def kept_records() -> Iterator[dict]:
            # The inputs are read a third time; ordinals must still match the first read.
            o = -1
            for o, rec in enumerate(_good_records(files, text_field, id_field, InputErrors())):
                if o >= n or corpus.ids[o] != rec[ID_KEY]:
                    raise _changed(o)
                if rec[ID_KEY] not in removed:
                    yield rec
            if o != n - 1:
                raise _changed(o + 1)

        shards = _write_shards(writer.path, kept_records(), cfg.shard_rows, text_field)
        timings["write_s"] = time.perf_counter() - t0
        timings["total_s"] = time.perf_counter() - t_start

        counts = {
            "docs_read": n + errors.total, "bad_records": errors.total, "docs": n,
            "bytes": corpus.nbytes, "exact_duplicates": int(len(drop)),
            "candidate_pairs": int(len(pairs)), "pairs_verified": verified,
            "pairs_skipped_connected": skipped, "pairs_similar": similar,
            "clusters": len(clusters), "duplicates_removed": len(removed),
            "docs_kept": n - len(removed),
        }
        params = {**asdict(cfg), "probability_at_threshold": round(cfg.probability_at_threshold, 6),
                  "text_field": text_field, "id_field": id_field, "strict": strict,
                  "workers": backend.num_workers}
        report = {
            "inputs": [str(f.path) for f in files], "params": params, "counts": counts,
            "timings": {k: round(v, 3) for k, v in timings.items()},
            "throughput_mb_s": round(corpus.nbytes / 1e6 / max(timings["total_s"], 1e-9), 3),
            "input_errors": errors.to_dict(), "clusters": clusters,
        }
        (writer.path / REPORT).write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
        steps += [{"phase": k[:-2], "seconds": round(v, 4)} for k, v in timings.items()]
        steps.append({"phase": "done", **counts})
        with open(writer.path / "metrics.jsonl", "w") as f:
            f.writelines(json.dumps(s) + "\n" for s in steps)
        writer.manifest.update({"inputs": report["inputs"], "config": params,
                                "counts": counts, "shards": shards})
    return report
