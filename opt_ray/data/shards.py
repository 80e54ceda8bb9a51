"""Packed token shards: Arrow IPC files of rows of ``seq_len + 1`` tokens, and their reader.

Layout of a shards artifact (written atomically through ``ArtifactWriter``)::

    manifest.json            kind "shards": seq_len, dtype, tokenizer hash/vocab size,
                             per split the shards with rows, tokens and sha256, the split
                             rule, the source artifact's manifest
    train/shard-00000.arrow  one column ``tokens``: fixed_size_list<uint16|uint32>[seq_len+1]
    valid/shard-00000.arrow

Packing: every document's tokens are followed by eos and the documents of a split are
concatenated into one stream (OPT packs across documents, no padding); the stream is cut
into consecutive, non-overlapping rows of ``seq_len + 1`` tokens (a row gives inputs
``row[:-1]`` and targets ``row[1:]``). The last partial row is dropped and counted.

Reading: :class:`ShardDataset` memory-maps the files lazily (a shard is opened on its
first row, at most ``max_open`` stay open: thousands of shards at 180B tokens do not cost
a descriptor each); ``ds[i]`` is a zero-copy numpy view into the page cache, so any
number of training workers on a host share one copy. Verification (sha256 of every
shard of the split) runs once per dataset: it leaves ``.verified-<split>.json`` keyed by
the manifest's sha256 and the shards' sizes and mtimes, and a later ``verify=True``
with the same key skips the re-hash.

In object storage (``ShardDataset("s3://bucket/shards")``, through fsspec with the
standard AWS variables): no node downloads or keeps the corpus. The manifest records, for
each shard's record batches, the byte offset of their first row (``batches``: [rows,
offset] pairs, measured on the written file), so a row is one ranged GET of
``(seq_len + 1) x itemsize`` bytes and a batch of rows is one concurrent ``cat_ranges``:
a global shuffle reads from every shard without fetching whole files. Verification there
compares every shard's size, and its ETag (the store's hash of the object, recorded in the
manifest when the shard went up), with the manifest in one listing: a shard replaced or
truncated is refused without reading the corpus; the bytes were hashed when written.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from opt_ray.artifacts import MANIFEST, ArtifactError, read_manifest, sha256_file
from opt_ray.errors import UserError
from opt_ray.run_dir import is_url, store_errors

class ShardReadError(OSError):
    """Rows could not be read from object storage mid-run (the store's own retries spent):
    not a ``UserError``, so the gang restarts from its checkpoint and reads them again."""


KIND = "shards"
TOKENIZER_FILE = "tokenizer.json"  # the tokenizer the shards were made with
SPLITS = ("train", "valid")
ID_KEY = "opt_ray_id"  # the stable id opt_ray.data.readers attaches to every record
COLUMN = "tokens"
# Shards of ~64 MiB of uint16 by default: large enough that a 180B-token corpus is a few
# thousand files, small enough to checksum and move one at a time.
DEFAULT_SHARD_TOKENS = 1 << 25


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (GPT-2/OPT's 50k vocabulary does), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------

class ShardDataset:
    """Rows of one split of a shards artifact, memory-mapped.

    ``len(ds)`` rows; ``ds[i]`` is a read-only ``np.ndarray`` of ``seq_len + 1`` token ids
    (a view into the mapped file, no copy); ``ds.batch(rows)`` stacks rows into one array.

    ``verify=True`` checks every shard of the split against the sha256 in the manifest and
    refuses a mismatch naming the shard; once it passed, a marker (see the module doc)
    spares later opens the re-hash while the files stay as they were. Shards open on
    first use, at most ``max_open`` at a time. Passing ``tokenizer`` (a ``tokenizers.Tokenizer``
    or a path for ``load_tokenizer``) refuses shards made with a different vocabulary.
    """

    def __init__(self, path: str | os.PathLike, split: str = "train", *, verify: bool = True,
                 tokenizer: Any = None, max_open: int = 64):
        self.remote = is_url(path)
        # A bucket URL stays a string (``Path`` would fold its ``//``).
        self.path: Any = str(path).rstrip("/") if self.remote else Path(path)
        self.split = split
        self.manifest = read_shards_manifest(self.path)
        splits = self.manifest.get("splits", {})
        if split not in splits:
            raise UserError(f"{self.path} has no split {split!r}; it has {sorted(splits)}")
        info = splits[split]
        if not info.get("rows"):
            raise UserError(f"{self.path}: split {split!r} has no rows (the corpus held too few "
                            f"tokens for it); re-run 'opt-ray tokenize' with more data, a smaller "
                            f"--seq-len or a larger --valid-fraction")
        self.seq_len: int = int(self.manifest["seq_len"])
        self.vocab_size: int = int(self.manifest["tokenizer"]["vocab_size"])
        self.dtype = np.dtype(self.manifest["dtype"])
        self.shards: list[dict[str, Any]] = list(info["shards"])
        if tokenizer is not None:
            check_tokenizer(self.manifest, tokenizer, where=str(self.path))
        if verify:
            self._verify_sizes() if self.remote else self._verify_once()
        self.max_open = max(1, int(max_open))
        starts = [0]
        for sh in self.shards:
            starts.append(starts[-1] + int(sh["rows"]))
        self._starts = np.asarray(starts, dtype=np.int64)
        # shard index -> (batch start rows within the shard, the batches' row arrays)
        self._open: collections.OrderedDict[int, tuple[np.ndarray, list[np.ndarray]]] = \
            collections.OrderedDict()

    # -- verification, once per dataset ----------------------------------------------

    def _verify_key(self) -> dict[str, Any] | None:
        from opt_ray.artifacts import MANIFEST, sha256_file
        stats = []
        for sh in self.shards:
            try:
                st = (self.path / sh["name"]).stat()
            except OSError:
                return None          # missing: read_manifest names it
            stats.append([sh["name"], st.st_size, st.st_mtime_ns])
        return {"manifest_sha256": sha256_file(self.path / MANIFEST), "shards": stats}

    def _verify_once(self) -> None:
        marker = self.path / f".verified-{self.split}.json"
        key = self._verify_key()
        if key is not None:
            try:
                if json.loads(marker.read_text()).get("key") == key:
                    return
            except (OSError, ValueError):
                pass
        # read_manifest names the failing file: the shard the user must regenerate.
        read_manifest(self.path, verify=[s["name"] for s in self.shards])
        newest = max((m for _, _, m in key["shards"]), default=0) if key else 0
        # A file modified within the filesystem's timestamp granularity of the check could
        # keep its mtime: only files older than that are vouched for by the marker.
        if key is not None and time.time_ns() - newest > 2_000_000_000:
            try:
                from opt_ray.artifacts import write_json_atomic
                write_json_atomic(marker, {"key": key, "verified": time.time()})
            except OSError:
                pass                 # a read-only artifact: verified again next time

    def _verify_sizes(self) -> None:
        """In object storage: every shard of the split is there with the manifest's size,
        and the manifest says where its rows lie (one listing, no download)."""
        fs, root = _fs(self.path)
        where = f"--data {self.path}"
        with store_errors(where, "listing the shards"):
            entries = {Path(e["name"]).name: e for e in fs.ls(f"{root}/{self.split}", detail=True)}
        listed = {name: int(e["size"]) for name, e in entries.items()}
        files = self.manifest.get("files", {})
        for sh in self.shards:
            name = sh["name"].rsplit("/", 1)[-1]
            if "batches" not in sh:
                raise ArtifactError(f"{where}: shard {sh['name']} has no row offsets in its "
                                    f"manifest (made before reading from object storage); run "
                                    f"'opt-ray tokenize' again, or train from a local copy")
            if name not in listed:
                raise ArtifactError(f"{where}: shard {sh['name']} listed in {MANIFEST} is "
                                    f"missing from the bucket; upload the whole shards directory")
            if listed[name] != sh["bytes"]:
                raise ArtifactError(f"{where}: shard {sh['name']} is {listed[name]} bytes, the "
                                    f"manifest says {sh['bytes']}; upload it again")
            etag, want = entries[name].get("ETag"), files.get(sh["name"], {}).get("etag")
            if want and etag and etag != want:
                raise ArtifactError(f"{where}: shard {sh['name']} was replaced since it was "
                                    f"written (its ETag is {etag}, the manifest says {want}); "
                                    f"run 'opt-ray tokenize' again")

    # -- lazy opening ------------------------------------------------------------------

    def _shard(self, k: int) -> tuple[np.ndarray, list[np.ndarray]]:
        got = self._open.get(k)
        if got is not None:
            self._open.move_to_end(k)
            return got
        import pyarrow as pa

        s = self.shards[k]
        width = self.seq_len + 1
        p = self.path / s["name"]
        try:
            mm = pa.memory_map(str(p), "r")
            reader = pa.ipc.open_file(mm)
        except (OSError, pa.ArrowInvalid) as e:
            raise ArtifactError(f"{self.path}: shard {s['name']} cannot be read as Arrow IPC "
                                f"({e}); regenerate the shards with 'opt-ray tokenize'") from e
        chunks: list[np.ndarray] = []
        starts = [0]
        for b in range(reader.num_record_batches):
            col = reader.get_batch(b).column(COLUMN)
            # flatten() of a null-free fixed-size list is a slice of its child buffer, and
            # to_numpy(zero_copy_only) maps that buffer without copying; the views keep
            # the mapping alive after this shard is evicted from the open set.
            arr = col.flatten().to_numpy(zero_copy_only=True).reshape(-1, width)
            if arr.dtype != self.dtype:
                raise ArtifactError(f"{self.path}: shard {s['name']} holds {arr.dtype}, the "
                                    f"manifest says {self.dtype}; regenerate the shards")
            chunks.append(arr)
            starts.append(starts[-1] + len(arr))
        if starts[-1] != s["rows"]:
            raise ArtifactError(f"{self.path}: shard {s['name']} has {starts[-1]} rows, the "
                                f"manifest says {s['rows']}; regenerate the shards")
        got = (np.asarray(starts, dtype=np.int64), chunks)
        self._open[k] = got
        if len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return got

    @property
    def open_shards(self) -> int:
        """Shard files currently held open (at most ``max_open``)."""
        return len(self._open)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _index(self, i: int) -> int:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"row {i} out of range for {n} rows")
        return i

    def __getitem__(self, i: int) -> np.ndarray:
        i = self._index(i)
        if self.remote:
            return self.batch([i], dtype=self.dtype)[0]
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        starts, chunks = self._shard(k)
        r = i - int(self._starts[k])
        c = int(np.searchsorted(starts, r, side="right")) - 1
        return chunks[c][r - starts[c]]

    def batch(self, rows: Sequence[int], dtype: Any = np.int64) -> np.ndarray:
        """Rows stacked into a new ``[len(rows), seq_len + 1]`` array of ``dtype`` (int64 is
        what embedding lookups take)."""
        out = np.empty((len(rows), self.seq_len + 1), dtype=dtype)
        if self.remote:
            self._read_remote(rows, out)
            return out
        for k, r in enumerate(rows):
            out[k] = self[r]
        return out

    def _read_remote(self, rows: Sequence[int], out: np.ndarray) -> None:
        """``rows`` into ``out`` by one concurrent batch of ranged reads."""
        fs, root = _fs(self.path)
        row_bytes = (self.seq_len + 1) * self.dtype.itemsize
        paths, starts = [], []
        for r in rows:
            i = self._index(r)
            k = int(np.searchsorted(self._starts, i, side="right")) - 1
            sh, r_in = self.shards[k], i - int(self._starts[k])
            first = 0
            for n, offset in sh["batches"]:
                if r_in < first + n:
                    break
                first += n
            paths.append(f"{root}/{sh['name']}")
            starts.append(int(offset) + (r_in - first) * row_bytes)
        with store_errors(f"--data {self.path}", f"reading {len(rows)} rows", error=ShardReadError):
            blobs = fs.cat_ranges(paths, starts, [s + row_bytes for s in starts], on_error="raise")
        for k, blob in enumerate(blobs):
            if len(blob) != row_bytes:
                raise ArtifactError(f"--data {self.path}: a row of {paths[k]} came back with "
                                    f"{len(blob)} of {row_bytes} bytes; the shard is truncated: "
                                    f"upload it again")
            out[k] = np.frombuffer(blob, dtype=self.dtype)

    @property
    def num_tokens(self) -> int:
        return len(self) * (self.seq_len + 1)

    def __reduce__(self):
        # Sent to another process (e.g. a Ray worker): reopen the same files there rather
        # than pickling mapped memory; verification already happened here.
        return (_reopen, (str(self.path), self.split))

    def __repr__(self) -> str:
        return (f"ShardDataset({str(self.path)!r}, split={self.split!r}, rows={len(self)}, "
                f"seq_len={self.seq_len}, vocab_size={self.vocab_size})")


def _fs(url: str) -> tuple[Any, str]:
    """fsspec's filesystem for a bucket URL and the path inside it."""
    from fsspec.core import url_to_fs
    with store_errors(f"--data {url}", "opening the bucket"):
        fs, root = url_to_fs(url)
    return fs, root.rstrip("/")


def read_shards_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """A shards artifact's manifest, from a directory or a bucket URL (``ArtifactError``
    naming it and the fix when it is not one)."""
    if not is_url(path):
        return read_manifest(path, kind=KIND)
    url = str(path).rstrip("/")
    fs, root = _fs(url)
    with store_errors(f"--data {url}", f"reading its {MANIFEST}"):
        try:
            text = fs.cat_file(f"{root}/{MANIFEST}")
        except FileNotFoundError:
            raise ArtifactError(f"{url} is not a complete artifact (no {MANIFEST}); upload the "
                                f"whole output directory of 'opt-ray tokenize' there") from None
    try:
        manifest = json.loads(text)
    except ValueError as e:
        raise ArtifactError(f"{url}/{MANIFEST} is not valid JSON ({e}); upload it again") from e
    if manifest.get("kind") != KIND:
        raise ArtifactError(f"{url} holds a {manifest.get('kind')!r} artifact, expected {KIND!r}")
    return manifest


def read_shards_tokenizer(path: str | os.PathLike) -> bytes | None:
    """The tokenizer file the shards were made with (None where an old artifact has none)."""
    if not is_url(path):
        p = Path(path) / TOKENIZER_FILE
        return p.read_bytes() if p.is_file() else None
    fs, root = _fs(str(path))
    with store_errors(f"--data {path}", f"reading its {TOKENIZER_FILE}"):
        try:
            return fs.cat_file(f"{root}/{TOKENIZER_FILE}")
        except FileNotFoundError:
            return None


def tokenize_work_url(url: str) -> str:
    """The work prefix of ``opt-ray tokenize --output URL``."""
    from opt_ray.data.artifact_io import bucket_work_url
    return bucket_work_url(url, "tokenize")


def check_shards_url(url: str, *, overwrite: bool = False) -> None:
    """``opt-ray tokenize --output URL``, before any work (``artifact_io.check_artifact_url``)."""
    from opt_ray.data.artifact_io import check_artifact_url
    check_artifact_url(url, tokenize_work_url(url), overwrite=overwrite)


def upload_shards(local: str | os.PathLike, url: str, *, progress: bool = False) -> None:
    """A finished shards artifact into a bucket (``artifact_io.upload_artifact``)."""
    from opt_ray.data.artifact_io import upload_artifact
    upload_artifact(local, url, kind=KIND, progress=progress)


def batch_offsets(path: str | os.PathLike) -> list[list[int]]:
    """[rows, byte offset of the first row's tokens] of each record batch of a shard
    file, measured on the file itself (the zero-copy views of a mapping start where the
    bytes lie): what lets a reader without a mapping fetch one row by one ranged read."""
    import pyarrow as pa

    data = pa.memory_map(str(path), "r").read_buffer()
    base = np.frombuffer(data, dtype=np.uint8).ctypes.data
    reader = pa.ipc.open_file(data)
    out = []
    for b in range(reader.num_record_batches):
        col = reader.get_batch(b).column(COLUMN)
        values = col.flatten().to_numpy(zero_copy_only=True)
        out.append([len(col), int(values.ctypes.data - base)])
    return out


def _reopen(path: str, split: str) -> ShardDataset:
    return ShardDataset(path, split, verify=False)


def check_tokenizer(manifest: dict[str, Any], tokenizer: Any, *, where: str) -> None:
    """Refuse a tokenizer other than the one the shards were made with (``UserError``)."""
    from opt_ray.data.tokenizer import load_tokenizer, tokenizer_hash

    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    rec = manifest["tokenizer"]
    size = tok.get_vocab_size(with_added_tokens=True)
    if size != rec["vocab_size"] or tokenizer_hash(tok) != rec["hash"]:
        raise UserError(f"{where} was tokenized with tokenizer {rec['hash'][:12]} (vocab "
                        f"{rec['vocab_size']}), but the given tokenizer is "
                        f"{tokenizer_hash(tok)[:12]} (vocab {size}); use the tokenizer the "
                        f"shards were made with, or re-run 'opt-ray tokenize' with this one")


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------

def is_valid_doc(key: str | int, seed: int, fraction: float) -> bool:
    """Whether a document goes to the validation split: a hash of ``(seed, key)`` against
    ``fraction``, so the split depends neither on worker count nor on batch boundaries."""
    if fraction <= 0:
        return False
    h = hashlib.blake2b(f"{seed}\0{key}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "little") < fraction * 2.0**64


def encode_docs(tok: Any, texts: Sequence[str], eos_id: int, dtype: Any) -> np.ndarray:
    """One flat array: each text's ids followed by ``eos_id``. No special tokens are added
    by the tokenizer itself; the eos separators are the only ones."""
    if not texts:
        return np.empty(0, dtype=dtype)
    flat: list[int] = []
    # encode_batch_fast skips offset tracking, which packing never needs.
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    for enc in encode(list(texts), add_special_tokens=False):
        flat.extend(enc.ids)
        flat.append(eos_id)
    return np.asarray(flat, dtype=dtype)


class SplitWriter:
    """Packs one split's token stream into rows and writes them into Arrow IPC shards."""

    def __init__(self, root: Path, split: str, seq_len: int, dtype: np.dtype,
                 rows_per_shard: int, batch_rows: int = 1024, prefix: str = ""):
        self.root, self.split, self.prefix = root, split, prefix
        self.width = seq_len + 1
        self.dtype = np.dtype(dtype)
        self.rows_per_shard = max(1, rows_per_shard)
        self.batch_rows = max(1, min(batch_rows, self.rows_per_shard))
        self.shards: list[dict[str, Any]] = []
        self.docs = 0
        self.stream_tokens = 0
        self._pending: list[np.ndarray] = []   # tokens not yet in a written row
        self._pending_n = 0
        self._writer = None
        self._shard_rows = 0
        self._shard_path: Path | None = None

    def add(self, tokens: np.ndarray, docs: int) -> None:
        """Append a piece of the stream (documents already eos-terminated)."""
        self.docs += docs
        if not len(tokens):
            return
        self.stream_tokens += len(tokens)
        self._pending.append(tokens)
        self._pending_n += len(tokens)
        if self._pending_n >= self.width * self.batch_rows:
            self._flush_rows()

    def _flush_rows(self) -> None:
        stream = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        n_rows = len(stream) // self.width
        rows = stream[:n_rows * self.width].reshape(n_rows, self.width)
        rest = stream[n_rows * self.width:]
        self._pending, self._pending_n = ([rest] if len(rest) else []), len(rest)
        start = 0
        while start < n_rows:
            if self._writer is None:
                self._new_shard()
            take = min(n_rows - start, self.rows_per_shard - self._shard_rows)
            self._write(rows[start:start + take])
            start += take
            if self._shard_rows == self.rows_per_shard:
                self._close_shard()

    def _new_shard(self) -> None:
        import pyarrow as pa

        name = f"{self.split}/shard-{self.prefix}{len(self.shards):05d}.arrow"
        self._shard_path = self.root / name
        self._shard_path.parent.mkdir(parents=True, exist_ok=True)
        schema = pa.schema([pa.field(COLUMN, pa.list_(pa.from_numpy_dtype(self.dtype), self.width),
                                     nullable=False)],
                           metadata={"seq_len": str(self.width - 1), "split": self.split})
        self._schema = schema
        self._writer = pa.ipc.new_file(str(self._shard_path), schema)
        self._shard_rows = 0
        self.shards.append({"name": name, "rows": 0, "tokens": 0})

    def _write(self, rows: np.ndarray) -> None:
        import pyarrow as pa

        values = pa.array(np.ascontiguousarray(rows).reshape(-1))
        batch = pa.record_batch([pa.FixedSizeListArray.from_arrays(values, self.width)],
                                schema=self._schema)
        self._writer.write_batch(batch)
        self._shard_rows += len(rows)
        self.shards[-1]["rows"] += len(rows)
        self.shards[-1]["tokens"] += int(rows.size)

    def _close_shard(self) -> None:
        self._writer.close()
        self._writer = None
        self.shards[-1]["sha256"] = sha256_file(self._shard_path)
        self.shards[-1]["bytes"] = self._shard_path.stat().st_size
        self.shards[-1]["batches"] = batch_offsets(self._shard_path)

    def close(self) -> dict[str, Any]:
        """Write what is left, drop the last partial row, and return the split's summary."""
        if self._pending_n >= self.width:
            self._flush_rows()
        if self._writer is not None:
            self._close_shard()
        rows = sum(s["rows"] for s in self.shards)
        return {"shards": self.shards, "rows": rows, "tokens": rows * self.width,
                "docs": self.docs, "stream_tokens": self.stream_tokens,
                "dropped_tail_tokens": self._pending_n}


@dataclass
class TextBatch:
    """A batch of documents on its way to an encoder; ``valid[k]`` says texts[k]'s split."""
    texts: list[str]
    valid: list[bool]
    chars: int = 0


@dataclass
class EncodedBatch:
    train: np.ndarray
    valid: np.ndarray
    train_docs: int = 0
    valid_docs: int = 0
    cpu_seconds: float = 0.0   # encoder CPU time, for accounting where the stage's time goes


def encode_text_batch(tok: Any, batch: TextBatch, eos_id: int, dtype: Any) -> EncodedBatch:
    """What one tokenize worker does with one batch."""
    c0 = time.process_time()
    train = [t for t, v in zip(batch.texts, batch.valid) if not v]
    valid = [t for t, v in zip(batch.texts, batch.valid) if v]
    return EncodedBatch(encode_docs(tok, train, eos_id, dtype), encode_docs(tok, valid, eos_id, dtype),
                        len(train), len(valid), time.process_time() - c0)


def text_batches(records: Iterable[dict[str, Any]], *, text_field: str = "text",
                 id_field: str | None = None, valid_fraction: float = 0.0, seed: int = 0,
                 batch_chars: int = 1 << 18) -> Iterator[TextBatch]:
    """Group records into batches of about ``batch_chars`` characters (big enough to
    amortise a remote call, small enough to keep every worker busy) and assign each
    document its split. Records without text are skipped."""
    texts: list[str] = []
    valid: list[bool] = []
    chars = 0
    for ordinal, rec in enumerate(records):
        text = rec.get(text_field)
        if text is None and text_field != "text":
            text = rec.get("text")
        if not text:
            continue
        # The reader's stable id (a dedup output keeps the ids its report names), so the
        # split of a document does not move when other documents are added or removed.
        key = rec.get(id_field) if id_field else rec.get(ID_KEY)
        texts.append(text)
        valid.append(is_valid_doc(ordinal if key is None else key, seed, valid_fraction))
        chars += len(text)
        if chars >= batch_chars:
            yield TextBatch(texts, valid, chars)
            texts, valid, chars = [], [], 0
    if texts:
        yield TextBatch(texts, valid, chars)


EncodeMap = Callable[[Iterator[TextBatch]], Iterator[EncodedBatch]]


def local_encode_map(tok: Any, eos_id: int, dtype: Any) -> EncodeMap:
    """Encode in this process (no Ray): the reference the parallel map must equal."""
    def run(batches: Iterator[TextBatch]) -> Iterator[EncodedBatch]:
        for b in batches:
            yield encode_text_batch(tok, b, eos_id, dtype)
    return run


def write_shards(records: Iterable[dict[str, Any]], tok: Any, out: str | os.PathLike, *,
                 seq_len: int, valid_fraction: float = 0.01, seed: int = 0,
                 text_field: str = "text", id_field: str | None = None,
                 encode_map: EncodeMap | None = None, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                 batch_chars: int = 1 << 18, source: dict[str, Any] | None = None,
                 progress: bool = False, overwrite: bool = False) -> Path:
    """The tokenize stage: read -> encode (``encode_map``, in-process by default) -> pack
    -> write, into a shards artifact at ``out`` (atomic: nothing appears on failure).

    Raises ``UserError`` when the corpus has no documents or too few tokens for one row.
    """
    from opt_ray import metrics
    from opt_ray.artifacts import ArtifactWriter
    from opt_ray.data.tokenizer import describe

    if seq_len < 1:
        raise UserError(f"--seq-len must be >= 1, got {seq_len}")
    if not 0.0 <= valid_fraction < 1.0:
        raise UserError(f"--valid-fraction must be in [0, 1), got {valid_fraction}")
    tinfo = describe(tok)
    dtype = token_dtype(tinfo["vocab_size"])
    eos = tinfo["special_ids"]["eos"]
    encode_map = encode_map or local_encode_map(tok, eos, dtype)
    rows_per_shard = max(1, shard_tokens // (seq_len + 1))
    tokens_metric = metrics.counter("tokenize_tokens", "tokens written by the tokenize stage")
    docs_metric = metrics.counter("tokenize_docs", "documents tokenized")
    rate_metric = metrics.gauge("tokenize_tokens_per_second", "tokenize stage throughput so far")

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(unit="tok", unit_scale=True, desc="tokenize", mininterval=1.0)
    t0, done, encode_cpu = time.time(), 0, 0.0
    with ArtifactWriter(out, kind=KIND, overwrite=overwrite) as w:
        # The tokenizer travels with its shards (checksummed like them), so training runs
        # and their exports for serving load exactly the file the tokens came from.
        tok.save(str(w.path / TOKENIZER_FILE))
        writers = {s: SplitWriter(w.path, s, seq_len, dtype, rows_per_shard) for s in SPLITS}
        batches = text_batches(records, text_field=text_field, id_field=id_field,
                               valid_fraction=valid_fraction, seed=seed, batch_chars=batch_chars)
        try:
            for enc in encode_map(batches):
                writers["train"].add(enc.train, enc.train_docs)
                writers["valid"].add(enc.valid, enc.valid_docs)
                n = len(enc.train) + len(enc.valid)
                done += n
                encode_cpu += enc.cpu_seconds
                tokens_metric.inc(n)
                docs_metric.inc(enc.train_docs + enc.valid_docs)
                rate_metric.set(done / max(time.time() - t0, 1e-9))
                if bar is not None:
                    bar.update(n)
        finally:
            if bar is not None:
                bar.close()
        summary = {s: wr.close() for s, wr in writers.items()}
        docs = sum(v["docs"] for v in summary.values())
        if docs == 0:
            raise UserError(f"the corpus has no documents with text (field {text_field!r}); "
                            f"check the input path and --text-field")
        if summary["train"]["rows"] == 0:
            raise UserError(f"the corpus has only {summary['train']['stream_tokens']} training "
                            f"tokens, fewer than one row of --seq-len + 1 = {seq_len + 1}; "
                            f"add data or lower --seq-len")
        w.manifest.update({
            "seq_len": seq_len, "dtype": dtype.name, "tokenizer": tinfo,
            "splits": summary,
            "split": {"by": "document", "valid_fraction": valid_fraction, "seed": seed,
                      "key": id_field or f"{ID_KEY} (else the record's ordinal)",
                      "rule": "blake2b(f'{seed}\\0{key}') / 2**64 < valid_fraction"},
            "packing": {"separator": "eos after every document", "eos_id": eos,
                        "row_tokens": seq_len + 1, "tail": "dropped"},
            "source": source or {},
            "tokens_per_second": round(done / max(time.time() - t0, 1e-9)),
            "encode_cpu_seconds": round(encode_cpu, 3),
        })
    return w.out


def source_info(inputs: Sequence[str | os.PathLike]) -> dict[str, Any]:
    """What the shards manifest records about its input: for an artifact directory its
    manifest's kind, sha256 and counts, so the next stage can trace its lineage."""
    out: list[dict[str, Any]] = []
    for raw in inputs:
        if is_url(raw):   # a bucket corpus: its URL, and its manifest's lineage if it has one
            fs, root = _fs(str(raw))
            entry = {"path": str(raw).rstrip("/")}
            with store_errors(f"input {raw}", "reading its manifest"):
                try:
                    data = fs.cat_file(f"{root}/{MANIFEST}")
                except FileNotFoundError:
                    data = None
            if data is not None:
                m = json.loads(data)
                entry.update({"kind": m.get("kind"), "manifest_sha256": hashlib.sha256(data).hexdigest(),
                              "counts": m.get("counts")})
            out.append(entry)
            continue
        p = Path(raw)
        entry: dict[str, Any] = {"path": str(p.absolute())}
        mf = p / MANIFEST
        if p.is_dir() and mf.is_file():
            m = read_manifest(p)
            entry.update({"kind": m.get("kind"), "manifest_sha256": sha256_file(mf),
                          "counts": m.get("counts")})
        out.append(entry)
    return {"inputs": out}
