"""MinHash-LSH near-duplicate removal at corpus scale: phases over splits and partitions.

The driver (``run_dedup``) only plans and tracks: it never reads a text. Workers (an
``Executor``: in-process, or Ray tasks from ``actors.dedup``) run one function per phase on
one split (an input file) or one partition (``key % partitions``), and each writes its
result under the work dir ``.<output>.dedup-work/`` (a sibling of the output) followed by a
``done.json`` marker. A rerun with the same inputs and parameters skips what is done, so a
killed worker (its task is retried) or a killed driver (run the command again) costs only
the unfinished splits; the output is identical either way.

A split is an input file, or, for a Parquet or jsonl file larger than ``split_bytes``, a
run of its row groups or lines (``readers.plan_splits``: the lines of large jsonl files,
compressed ones included, are counted by tasks on the executor, not the driver; rows and
lines keep their file-wide numbers, so ids do not depend on the splitting).
Documents are named by a ``uid = split << 32 | k`` (``k``: the k-th good record of the
split), which orders them as the inputs do. The phases and the data between them:

1. **sign** (per split): read the split; per good record its MinHash signature (identical to
   datasketch's, ``minhash.signatures``), cut into ``bands`` bands of ``rows`` values, each
   hashed to a 64-bit key. Written map-side, partitioned by hash (as datatrove does):
   ``bands-pP`` (key, uid), ``digests-pP`` (16-byte digest of the normalised words, uid),
   ``ids-pP`` (id, uid). Bad records are counted there with file and line.
2. **keys** (per partition): an id seen twice is a bad record (``duplicate_id``) for every
   occurrence after the first; documents with equal digests have equal word sequences
   (Jaccard 1), so each such group is joined to its lowest uid (the exact-duplicate edges)
   and only that one goes on to LSH.
3. **buckets** (per partition): sort (key, uid); documents sharing a key form a group, kept
   as its member list (linear in its size, never its pairs). Bands and rows default to the
   largest ``rows`` whose candidate probability ``1 - (1 - s**rows)**bands`` at the
   threshold is >= 0.99 (``choose_bands``).
4. **fetch** (per split): re-read the split (its second and last read) and write, for
   each document in a group, its shingle set as sorted 64-bit shingle hashes, to the
   partitions whose groups hold it. Every document is then decided or not: one in no
   group and no exact-duplicate pair is kept for certain and goes straight into output
   shards; one in a group or a pair (components decides it) goes, all fields, into the
   split's stash (``cand-*``, with its uids); a duplicate id is dropped.
5. **verify** (per partition): within each group, members in uid order join the local
   components they are similar to: a member is compared with the members of each
   component it is not yet connected to until one has Jaccard >= threshold (exact, on the
   shingle hashes). Only pairs whose ends are already connected are skipped, so the
   components are those of *all* verified pairs in the group (the previous all-pairs
   algorithm's), while k near-identical documents cost k - 1 comparisons, not k^2/2.
   Edges kept: those that joined two components, with their similarity.
6. **components** (one task): connected components of the edge arrays (label propagation
   with pointer jumping in numpy); each keeps its lowest id (natural order: ``doc9`` <
   ``doc10``); written as ``clusters.parquet`` and one ``removed`` array per split.
   In a chain A~B~C with A, C below threshold, C goes because of its verified partner B.
7. **filter** (per split): the stashed records components kept, as Parquet shards
   numbered after fetch's. The input is not read a third time: at the 0.95 rule the
   stash is the small part of a corpus (the candidates), so 800 GB of input cost ~1.6 TB
   of reads, not 2.4 TB. Output order: per split, the certain documents in input
   order, then the kept candidates in input order (splits in input order).
8. **finish** (driver): the shards, ``clusters.parquet``, ``dedup_report.json`` (counts,
   bad records, parameters, timings, the first ``report_clusters`` clusters),
   ``metrics.jsonl`` and ``manifest.json`` into the artifact directory, atomically.

Output shards are sized by text bytes (``shard_bytes``) and records (``shard_rows``).
Shingle hashes are 64-bit: the Jaccard is exact up to a hash collision between two
different shingles of one pair (probability ~ n^2 / 2^64, < 1e-9 below 10^5 shingles).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import numpy as np

from opt_ray import metrics
from opt_ray.data import minhash
from opt_ray.data.readers import (ID_KEY, InputErrors, InputFile, input_fingerprint, iter_file,
                                  plan_splits, resolve_inputs)
from opt_ray.errors import UserError
from opt_ray.storage import Loc

REPORT = "dedup_report.json"
CLUSTERS = "clusters.parquet"
WORK_VERSION = 2     # bump when the work-dir layout changes: old work dirs are discarded
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


BUCKET_TEXT_BYTES = 16 << 30   # input text per partition when the number is chosen
MAX_BUCKETS = 1024


def auto_buckets(files: Sequence[InputFile]) -> int:
    """Partitions for ``files``: one per ``BUCKET_TEXT_BYTES`` of text, at least 2.

    A partition task holds its share of every document's band keys (16 bytes x bands
    each), digests and ids, and sorts them in one process: two partitions (the old fixed
    default) of 800 GB of text are ~13 GB of keys each, sorted on one core, while the
    other workers idle. The text's size is estimated from the files' sizes (no request
    per file: a bucket listing's sizes): compressed jsonl x4, Parquet x2."""
    from opt_ray.data.readers import text_weight
    text = sum(text_weight(f) for f in files)
    return max(2, min(MAX_BUCKETS, -(-text // BUCKET_TEXT_BYTES)))


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
    batch_docs: int = 512        # documents signed at a time in a worker, at most
    batch_bytes: int = 1 << 20   # text bytes signed at a time in a worker, at most
    num_buckets: int | None = None  # partitions of the band keys (and digests, ids); None: auto_buckets
    shard_bytes: int = 128 << 20  # text characters per output Parquet shard, at most
    shard_rows: int = 200_000    # records per output Parquet shard, at most
    report_clusters: int = 10_000  # clusters listed in dedup_report.json (all: clusters.parquet)
    split_bytes: int = 256 << 20   # larger Parquet / jsonl files: split by row groups / lines

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
        for name in ("batch_docs", "batch_bytes", "num_buckets", "shard_bytes", "shard_rows",
                     "split_bytes"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def probability_at_threshold(self) -> float:
        return candidate_probability(self.threshold, self.bands, self.rows)


# ------------------------------------------------------------------------- primitives

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


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: partition choice independent of the key's own low bits."""
    x = x.astype(_U64, copy=True)
    x ^= x >> _U64(30)
    x *= _U64(0xBF58476D1CE4E5B9)
    x ^= x >> _U64(27)
    x *= _U64(0x94D049BB133111EB)
    x ^= x >> _U64(31)
    return x


def shingle_hashes(text: str, ngram: int) -> np.ndarray:
    """The shingle set of ``text`` (``minhash.shingles``) as sorted unique uint64 hashes
    (first 8 bytes of each shingle's blake2b): 8 bytes a shingle, whatever its length."""
    blake = hashlib.blake2b
    buf = b"".join(blake(s.encode("utf-8"), digest_size=8).digest()
                   for s in set(minhash.shingles(text, ngram)))
    return np.unique(np.frombuffer(buf, dtype="<u8"))


def jaccard_sorted(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard of two sorted unique arrays; two empty sets count as 0 (as ``minhash.jaccard``)."""
    if not len(a) and not len(b):
        return 0.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


_DIGITS = re.compile(r"([0-9]+)")


def natural_key(doc_id: str) -> tuple:
    """Sort key that orders embedded numbers (runs of ASCII digits) by value: ``a:9`` <
    ``a:10``, ``7`` < ``12``."""
    parts = _DIGITS.split(doc_id)
    return tuple(int(p) if k % 2 else p for k, p in enumerate(parts))


#: Digit runs of up to this many digits are compared by ``natural_ranks``'s byte key
#: (longer ones: the Python ``natural_key``).
_NATURAL_DIGITS = 64


def natural_ranks(ids) -> np.ndarray:
    """Each id's place in ``natural_key`` order (equal keys: by position), for a pyarrow
    string array, computed on its bytes with numpy, not per id in Python (the components
    phase orders tens of millions of ids): every run of digits becomes a marker byte below
    any other character followed by the number left-padded with zeros to the longest
    run's width, so that byte order is natural order (``a1`` < ``a-`` < ``ab``, ``9`` <
    ``10``, ``07`` = ``7``). Ids holding bytes 0 or 1, or a run of more than 64 digits,
    take the Python key."""
    import pyarrow as pa
    import pyarrow.compute as pc
    n = len(ids)
    if not n:
        return np.empty(0, np.int64)
    key = _natural_bytes(ids.cast(pa.large_string()))
    if key is None:
        py = ids.to_pylist()
        order = np.array(sorted(range(n), key=lambda i: natural_key(py[i])), dtype=np.int64)
    else:
        order = pc.sort_indices(pa.table({"k": key, "i": np.arange(n)}),
                                sort_keys=[("k", "ascending"), ("i", "ascending")]).to_numpy()
    ranks = np.empty(n, dtype=np.int64)
    ranks[order] = np.arange(n)
    return ranks


def _natural_bytes(ids):
    """``natural_ranks``'s byte key of each id (a pyarrow large_binary array), or None
    when some id needs the Python key."""
    import pyarrow as pa
    if ids.null_count:
        return None
    offsets = np.frombuffer(ids.buffers()[1], dtype=np.int64)[ids.offset:ids.offset + len(ids) + 1]
    data = np.frombuffer(ids.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]]
    offsets = offsets - offsets[0]
    if not len(data):
        return pa.array([b""] * len(ids), pa.large_binary())
    if (data <= 1).any():
        return None
    digit = (data >= 48) & (data <= 57)
    at_start = np.zeros(len(data) + 1, dtype=bool)
    at_start[offsets] = True                                  # (and one past the end)
    prev = np.concatenate([[False], digit[:-1]])
    nxt = np.concatenate([digit[1:], [False]])
    starts = np.flatnonzero(digit & (at_start[:-1] | ~prev))
    ends = np.flatnonzero(digit & (at_start[1:] | ~nxt))
    lengths = ends - starts + 1
    width = int(lengths.max()) if len(lengths) else 0
    if width > _NATURAL_DIGITS:
        return None
    # Before each run: a marker (byte 1) and the zeros that pad it to the widest run's digits.
    extra = width + 1 - lengths
    before = np.concatenate([[0], np.cumsum(extra, dtype=np.int64)])   # inserted before run r
    fill = np.full(int(before[-1]), ord("0"), dtype=np.uint8)
    fill[before[:-1]] = 1
    out = np.insert(data, np.repeat(starts, extra), fill)
    new_offsets = offsets + before[np.searchsorted(starts, offsets, side="left")]
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(ids),
                                            [None, pa.py_buffer(new_offsets), pa.py_buffer(out)])


def connected_components(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Components of the graph with edges ``u[i] - v[i]`` (int64 node names): ``(nodes,
    labels)``, nodes sorted, each label the smallest node of its component. Min-label
    propagation with pointer jumping over numpy arrays (no per-node Python objects)."""
    if not len(u):
        return np.empty(0, np.int64), np.empty(0, np.int64)
    nodes, inv = np.unique(np.concatenate([u, v]).astype(np.int64), return_inverse=True)
    a, b = inv[:len(u)], inv[len(u):]
    label = np.arange(len(nodes), dtype=np.int64)
    while True:
        m = np.minimum(label[a], label[b])
        new = label.copy()
        np.minimum.at(new, a, m)
        np.minimum.at(new, b, m)
        while True:                          # pointer jumping: follow labels to their root
            jumped = new[new]
            if np.array_equal(jumped, new):
                break
            new = jumped
        if np.array_equal(new, label):
            break
        label = new
    return nodes, nodes[label]


# --------------------------------------------------------------------------- executors

class Executor(Protocol):
    """Where phase tasks run: ``LocalExecutor`` in this process; ``actors.dedup`` has the
    Ray one (retried tasks). ``map`` yields results as tasks finish, in any order."""

    num_workers: int

    def map(self, fn: Callable[..., Any], args: Sequence[tuple]) -> Iterator[Any]: ...


class LocalExecutor:
    """Everything in the calling process: the reference and what tests compare Ray to."""

    num_workers = 1

    def map(self, fn: Callable[..., Any], args: Sequence[tuple]) -> Iterator[Any]:
        for a in args:
            yield fn(*a)


# --------------------------------------------------------------------------- work dir

def _write_table(path: Path, columns: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table(columns), path, compression="zstd")


def _read_tables(paths: Iterable[Loc], columns: list[str] | None = None):
    """The Parquet files ``paths`` as one table; from a bucket, read concurrently."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    paths = list(paths)
    if paths and not paths[0].local:
        raw = paths[0].fs.cat([p.path for p in paths])
        tables = [pq.read_table(pa.BufferReader(raw[p.path]), columns=columns) for p in paths]
    else:
        tables = [pq.read_table(p.path, columns=columns) for p in paths]
    return pa.concat_tables(tables) if tables else None


def _load_npy(loc: Loc) -> Any:
    """A task's ``.npy`` (an array) or ``.npz`` (its arrays) from the work dir."""
    return np.load(loc.path) if loc.local else np.load(io.BytesIO(loc.read_bytes()))


class _Task:
    """One split's or partition's output directory: files go into a temporary sibling
    that is renamed into place once ``done.json`` is in it, so a directory that exists is
    complete, and a retried task (killed worker) starts over in a fresh temporary. In a
    bucket work prefix the temporary is in this node's staging directory and its files go
    up on success, ``done.json`` last (the task counts as done only then)."""

    def __init__(self, final: Loc):
        self.final = final
        p = Path(final.path)
        self.tmp = p.with_name(f".{p.name}.tmp-{uuid.uuid4().hex[:8]}") if final.local else None

    def __enter__(self) -> Path:
        if self.final.local:
            self.tmp.parent.mkdir(parents=True, exist_ok=True)
            self.tmp.mkdir()
        else:
            from opt_ray.run_dir import staging_root
            staging_root().mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=".dedup-task-", dir=staging_root()))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if not self.final.local:
            from opt_ray.data.artifact_io import put_files
            try:
                put_files(self.tmp, self.final, f"the dedup work prefix {self.final}")
            finally:
                shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            os.replace(self.tmp, self.final.path)
        except OSError:   # a twin of this task (a retry) finished first: same content
            shutil.rmtree(self.tmp, ignore_errors=True)


def _started(path: Loc) -> None:
    """Say which process works on ``path`` (for operators, and the chaos test's victim)."""
    if not path.local:
        return
    p = Path(path.path)
    p.parent.mkdir(parents=True, exist_ok=True)
    (p.parent / f"{p.name}.running").write_text(
        json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))


def _done(path: Loc) -> dict[str, Any] | None:
    from opt_ray.data.artifact_io import read_done
    return read_done([path])[0]


def _finish_task(tmp: Path, c0: float, info: dict[str, Any]) -> dict[str, Any]:
    """Write the done marker (with the task's CPU seconds since ``c0``) into ``tmp``."""
    info["cpu_s"] = round(time.process_time() - c0, 3)
    (tmp / "done.json").write_text(json.dumps(info))
    return info


@dataclass(frozen=True)
class Plan:
    """What every task needs to know: the work dir, the splits and the parameters."""

    work: str
    files: tuple[InputFile, ...]
    cfg: DedupConfig
    text_field: str
    id_field: str | None
    strict: bool
    # A bucket output: the artifact's URL (``work`` is then the work prefix beside it),
    # where the filter tasks put their own shards.
    output: str | None = None

    @property
    def root(self) -> Loc:
        return Loc(self.work)

    @property
    def parts(self) -> int:
        return self.cfg.num_buckets

    def split_dir(self, phase: str, s: int) -> Loc:
        return self.root.child(phase, f"s{s:05d}")

    def part_dir(self, phase: str, p: int) -> Loc:
        return self.root.child(phase, f"p{p:04d}")

    def records(self, s: int, errors: InputErrors) -> Iterator[tuple[int, dict]]:
        """``(uid, record)`` for the good records of split ``s``."""
        base = s << 32
        for k, rec in enumerate(iter_file(self.files[s], text_field=self.text_field,
                                          id_field=self.id_field, errors=errors)):
            yield base + k, rec


def _ids_digest(h: Any, doc_id: str) -> None:
    h.update(doc_id.encode("utf-8", "surrogatepass"))
    h.update(b"\0")


def _changed(split: InputFile) -> UserError:
    return UserError(f"input {split.path} changed while dedup ran (its records differ from "
                     f"the first read); re-run on inputs that stay put")


# ----------------------------------------------------------------------------- phases

def sign_split(plan: Plan, s: int) -> dict[str, Any]:
    """Phase 1 on split ``s``: signatures -> band keys, digests and ids, partitioned."""
    out = plan.split_dir("sign", s)
    if (info := _done(out)) is not None:
        return info
    _started(out)
    c0 = time.process_time()
    cfg, P = plan.cfg, plan.parts
    errors = InputErrors(strict=plan.strict)
    keys_p: list[list[np.ndarray]] = [[] for _ in range(P)]
    kuid_p: list[list[np.ndarray]] = [[] for _ in range(P)]
    dig_all: list[np.ndarray] = []
    uids: list[int] = []
    ids: list[str] = []
    ids_hash = hashlib.blake2b(digest_size=16)
    nbytes = 0
    texts: list[str] = []
    tbytes = 0

    def flush() -> None:
        nonlocal texts, tbytes
        if not texts:
            return
        sig, dig = minhash.signatures_and_digests(texts, cfg.num_perm, cfg.seed, cfg.ngram)
        keys = band_keys(sig, cfg.bands, cfg.rows).ravel()
        ku = np.repeat(np.asarray(uids[-len(texts):], dtype=np.int64), cfg.bands)
        route = (_mix64(keys) % _U64(P)).astype(np.int64)
        for p in range(P):
            sel = route == p
            keys_p[p].append(keys[sel])
            kuid_p[p].append(ku[sel])
        dig_all.append(dig)
        texts, tbytes = [], 0

    for uid, rec in plan.records(s, errors):
        text = rec[plan.text_field]
        doc_id = rec[ID_KEY]
        uids.append(uid)
        ids.append(doc_id)
        _ids_digest(ids_hash, doc_id)
        n = len(text.encode("utf-8"))
        nbytes += n
        tbytes += n
        texts.append(text)
        if len(texts) >= cfg.batch_docs or tbytes >= cfg.batch_bytes:
            flush()
    flush()
    uid_arr = np.asarray(uids, dtype=np.int64)
    dig = np.concatenate(dig_all) if dig_all else np.empty((0, 16), np.uint8)
    import pyarrow as pa
    id_arr = pa.array(ids, pa.string())
    # Partition digests and ids by a hash of their value: equal values meet in one task.
    dig_route = (dig[:, :8].copy().view("<u8").ravel() % _U64(P)).astype(np.int64)
    id_route = np.frombuffer(b"".join(hashlib.blake2b(i.encode("utf-8"), digest_size=8).digest()
                                      for i in ids), dtype="<u8") % _U64(P)
    with _Task(out) as tmp:
        for p in range(P):
            k = np.concatenate(keys_p[p]) if keys_p[p] else np.empty(0, _U64)
            u = np.concatenate(kuid_p[p]) if kuid_p[p] else np.empty(0, np.int64)
            _write_table(tmp / f"bands-p{p:04d}.parquet", {"key": k, "uid": u})
            sel = dig_route == p
            _write_table(tmp / f"digests-p{p:04d}.parquet",
                         {"digest": pa.array(list(map(bytes, dig[sel])), pa.binary(16)),
                          "uid": uid_arr[sel]})
            sel = np.flatnonzero(id_route.astype(np.int64) == p)
            _write_table(tmp / f"ids-p{p:04d}.parquet",
                         {"id": id_arr.take(pa.array(sel)), "uid": uid_arr[sel]})
        return _finish_task(tmp, c0, {"split": s, "docs": len(uids), "bytes": nbytes,
                                  "ids_hash": ids_hash.hexdigest(), "errors": errors.to_dict()})


def keys_partition(plan: Plan, p: int, n_splits: int) -> dict[str, Any]:
    """Phase 2 on partition ``p``: duplicate ids (bad records) and exact-duplicate edges."""
    out = plan.part_dir("keys", p)
    if (info := _done(out)) is not None:
        return info
    _started(out)
    c0 = time.process_time()
    name = f"p{p:04d}.parquet"
    ids = _read_tables(plan.split_dir("sign", s).child(f"ids-{name}") for s in range(n_splits))
    digs = _read_tables(plan.split_dir("sign", s).child(f"digests-{name}") for s in range(n_splits))
    # Duplicate ids: every occurrence after the lowest uid is a bad record.
    id_uid = ids.column("uid").to_numpy()
    order = ids.sort_by([("id", "ascending"), ("uid", "ascending")])
    sid = order.column("id").to_numpy(zero_copy_only=False)
    suid = order.column("uid").to_numpy()
    again = np.zeros(len(sid), dtype=bool)
    if len(sid) > 1:
        again[1:] = sid[1:] == sid[:-1]
    dup_uid = suid[again]
    first_of = suid[np.maximum.accumulate(np.where(~again, np.arange(len(sid)), 0))][again]
    dup_ids = sid[again].tolist()
    del id_uid
    # Exact duplicates among the rest: one group per digest, joined to its lowest uid.
    duid = digs.column("uid").to_numpy()
    dbytes = np.frombuffer(b"".join(digs.column("digest").to_pylist()), dtype=np.uint8
                           ).reshape(-1, 16) if len(duid) else np.empty((0, 16), np.uint8)
    keep = ~np.isin(duid, dup_uid)
    duid, dbytes = duid[keep], dbytes[keep]
    order = np.argsort(duid, kind="stable")
    duid, dbytes = duid[order], dbytes[order]
    keyed = np.ascontiguousarray(dbytes).view(np.dtype((np.void, 16))).ravel()
    if len(duid):
        _, first, inverse = np.unique(keyed, return_index=True, return_inverse=True)
        rep = duid[first[inverse.ravel()]]
    else:
        rep = duid
    dup = rep != duid
    with _Task(out) as tmp:
        np.save(tmp / "exact.npy", np.stack([rep[dup], duid[dup]], axis=1).astype(np.int64))
        import pyarrow as pa
        _write_table(tmp / "dup_ids.parquet", {"uid": dup_uid, "first": first_of,
                                              "id": pa.array(dup_ids, pa.string())})
        return _finish_task(tmp, c0, {"part": p, "exact": int(dup.sum()),
                                  "duplicate_ids": int(len(dup_uid))})


def _drop_set(plan: Plan) -> np.ndarray:
    """uids that take no part in LSH: duplicate ids and exact duplicates (not their reps)."""
    arrs = []
    for p in range(plan.parts):
        d = plan.part_dir("keys", p)
        arrs.append(_load_npy(d / "exact.npy")[:, 1])
        arrs.append(_read_tables([d / "dup_ids.parquet"], ["uid"]).column("uid").to_numpy())
    return np.unique(np.concatenate(arrs)).astype(np.int64)


def bucket_partition(plan: Plan, p: int, n_splits: int) -> dict[str, Any]:
    """Phase 3 on partition ``p``: groups of documents sharing a band key (member lists)."""
    out = plan.part_dir("buckets", p)
    if (info := _done(out)) is not None:
        return info
    _started(out)
    c0 = time.process_time()
    t = _read_tables(plan.split_dir("sign", s) / f"bands-p{p:04d}.parquet"
                     for s in range(n_splits))
    keys = t.column("key").to_numpy()
    uids = t.column("uid").to_numpy()
    del t
    keep = ~np.isin(uids, _drop_set(plan))
    keys, uids = keys[keep], uids[keep]
    order = np.lexsort((uids, keys))
    keys, uids = keys[order], uids[order]
    edge = np.flatnonzero(np.diff(keys) != 0) + 1
    starts = np.concatenate([[0], edge]).astype(np.int64)
    ends = np.concatenate([edge, [len(keys)]]).astype(np.int64)
    multi = (ends - starts) >= 2
    starts, ends = starts[multi], ends[multi]
    sizes = ends - starts
    members = uids[np.repeat(starts, sizes) + _ranges(sizes)] if len(sizes) else uids[:0]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    with _Task(out) as tmp:
        np.save(tmp / "members.npy", members)
        np.save(tmp / "offsets.npy", offsets)
        np.save(tmp / "need.npy", np.unique(members))
        return _finish_task(tmp, c0, {"part": p, "groups": int(len(sizes)),
                                  "links": int((sizes - 1).sum()),
                                  "largest_group": int(sizes.max()) if len(sizes) else 0})


def _ranges(sizes: np.ndarray) -> np.ndarray:
    """concat(arange(n) for n in sizes), vectorised."""
    total = int(sizes.sum())
    starts = np.repeat(np.cumsum(sizes) - sizes, sizes)
    return np.arange(total, dtype=np.int64) - starts


def _in_split(arr: np.ndarray, s: int) -> np.ndarray:
    return arr[(arr >= s << 32) & (arr < (s + 1) << 32)]


def fetch_split(plan: Plan, s: int, sign_info: dict[str, Any]) -> dict[str, Any]:
    """Phase 4 on split ``s``, the split's second and last read.

    - Documents in a group: their shingle hashes (or signatures, without exact
      verification) to each partition whose groups hold them.
    - Documents whose fate components decides (in a group, or in an exact-duplicate
      pair): their records into the split's stash (``cand-*``), for filter.
    - Every other good record is kept for certain: straight into output shards.
    - Duplicate ids (bad records): dropped.
    """
    out = plan.split_dir("fetch", s)
    if (info := _done(out)) is not None:
        return info
    _started(out)
    c0 = time.process_time()
    cfg = plan.cfg
    need = []
    undecided = []
    dropped = []
    for p in range(plan.parts):
        n = _in_split(_load_npy(plan.part_dir("buckets", p) / "need.npy"), s)
        need.append(n)
        undecided.append(_in_split(_load_npy(plan.part_dir("keys", p) / "exact.npy").ravel(), s))
        u = _read_tables([plan.part_dir("keys", p) / "dup_ids.parquet"], ["uid"])
        dropped.append(_in_split(u.column("uid").to_numpy(), s))
    in_part = [set(x.tolist()) for x in need]
    wanted = set().union(*in_part)
    stash_uids = wanted.union(*(set(x.tolist()) for x in undecided))
    dup_ids = set(np.concatenate(dropped).tolist())
    rows: list[list[int]] = [[] for _ in range(plan.parts)]
    vals: list[list[np.ndarray]] = [[] for _ in range(plan.parts)]
    ids_hash = hashlib.blake2b(digest_size=16)
    count = 0
    with _Task(out) as tmp:
        kept = _ShardWriter(tmp, f"part-{s:05d}", plan)
        stash = _ShardWriter(tmp, "cand", plan, uids=True)
        for uid, rec in plan.records(s, InputErrors()):
            count += 1
            _ids_digest(ids_hash, rec[ID_KEY])
            if uid in dup_ids:
                continue
            if uid not in stash_uids:
                kept.add(rec)
                continue
            stash.add(rec, uid)
            if uid not in wanted:
                continue
            text = rec[plan.text_field]
            if cfg.verify:
                v = shingle_hashes(text, cfg.ngram)
            else:
                v = minhash.signatures([text], cfg.num_perm, cfg.seed, cfg.ngram)[0]
            for p in range(plan.parts):
                if uid in in_part[p]:
                    rows[p].append(uid)
                    vals[p].append(v)
        shards, stashed = kept.close(), stash.close()
        if count != sign_info["docs"] or ids_hash.hexdigest() != sign_info["ids_hash"]:
            raise _changed(plan.files[s])
        import pyarrow as pa
        for p in range(plan.parts):
            _write_table(tmp / f"p{p:04d}.parquet",
                         {"uid": np.asarray(rows[p], np.int64),
                          "v": pa.array([x for x in vals[p]], pa.list_(pa.uint64()))})
        _put_shards(plan, tmp, shards)
        return _finish_task(tmp, c0, {"split": s, "fetched": len(wanted), "shards": shards,
                                      "kept": sum(sh["rows"] for sh in shards),
                                      "stashed": sum(sh["rows"] for sh in stashed),
                                      "stash": len(stashed)})


def verify_partition(plan: Plan, p: int, n_splits: int) -> dict[str, Any]:
    """Phase 5 on partition ``p``: verified edges of its groups (see the module doc)."""
    out = plan.part_dir("verify", p)
    if (info := _done(out)) is not None:
        return info
    _started(out)
    c0 = time.process_time()
    cfg = plan.cfg
    d = plan.part_dir("buckets", p)
    members, offsets = _load_npy(d / "members.npy"), _load_npy(d / "offsets.npy")
    vec: dict[int, np.ndarray] = {}
    for s in range(n_splits):
        t = _read_tables([plan.split_dir("fetch", s) / f"p{p:04d}.parquet"])
        if t.num_rows:
            flat = t.column("v").combine_chunks()
            values = flat.values.to_numpy()
            offs = flat.offsets.to_numpy()
            for k, uid in enumerate(t.column("uid").to_numpy().tolist()):
                vec[uid] = values[offs[k]:offs[k + 1]]

    def similarity(a: int, b: int) -> float:
        if cfg.verify:
            return jaccard_sorted(vec[a], vec[b])
        return float(np.mean(vec[a] == vec[b]))

    parent: dict[int, int] = {}

    def find(x: int) -> int:
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(x, x) != root:       # path compression
            parent[x], x = root, parent[x]
        return root

    eu: list[int] = []
    ev: list[int] = []
    es: list[float] = []
    compared = similar = skipped = 0
    for g in range(len(offsets) - 1):
        group = members[offsets[g]:offsets[g + 1]].tolist()
        comps: list[list[int]] = []       # this group's components so far, in order
        for m in group:
            for comp in comps:
                if find(m) == find(comp[0]):
                    skipped += len(comp)
                    continue
                for x in comp:
                    compared += 1
                    sim = similarity(x, m)
                    if sim >= cfg.threshold:
                        similar += 1
                        parent[find(m)] = find(x)
                        eu.append(x)
                        ev.append(m)
                        es.append(sim)
                        break
            joined = [c for c in comps if find(c[0]) == find(m)]
            if joined:
                merged = [x for c in joined for x in c] + [m]
                comps = [c for c in comps if c not in joined] + [merged]
            else:
                comps.append([m])
    with _Task(out) as tmp:
        np.savez(tmp / "edges.npz", u=np.asarray(eu, np.int64), v=np.asarray(ev, np.int64),
                 sim=np.asarray(es, np.float64))
        return _finish_task(tmp, c0, {"part": p, "pairs_verified": compared,
                                  "pairs_similar": similar, "pairs_skipped_connected": skipped})


def components_phase(plan: Plan, n_splits: int) -> dict[str, Any]:
    """Phase 6: clusters from all edges; the kept member of each is its lowest id."""
    out = plan.root / "components"
    if (info := _done(out)) is not None:
        return info
    _started(out)
    c0 = time.process_time()
    us, vs, ss = [], [], []
    for p in range(plan.parts):
        ex = _load_npy(plan.part_dir("keys", p) / "exact.npy")
        us.append(ex[:, 0])
        vs.append(ex[:, 1])
        ss.append(np.ones(len(ex)))
        e = _load_npy(plan.part_dir("verify", p) / "edges.npz")
        us.append(e["u"])
        vs.append(e["v"])
        ss.append(e["sim"])
    u, v, sim = np.concatenate(us), np.concatenate(vs), np.concatenate(ss)
    nodes, label = connected_components(u, v)
    u, v, sim = _spanning_forest(u, v, sim)
    names = _clustered_ids(plan, n_splits, nodes)
    # Kept member per cluster: the lowest natural id (ties: the lowest uid). Arrays only:
    # a duplicate-heavy corpus has tens of millions of clustered documents.
    order = np.lexsort((natural_ranks(names), label))
    first = np.ones(len(order), dtype=bool)
    first[1:] = label[order][1:] != label[order][:-1]
    group = np.empty(len(order), dtype=np.int64)
    group[order] = np.cumsum(first) - 1
    keep_idx = order[first][group]              # per node: the index of its cluster's kept one
    removed = keep_idx != np.arange(len(nodes))
    rem_uids = np.sort(nodes[removed])
    with _Task(out) as tmp:
        _write_table(tmp / CLUSTERS, {"id": names, "uid": nodes, "keep": names.take(keep_idx),
                                      "removed": removed})
        _write_table(tmp / "edges.parquet", {"a": names.take(np.searchsorted(nodes, u)),
                                             "b": names.take(np.searchsorted(nodes, v)),
                                             "similarity": sim})
        for s in range(n_splits):
            lo, hi = np.searchsorted(rem_uids, [s << 32, (s + 1) << 32])
            np.save(tmp / f"removed-s{s:05d}.npy", rem_uids[lo:hi])
        # The report's excerpt is made here, so the driver never loads every cluster.
        (tmp / "report_clusters.json").write_text(
            json.dumps(report_clusters(tmp, plan.cfg.report_clusters)))
        return _finish_task(tmp, c0, {"clusters": int(first.sum()), "removed": int(removed.sum()),
                                  "exact_duplicates": int(sum(len(x) for x in us[0::2]))})


def _clustered_ids(plan: Plan, n_splits: int, nodes: np.ndarray):
    """The ids of the clustered documents ``nodes`` (sorted uids), as a pyarrow string
    array aligned with them, read from the id partitions; a duplicated id's first
    occurrence (in partition, then split order) is the one kept."""
    import pyarrow as pa
    uids, ids = [], []
    for p in range(plan.parts):
        t = _read_tables(plan.split_dir("sign", s) / f"ids-p{p:04d}.parquet"
                         for s in range(n_splits))
        tu = t.column("uid").to_numpy()
        sel = np.flatnonzero(np.isin(tu, nodes))
        uids.append(tu[sel])
        ids.append(t.column("id").take(sel).combine_chunks().cast(pa.string()))
    if not nodes.size:
        return pa.array([], pa.string())
    found, first = np.unique(np.concatenate(uids), return_index=True)
    assert np.array_equal(found, nodes), "a clustered document has no id"
    return pa.concat_arrays(ids).take(first)


def _spanning_forest(u: np.ndarray, v: np.ndarray, sim: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The edges the report lists: partitions verify independently, so an edge (or a
    cycle) can arrive twice; keep, in (u, v) order, only those that join two clusters.
    That is Kruskal's forest with each edge weighted by its place in that order (distinct
    weights: the forest is unique), found by scipy's minimum spanning tree in C, not a
    Python union-find over every edge."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import minimum_spanning_tree

    order = np.lexsort((v, u))
    u, v, sim = u[order], v[order], sim[order]
    if not len(u):
        return u, v, sim
    # The first of repeated pairs and no self-loops: neither could join two clusters (and
    # the sparse matrix would add repeats' weights together).
    keep = np.ones(len(u), dtype=bool)
    keep[1:] = (u[1:] != u[:-1]) | (v[1:] != v[:-1])
    keep &= u != v
    rows = np.flatnonzero(keep)
    nodes, inv = np.unique(np.concatenate([u[rows], v[rows]]), return_inverse=True)
    a, b = inv[:len(rows)], inv[len(rows):]
    graph = coo_matrix((rows + 1.0, (a, b)), shape=(len(nodes), len(nodes))).tocsr()
    forest = minimum_spanning_tree(graph).tocoo()      # undirected: min over (a,b), (b,a)
    picked = np.sort(forest.data.astype(np.int64) - 1)
    return u[picked], v[picked], sim[picked]


def filter_split(plan: Plan, s: int, fetch_info: dict[str, Any]) -> dict[str, Any]:
    """Phase 7 on split ``s``: the records of its stash that components kept, as output
    shards numbered after fetch's (the input is not read again)."""
    out = plan.split_dir("filter", s)
    if (info := _done(out)) is not None:
        return info
    _started(out)
    c0 = time.process_time()
    removed = _load_npy(plan.root / "components" / f"removed-s{s:05d}.npy")
    src = plan.split_dir("fetch", s)
    first = len(fetch_info["shards"])
    with _Task(out) as tmp:
        shards: list[dict[str, Any]] = []
        for k in range(fetch_info["stash"]):
            name = f"cand-{k:04d}"
            table = _read_tables([src / f"{name}.parquet"])
            keep = ~np.isin(_load_npy(src / f"{name}.uids.npy"), removed)
            if keep.any():
                shards.append(_save_shard(tmp, f"part-{s:05d}-{first + len(shards):04d}.parquet",
                                          table.filter(keep)))
        _put_shards(plan, tmp, shards)
        return _finish_task(tmp, c0, {"split": s, "shards": shards,
                                      "kept": sum(sh["rows"] for sh in shards)})


class _ShardWriter:
    """Records into Parquet shards ``{prefix}-0000.parquet``, ... of at most
    ``cfg.shard_bytes`` text characters and ``cfg.shard_rows`` records; with ``uids``,
    each shard's uids beside it (``{name}.uids.npy``)."""

    def __init__(self, d: Path, prefix: str, plan: Plan, *, uids: bool = False):
        self.d, self.prefix, self.plan = d, prefix, plan
        self.uids: list[int] | None = [] if uids else None
        self.buf: list[dict] = []
        self.nbytes = 0
        self.shards: list[dict[str, Any]] = []

    def add(self, rec: dict, uid: int | None = None) -> None:
        self.buf.append(rec)
        if self.uids is not None:
            self.uids.append(uid)
        self.nbytes += len(rec[self.plan.text_field])
        if self.nbytes >= self.plan.cfg.shard_bytes or len(self.buf) >= self.plan.cfg.shard_rows:
            self._flush()

    def _flush(self) -> None:
        name = f"{self.prefix}-{len(self.shards):04d}"
        if self.uids is not None:
            np.save(self.d / f"{name}.uids.npy", np.asarray(self.uids, np.int64))
            self.uids = []
        # The stash is the work dir's: only output shards are hashed (for the manifest).
        self.shards.append(_write_shard(self.d, f"{name}.parquet", self.buf,
                                        digest=self.uids is None))
        self.buf, self.nbytes = [], 0

    def close(self) -> list[dict[str, Any]]:
        if self.buf:
            self._flush()
        return self.shards


def _put_shards(plan: Plan, tmp: Path, shards: list[dict[str, Any]]) -> None:
    """A bucket output: a task's output shards go straight to their final names (the
    artifact's manifest, written last by the driver, makes them part of it)."""
    if not plan.output or not shards:
        return
    shard_dir = tmp / "shards"
    shard_dir.mkdir()
    for sh in shards:
        os.replace(tmp / sh["file"], shard_dir / sh["file"])
    from opt_ray.data.artifact_io import put_files
    put_files(shard_dir, Loc(plan.output), f"--output {plan.output}")
    shutil.rmtree(shard_dir)


def _write_shard(d: Path, name: str, rows: list[dict], *, digest: bool = True) -> dict[str, Any]:
    """One Parquet shard of records: a column per field of any record (null where a
    record lacks it; ``Table.from_pylist`` would take the first record's fields only). A
    column whose values Arrow cannot type together (e.g. an int in one record and a
    string in another) is stored as JSON text."""
    import pyarrow as pa
    arrays = {}
    for c in dict.fromkeys(k for r in rows for k in r):
        vals = [r.get(c) for r in rows]
        try:
            arrays[c] = pa.array(vals)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            arrays[c] = pa.array([None if v is None else json.dumps(v) for v in vals])
    return _save_shard(d, name, pa.table(arrays), digest=digest)


def _save_shard(d: Path, name: str, table: Any, *, digest: bool = True) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from opt_ray.artifacts import sha256_file
    pq.write_table(table, d / name, compression="zstd")
    info = {"file": name, "rows": table.num_rows, "bytes": (d / name).stat().st_size}
    if digest:
        info["sha256"] = sha256_file(d / name)
    return info


# -------------------------------------------------------------------------- the driver

_M_DOCS = metrics.counter("dedup_docs", "documents signed by the dedup stage")
_M_BYTES = metrics.counter("dedup_bytes", "text bytes signed by the dedup stage")
_M_PAIRS = metrics.counter("dedup_candidate_pairs",
                           "LSH candidate links (group members after the first)")
_M_DUPS = metrics.counter("dedup_duplicates", "documents removed as near-duplicates")


def work_dir(output: str | os.PathLike) -> Path:
    """Where a run keeps its intermediates: a hidden sibling of the output directory."""
    out = Path(output).absolute()
    return out.with_name(f".{out.name}.dedup-work")


def work_url(url: str) -> str:
    """The work prefix of ``opt-ray dedup --output URL``."""
    from opt_ray.data.artifact_io import bucket_work_url
    return bucket_work_url(url, "dedup")


def _fingerprint(files: list[InputFile], cfg: DedupConfig, text_field: str,
                 id_field: str | None, strict: bool) -> dict[str, Any]:
    """What must not change for completed work to be reused."""
    inputs = [input_fingerprint(f) for f in files]
    return {"version": WORK_VERSION, "inputs": inputs, "cfg": asdict(cfg),
            "text_field": text_field, "id_field": id_field, "strict": strict}


def _progress(total: int | None, unit: str, desc: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, unit=unit, desc=desc, disable=not enabled, unit_scale=True,
                dynamic_ncols=True, leave=False)


def _merge_errors(dicts: Iterable[dict[str, Any]]) -> InputErrors:
    errors = InputErrors(strict=False)
    for d in dicts:
        for path, f in d["files"].items():
            mine = errors.files.setdefault(path, {"count": 0, "by_kind": {}, "examples": []})
            mine["count"] += f["count"]
            for k, v in f["by_kind"].items():
                mine["by_kind"][k] = mine["by_kind"].get(k, 0) + v
            room = errors.max_examples - len(mine["examples"])
            mine["examples"].extend(f["examples"][:max(room, 0)])
    return errors


def run_dedup(inputs: list[str], output: str, cfg: DedupConfig,
              executor: Executor | None = None, *,
              text_field: str = "text", id_field: str | None = None, strict: bool = False,
              overwrite: bool = False, progress: bool = False,
              on_progress: Callable[[str, int], None] | None = None,
              files: list[InputFile] | None = None) -> dict[str, Any]:
    """Deduplicate ``inputs`` into the artifact directory ``output``; returns the report
    (without the clusters beyond ``cfg.report_clusters``: ``clusters.parquet`` has all).

    ``executor``: where tasks run (default ``LocalExecutor``). ``files``: the already
    resolved inputs (``resolve_inputs``). ``on_progress(phase, tasks_done)`` is called as
    tasks complete (the chaos tests kill a worker from there). Completed work under
    ``work_dir(output)`` from an interrupted run with the same inputs and parameters is
    reused; the work dir is removed once the output is in place.
    """
    from opt_ray.artifacts import ArtifactError
    from opt_ray.data.artifact_io import check_artifact_url, prepare_work
    from opt_ray.run_dir import is_url, store_errors

    executor = executor or LocalExecutor()
    files = files if files is not None else resolve_inputs(inputs)
    if cfg.num_buckets is None:
        from dataclasses import replace
        cfg = replace(cfg, num_buckets=auto_buckets(files))
    url = str(output).rstrip("/") if is_url(output) else None
    out: Path | str = url or Path(output).absolute()
    t_start = time.perf_counter()
    # The output is checked before planning: counting a large corpus's lines is a read.
    if url:
        with store_errors(f"--output {url}", "the work prefix", "the bucket exists"):
            check_artifact_url(url, work_url(url), overwrite=overwrite)
    elif out.exists() and not overwrite:
        raise ArtifactError(f"output directory {out} already exists; choose another "
                            f"--output or pass --overwrite")
    files = plan_splits(files, cfg.split_bytes, executor)
    fp = _fingerprint(files, cfg, text_field, id_field, strict)
    if url:
        # A bucket output: every task reads and writes the work prefix beside it (no
        # filesystem shared by the nodes); the fetch and filter tasks put the shards in place.
        work = Loc(work_url(url))
        with store_errors(f"--output {url}", "the work prefix", "the bucket exists"):
            resumed = prepare_work(work, fp, Loc(url), overwrite=overwrite)
    else:
        work = Loc(work_dir(output))
        resumed = prepare_work(work, fp)
    plan = Plan(str(work), tuple(files), cfg, text_field, id_field, strict, output=url)
    try:
        report = _run_phases(plan, inputs, out, overwrite, executor, progress, on_progress,
                             t_start, resumed)
    except UserError:
        # Bad input: a rerun needs other inputs or flags, so nothing here is reusable.
        work.rm()
        raise
    work.rm()
    return report


def _run_phases(plan: Plan, inputs: list[str], out: Path | str, overwrite: bool, executor: Executor,
                progress: bool, on_progress: Callable[[str, int], None] | None,
                t_start: float, resumed: bool) -> dict[str, Any]:
    """The phases in order (see the module doc); each skips its completed tasks."""
    from opt_ray.data.artifact_io import read_done
    cfg, files, work = plan.cfg, plan.files, plan.root
    text_field, id_field, strict = plan.text_field, plan.id_field, plan.strict
    n, P = len(files), plan.parts
    timings: dict[str, float] = {}
    steps: list[dict[str, Any]] = []     # -> metrics.jsonl

    def phase(name: str, fn: Callable[..., dict], args: list[tuple], unit: str,
              where: Callable[[tuple], Loc]) -> list[dict]:
        t0 = time.perf_counter()
        results: list[dict] = []
        todo = []
        # Completed by an earlier, interrupted run: reuse.
        for a, info in zip(args, read_done([where(a) for a in args])):
            if info is None:
                todo.append(a)
            else:
                results.append(info)
        if results:
            steps.append({"phase": name, "reused": len(results)})
        bar = _progress(len(args), unit, f"dedup: {name}", progress)
        bar.update(len(results))
        for info in executor.map(fn, todo):
            results.append(info)
            bar.update(1)
            steps.append({"phase": name, **{k: v for k, v in info.items()
                                            if k not in ("errors", "shards")},
                          "elapsed_s": round(time.perf_counter() - t_start, 4)})
            if on_progress is not None:
                on_progress(name, len(results))
        bar.close()
        timings[f"{name}_s"] = time.perf_counter() - t0
        return results

    # 1. sign ---------------------------------------------------------------------------
    by_split = {ph: (lambda a, ph=ph: plan.split_dir(ph, a[1])) for ph in ("sign", "fetch", "filter")}
    by_part = {ph: (lambda a, ph=ph: plan.part_dir(ph, a[1])) for ph in ("keys", "buckets", "verify")}
    signed = sorted(phase("sign", sign_split, [(plan, s) for s in range(n)], "split",
                          by_split["sign"]), key=lambda i: i["split"])
    errors = _merge_errors(i["errors"] for i in signed)
    docs = sum(i["docs"] for i in signed)
    nbytes = sum(i["bytes"] for i in signed)
    _M_DOCS.inc(docs)
    _M_BYTES.inc(nbytes)
    if docs == 0:
        raise UserError(f"no usable document in {', '.join(map(str, inputs))} "
                        f"({errors.total} bad records); check the input and --text-field")
    # 2. keys: duplicate ids, exact duplicates ------------------------------------------
    keyed = phase("keys", keys_partition, [(plan, p, n) for p in range(P)], "part",
                  by_part["keys"])
    dup_id_count = sum(i["duplicate_ids"] for i in keyed)
    if dup_id_count:
        _report_duplicate_ids(plan, errors, strict)
    # 3. buckets ------------------------------------------------------------------------
    buckets = phase("buckets", bucket_partition, [(plan, p, n) for p in range(P)], "part",
                    by_part["buckets"])
    links = sum(i["links"] for i in buckets)
    _M_PAIRS.inc(links)
    # 4. fetch, 5. verify ---------------------------------------------------------------
    fetched = sorted(phase("fetch", fetch_split, [(plan, s, signed[s]) for s in range(n)],
                           "split", by_split["fetch"]), key=lambda i: i["split"])
    verified = phase("verify", verify_partition, [(plan, p, n) for p in range(P)], "part",
                     by_part["verify"])
    # 6. components ---------------------------------------------------------------------
    [comp] = phase("components", components_phase, [(plan, n)], "task",
                   lambda a: plan.root / "components")
    _M_DUPS.inc(comp["removed"])
    # 7. filter -------------------------------------------------------------------------
    filtered = sorted(phase("filter", filter_split, [(plan, s, fetched[s]) for s in range(n)],
                            "split", by_split["filter"]), key=lambda i: i["split"])
    # 8. finish -------------------------------------------------------------------------
    usable = docs - dup_id_count
    counts = {
        "docs_read": docs + errors.total - dup_id_count, "bad_records": errors.total,
        "docs": usable, "bytes": nbytes, "exact_duplicates": comp["exact_duplicates"],
        "candidate_pairs": links,
        "pairs_verified": sum(i["pairs_verified"] for i in verified),
        "pairs_skipped_connected": sum(i["pairs_skipped_connected"] for i in verified),
        "pairs_similar": sum(i["pairs_similar"] for i in verified),
        "clusters": comp["clusters"], "duplicates_removed": comp["removed"],
        "docs_kept": usable - comp["removed"],
    }
    params = {**asdict(cfg), "probability_at_threshold": round(cfg.probability_at_threshold, 6),
              "text_field": text_field, "id_field": id_field, "strict": strict,
              "workers": executor.num_workers}
    timings["total_s"] = time.perf_counter() - t_start
    worker_cpu: dict[str, float] = {}
    for st in steps:
        if "cpu_s" in st:
            worker_cpu[st["phase"]] = round(worker_cpu.get(st["phase"], 0.0) + st["cpu_s"], 3)
    report = {
        "inputs": list(dict.fromkeys(str(f.path) for f in files)), "params": params,
        "counts": counts,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "throughput_mb_s": round(nbytes / 1e6 / max(timings["total_s"], 1e-9), 3),
        "input_errors": errors.to_dict(), "resumed": resumed,
        "task_cpu_s": worker_cpu,   # CPU seconds of the tasks of this run, per phase
        "clusters": json.loads((work / "components" / "report_clusters.json").read_text()),
    }
    steps += [{"phase": k[:-2], "seconds": round(v, 4)} for k, v in timings.items()]
    steps.append({"phase": "done", **counts})
    _finish_output(out, overwrite, work, [(ph, i) for f in zip(fetched, filtered)
                                          for ph, i in zip(("fetch", "filter"), f)],
                   report, steps)
    return report




def _report_duplicate_ids(plan: Plan, errors: InputErrors, strict: bool) -> None:
    """Duplicate ids as bad records of the file where they occur again: every one
    counted, the first ``errors.max_examples`` per file described."""
    t = _read_tables(plan.part_dir("keys", p) / "dup_ids.parquet" for p in range(plan.parts))
    t = t.sort_by("uid")
    uids = t.column("uid").to_numpy()
    splits, starts, counts = np.unique(uids >> 32, return_index=True, return_counts=True)
    for s, start, count in zip(splits.tolist(), starts.tolist(), counts.tolist()):
        f = plan.files[s]
        shown = min(count, errors.max_examples)
        rows = t.slice(start, shown).to_pydict()
        for uid, first, doc_id in zip(rows["uid"], rows["first"], rows["id"]):
            k = (uid & 0xFFFFFFFF) + 1
            detail = (f"id {doc_id!r} (usable record {k} of the file) was already used by "
                      f"{plan.files[first >> 32].path} usable record {(first & 0xFFFFFFFF) + 1}; "
                      f"fix --id-field, or omit it to generate ids")
            if strict:
                raise UserError(f"{f.path}: duplicate id: {detail}")
            errors.add(str(f.path), k, "duplicate_id", detail)
        if count > shown:          # counted, not described (bounded driver work)
            entry = errors.files[str(f.path)]
            entry["count"] += count - shown
            entry["by_kind"]["duplicate_id"] += count - shown


def report_clusters(components_dir: Path, limit: int) -> list[dict[str, Any]]:
    """Clusters as ``{"keep", "members", "edges"}`` (ids, sorted naturally), sorted by the
    kept id, at most ``limit`` of them (``clusters.parquet`` holds every one). Only the
    reported clusters' rows become Python objects."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    c = pq.read_table(components_dir / CLUSTERS)
    kept = np.flatnonzero(~c.column("removed").to_numpy())
    kept_ids = c.column("id").combine_chunks().take(kept)
    shown = kept_ids.take(np.argsort(natural_ranks(kept_ids))[:limit])
    rows = c.filter(pc.is_in(c.column("keep"), value_set=shown)).to_pydict()
    members: dict[str, list[str]] = {k: [] for k in shown.to_pylist()}
    for i, k in zip(rows["id"], rows["keep"]):
        members[k].append(i)
    keep_of = dict(zip(rows["id"], rows["keep"]))
    e = pq.read_table(components_dir / "edges.parquet")
    e = e.filter(pc.is_in(e.column("a"), value_set=pa.array(rows["id"], pa.string()))).to_pydict()
    edges: dict[str, list] = {}
    for a, b, sim in sorted(zip(e["a"], e["b"], e["similarity"]),
                            key=lambda x: (natural_key(x[0]), natural_key(x[1]))):
        edges.setdefault(keep_of[a], []).append([a, b, round(float(sim), 6)])
    return [{"keep": k, "members": sorted(m, key=natural_key), "edges": edges.get(k, [])}
            for k, m in members.items()]


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:      # another filesystem: copy
        shutil.copyfile(src, dst)


def _finish_output(out: Path | str, overwrite: bool, work: Loc, written: list[tuple[str, dict]],
                   report: dict[str, Any], steps: list[dict]) -> None:
    """Link the workers' shards into the artifact (hard links: no copy, and the work dir
    stays whole until the artifact is committed, should the driver die here) and write
    the report and manifest. A bucket output: the shards are in place already; the
    clusters, the report, the metrics and the manifest are made in this node's staging
    directory and go up, the manifest last (``upload_artifact``)."""
    from opt_ray.data.artifact_io import PrehashedArtifactWriter, upload_artifact
    from opt_ray.run_dir import local_run_dir

    url = out if isinstance(out, str) else None
    with PrehashedArtifactWriter(local_run_dir(url) if url else out, kind="dedup",
                                 overwrite=overwrite or bool(url)) as w:
        shards = []
        for phase, info in written:     # in output order: per split, fetch's then filter's
            src = work / phase / f"s{info['split']:05d}"
            for sh in info["shards"]:
                entry = {"sha256": sh["sha256"], "bytes": sh["bytes"]}
                if url:
                    w.elsewhere[sh["file"]] = entry
                else:
                    _link(Path(src.path) / sh["file"], w.path / sh["file"])
                    w.known[sh["file"]] = entry
                shards.append({"file": sh["file"], "rows": sh["rows"]})
        clusters = work / "components" / CLUSTERS
        if url:
            clusters.fs.get_file(clusters.path, str(w.path / CLUSTERS))
        else:
            _link(Path(clusters.path), w.path / CLUSTERS)
        (w.path / REPORT).write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
        with open(w.path / "metrics.jsonl", "w") as f:
            f.writelines(json.dumps(s) + "\n" for s in steps)
        w.manifest.update({"inputs": report["inputs"], "config": report["params"],
                           "counts": report["counts"], "shards": shards})
    if url:
        upload_artifact(w.out, url, kind="dedup")
        shutil.rmtree(w.out, ignore_errors=True)
