"""A training run directory in object storage: ``opt-ray train --output s3://bucket/run``.

A run directory holds small files that are appended to or rewritten while the run goes:
``logbook.jsonl``, ``metrics.jsonl``, ``guard.json``, ``manifest.json`` and the kept
``tokenizer.json``. Object stores cannot append, and the processes that write these files
(the driver, rank 0, the Ray Train controller) may sit on different nodes. So with a URL
``--output``, every process works in a **local staging directory** named after the URL
(``~/.cache/opt-ray/runs/<name>-<hash>``, or under ``$OPT_RAY_STAGING_DIR``), exactly as
with a local ``--output``, and the files are **mirrored** to the URL:

- ``push``: rank 0 after every checkpoint and at the end of the run (every file), and
  every ``--mirror-every`` seconds between checkpoints (the metrics and the logbook), the
  driver and the controller after the events they write (the logbook only). The logbook
  is merged with the bucket's copy (the union of the events of every writer, in time
  order), the other files are rank 0's alone and replace the bucket's. Each object is one
  PUT, so a reader never sees half a file; ``.mirror.json`` is written last and names the
  push.
- ``pull``: when a process starts (the driver, every rank) its staging directory is
  brought up to the bucket's unless it already holds the newest push: a fresh machine
  (the whole job or node lost) resumes where the bucket says the run is.

``metrics.jsonl`` grows by a line a step (tens of MB over a long run), so it is not
uploaded whole every ``--mirror-every`` seconds. A checkpoint (and the end of the run, and
a rollback, which rewrites the file) uploads it whole as a new *generation*, named with
its size in ``metrics.parts/gen.json``; between checkpoints only the lines appended since
the last push go up, each batch one object ``metrics.parts/<gen>/<byte offset>.jsonl``.
Readers take the whole file and then the parts that continue it, and a reader that
already holds a generation fetches only the parts it lacks. So the bucket's
``metrics.jsonl`` is whole at every checkpoint and at the end; between them its newest
lines are in the parts.

Checkpoints do not go through the staging directory: they go to ``URL/checkpoints``
(or ``--checkpoint-dir``) directly, each rank writing its own objects.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import sys
import time
import uuid
from pathlib import Path
from typing import Iterable, Iterator

from opt_ray.artifacts import write_text_atomic
from opt_ray.errors import UserError
from opt_ray.logbook import LOGBOOK, METRICS

STAGING_ENV = "OPT_RAY_STAGING_DIR"
#: Where a node keeps what it fetched from a bucket to read as files (a served export, a
#: tokenizer) and the HF directories it built from a training run to serve:
#: ``artifact_io.cached``.
FETCH_ENV = "OPT_RAY_FETCH_DIR"
#: The most the fetch directory holds (``200GB``, ``500GiB``); past it the least recently
#: used versions that no process is using are removed (``artifact_io.evict``). Unset or
#: empty: no limit (each source keeps only its newest version, whatever the total).
FETCH_MAX_ENV = "OPT_RAY_FETCH_MAX_BYTES"
MARK = ".mirror.json"
#: Files of a run directory that live in the bucket, besides the checkpoints. The other
#: entries of a staging directory (pids, chaos state, Ray Train's, attempt counters) are
#: per invocation and stay on the node. ("tokenizer.json" is ``data.shards.TOKENIZER_FILE``,
#: not imported here: this module stays as light as the config that imports it.)
MIRRORED = (LOGBOOK, METRICS, "guard.json", "manifest.json", "tokenizer.json")
#: The running driver's record (``actors.train.DRIVER_FILE``): pushed and removed by the
#: driver alone, pulled with the rest, so a driver lost with its machine is noticed by the
#: next one wherever it runs.
DRIVER = "driver.json"
#: Where the metrics pushed between checkpoints go (see the module docstring).
PARTS = "metrics.parts"
#: What this staging directory's ``metrics.jsonl`` holds of the bucket's: its first ``size``
#: bytes are generation ``gen`` (ending with ``tail``), as pushed by ``writer`` or pulled.
_METRICS_STATE = ".metrics.json"


def is_url(path: str | os.PathLike | None) -> bool:
    """An fsspec URL (``s3://bucket/key``, ``gs://...``); local paths and ``file://`` are local."""
    s = str(path or "")
    return "://" in s and not s.startswith("file://")


def staging_root() -> Path:
    return Path(os.environ.get(STAGING_ENV) or Path.home() / ".cache" / "opt-ray" / "runs")


def fetch_root() -> Path:
    return Path(os.environ.get(FETCH_ENV) or Path.home() / ".cache" / "opt-ray" / "fetched")


def fetch_max_bytes() -> int | None:
    """``$OPT_RAY_FETCH_MAX_BYTES`` in bytes, None when unset; a ``UserError`` naming it
    when it is not a size."""
    raw = os.environ.get(FETCH_MAX_ENV, "").strip()
    if not raw:
        return None
    from opt_ray.sizes import parse_size
    return parse_size(raw, FETCH_MAX_ENV)


def local_run_dir(output: str | os.PathLike) -> Path:
    """Where this process reads and writes the run directory ``output``: itself when it is
    local, else its staging directory on this node (the same for every process here)."""
    if not is_url(output):
        return Path(str(output).removeprefix("file://"))
    url = str(output).rstrip("/")
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", url.rsplit("/", 1)[-1])[:40] or "run"
    return staging_root() / f"{name}-{hashlib.sha256(url.encode()).hexdigest()[:16]}"


AWS_HINT = "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_ENDPOINT_URL"


class StoreUnavailable(OSError):
    """An object-store request that failed, after the client's own retries, in the middle
    of a stage's work (a task's upload): not bad input, so the stage's executor runs the
    task again (``actors.dedup.RayExecutor``) instead of stopping the stage."""


@contextlib.contextmanager
def store_errors(what: str, doing: str, check: str = "the URL",
                 error: type[Exception] = UserError) -> Iterator[None]:
    """Object-store failures inside as one ``error`` line (a ``UserError``: exit 2 at the
    CLI, INVALID_ARGUMENT at the API) that names ``what`` and the AWS variables; a
    ``UserError`` raised inside passes as it is. Where a failure may be transient (a read
    in the middle of a run), ``error`` is another class, so the gang retries."""
    try:
        yield
    except UserError:
        raise
    except (ImportError, ValueError) as e:
        if _no_filesystem(e):
            raise error(f"{what}: no filesystem for this URL ({e}); use s3://bucket/prefix "
                        f"(s3fs)") from e
        raise error(f"{what}: {doing} failed ({type(e).__name__}: "
                    f"{' '.join(str(e).split())[:300]})") from e
    except Exception as e:  # noqa: BLE001 - botocore/s3fs raise many types
        raise error(f"{what}: the object store refused {doing} ({type(e).__name__}: "
                    f"{' '.join(str(e).split())[:300]}); check {check} and {AWS_HINT}") from e


def probe_write(fs, prefix: str) -> None:
    """Write and remove a probe object under ``prefix``: the store's errors (no bucket,
    no permission, bad credentials) raise here, before any work is done."""
    probe = f"{prefix}/.write-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    fs.pipe_file(probe, b"")
    fs.rm_file(probe)


def _no_filesystem(e: Exception) -> bool:
    """fsspec's answer for a scheme it has no implementation for (unknown, or its package
    not installed), as opposed to a ValueError from reading what the store returned."""
    return isinstance(e, ImportError) or str(e).startswith("Protocol not known")


def _merge_lines(*texts: str) -> list[str]:
    """The union of the JSON lines of several copies of a logbook, in time order (a line
    present in several copies is one event; a torn line is dropped)."""
    seen: dict[str, float] = {}
    for text in texts:
        for line in text.splitlines():
            line = line.strip()
            if not line or line in seen:
                continue
            try:
                seen[line] = float(json.loads(line).get("time", 0.0))
            except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
                continue
    return sorted(seen, key=lambda l: seen[l])  # stable: equal times keep their order


class RunMirror:
    """The staging directory ``local`` of the run directory at ``url`` (see the module)."""

    def __init__(self, url: str, local: Path | None = None):
        import fsspec

        self.url = str(url).rstrip("/")
        self.local = Path(local) if local is not None else local_run_dir(self.url)
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.root = self.root.rstrip("/")
        # Metrics parts continue only the pushes of this object (one per process): a
        # restarted rank 0 starts a generation of its own.
        self._writer = uuid.uuid4().hex

    @classmethod
    def of(cls, output: str | os.PathLike) -> "RunMirror | None":
        """The mirror of ``output``, or None for a local run directory."""
        return cls(str(output)) if is_url(output) else None

    # -- helpers -------------------------------------------------------------------------
    def _remote(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _cat(self, name: str) -> bytes | None:
        try:
            return self.fs.cat_file(self._remote(name))
        except FileNotFoundError:
            return None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One process of this node at a time pulls or pushes this staging directory."""
        self.local.mkdir(parents=True, exist_ok=True)
        with open(self.local / ".mirror.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _mark(self, where: str) -> str | None:
        raw = self._cat(MARK) if where == "remote" else (
            (self.local / MARK).read_bytes() if (self.local / MARK).is_file() else None)
        try:
            return json.loads(raw)["id"] if raw else None
        except (json.JSONDecodeError, KeyError, TypeError):
            return None

    # -- the two directions --------------------------------------------------------------
    def check_writable(self) -> None:
        """Raise ``OSError``-like errors when the bucket cannot be written (a probe object)."""
        probe_write(self.fs, self.root)

    def pull(self) -> bool:
        """Bring the staging directory up to the bucket's newest push; True if it changed.
        The logbook gains the bucket's events it lacks (appended: never rewritten under a
        writer); the other files are replaced by the bucket's."""
        with self._locked():
            self.fs.invalidate_cache()
            remote = self._mark("remote")
            if remote is None or remote == self._mark("local"):
                return False
            for name in (*MIRRORED, DRIVER):
                if name == METRICS:
                    self._pull_metrics()
                    continue
                data = self._cat(name)
                if data is None:
                    continue
                if name == LOGBOOK:
                    self._append_missing(data.decode("utf-8", "replace"))
                else:
                    self._replace(name, data)
            write_text_atomic(self.local / MARK, json.dumps({"id": remote}))
            return True

    def push(self, names: Iterable[str] = MIRRORED, *, whole: bool = True) -> None:
        """Upload ``names`` from the staging directory (the logbook merged with the
        bucket's), then a new ``.mirror.json``. ``whole=False``: the metrics go up as the
        lines appended since this mirror's last push (see the module docstring)."""
        with self._locked():
            self.fs.invalidate_cache()
            for name in names:
                path = self.local / name
                if name == METRICS:
                    if path.is_file():
                        self._push_metrics(path, whole)
                    continue
                if name == LOGBOOK:
                    here = path.read_text() if path.is_file() else ""
                    there = (self._cat(LOGBOOK) or b"").decode("utf-8", "replace")
                    data = "".join(l + "\n" for l in _merge_lines(there, here)).encode()
                    self._append_missing(there)  # the mark below says this node is current
                elif path.is_file():
                    data = path.read_bytes()
                else:
                    continue
                self.fs.pipe_file(self._remote(name), data)
            mark = json.dumps({"id": uuid.uuid4().hex, "time": time.time()})
            self.fs.pipe_file(self._remote(MARK), mark.encode())
            write_text_atomic(self.local / MARK, mark)

    def try_push(self, names: Iterable[str] = MIRRORED, *, whole: bool = True) -> bool:
        """``push``, where a failing object store costs the mirror, never the run: the
        error is printed and the files stay staged for the next push. True if it pushed."""
        names = tuple(names)
        try:
            self.push(names, whole=whole)
            return True
        except Exception as e:  # noqa: BLE001 - object-store errors come in many types
            print(f"opt-ray: could not mirror {', '.join(names)} to {self.url} "
                  f"({type(e).__name__}: {e}); retried at the next push", file=sys.stderr)
            return False

    def remove(self, name: str) -> None:
        """Delete one file of the run directory from the bucket (absent: nothing)."""
        with self._locked():
            try:
                self.fs.rm_file(self._remote(name))
            except FileNotFoundError:
                pass

    def _append_missing(self, remote_text: str) -> None:
        path = self.local / LOGBOOK
        here = set(l.strip() for l in path.read_text().splitlines()) if path.is_file() else set()
        missing = [l for l in _merge_lines(remote_text) if l not in here]
        if missing:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, "".join(l + "\n" for l in missing).encode())
            finally:
                os.close(fd)

    def read(self, name: str) -> bytes | None:
        """One file of the run directory as the bucket holds it (None if absent)."""
        self.fs.invalidate_cache()
        if name == METRICS:
            gen = self._metrics_generation()
            base = self._cat(METRICS)
            if gen is None or base is None or len(base) != gen["base"]:
                return base
            return base + b"".join(self._metrics_parts(gen["gen"], len(base)))
        return self._cat(name)

    # -- metrics: whole at checkpoints, appended parts between them ----------------------
    def _metrics_generation(self) -> dict | None:
        raw = self._cat(f"{PARTS}/gen.json")
        try:
            gen = json.loads(raw) if raw else None
            return gen if isinstance(gen, dict) and {"gen", "base"} <= gen.keys() else None
        except json.JSONDecodeError:
            return None

    def _metrics_parts(self, gen: str, start: int) -> Iterator[bytes]:
        """The parts of generation ``gen`` that continue the file from byte ``start``, in
        order, up to the first gap."""
        try:
            names = self.fs.ls(self._remote(f"{PARTS}/{gen}"), detail=False)
        except FileNotFoundError:
            return
        offsets = {}
        for p in names:
            stem = p.rstrip("/").rsplit("/", 1)[-1].split(".", 1)[0]
            if stem.isdigit():
                offsets[int(stem)] = p
        at = start
        for off in sorted(offsets):
            if off < at:
                continue
            if off > at:
                return
            data = self.fs.cat_file(offsets[off])
            yield data
            at += len(data)

    def _push_metrics(self, path: Path, whole: bool) -> None:
        state = self._metrics_state()
        size = path.stat().st_size
        if not whole and state is not None and state.get("writer") == self._writer \
                and size >= state["size"] and self._continues(path, state):
            with open(path, "rb") as f:
                f.seek(state["size"])
                data = f.read(size - state["size"])
            data = data[:data.rfind(b"\n") + 1]  # whole lines: a torn one waits
            if data:
                self.fs.pipe_file(self._remote(f"{PARTS}/{state['gen']}/{state['size']:016d}.jsonl"),
                                  data)
                self._save_metrics_state(state["gen"], state["size"] + len(data), self._writer)
            return
        data = path.read_bytes()
        gen = uuid.uuid4().hex[:16]
        self.fs.pipe_file(self._remote(METRICS), data)
        self.fs.pipe_file(self._remote(f"{PARTS}/gen.json"),
                          json.dumps({"gen": gen, "base": len(data)}).encode())
        self._save_metrics_state(gen, len(data), self._writer)
        try:  # the parts of earlier generations are in the whole file now
            for p in self.fs.ls(self._remote(PARTS), detail=False):
                if p.rstrip("/").rsplit("/", 1)[-1] not in (gen, "gen.json"):
                    self.fs.rm(p, recursive=True)
        except FileNotFoundError:
            pass

    def _pull_metrics(self) -> None:
        path = self.local / METRICS
        gen = self._metrics_generation()
        if gen is None:  # no metrics yet, or a bucket written before the parts existed
            data = self._cat(METRICS)
            if data is not None:
                self._replace(METRICS, data)
            (self.local / _METRICS_STATE).unlink(missing_ok=True)
            return
        state = self._metrics_state()
        here = path.stat().st_size if path.is_file() else -1
        if state is not None and state["gen"] == gen["gen"] and state.get("writer"):
            # Rank 0 on this node pushed this generation: its copy is the newest (lines
            # not pushed yet, or a rollback's trim not pushed yet), never the bucket's.
            return
        if state is not None and state["gen"] == gen["gen"] and here == state["size"] \
                and self._continues(path, state):
            size = here  # holds this generation up to here: the parts after it only
        else:
            base = self._cat(METRICS)
            if base is None or len(base) != gen["base"]:
                return  # a new generation is being written: the next pull takes it
            self._replace(METRICS, base)
            size = len(base)
        with open(path, "ab") as f:
            for data in self._metrics_parts(gen["gen"], size):
                f.write(data)
                size += len(data)
        self._save_metrics_state(gen["gen"], size, None)

    def _metrics_state(self) -> dict | None:
        try:
            state = json.loads((self.local / _METRICS_STATE).read_text())
            return state if {"gen", "size", "tail"} <= state.keys() else None
        except (OSError, json.JSONDecodeError, AttributeError):
            return None

    def _save_metrics_state(self, gen: str, size: int, writer: str | None) -> None:
        """Record that the local ``metrics.jsonl`` holds generation ``gen`` up to ``size``,
        pushed by ``writer`` (this mirror) or pulled (None), with the bytes it then ends
        with (``_continues``)."""
        with open(self.local / METRICS, "rb") as f:
            f.seek(max(0, size - 64))
            tail = f.read(size - f.tell())
        write_text_atomic(self.local / _METRICS_STATE, json.dumps({
            "gen": gen, "size": size, "tail": tail.hex(), "writer": writer}))

    @staticmethod
    def _continues(path: Path, state: dict) -> bool:
        """The local file still starts with what the state describes (its bytes before
        ``size`` end with the recorded tail): not rewritten by a trim since."""
        tail = bytes.fromhex(state["tail"])
        try:
            with open(path, "rb") as f:
                f.seek(state["size"] - len(tail))
                return f.read(len(tail)) == tail
        except (OSError, ValueError):
            return False

    def _replace(self, name: str, data: bytes) -> None:
        tmp = self.local / f".{name}.pull"
        tmp.write_bytes(data)
        os.replace(tmp, self.local / name)

