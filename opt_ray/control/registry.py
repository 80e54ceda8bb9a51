"""The job registry: one JSON file per control job (and per serving app) in the state dir.

Each record is the ``opt_ray.v1.Job`` (or ``ServeApp``) message as JSON, rewritten
atomically (temporary file, fsync, rename) on every change, so a crash leaves either the
old or the new record, never a torn one. A restarted control server loads every record
and its reconciler asks Ray about the ones still active: that is how it reattaches to
running Ray jobs, by their submission ids.

Layout::

    STATE_DIR/jobs/<job_id>.json      the Job message
    STATE_DIR/serve/<name>.json       the ServeApp message
    STATE_DIR/logbooks/<job_id>.jsonl control-plane events of a job (opt_ray.logbook)
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from pathlib import Path
from typing import TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

from opt_ray.artifacts import write_json_atomic
from opt_ray.errors import UserError
from opt_ray.logbook import Logbook
from opt_ray.v1 import control_pb2 as pb

TERMINAL = frozenset({pb.SUCCEEDED, pb.FAILED, pb.STOPPED})

M = TypeVar("M", bound=Message)


class Registry:
    """Thread-safe, persisted store of ``Job`` and ``ServeApp`` records.

    Readers get copies, so a record handed to a gRPC response is never mutated by the
    reconciler while it is being serialised.
    """

    def __init__(self, state_dir: str | os.PathLike):
        self.state_dir = Path(state_dir).absolute()
        self._dirs = {"jobs": self.state_dir / "jobs", "serve": self.state_dir / "serve",
                      "logbooks": self.state_dir / "logbooks"}
        try:
            for d in self._dirs.values():
                d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create --state-dir {self.state_dir}: {e.strerror}") from e
        self._lock = threading.RLock()
        self._jobs: dict[str, pb.Job] = self._load("jobs", pb.Job, "job_id")
        self._apps: dict[str, pb.ServeApp] = self._load("serve", pb.ServeApp, "name")

    def _load(self, sub: str, cls: type[M], key: str) -> dict[str, M]:
        out: dict[str, M] = {}
        for f in sorted(self._dirs[sub].glob("*.json")):
            try:
                msg = json_format.Parse(f.read_text(), cls(), ignore_unknown_fields=True)
            except (OSError, json_format.ParseError) as e:
                # A record this server cannot parse is kept on disk untouched for a human.
                print(f"opt-ray control: skipping unreadable registry record {f}: {e}", flush=True)
                continue
            out[getattr(msg, key)] = msg
        return out

    @staticmethod
    def _write(path: Path, msg: Message) -> None:
        write_json_atomic(path, json_format.MessageToDict(msg, preserving_proto_field_name=True))

    # ------------------------------------------------------------------ jobs

    def new_job_id(self, kind: str) -> str:
        """Short, sortable by creation time, and valid as part of a Ray submission id."""
        return f"{kind}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"

    def put_job(self, job: pb.Job) -> pb.Job:
        with self._lock:
            job.updated = time.time()
            self._write(self._dirs["jobs"] / f"{job.job_id}.json", job)
            self._jobs[job.job_id] = copy(job)
            return copy(job)

    def get_job(self, job_id: str) -> pb.Job | None:
        with self._lock:
            j = self._jobs.get(job_id)
            return copy(j) if j is not None else None

    def jobs(self) -> list[pb.Job]:
        with self._lock:
            return [copy(j) for j in sorted(self._jobs.values(), key=lambda j: j.created)]

    def delete_job(self, job_id: str) -> None:
        """Forget a job: its record and its control-plane logbook (never its artifacts)."""
        with self._lock:
            self._jobs.pop(job_id, None)
            (self._dirs["jobs"] / f"{job_id}.json").unlink(missing_ok=True)
            (self._dirs["logbooks"] / f"{job_id}.jsonl").unlink(missing_ok=True)

    def active_job_ids(self) -> list[str]:
        with self._lock:
            return [j.job_id for j in self._jobs.values() if j.state not in TERMINAL]

    def logbook(self, job_id: str) -> Logbook:
        """Where the control plane records a job's events (submitted, scaled, ...). Kept
        apart from the run directory, which belongs to the stage that writes it."""
        return _JobLogbook(self._dirs["logbooks"], job_id)

    # ------------------------------------------------------------------ serving apps

    def put_app(self, app: pb.ServeApp) -> pb.ServeApp:
        with self._lock:
            self._write(self._dirs["serve"] / f"{app.name}.json", app)
            self._apps[app.name] = copy(app)
            return copy(app)

    def get_app(self, name: str) -> pb.ServeApp | None:
        with self._lock:
            a = self._apps.get(name)
            return copy(a) if a is not None else None

    def apps(self) -> list[pb.ServeApp]:
        with self._lock:
            return [copy(a) for a in sorted(self._apps.values(), key=lambda a: a.name)]

    def delete_app(self, name: str) -> None:
        with self._lock:
            self._apps.pop(name, None)
            (self._dirs["serve"] / f"{name}.json").unlink(missing_ok=True)


class _JobLogbook(Logbook):
    """A Logbook whose file is ``logbooks/<job_id>.jsonl`` instead of ``logbook.jsonl``."""

    def __init__(self, directory: Path, job_id: str):
        super().__init__(directory)
        self.path = directory / f"{job_id}.jsonl"


def copy(msg: M) -> M:
    out = type(msg)()
    out.CopyFrom(msg)
    return out


def read_jsonl_from(path: Path, offset: int) -> tuple[list[str], int]:
    """Complete lines appended to ``path`` since byte ``offset``, and the new offset.
    A partial last line (a writer mid-append) is left for the next call."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n")
    if end < 0:
        return [], offset
    lines = [ln.decode("utf-8", "replace") for ln in data[:end].split(b"\n") if ln.strip()]
    return lines, offset + end + 1


def parse_json(line: str) -> dict | None:
    try:
        v = json.loads(line)
    except json.JSONDecodeError:
        return None
    return v if isinstance(v, dict) else None
