"""Streaming corpus readers: jsonl (plain, .gz, .zst), Parquet, and directories.

``iter_records(inputs)`` yields one dict per document with every original field, plus a
stable id under ``ID_KEY`` (``"opt_ray_id"``):

- ``id_field`` given: ``str(record[id_field])`` (a record without it is bad input);
- else the record's own ``opt_ray_id`` when it has one (so a dedup output read back keeps
  the ids the dedup report names);
- else generated: ``f"{name}:{n}"``, where ``n`` is the 1-based line number (jsonl) or row
  number (Parquet) and ``name`` the file name without its extension, prefixed with the
  input directory's name and sub-path for files found in a directory (``corpus/sub/a:12``).
  A ``.txt`` file is one document whose id is just ``name``. When two inputs would get
  the same ``name`` (``a/part-0.jsonl`` and ``b/part-0.jsonl``), both take as many of
  their parent directories as make them distinct (``a/part-0:12``, ``b/part-0:12``).

Accepted inputs: ``*.jsonl`` / ``*.ndjson`` (optionally ``.gz`` or ``.zst``), ``*.parquet``,
``*.txt``, and directories (searched recursively, sorted, hidden entries skipped) holding
such files; each of them may also be a bucket URL (``s3://bucket/corpus/``, a prefix read
as a directory; fsspec, the standard AWS variables and ``AWS_ENDPOINT_URL``), read in
large ranged blocks by whichever node's task reads it, so no filesystem need be shared. A dedup output directory is read as exactly the Parquet shards its
manifest lists; in any directory holding a ``manifest.json``, the side files
``metrics.jsonl`` and ``logbook.jsonl`` are not corpus text and are skipped.

Memory stays bounded: jsonl is read line by line, Parquet in record batches, a ``.txt``
file is one document. Bad records (malformed JSON, non-UTF-8 bytes, a lone surrogate
escape such as ``"\\ud83d"``, a missing or empty text) go to an ``InputErrors`` collector
with file and line, and reading continues; a compressed file that is truncated or not in
its format (``.gz`` / ``.zst``) is one bad record (``truncated_file`` / ``corrupt_file``)
at the line where reading stopped, and the records before it are kept. Without a
collector, or with ``InputErrors(strict=True)``, the first one raises ``UserError``.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

from opt_ray.errors import UserError

ID_KEY = "opt_ray_id"

# Longest suffix first so that "a.jsonl.gz" is matched as ".jsonl.gz", not ".gz".
_FORMATS = [
    (".jsonl.zst", "jsonl"), (".jsonl.gz", "jsonl"), (".ndjson.zst", "jsonl"),
    (".ndjson.gz", "jsonl"), (".jsonl", "jsonl"), (".ndjson", "jsonl"),
    (".parquet", "parquet"), (".txt", "txt"),
]
SUPPORTED = ", ".join(s for s, _ in _FORMATS)
_WORD = re.compile(r"\w")


def file_format(path: str | os.PathLike) -> tuple[str, str] | None:
    """``(kind, suffix)`` for a supported file name, else None."""
    name = os.fspath(path).lower()
    for suffix, kind in _FORMATS:
        if name.endswith(suffix):
            return kind, suffix
    return None


# Files a stage writes next to its data (opt_ray.logbook); never corpus text.
_ARTIFACT_SIDE_FILES = {"metrics.jsonl", "logbook.jsonl"}


def _artifact_shards(d: Path) -> list[str] | None:
    """The data files of a dedup artifact directory, as its manifest lists them; None for
    any other directory."""
    mf = d / "manifest.json"
    if not mf.is_file():
        return None
    try:
        manifest = json.loads(mf.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"input directory {d} has an unreadable manifest.json ({e}); "
                        f"re-run the stage that wrote it") from e
    if manifest.get("kind") != "dedup":
        return None
    return [s["file"] for s in manifest.get("shards", [])]


#: Bytes a bucket input is read by, per ranged request (fsspec's block; s3fs's default is 5 MiB).
READ_BLOCK = 16 << 20


def _url(path: Path | str) -> bool:
    return isinstance(path, str)     # resolve_inputs keeps bucket URLs as str, files as Path


def open_input(path: Path | str) -> io.BufferedIOBase:
    """A binary file object for an input: a local file, or an object in a bucket."""
    if _url(path):
        from fsspec.core import url_to_fs
        fs, root = url_to_fs(path)
        # fsspec's file reads lines in Python, block by block; io's buffer does it in C
        # (a jsonl object's lines read 3.5x faster, as fast as fetching its bytes).
        return io.BufferedReader(fs.open(root, "rb", block_size=READ_BLOCK), 1 << 20)
    return open(path, "rb")


def _base(path: Path | str) -> str:
    return path.rstrip("/").rpartition("/")[2] if _url(path) else path.name


def input_fingerprint(f: "InputFile") -> list[Any]:
    """What identifies an input split's content for reusing finished work: its path, id
    prefix, size and modification (mtime; for an object its ETag, from the listing that
    found it) and the split."""
    if _url(f.path):
        size, stamp = f.stamp or _stamp(f.path)
    else:
        st = f.path.stat()
        size, stamp = st.st_size, st.st_mtime_ns
    return [str(f.path if _url(f.path) else f.path.absolute()), f.name, size, stamp,
            list(f.row_groups) if f.row_groups else None,
            list(f.byte_range) if f.byte_range else None,
            list(f.line_range) if f.line_range else None]


def _stamp(url: str, info: dict[str, Any] | None = None) -> tuple[int, str]:
    """An object's (size, ETag) from its listing entry ``info``, or one request."""
    if info is None:
        from fsspec.core import url_to_fs
        fs, root = url_to_fs(url)
        info = fs.info(root)
    return int(info["size"]), str(info.get("ETag") or info.get("LastModified"))


def input_size(f: "InputFile") -> int:
    """The file's (or object's) size in bytes; an object's from its listing."""
    if _url(f.path):
        return (f.stamp or _stamp(f.path))[0]
    return f.path.stat().st_size


@dataclass(frozen=True)
class InputFile:
    path: Path | str   # a local file, or (str) an object's URL
    kind: str          # "jsonl" | "parquet" | "txt"
    name: str          # id prefix: file name without extension, with directory prefix
    # Parquet only: the row groups [first, last) this split reads (None: the whole file).
    row_groups: tuple[int, int] | None = None
    # Plain jsonl only: (start byte, end byte, number of the line at start) of this split.
    byte_range: tuple[int, int, int] | None = None
    # Compressed jsonl only: the lines [first, stop) this split reads (stop None: to the
    # end), numbered from 1 in the decompressed stream.
    line_range: tuple[int, int | None] | None = None
    # An object: (size, ETag) as the listing that found it said (no request per object
    # to plan splits or fingerprint the inputs; a corpus may be 10^4 objects).
    stamp: tuple[int, str] | None = None


COMPRESSED_SPLITS = 16   # most splits of one compressed jsonl file (see split_jsonl)
COMPRESSION_GUESS = 4    # text bytes per byte of a .gz/.zst file, for planning before reading


def plan_splits(files: list[InputFile], max_bytes: int, executor: Any = None) -> list[InputFile]:
    """The units of work for parallel readers: each input file, with Parquet files cut by
    row groups and jsonl files by lines into splits of about ``max_bytes``.
    ``executor`` (``.map(fn, args)``, e.g. the stage's Ray executor) counts the lines of
    the large jsonl files; default: in this process."""
    return split_jsonl(split_row_groups(files, max_bytes), max_bytes, executor)


def _compressed(path: Path | str) -> bool:
    return _base(path).lower().endswith((".gz", ".zst"))


def split_jsonl(files: list[InputFile], max_bytes: int, executor: Any = None) -> list[InputFile]:
    """Cut jsonl files larger than ``max_bytes`` into splits of whole lines. Lines keep
    their file-wide numbers (ids ``name:line``), so the records are the same as unsplit.

    - Plain jsonl: byte ranges of about ``max_bytes``, cut just after the first newline
      at or past each multiple of it (found by small reads, concurrently); the lines of
      each range are counted by a task (a byte scan, no parsing) and summed into each
      split's first line number. No process reads a whole file to plan it.
    - Compressed (``.gz``, ``.zst``): a stream cannot be entered in the middle, so one
      task decompresses and counts the file's lines, and the file is cut into equal runs
      of lines (``line_range``), one per ``max_bytes`` of decompressed text, at most
      ``COMPRESSED_SPLITS``. Each split's reader decompresses and skips the lines before
      its own (a byte count, ~1 GB/s, against ~10-20 MB/s for signing or encoding them),
      so a corpus of a few huge files (the Pile: 30 files of ~45 GB) is read by up to
      16 tasks per file instead of one.
    """
    out: list[Any] = []
    jobs: list[tuple] = []
    for f in files:
        if (f.kind != "jsonl" or f.byte_range is not None or f.line_range is not None
                or text_weight(f) <= max_bytes):
            out.append(f)
        elif _compressed(f.path):
            out.append(("stream", f, len(jobs)))
            jobs.append((len(jobs), f, 0, -1))
        else:
            cuts = _cut_points(f, input_size(f), max_bytes)
            out.append(("ranges", f, len(jobs), cuts))
            jobs.extend((len(jobs), f, a, b) for a, b in zip(cuts[:-1], cuts[1:]))
    if not jobs:
        return out
    counted: dict[int, tuple[int, int]] = {}
    results = executor.map(count_lines, jobs) if executor else (count_lines(*a) for a in jobs)
    for j, lines, nbytes in results:
        counted[j] = (lines, nbytes)
    planned: list[InputFile] = []
    for item in out:
        if isinstance(item, InputFile):
            planned.append(item)
        elif item[0] == "ranges":
            _, f, j0, cuts = item
            line = 1
            for k, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
                planned.append(replace(f, byte_range=(a, b, line)))
                line += counted[j0 + k][0]
        else:
            _, f, j = item
            lines, nbytes = counted[j]
            n = min(COMPRESSED_SPLITS, -(-nbytes // max_bytes), max(lines, 1))
            if n <= 1:
                planned.append(f)
                continue
            firsts = [1 + lines * k // n for k in range(n)]
            for k, first in enumerate(firsts):
                planned.append(replace(f, line_range=(first, firsts[k + 1] if k + 1 < n else None)))
    return planned


def _cut_points(f: InputFile, size: int, max_bytes: int, window: int = 1 << 16) -> list[int]:
    """[0, cut, ..., size]: each cut just after the first newline at or past a multiple
    of ``max_bytes`` (one small ranged read each, concurrently for objects)."""
    from concurrent.futures import ThreadPoolExecutor

    def next_line(target: int) -> int:
        pos = target
        while pos < size:
            buf = _read_range(f.path, pos, min(pos + window, size))
            nl = buf.find(b"\n")
            if nl >= 0:
                return pos + nl + 1
            pos += len(buf)
        return size

    targets = range(max_bytes, size, max_bytes)
    with ThreadPoolExecutor(16 if _url(f.path) else 1) as pool:
        cuts = sorted(set(pool.map(next_line, targets)))
    return [0, *[c for c in cuts if c < size], size]


def _read_range(path: Path | str, start: int, end: int) -> bytes:
    if _url(path):
        from fsspec.core import url_to_fs
        fs, root = url_to_fs(path)
        return fs.cat_file(root, start=start, end=end)
    with open(path, "rb") as fh:
        fh.seek(start)
        return fh.read(end - start)


def count_lines(j: int, f: InputFile, start: int, end: int,
                chunk: int = 1 << 24) -> tuple[int, int, int]:
    """``(j, lines, bytes)`` of a plain file's byte range ``[start, end)``, or (``end`` -1)
    of a compressed file's whole decompressed stream (a last line without a newline
    counts; a truncated or corrupt stream counts the lines before the damage, and its
    last split reports it, as an unsplit read does)."""
    lines = nbytes = 0
    last = b"\n"
    if end < 0:
        try:
            with _open_binary(f.path) as fh:
                while buf := fh.read1(chunk):    # (read() would drop a block cut by damage)
                    lines += buf.count(b"\n")
                    nbytes += len(buf)
                    last = buf[-1:]
        except _stream_errors():
            pass
        return j, lines + (last != b"\n"), nbytes
    with open_input(f.path) as fh:
        fh.seek(start)
        left = end - start
        while left > 0 and (buf := fh.read(min(chunk, left))):
            lines += buf.count(b"\n")
            left -= len(buf)
    return j, lines, end - start


def split_row_groups(files: list[InputFile], max_bytes: int) -> list[InputFile]:
    """Cut Parquet files larger than ``max_bytes`` into splits of whole row groups of
    about that size, so that workers read one large file in parallel. Rows keep their
    file-wide numbers (ids ``name:row``), so the records are the same as unsplit."""
    import pyarrow.parquet as pq
    out: list[InputFile] = []
    for f in files:
        if f.kind != "parquet" or f.row_groups is not None or input_size(f) <= max_bytes:
            out.append(f)
            continue
        try:
            with open_input(f.path) as fh:
                meta = pq.ParquetFile(fh).metadata
        except Exception as e:  # pyarrow raises several types for a corrupt file
            raise UserError(f"input {f.path} is not a readable Parquet file ({e})") from e
        start, size = 0, 0
        for g in range(meta.num_row_groups):
            size += meta.row_group(g).total_byte_size
            if size >= max_bytes and g + 1 < meta.num_row_groups:
                out.append(replace(f, row_groups=(start, g + 1)))
                start, size = g + 1, 0
        out.append(replace(f, row_groups=(start, meta.num_row_groups)))
    return out


def resolve_inputs(inputs: list[str]) -> list[InputFile]:
    """Expand ``inputs`` into the files to read, in order, and check each is readable.

    Raises ``UserError`` naming the first missing, unreadable or unsupported input; call it
    before starting any work.
    """
    if not inputs:
        raise UserError("no input given: pass one or more files or directories")
    from opt_ray.run_dir import is_url

    files: list[InputFile] = []
    for raw in inputs:
        if is_url(raw):
            files.extend(_resolve_url(str(raw)))
            continue
        p = Path(raw)
        if not p.exists():
            raise UserError(f"input {raw!r} does not exist; check the path")
        if p.is_dir():
            if not os.access(p, os.R_OK | os.X_OK):
                raise UserError(f"input directory {raw!r} is not readable; check its permissions")
            shards = _artifact_shards(p)
            if shards is not None:
                files.extend(InputFile(p / fn, file_format(fn)[0],
                                       f"{p.name}/{fn[:-len(file_format(fn)[1])]}")
                             for fn in shards)
                continue
            found = []
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                artifact = "manifest.json" in filenames
                for fn in sorted(filenames):
                    if fn.startswith(".") or file_format(fn) is None:
                        continue
                    if artifact and fn in _ARTIFACT_SIDE_FILES:
                        continue
                    fp = Path(dirpath) / fn
                    kind, suffix = file_format(fn)
                    rel = fp.relative_to(p).as_posix()
                    found.append(InputFile(fp, kind, f"{p.name}/{rel[:-len(suffix)]}"))
            if not found:
                raise UserError(f"input directory {raw!r} holds no supported files "
                                f"({SUPPORTED})")
            files.extend(found)
        else:
            fmt = file_format(p)
            if fmt is None:
                raise UserError(f"input {raw!r} has an unsupported format; use one of "
                                f"{SUPPORTED} or a directory of them")
            files.append(InputFile(p, fmt[0], p.name[:-len(fmt[1])]))
    files = _distinct_names(files)
    for f in files:
        if _url(f.path):
            continue     # its listing went through the same credentials
        try:
            with open(f.path, "rb") as fh:
                fh.read(1)
        except OSError as e:
            raise UserError(f"input {f.path} cannot be read ({e.strerror}); check its "
                            f"permissions") from e
    return files


def _resolve_url(raw: str) -> list[InputFile]:
    """A bucket input: one object, or a prefix read as a directory is (a dedup artifact's
    listed shards, else every supported object below it, sorted, hidden names skipped)."""
    from fsspec.core import url_to_fs

    from opt_ray.run_dir import store_errors

    with store_errors(f"input {raw}", "listing it", "the URL"):
        fs, root = url_to_fs(raw)
        root = root.rstrip("/")
        unstrip = fs.unstrip_protocol
        if fs.isfile(root):
            fmt = file_format(root)
            if fmt is None:
                raise UserError(f"input {raw!r} has an unsupported format; use one of "
                                f"{SUPPORTED} or a prefix of them")
            return [InputFile(unstrip(root), fmt[0], _base(root)[:-len(fmt[1])],
                              stamp=_stamp(raw, fs.info(root)))]
        found = {p: i for p, i in fs.find(root, detail=True).items()
                 if i.get("type") == "file" and p.rstrip("/") != root}
        if not found:
            raise UserError(f"input {raw!r} does not exist (no object or prefix); check the URL")
        prefix = _base(root)
        try:
            manifest = json.loads(fs.cat_file(f"{root}/manifest.json"))
        except FileNotFoundError:
            manifest = None
        except ValueError as e:
            raise UserError(f"input {raw} has an unreadable manifest.json ({e}); re-run the "
                            f"stage that wrote it") from e
        if manifest is not None and manifest.get("kind") == "dedup":
            listed = [s["file"] for s in manifest.get("shards", [])]
            missing = [fn for fn in listed if f"{root}/{fn}" not in found]
            if missing:
                raise UserError(f"input {raw}: {missing[0]} listed in its manifest.json is "
                                f"missing; re-run the stage that wrote it")
            return [InputFile(unstrip(f"{root}/{fn}"), file_format(fn)[0],
                              f"{prefix}/{fn[:-len(file_format(fn)[1])]}",
                              stamp=_stamp(fn, found[f"{root}/{fn}"])) for fn in listed]
        artifact_dirs = {p.rpartition("/")[0] for p in found if p.endswith("/manifest.json")}
        out = []
        for p in sorted(found):
            rel = p[len(root) + 1:]
            fmt = file_format(rel)
            if fmt is None or any(part.startswith(".") for part in rel.split("/")):
                continue
            if p.rpartition("/")[0] in artifact_dirs and _base(p) in _ARTIFACT_SIDE_FILES:
                continue
            out.append(InputFile(unstrip(p), fmt[0], f"{prefix}/{rel[:-len(fmt[1])]}",
                                 stamp=_stamp(p, found[p])))
        if not out:
            raise UserError(f"input {raw!r} holds no supported files ({SUPPORTED})")
        return out


def _parents(path: Path | str) -> tuple[str, ...]:
    if _url(path):
        return tuple(path.split("://", 1)[-1].rstrip("/").split("/")[:-1])
    return path.absolute().parent.parts


def _distinct_names(files: list[InputFile]) -> list[InputFile]:
    """Give inputs that share an id prefix enough of their parent directories to differ:
    generated ids are ``name:row``, so equal names would give equal ids."""
    names = [f.name for f in files]
    extra = [0] * len(files)
    while True:
        count: dict[str, int] = {}
        for n in names:
            count[n] = count.get(n, 0) + 1
        clash = [i for i, n in enumerate(names) if count[n] > 1]
        if not clash:
            break
        grown = False
        for i in clash:
            parents = _parents(files[i].path)
            if extra[i] < len(parents):
                extra[i] += 1
                grown = True
                prefix = "/".join(p.strip("/") for p in parents[len(parents) - extra[i]:])
                names[i] = f"{prefix}/{files[i].name}".lstrip("/")
        if not grown:   # the same file given twice: its ids really do repeat
            break
    return [f if n == f.name else replace(f, name=n) for f, n in zip(files, names)]


def check_output_dir(output: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Refuse an ``--output`` that cannot be written, before any work starts: one that
    exists (without ``overwrite``), is a file, or whose nearest existing parent is not a
    writable directory. A bucket prefix (for a stage that writes its artifact on this
    node and uploads it) must take writes and hold nothing yet (``check_artifact_url``).
    Raises ``UserError`` naming the path and the fix."""
    from opt_ray.run_dir import is_url
    if is_url(output):
        from opt_ray.data.artifact_io import check_artifact_url
        check_artifact_url(str(output).rstrip("/"), overwrite=overwrite)
        return
    out = Path(output).absolute()
    if out.exists():
        if not out.is_dir():
            raise UserError(f"--output {output} is an existing file; choose a directory path")
        if not overwrite:
            raise UserError(f"output directory {output} already exists; choose another "
                            f"--output or pass --overwrite")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"--output {output}: {parent} is a file, not a directory; choose "
                        f"another --output")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--output {output} cannot be created: {parent} is not writable; "
                        f"choose another --output or fix the permissions")


def _describe(file: str, line: int, kind: str, detail: str) -> str:
    return f"{file}:{line}: {kind.replace('_', ' ')}" + (f": {detail}" if detail else "")


@dataclass
class InputErrors:
    """Bad records, counted per file and kind, with up to ``max_examples`` line numbers
    per file. ``strict=True`` turns the first one into a ``UserError``."""

    strict: bool = False
    max_examples: int = 100
    files: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add(self, file: str, line: int, kind: str, detail: str = "") -> None:
        if self.strict:
            raise UserError(f"{_describe(file, line, kind, detail)} (run without --strict to "
                            f"skip and report bad records)")
        f = self.files.setdefault(file, {"count": 0, "by_kind": {}, "examples": []})
        f["count"] += 1
        f["by_kind"][kind] = f["by_kind"].get(kind, 0) + 1
        if len(f["examples"]) < self.max_examples:
            f["examples"].append({"line": line, "kind": kind, "detail": detail[:200]})

    @property
    def total(self) -> int:
        return sum(f["count"] for f in self.files.values())

    def to_dict(self) -> dict[str, Any]:
        by_kind: dict[str, int] = {}
        for f in self.files.values():
            for k, v in f["by_kind"].items():
                by_kind[k] = by_kind.get(k, 0) + v
        return {"total": self.total, "by_kind": by_kind, "files": self.files}


class _Raise(InputErrors):
    def add(self, file: str, line: int, kind: str, detail: str = "") -> None:
        raise UserError(_describe(file, line, kind, detail))


class _ZstdReader(io.RawIOBase):
    """Decompresses a (possibly multi-frame) .zst file and, unlike zstandard's own
    stream reader, raises ``EOFError`` when the file ends inside a frame (a truncated
    download), instead of returning what it had as if that were the whole file."""

    def __init__(self, path: Path | str, chunk: int = 1 << 20):
        import zstandard
        self._zstd = zstandard
        self._fh = open_input(path)
        self._chunk = chunk
        self._obj = zstandard.ZstdDecompressor().decompressobj()
        self._in_frame = False     # bytes of the current frame have been fed
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._buf:
            data = self._fh.read(self._chunk)
            if not data:
                if self._in_frame:
                    raise EOFError("the file ends inside a zstd frame (truncated)")
                return 0
            while data:
                self._in_frame = True
                self._buf += self._obj.decompress(data)
                if self._obj.eof:      # frame complete; what follows is the next frame
                    data = self._obj.unused_data
                    self._obj = self._zstd.ZstdDecompressor().decompressobj()
                    self._in_frame = False
                else:
                    data = b""
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def close(self) -> None:
        self._fh.close()
        super().close()


def _open_binary(path: Path | str) -> io.BufferedIOBase:
    name = _base(path).lower()
    if name.endswith(".gz"):
        return gzip.open(open_input(path) if _url(path) else path, "rb")
    if name.endswith(".zst"):
        return io.BufferedReader(_ZstdReader(path), buffer_size=1 << 16)
    return open_input(path)


def _stream_errors() -> tuple[type[BaseException], ...]:
    """What a truncated or corrupt compressed stream raises while being read."""
    import zstandard
    return (EOFError, gzip.BadGzipFile, zlib.error, zstandard.ZstdError)


# A JSON escape of a UTF-16 surrogate: json.loads accepts a lone one, UTF-8 cannot hold it.
_SURROGATE_ESCAPE = re.compile(rb"\\[uU][dD][89a-fA-F]")


def _finish(rec: dict, f: InputFile, n: int, text_field: str, id_field: str | None,
            errors: InputErrors, gen_id: str) -> dict | None:
    """Check the text and attach the id; None (after reporting) for a bad record."""
    text = rec.get(text_field)
    if not isinstance(text, str):
        kind = "missing_text" if text is None else "text_not_string"
        errors.add(str(f.path), n, kind, f"field {text_field!r}")
        return None
    if not _WORD.search(text):
        errors.add(str(f.path), n, "empty_text", f"field {text_field!r} has no words")
        return None
    if id_field is not None:
        if rec.get(id_field) is None:
            errors.add(str(f.path), n, "missing_id", f"field {id_field!r}")
            return None
        rec[ID_KEY] = str(rec[id_field])
    elif not isinstance(rec.get(ID_KEY), str):
        rec[ID_KEY] = gen_id
    return rec


def _iter_jsonl(f: InputFile, text_field: str, id_field: str | None,
                errors: InputErrors) -> Iterator[dict]:
    n = 0
    stream_errors = _stream_errors()
    if f.byte_range is not None:
        start, end, first = f.byte_range
        with open_input(f.path) as fh:
            fh.seek(start)
            pos = start
            for n, raw in enumerate(fh, first):
                if pos >= end:
                    break
                pos += len(raw)
                out = _jsonl_record(raw, n, f, text_field, id_field, errors)
                if out is not None:
                    yield out
        return
    first, stop = f.line_range or (1, None)
    n = first - 1
    try:
        with _open_binary(f.path) as fh:
            for n, raw in enumerate(_lines_from(fh, first - 1), first):
                out = _jsonl_record(raw, n, f, text_field, id_field, errors)
                if out is not None:
                    yield out
                if n + 1 == stop:    # (the next line is not read: it may be the damage)
                    break
    except stream_errors as e:
        kind = "truncated_file" if isinstance(e, EOFError) else "corrupt_file"
        errors.add(str(f.path), n + 1, kind,
                   f"{type(e).__name__}: {e}; reading of this file stopped here (records "
                   f"before it are kept): re-download or re-compress it")


def _lines_from(fh: io.BufferedIOBase, skip: int, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The lines of ``fh`` after its first ``skip``, which are passed over by counting
    newlines in blocks (C speed) rather than read as lines."""
    rest = b""
    while skip > 0:
        buf = fh.read1(chunk)     # (read() would raise for damage past the lines wanted)
        if not buf:
            return
        c = buf.count(b"\n")
        if c < skip:
            skip -= c
            continue
        pos = -1
        for _ in range(skip):
            pos = buf.index(b"\n", pos + 1)
        rest, skip = buf[pos + 1:], 0
    if rest:
        *whole, tail = rest.split(b"\n")
        for w in whole:
            yield w + b"\n"
        if tail:
            yield tail + fh.readline()
    yield from fh


def _jsonl_record(raw: bytes, n: int, f: InputFile, text_field: str, id_field: str | None,
                  errors: InputErrors) -> dict | None:
    """One jsonl line as a record, or None (blank, or bad and reported)."""
    if not raw.strip():
        return None  # blank lines (e.g. a trailing newline) are not records
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        errors.add(str(f.path), n, "non_utf8", f"byte {e.start}: {e.reason}")
        return None
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        errors.add(str(f.path), n, "malformed_json", e.msg)
        return None
    if not isinstance(rec, dict):
        errors.add(str(f.path), n, "malformed_json", "line is not a JSON object")
        return None
    if _SURROGATE_ESCAPE.search(raw):
        # Paired surrogates decode to one character; a lone one stays a surrogate that
        # no UTF-8 writer (hashing, Parquet) accepts. Only such lines pay for the check.
        try:
            json.dumps(rec, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            errors.add(str(f.path), n, "lone_surrogate",
                       f"an escape like \\ud83d without its pair ({e.reason})")
            return None
    return _finish(rec, f, n, text_field, id_field, errors, f"{f.name}:{n}")


def _iter_parquet(f: InputFile, text_field: str, id_field: str | None,
                  errors: InputErrors, batch_size: int) -> Iterator[dict]:
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(open_input(f.path) if _url(f.path) else f.path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise UserError(f"input {f.path} is not a readable Parquet file ({e})") from e
    n = 0
    groups = None
    if f.row_groups is not None:
        first, last = f.row_groups
        groups = list(range(first, last))
        # Rows are numbered file-wide: a split starts after the rows of the groups before it.
        n = sum(pf.metadata.row_group(g).num_rows for g in range(first))
    for batch in pf.iter_batches(batch_size=batch_size, row_groups=groups):
        for rec in batch.to_pylist():
            n += 1
            out = _finish(rec, f, n, text_field, id_field, errors, f"{f.name}:{n}")
            if out is not None:
                yield out


def _iter_txt(f: InputFile, text_field: str, id_field: str | None,
              errors: InputErrors) -> Iterator[dict]:
    with open_input(f.path) as fh:
        data = fh.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        errors.add(str(f.path), line, "non_utf8", f"byte {e.start}: {e.reason}")
        return
    out = _finish({text_field: text}, f, 1, text_field, None, errors, f.name)
    if out is not None:
        yield out


def iter_file(f: InputFile, *, text_field: str = "text", id_field: str | None = None,
              errors: InputErrors | None = None, batch_size: int = 1024) -> Iterator[dict]:
    """Records of one resolved input file (see ``iter_records``)."""
    errors = errors if errors is not None else _Raise()
    if f.kind == "jsonl":
        yield from _iter_jsonl(f, text_field, id_field, errors)
    elif f.kind == "parquet":
        yield from _iter_parquet(f, text_field, id_field, errors, batch_size)
    else:
        yield from _iter_txt(f, text_field, id_field, errors)


def text_weight(f: InputFile) -> int:
    """A file's estimated bytes of text, from its size alone (no read): compressed jsonl
    ``COMPRESSION_GUESS`` times its size, Parquet twice."""
    factor = (COMPRESSION_GUESS if _compressed(f.path) else 2 if f.kind == "parquet" else 1)
    return input_size(f) * factor


def iter_sample(files: list[InputFile], chars: int | None, *, text_field: str = "text",
                errors: InputErrors | None = None) -> Iterator[dict]:
    """About ``chars`` characters of text from ``files`` (``resolve_inputs``; None: all of
    them): from each file, its first records while the text taken from it is below its
    share of ``chars``, the shares in proportion to the files' estimated text
    (``text_weight``), so every file contributes and none is read whole. A corpus is
    shuffled within its files (a dedup output's shards, the Pile's files): a sample of
    a few GB stands for hundreds. At least one record per file."""
    weights = [text_weight(f) for f in files]
    total = sum(weights) or 1
    for f, w in zip(files, weights):
        share = None if chars is None else chars * w / total
        taken = 0
        for rec in iter_file(f, text_field=text_field, errors=errors):
            yield rec
            taken += len(rec[text_field])
            if share is not None and taken >= share:
                break


def iter_records(inputs: list[str], *, text_field: str = "text", id_field: str | None = None,
                 errors: InputErrors | None = None) -> Iterator[dict]:
    """Stream the documents of ``inputs`` (files and directories, see the module doc).

    Each record is a dict with all its original fields plus ``ID_KEY`` (``"opt_ray_id"``,
    a stable string id). Records whose ``text_field`` is missing, not a string or has no
    words, malformed JSON lines and non-UTF-8 lines are reported to ``errors`` (an
    ``InputErrors``) and skipped; with ``errors=None`` the first one raises ``UserError``.
    Every input is checked before the first record is read.
    """
    files = resolve_inputs(list(inputs))  # eagerly: a bad path fails at the call

    def gen() -> Iterator[dict]:
        for f in files:
            yield from iter_file(f, text_field=text_field, id_field=id_field, errors=errors)
    return gen()
