"""The run logbook: every event appended as one JSON line to ``RUN_DIR/logbook.jsonl``.

Writers call ``Logbook(run_dir).event("checkpoint_saved", step=100, path=...)``; the
chronicle (Markdown + loss plot) is rendered from the same file. Appends are single
``write`` calls on an ``O_APPEND`` file, so several processes may log to one run.

OPT-175B's team kept their logbook by hand (35+ manual restarts, rollbacks, LR and
clipping changes, skipped data). Here the training stack writes it, and
``render_markdown`` turns it into a chronicle in the same spirit: dated entries, what
happened, what was done, the loss at the time.

The schema is the record types below: one frozen dataclass per event kind, its fields
exactly what the writers (the training loop, the checkpointer, the gang, the guard, the
chaos drills, the control plane, eval) write. The writer is strict: ``Logbook.event``
raises ``LogbookSchemaError`` on an unknown kind, an unknown field or a missing required
one, so a writer that drifts from the schema fails its own tests, not the reader. The
reader is tolerant: logbooks written by older code (unknown kinds, other fields) still
render, unknown kinds as their raw JSON. logbook/README.md's table is generated from the
records (``schema_markdown``) and a test keeps the two equal.

Helpers for writers: ``log_start`` (config, versions, hardware), ``log_verdict`` (the
divergence guard's decision, written as the loop writes it: divergence, then rollback or
divergence_give_up), ``log_resume`` (records a version_mismatch when a checkpoint was
written under other library versions).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Iterator

LOGBOOK = "logbook.jsonl"
METRICS = "metrics.jsonl"


class LogbookSchemaError(TypeError):
    """A writer logged an event the schema does not have (unknown kind or field, or a
    required field missing): fix the writer or add the field to its record type."""


# --------------------------------------------------------------------------------------
# The records: one per event kind. Fields without a default are required. Every line
# also has `time` (Unix seconds) and `event` (the kind).
# --------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Record:
    """Base of every event record; ``KIND`` is the ``event`` value in the file."""
    KIND: ClassVar[str] = ""
    WHO: ClassVar[str] = ""  # which code writes it (for the README table)


@dataclass(frozen=True, kw_only=True)
class _RunStart(Record):
    """A gang (re)starts. The loop writes one record shape for start, resume and
    restart; ``log_start`` writes config, versions and hardware."""
    step: int | None = None            # the step training continues after (0: from scratch)
    attempt: int | None = None         # Ray Train's attempt (0: the first)
    checkpoint: str | None = None      # the checkpoint restored, if any
    config: dict | None = None         # the full training config
    model: dict | None = None          # the model shape
    params: int | None = None
    world_size: int | None = None
    dp: int | None = None
    tp: int | None = None
    precision: str | None = None
    global_rows: int | None = None
    micro_batch: int | None = None
    grad_accum: int | None = None
    seq_len: int | None = None
    versions: dict | None = None
    hardware: dict | None = None


@dataclass(frozen=True, kw_only=True)
class Start(_RunStart):
    """a run begins"""
    KIND = "start"
    WHO = "train loop (rank 0), log_start"


@dataclass(frozen=True, kw_only=True)
class Resume(_RunStart):
    """a new invocation continues from a checkpoint"""
    KIND = "resume"
    WHO = "train loop (rank 0)"


@dataclass(frozen=True, kw_only=True)
class Restart(_RunStart):
    """Ray Train restarted the gang after a failure"""
    KIND = "restart"
    WHO = "train loop (rank 0)"


@dataclass(frozen=True, kw_only=True)
class Interrupted(Record):
    """the driver of a run stopped before the run finished (Ctrl-C, killed, its job gone)"""
    KIND = "interrupted"
    WHO = "train command (driver)"
    step: int | None                   # the last committed checkpoint's step
    reason: str
    resume: str                        # the command that resumes the run


@dataclass(frozen=True, kw_only=True)
class Finish(Record):
    """the run ended"""
    KIND = "finish"
    WHO = "train loop (rank 0)"
    step: int
    tokens: int | None = None
    loss: float | None = None


@dataclass(frozen=True, kw_only=True)
class Failure(Record):
    """the run stopped for a reason restarts cannot fix (the guard gave up)"""
    KIND = "failure"
    WHO = "actors/train.py (driver)"
    reason: str
    report: str | None = None


@dataclass(frozen=True, kw_only=True)
class FailureBudgetExceeded(Record):
    """the gang failed more often than --max-failures allows"""
    KIND = "failure_budget_exceeded"
    WHO = "actors/train.py (driver)"
    max_failures: int
    reason: str
    seconds: float | None = None


@dataclass(frozen=True, kw_only=True)
class WorkerLost(Record):
    """workers died or their collectives timed out"""
    KIND = "worker_lost"
    WHO = "actors/train.py (Ray Train controller callback)"
    ranks: list
    errors: dict                       # rank -> repr of the worker's exception


@dataclass(frozen=True, kw_only=True)
class CheckpointSaved(Record):
    """a checkpoint was committed (atomic rename)"""
    KIND = "checkpoint_saved"
    WHO = "checkpointer"
    step: int
    path: str | None = None
    bytes: int | None = None
    seconds: float | None = None
    milestone: bool | None = None


@dataclass(frozen=True, kw_only=True)
class CheckpointCorrupt(Record):
    """a checkpoint failed its checks and was skipped"""
    KIND = "checkpoint_corrupt"
    WHO = "checkpointer"
    step: int
    reason: str
    path: str | None = None


@dataclass(frozen=True, kw_only=True)
class CheckpointPartialRemoved(Record):
    """a half-written checkpoint (killed during save) was removed"""
    KIND = "checkpoint_partial_removed"
    WHO = "checkpointer"
    path: str


@dataclass(frozen=True, kw_only=True)
class Rollback(Record):
    """rolled back to an earlier checkpoint: by the guard (with its intervention) or on
    request (--resume-from, ctl rollback: newer checkpoints moved aside)"""
    KIND = "rollback"
    WHO = "train loop (guard), checkpointer (--resume-from), log_verdict"
    step: int                          # the step rolled back from
    to_step: int                       # the checkpoint training continues from
    lr_factor: float | None = None     # cumulative LR multiplier from now on
    clip: float | None = None          # gradient clipping from now on
    skip_steps: list | None = None     # steps whose batches will be skipped
    requested: bool | None = None      # True: asked for with --resume-from
    moved_aside: list | None = None    # newer checkpoint steps moved out of the way
    path: str | None = None


@dataclass(frozen=True, kw_only=True)
class Resize(Record):
    """resumed on another number of workers or tensor-parallel degree"""
    KIND = "resize"
    WHO = "train loop (restore)"
    step: int
    from_world: int | None
    to_world: int
    from_tp: int | None = None
    to_tp: int | None = None


@dataclass(frozen=True, kw_only=True)
class Divergence(Record):
    """the divergence guard fired (the fields of guard.Verdict)"""
    KIND = "divergence"
    WHO = "train loop (guard verdict), log_verdict"
    reason: str                        # nan | spike | loss_scale_floor
    step: int
    onset_step: int | None = None
    loss: float | None = None
    grad_norm: float | None = None
    loss_scale: float | None = None
    running_mean: float | None = None
    attempt: int | None = None
    max_rollbacks: int | None = None
    lr_factor: float | None = None
    lr_scale: float | None = None
    new_clip: float | None = None
    skip_steps: list | None = None
    skip_batches: list | None = None
    rollback_to: int | None = None
    invalidate_checkpoints: list | None = None
    give_up: bool | None = None
    report: str | None = None
    message: str | None = None


@dataclass(frozen=True, kw_only=True)
class DivergenceGiveUp(Record):
    """the guard gave up; the run stops"""
    KIND = "divergence_give_up"
    WHO = "train loop, log_verdict"
    report: str


@dataclass(frozen=True, kw_only=True)
class DataSkipped(Record):
    """the batch of a step was skipped (the guard's data skip)"""
    KIND = "data_skipped"
    WHO = "train loop"
    step: int
    start: int                         # first sample position of the data stream skipped
    end: int


@dataclass(frozen=True, kw_only=True)
class StepSkipped(Record):
    """an update was skipped (fp16 overflow or non-finite gradients)"""
    KIND = "step_skipped"
    WHO = "train loop"
    step: int
    loss: float | None = None
    grad_norm: float | None = None


@dataclass(frozen=True, kw_only=True)
class VersionMismatch(Record):
    """resumed under other library versions than the checkpoint recorded"""
    KIND = "version_mismatch"
    WHO = "log_resume (train loop)"
    diff: dict                         # name -> {recorded, current}
    step: int | None = None
    checkpoint: str | None = None


@dataclass(frozen=True, kw_only=True)
class Chaos(Record):
    """a drill fault was injected on purpose (--chaos)"""
    KIND = "chaos"
    WHO = "train/chaos.py"
    kind: str
    step: int
    rank: int | None = None
    pid: int | None = None
    file: str | None = None


@dataclass(frozen=True, kw_only=True)
class Eval(Record):
    """a checkpoint was evaluated (lm-eval tasks); results in lm-eval's layout"""
    KIND = "eval"
    WHO = "eval command"
    checkpoint: str
    step: int | None
    tasks: list
    num_fewshot: int | None
    limit: float | int | None
    results: dict                      # task -> {metric: value}


@dataclass(frozen=True, kw_only=True)
class _Control(Record):
    """Events of the control plane, in STATE_DIR/logbooks/<job_id>.jsonl."""
    job_id: str
    source: str = "control"


@dataclass(frozen=True, kw_only=True)
class JobSubmitted(_Control):
    """a control job was accepted"""
    KIND = "job_submitted"
    WHO = "control plane"
    job_kind: str
    name: str
    stages: list


@dataclass(frozen=True, kw_only=True)
class StageSubmitted(_Control):
    """a stage was submitted as a Ray job"""
    KIND = "stage_submitted"
    WHO = "control plane"
    stage: str
    index: int
    ray_submission_id: str
    entrypoint: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class StageSubmitFailed(_Control):
    """Ray refused a stage's submission for longer than the submit timeout"""
    KIND = "stage_submit_failed"
    WHO = "control plane"
    stage: str
    error: str


@dataclass(frozen=True, kw_only=True)
class StageState(_Control):
    """a stage's Ray job changed state"""
    KIND = "stage_state"
    WHO = "control plane"
    stage: str
    state: str
    ray_submission_id: str
    message: str


@dataclass(frozen=True, kw_only=True)
class JobFinished(_Control):
    """a control job reached a final state"""
    KIND = "job_finished"
    WHO = "control plane"
    state: str
    message: str


@dataclass(frozen=True, kw_only=True)
class JobCancelled(_Control):
    """a user cancelled the job"""
    KIND = "job_cancelled"
    WHO = "control plane"


@dataclass(frozen=True, kw_only=True)
class _JobRestarted(_Control):
    before: str
    after: str
    ray_submission_id: str             # the Ray job that was stopped


@dataclass(frozen=True, kw_only=True)
class JobScaled(_JobRestarted):
    """a training job was stopped and resubmitted with another worker range"""
    KIND = "job_scaled"
    WHO = "control plane"


@dataclass(frozen=True, kw_only=True)
class JobRolledBack(_JobRestarted):
    """a training job was stopped and resubmitted with --resume-from STEP"""
    KIND = "job_rolled_back"
    WHO = "control plane"


@dataclass(frozen=True, kw_only=True)
class ServeStopped(_Control):
    """a serving app's job was stopped (update or remove)"""
    KIND = "serve_stopped"
    WHO = "control plane"
    reason: str


def _record_types() -> dict[str, type[Record]]:
    out: dict[str, type[Record]] = {}
    todo = list(Record.__subclasses__())
    while todo:
        cls = todo.pop(0)
        todo += cls.__subclasses__()
        if cls.__dict__.get("KIND"):
            out[cls.KIND] = cls
    return out


RECORDS: dict[str, type[Record]] = _record_types()


def _fields(cls: type[Record]) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls)]


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


# kind -> (what it means, the fields; optional ones in [brackets]): derived from RECORDS.
EVENTS: dict[str, tuple[str, tuple[str, ...]]] = {
    kind: ((cls.__doc__ or "").strip(),
           tuple(f.name if _required(f) else f"[{f.name}]" for f in _fields(cls)))
    for kind, cls in RECORDS.items()}


def record(kind: str, /, **fields: Any) -> Record:
    """The typed record of one event; raises ``LogbookSchemaError`` on an unknown kind,
    an unknown field or a missing required field."""
    cls = RECORDS.get(kind)
    if cls is None:
        raise LogbookSchemaError(f"unknown logbook event kind {kind!r}; the kinds are "
                                 f"{', '.join(sorted(RECORDS))} (opt_ray/logbook.py)")
    names = {f.name for f in _fields(cls)}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise LogbookSchemaError(f"logbook event {kind!r} has no field(s) {', '.join(unknown)}; "
                                 f"its fields are {', '.join(sorted(names))} "
                                 f"(add them to {cls.__name__} in opt_ray/logbook.py)")
    missing = [f.name for f in _fields(cls) if _required(f) and f.name not in fields]
    if missing:
        raise LogbookSchemaError(f"logbook event {kind!r} needs field(s) {', '.join(missing)}")
    return cls(**fields)


def schema_markdown() -> str:
    """The README's event table, generated from the record types."""
    lines = ["| event | when | written by | fields |", "|---|---|---|---|"]
    for kind, cls in RECORDS.items():
        flds = ", ".join(f.name if _required(f) else f"[{f.name}]" for f in _fields(cls))
        lines.append(f"| `{kind}` | {(cls.__doc__ or '').strip()} | {cls.WHO} | {flds} |")
    return "\n".join(lines) + "\n"


def _now() -> float:
    return time.time()


class Logbook:
    """Append-only JSON-lines event log of one run directory."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOGBOOK

    def event(self, kind: str, /, **fields: Any) -> dict[str, Any]:
        """Append one event; ``kind`` is positional-only so ``kind=`` may be a field.
        Checked against its record type first (``LogbookSchemaError``); only the fields
        given are written, in the record's order."""
        rec_type = type(record(kind, **fields))
        order = [f.name for f in _fields(rec_type) if f.name in fields]
        rec = {"time": _now(), "event": kind, **{k: fields[k] for k in order}}
        line = json.dumps(_json_clean(rec), default=str, sort_keys=False) + "\n"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
        return rec

    def events(self) -> Iterator[dict[str, Any]]:
        """Every event in the order written; a torn last line (killed writer) is skipped."""
        if not self.path.exists():
            return
        with open(self.path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a torn last line from a killed writer


def _json_clean(obj: Any) -> Any:
    """NaN/Inf are not JSON; write them as strings so every line parses everywhere."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    return obj


def validate_event(rec: dict[str, Any]) -> list[str]:
    """Problems of one event read back from a logbook against its record type; [] if
    fine. (The writer raises on the same problems; this is for files from elsewhere.)"""
    fields = {k: v for k, v in rec.items() if k not in ("time", "event")}
    try:
        record(str(rec.get("event")), **fields)
    except LogbookSchemaError as e:
        return [str(e)]
    return []


# --------------------------------------------------------------------------------------
# Versions, hardware, and the writers' helpers
# --------------------------------------------------------------------------------------

_PACKAGES = ("torch", "ray", "fairscale", "numpy", "tokenizers", "pyarrow", "safetensors")


def versions() -> dict[str, str | None]:
    """Versions that change training numerics or checkpoint formats (None: not installed).

    Read from package metadata, so it does not import torch; the CUDA/cuDNN versions are
    added only when torch is already imported (the training worker)."""
    from opt_ray import __version__
    out: dict[str, str | None] = {"opt_ray": __version__, "python": platform.python_version()}
    for pkg in _PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    torch = sys.modules.get("torch")
    if torch is not None:
        out["cuda"] = getattr(torch.version, "cuda", None)
        try:
            out["cudnn"] = str(torch.backends.cudnn.version()) if torch.cuda.is_available() else None
        except Exception:  # cudnn probing must never break logging
            out["cudnn"] = None
    return out


def hardware() -> dict[str, Any]:
    """Where this process runs: host, CPU count, memory, accelerators (best effort)."""
    hw: dict[str, Any] = {"host": platform.node(), "platform": platform.platform(),
                          "machine": platform.machine(), "cpus": os.cpu_count()}
    try:
        hw["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        hw["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return hw


def version_diff(recorded: dict[str, Any], current: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{name: {"recorded": old, "current": new}}`` for every name whose version differs
    (a name present on one side only counts, with None on the other)."""
    out = {}
    for name in sorted(set(recorded) | set(current)):
        old, new = recorded.get(name), current.get(name)
        if old != new:
            out[name] = {"recorded": old, "current": new}
    return out


def log_start(logbook: Logbook, config: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """The first event of a run: full config, library versions, hardware."""
    return logbook.event("start", config=config, versions=versions(), hardware=hardware(), **fields)


def log_resume(logbook: Logbook, recorded_versions: dict[str, Any] | None,
               **fields: Any) -> dict[str, dict[str, Any]]:
    """Call when resuming from a checkpoint that recorded ``versions()`` at save time.

    Logs a ``version_mismatch`` event with the difference when there is one (OPT-175B
    learned the hard way that a library upgrade can change training dynamics) and
    returns the difference ({} when identical or when nothing was recorded). Only the
    names the checkpoint recorded are compared: a writer that recorded fewer libraries
    than ``versions()`` lists is not a mismatch."""
    if not recorded_versions:
        return {}
    current = versions()
    diff = version_diff(recorded_versions, {k: current.get(k) for k in recorded_versions})
    if diff:
        logbook.event("version_mismatch", diff=diff, **fields)
    return diff


def log_verdict(logbook: Logbook, verdict: Any, *, clip: float | None = None) -> None:
    """Log a divergence guard ``Verdict`` as the training loop does: ``divergence`` with
    the verdict, then ``divergence_give_up`` (the guard gave up) or ``rollback`` with the
    intervention (cumulative LR factor, clipping from now on, the steps whose batches
    will be skipped). ``clip`` is the clipping in force before the verdict."""
    v = verdict.to_dict() if hasattr(verdict, "to_dict") else dict(verdict)
    logbook.event("divergence", **v)
    if v.get("give_up") or v.get("rollback_to") is None:
        logbook.event("divergence_give_up", report=v.get("report") or v.get("message") or "")
        return
    new_clip = v.get("new_clip")
    logbook.event("rollback", step=v["step"], to_step=v["rollback_to"], lr_factor=v.get("lr_scale"),
                  clip=new_clip if new_clip is not None else clip, skip_steps=v.get("skip_steps", []))


# --------------------------------------------------------------------------------------
# Reading: metrics, the Markdown chronicle
# --------------------------------------------------------------------------------------

def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of ``RUN_DIR/metrics.jsonl`` in file order (a torn last line is skipped).
    After a rollback or restart, steps repeat: each row is one step as it was run."""
    path = Path(run_dir) / METRICS
    rows: list[dict[str, Any]] = []
    if not path.exists():
        return rows
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)  # Python's json reads NaN/Infinity too
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "step" in row:
                rows.append(row)
    return rows


def _num(x: Any) -> float | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f


def _fmt(x: Any, digits: int = 4) -> str:
    f = _num(x)
    if f is None:
        return "?" if x is None else str(x)
    if not math.isfinite(f):
        return str(f)
    return f"{f:.{digits}g}"


def _loss_before(rows: list[dict[str, Any]], t: float | None, step: Any) -> Any:
    """The loss at the time of an event: the last row logged before it when rows carry a
    ``time``; otherwise the first row of the event's step (steps repeat after a rollback,
    and the first run of a step is the one the event is about), else the last row before."""
    if t is not None and rows and _num(rows[0].get("time")) is not None:
        best = None
        for r in rows:
            if _num(r.get("time")) is not None and r["time"] <= t:
                best = r
        return None if best is None else best.get("loss")
    if step is None or _num(step) is None:
        return None
    exact = next((r for r in rows if r.get("step") == step), None)
    if exact is not None:
        return exact.get("loss")
    before = [r for r in rows if _num(r.get("step")) is not None and r["step"] < step]
    return before[-1].get("loss") if before else None


# Errors a rank reports because *another* rank failed: symptoms, listed after the cause.
_SYMPTOMS = ("Connection closed by peer", "Connection reset by peer", "Timed out waiting")


def _short_error(text: str, limit: int = 110) -> str:
    """``RuntimeError('[/path/pair.cc:553] Connection closed ...')`` -> the type and the
    first sentence of the message, without source paths or multi-line dumps."""
    text = str(text)
    # The gang truncates reprs, so the closing parenthesis may be gone.
    m = re.match(r"(\w+)\((.*)", text, re.S)
    kind, msg = (m.group(1), m.group(2).rstrip(")").strip("'\"")) if m else ("", text)
    msg = re.sub(r"^\[[^\]]*\]\s*", "", msg)          # gloo's "[file.cc:123] " prefix
    msg = msg.replace("\\n", "\n").split("\n")[0].split(". ")[0].strip().rstrip(".")
    if len(msg) > limit:
        msg = msg[:limit] + "..."
    return f"{kind}: {msg}" if kind and msg else (kind or msg)


def _describe_failures(errors: dict[str, Any]) -> str:
    """One sentence for a gang failure: the rank(s) that failed first, then the ranks that
    only saw their peer go (a broken or timed-out collective)."""
    cause, symptom = [], []
    for rank, err in sorted(errors.items(), key=lambda kv: str(kv[0])):
        (symptom if any(x in str(err) for x in _SYMPTOMS) else cause).append((rank, err))
    parts = [f"rank {r} failed ({_short_error(e)})" for r, e in cause]
    parts += [f"rank {r} {'saw its collective time out' if 'Timed out' in str(e) else 'lost its peer'} "
              f"({_short_error(e)})" for r, e in symptom]
    text = "; ".join(parts)
    return "Worker failure: " + text + "."


def _accuracy(results: Any) -> list[tuple[str, str, Any]]:
    """(task, metric, value) of each task's headline accuracy in lm-eval's result layout
    (``{"piqa": {"acc,none": 0.6, "acc_stderr,none": ...}}``): acc, else acc_norm, else
    the first numeric metric that is not a standard error."""
    out = []
    for task, metrics in (results or {}).items() if isinstance(results, dict) else ():
        if not isinstance(metrics, dict):
            continue
        nums = {k: v for k, v in metrics.items() if _num(v) is not None and "stderr" not in k}
        pick = next((k for pref in ("acc,", "acc_norm,", "acc", "acc_norm") for k in nums
                     if k == pref.rstrip(",") or k.startswith(pref)), None)
        pick = pick or next(iter(nums), None)
        if pick is not None:
            out.append((task, pick.split(",")[0], nums[pick]))
    return out


def _describe_start(e: dict[str, Any]) -> str:
    g = e.get
    k = g("event")
    if k == "start" and not g("checkpoint") and not g("attempt"):
        cfg = g("config") or {}
        bits = [f"{key} {cfg[key]}" for key in ("preset", "precision", "steps", "workers", "tp")
                if isinstance(cfg, dict) and cfg.get(key) is not None]
        if g("world_size") is not None:
            bits.append(f"world size {g('world_size')}")
        return "Run started" + (f" ({', '.join(map(str, bits))})" if bits else "") + "."
    att = f" (attempt {g('attempt')})" if g("attempt") else ""
    ws = f" on {g('world_size')} worker(s)" if g("world_size") is not None else ""
    what = "Gang restarted" if k == "restart" else "Run resumed"
    ck = f" from the checkpoint of step {g('step')}" if g("checkpoint") else " from scratch"
    return f"{what}{att}{ck}{ws}; training continues at step {(g('step') or 0) + 1}."


def _describe_divergence(e: dict[str, Any]) -> str:
    g = e.get
    what = {"nan": "Non-finite loss or gradient", "spike": "Loss spike",
            "loss_scale_floor": "fp16 loss scale at its floor"}.get(g("reason"), str(g("reason")))
    base = f" against a running mean of {_fmt(g('running_mean'))}" if g("running_mean") is not None else ""
    onset = (f"; the loss had been rising since step {g('onset_step')}"
             if g("onset_step") is not None and g("onset_step") != g("step") else "")
    att = (f" (intervention {g('attempt')} of at most {g('max_rollbacks')})"
           if g("attempt") is not None and g("max_rollbacks") is not None and not g("give_up") else "")
    loss = g("loss")
    if loss is None and g("reason") == "nan":
        loss = "non-finite"  # the guard keeps NaN out of JSON as None
    s = f"{what} at step {g('step')}: loss {_fmt(loss)}{base}{onset}{att}."
    if g("give_up"):
        s += " The guard gave up: retries exhausted or no healthy checkpoint left."
    return s


def _describe_rollback(e: dict[str, Any]) -> str:
    g = e.get
    if g("requested"):
        aside = g("moved_aside") or []
        moved = (f"; newer checkpoints {', '.join(map(str, aside))} moved aside" if aside else "")
        return f"Rolled back on request to the checkpoint of step {g('to_step')}{moved}."
    done = []
    if g("lr_factor") is not None:
        done.append(f"LR now x{_fmt(g('lr_factor'))} of the schedule")
    if g("clip") is not None:
        done.append(f"gradient clipping {_fmt(g('clip'))}")
    if g("skip_steps"):
        done.append(f"the batches of step(s) {', '.join(map(str, g('skip_steps')))} will be skipped")
    then = f"; {', '.join(done)}" if done else ""
    return f"Rolled back from step {g('step')} to the checkpoint of step {g('to_step')}{then}."


def _describe_eval(e: dict[str, Any]) -> str:
    g = e.get
    shots = f"{g('num_fewshot')}-shot" if g("num_fewshot") is not None else "default shots"
    limit = f", limit {g('limit')}" if g("limit") is not None else ""
    which = f"step {g('step')}" if g("step") is not None else Path(str(g("checkpoint"))).name
    acc = _accuracy(g("results"))
    scores = ("; " + ", ".join(f"{t} {m} {_fmt(v, 3)}" for t, m, v in acc)) if acc else ""
    tasks = ", ".join(map(str, g("tasks") or []))
    return f"Evaluated the checkpoint of {which} on {tasks} ({shots}{limit}){scores}."


def _describe_worker_lost(e: dict[str, Any]) -> str:
    if isinstance(e.get("errors"), dict) and e["errors"]:
        return _describe_failures(e["errors"])
    ranks = e.get("ranks") or []
    return f"Rank(s) {', '.join(map(str, ranks))} lost." if ranks else "A worker was lost."


def _describe_finish(e: dict[str, Any]) -> str:
    g = e.get
    at = f" at step {g('step')}" if g("step") is not None else ""
    loss = f", final loss {_fmt(g('loss'))}" if g("loss") is not None else ""
    return f"Run completed{at}{loss}."


def _describe_version_mismatch(e: dict[str, Any]) -> str:
    diff = e.get("diff") or {}
    parts = [f"{n} {d.get('recorded')} -> {d.get('current')}" for n, d in diff.items()
             if isinstance(d, dict)]
    return "Resumed under other library versions than the checkpoint recorded: " + "; ".join(parts) + "."


def _describe_resize(e: dict[str, Any]) -> str:
    g = e.get
    tp = (f" (tensor parallel {g('from_tp')} -> {g('to_tp')})"
          if g("from_tp") is not None and g("from_tp") != g("to_tp") else "")
    return f"Gang resized from {g('from_world')} to {g('to_world')} worker(s){tp}."


# kind -> sentence; one entry per record type (a test checks that every kind has one).
_DESCRIBE: dict[str, Any] = {
    "start": _describe_start, "resume": _describe_start, "restart": _describe_start,
    "interrupted": lambda e: (f"Run interrupted ({e.get('reason')}); the last committed checkpoint "
                              f"is step {e.get('step')}. Resume with `{e.get('resume')}`."),
    "finish": _describe_finish,
    "failure": lambda e: f"Run failed: {e.get('reason')}.",
    "failure_budget_exceeded": lambda e: (f"Failure budget exceeded (--max-failures "
                                          f"{e.get('max_failures')}): {e.get('reason')}."),
    "worker_lost": _describe_worker_lost,
    "checkpoint_saved": lambda e: f"Checkpoint saved at step {e.get('step')}.",
    "checkpoint_corrupt": lambda e: (f"Checkpoint of step {e.get('step')} failed its checks "
                                     f"({e.get('reason')}); using an earlier one."),
    "checkpoint_partial_removed": lambda e: (f"Removed a half-written checkpoint "
                                             f"({Path(str(e.get('path'))).name})."),
    "rollback": _describe_rollback,
    "resize": _describe_resize,
    "divergence": _describe_divergence,
    "divergence_give_up": lambda e: "The divergence guard gave up; the run stops.",
    "data_skipped": lambda e: (f"Skipped the batch of step {e.get('step')} (samples {e.get('start')}.."
                               f"{e.get('end')} of the data stream); it is not trained on in this epoch."),
    "step_skipped": lambda e: (f"Update of step {e.get('step')} skipped: loss {_fmt(e.get('loss'))}, "
                               f"grad norm {_fmt(e.get('grad_norm'))}."),
    "version_mismatch": _describe_version_mismatch,
    "chaos": lambda e: (f"Drill: injected `{e.get('kind')}` at step {e.get('step')}"
                        + (f" on rank {e.get('rank')}" if e.get("rank") is not None else "") + "."),
    "eval": _describe_eval,
    "job_submitted": lambda e: (f"Control job {e.get('job_id')} submitted ({e.get('job_kind')}: "
                                f"{', '.join(map(str, e.get('stages') or []))})."),
    "stage_submitted": lambda e: (f"Stage {e.get('stage')} submitted as Ray job "
                                  f"{e.get('ray_submission_id')} ({e.get('reason')})."),
    "stage_submit_failed": lambda e: f"Ray refused stage {e.get('stage')}: {e.get('error')}.",
    "stage_state": lambda e: (f"Stage {e.get('stage')} ({e.get('ray_submission_id')}) is "
                              f"{e.get('state')}" + (f": {e.get('message')}" if e.get("message") else "")
                              + "."),
    "job_finished": lambda e: f"Control job {e.get('job_id')} {e.get('state')}: {e.get('message')}.",
    "job_cancelled": lambda e: f"Control job {e.get('job_id')} cancelled by a user.",
    "job_scaled": lambda e: f"Training rescaled from {e.get('before')} to {e.get('after')} worker(s).",
    "job_rolled_back": lambda e: f"Training rolled back: {e.get('before')} -> {e.get('after')}.",
    "serve_stopped": lambda e: f"Serving job stopped: {e.get('reason')}.",
}


def describe(e: dict[str, Any]) -> str:
    """One event as a sentence: what happened and what was done. A kind this code does
    not know (an older or newer logbook) is shown as its raw fields."""
    fn = _DESCRIBE.get(e.get("event"))
    if fn is not None:
        try:
            return fn(e)
        except (TypeError, ValueError, AttributeError):
            pass  # a record of another shape (an older writer): shown raw below
    rest = {kk: vv for kk, vv in e.items() if kk not in ("time", "event")}
    return f"{e.get('event')}: {json.dumps(rest, default=str)}"


def _utc(t: Any) -> _dt.datetime | None:
    f = _num(t)
    return None if f is None else _dt.datetime.fromtimestamp(f, _dt.timezone.utc)


def _entries(events: list[dict[str, Any]]) -> list[tuple[dict[str, Any], str, bool]]:
    """(first event, text) per chronicle entry; runs of routine checkpoint saves are
    folded into one entry so the interventions stand out."""
    out: list[tuple[dict[str, Any], str, bool]] = []
    i = 0
    while i < len(events):
        e = events[i]
        if e.get("event") == "checkpoint_saved":
            j = i
            while j + 1 < len(events) and events[j + 1].get("event") == "checkpoint_saved":
                j += 1
            if j > i:
                steps = ", ".join(str(x.get("step")) for x in events[i:j + 1])
                out.append((e, f"Checkpoints saved at steps {steps}.", True))
                i = j + 1
                continue
        if e.get("event") == "chaos":
            # NaN and spike drills fire on every rank: one entry for all of them.
            j = i
            while (j + 1 < len(events) and events[j + 1].get("event") == "chaos"
                   and events[j + 1].get("kind") == e.get("kind")
                   and events[j + 1].get("step") == e.get("step")):
                j += 1
            if j > i:
                ranks = ", ".join(sorted(str(x.get("rank")) for x in events[i:j + 1]))
                out.append((e, f"Drill: injected `{e.get('kind')}` at step {e.get('step')} on ranks {ranks}.",
                            False))
                i = j + 1
                continue
        out.append((e, describe(e), False))
        i += 1
    return out


def format_entry(e: dict[str, Any], text: str, loss: Any = None, *, show_step: bool = True) -> str:
    """One chronicle line: time, step, text, loss at the time."""
    t = _utc(e.get("time"))
    when = t.strftime("%H:%M:%S") if t else "--:--:--"
    step = e.get("step")
    at = (f" step {step}" if show_step and step is not None and not isinstance(step, list)
          else "")
    loss_s = f" *(loss {_fmt(loss)})*" if loss is not None and e.get("event") not in ("finish",) else ""
    return f"- **{when}**{at} — {text}{loss_s}"


def render_markdown(run_dir: str | os.PathLike, *, plot: str | None = None,
                    name: str | None = None) -> str:
    """The run's chronicle as Markdown, in the spirit of OPT's published logbooks.

    A summary (config, versions, hardware, counts), then dated entries in the order the
    events were written: what happened, what was done, and the loss last logged before
    it. ``plot`` is a relative path of a loss-curve PNG to embed; ``name`` titles it
    (default: the directory's name; a bucket run's URL for its staging copy)."""
    run_dir = Path(run_dir)
    events = list(Logbook(run_dir).events())
    rows = read_metrics(run_dir)
    lines = [f"# Logbook: `{name or run_dir.name}`", ""]
    if not events:
        lines.append(f"No events recorded yet ({run_dir / LOGBOOK} is missing or empty).")
        return "\n".join(lines) + "\n"

    kinds = [e.get("event") for e in events]
    starts = [e for e in events if e.get("event") == "start"]
    finish = next((e for e in reversed(events) if e.get("event") == "finish"), None)
    t0, t1 = _utc(events[0].get("time")), _utc(events[-1].get("time"))
    finite = [r for r in rows if _num(r.get("loss")) is not None and math.isfinite(float(r["loss"]))]
    lines.append("## Summary")
    lines.append("")
    if t0 and t1:
        lines.append(f"- **When**: {t0:%Y-%m-%d %H:%M:%S} to {t1:%H:%M:%S} UTC "
                     f"({(t1 - t0).total_seconds():.0f} s)")
    if finish:
        lines.append(f"- **Outcome**: {describe(finish)}")
    else:
        # The gang and the guard record why a run stopped even when no finish follows.
        stop = next((e for e in reversed(events) if e.get("event") in
                     ("failure", "failure_budget_exceeded", "divergence_give_up", "interrupted")), None)
        if stop is not None and stop.get("event") == "interrupted":
            lines.append(f"- **Outcome**: interrupted. {describe(stop)}")
        elif stop is not None:
            lines.append(f"- **Outcome**: failed. {describe(stop)}")
        else:
            lines.append("- **Outcome**: no `finish` event yet (still running, or the driver died)")
    if finite:
        lines.append(f"- **Loss**: {_fmt(finite[0]['loss'])} at step {finite[0]['step']} -> "
                     f"{_fmt(finite[-1]['loss'])} at step {finite[-1]['step']}")
    evals = [e for e in events if e.get("event") == "eval"]
    if evals:
        # The accuracy curve: one point per evaluated checkpoint, in order of step.
        curve = []
        for e in sorted(evals, key=lambda e: (_num(e.get("step")) is None, _num(e.get("step")) or 0)):
            acc = _accuracy(e.get("results"))
            if acc:
                curve.append(f"step {e.get('step')}: " + ", ".join(f"{t} {m} {_fmt(v, 3)}"
                                                                   for t, m, v in acc))
        if curve:
            lines.append("- **Accuracy**: " + "; ".join(curve))
    counted = ("restart", "worker_lost", "divergence", "rollback", "data_skipped",
               "checkpoint_saved", "checkpoint_corrupt", "chaos", "eval")
    counts = {k: kinds.count(k) for k in counted}
    lines.append("- **Counts**: " + ", ".join(f"{k.replace('_', ' ')} {n}" for k, n in counts.items()))
    if starts:
        s0 = starts[0]
        v = s0.get("versions") or {}
        if v:
            lines.append("- **Versions**: " + ", ".join(f"{k} {val}" for k, val in v.items() if val))
        hw = s0.get("hardware") or {}
        if hw:
            lines.append("- **Hardware**: " + ", ".join(f"{k} {val}" for k, val in hw.items()
                                                         if k not in ("platform",)))
    lines.append("")
    if plot:
        lines += [f"![loss curve]({plot})", ""]
    if starts and isinstance(starts[0].get("config"), dict):
        lines += ["<details><summary>Full configuration at start</summary>", "", "```json",
                  json.dumps(starts[0]["config"], indent=2, sort_keys=True, default=str), "```",
                  "", "</details>", ""]

    lines += ["## Chronicle", ""]
    day = None
    cfg0 = starts[0].get("config") if starts and isinstance(starts[0].get("config"), dict) else {}
    budget = cfg0.get("max_failures")
    for e, text, folded in _entries(events):
        if (e.get("event") == "restart" and isinstance(e.get("attempt"), int) and e["attempt"] > 0
                and isinstance(budget, int) and budget >= 0):
            # Each gang restart spends one failure of --max-failures.
            text += f" Failure budget: {e['attempt']} of {budget} used."
        t = _utc(e.get("time"))
        d = t.date() if t else None
        if d != day:
            day = d
            lines += ["", f"### {d.isoformat() if d else 'undated'}", ""]
        loss = e.get("loss") if e.get("event") == "divergence" else None
        if folded:
            loss = None  # a run of routine saves spans many losses; none is "the" loss
        elif loss is None:
            loss = _loss_before(rows, _num(e.get("time")), e.get("step"))
        lines.append(format_entry(e, text, loss, show_step=not folded))
    report = next((e.get("report") for e in reversed(events)
                   if e.get("event") in ("finish", "failure", "divergence_give_up") and e.get("report")),
                  None)
    if report:
        lines += ["", "## Report", "", "```", str(report), "```"]
    return "\n".join(lines).replace("\n\n\n", "\n\n") + "\n"


# --------------------------------------------------------------------------------------
# The loss curve
# --------------------------------------------------------------------------------------

_MARKS = {  # event kind -> (colour, label); vertical lines on the loss plot
    "rollback": ("tab:red", "rollback"),
    "restart": ("tab:orange", "restart"),
    "resume": ("tab:orange", "resume"),
    "divergence": ("tab:purple", "divergence"),
    "chaos": ("0.6", "injected fault"),
}


def segments(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Split metrics rows into trajectories: a new one starts wherever the step does not
    increase (a rollback or a restart replaying from a checkpoint)."""
    segs: list[list[dict[str, Any]]] = []
    for r in rows:
        s = _num(r.get("step"))
        if not segs or s is None or s <= _num(segs[-1][-1].get("step")):
            segs.append([r])
        else:
            segs[-1].append(r)
    return segs


def plot_loss(run_dir: str | os.PathLike, out_png: str | os.PathLike) -> Path:
    """Plot loss (and LR) per step from ``RUN_DIR/metrics.jsonl`` to a PNG.

    Each trajectory (between rollbacks/restarts) gets its own colour, as in OPT's
    chronicle plots; rollbacks, restarts, divergences and injected faults are vertical
    lines; non-finite losses are red crosses at the top edge."""
    import matplotlib
    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    from opt_ray.errors import UserError
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        raise UserError(f"{run_dir / METRICS} has no metrics to plot; pass the run directory "
                        f"that `opt-ray train --output` wrote")
    events = list(Logbook(run_dir).events())
    has_lr = any(_num(r.get("lr")) is not None for r in rows)
    fig, axes = plt.subplots(2 if has_lr else 1, 1, sharex=True, figsize=(9, 6 if has_lr else 4.5),
                             gridspec_kw={"height_ratios": [3, 1]} if has_lr else None, squeeze=False)
    ax = axes[0][0]
    finite_all = [float(r["loss"]) for r in rows
                  if _num(r.get("loss")) is not None and math.isfinite(float(r["loss"]))]
    top = max(finite_all) * 1.05 if finite_all else 1.0
    for i, seg in enumerate(segments(rows)):
        pts = [(r["step"], float(r["loss"])) for r in seg
               if _num(r.get("loss")) is not None and math.isfinite(float(r["loss"]))]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, lw=1.2, color=f"C{i % 10}", label=f"trajectory {i + 1} (from step {seg[0]['step']})")
        bad = [r["step"] for r in seg if _num(r.get("loss")) is None or not math.isfinite(float(r["loss"]))]
        if bad:
            ax.plot(bad, [top] * len(bad), "x", color="red", ms=8, mew=2)
        if has_lr:
            lr = [(r["step"], float(r["lr"])) for r in seg if _num(r.get("lr")) is not None]
            if lr:
                axes[1][0].plot(*zip(*lr), lw=1.2, color=f"C{i % 10}")
    seen: set[str] = set()
    for e in events:
        kind = e.get("event")
        if kind not in _MARKS:
            continue
        x = _num(e.get("step"))
        if kind == "rollback":
            x = _num(e.get("to_step"))
        if x is None:
            continue
        colour, label = _MARKS[kind]
        ax.axvline(x, color=colour, ls="--" if kind != "chaos" else ":", lw=1,
                   label=None if label in seen else label)
        seen.add(label)
    if finite_all and min(finite_all) > 0 and max(finite_all) / min(finite_all) > 4:
        ax.set_yscale("log")  # an injected x10 spike would flatten a linear axis
    # The step that diverged never reaches metrics.jsonl (the guard rolls back first):
    # mark it at the top edge with what the guard saw.
    for e in events:
        if e.get("event") == "divergence" and _num(e.get("step")) is not None:
            loss = e.get("loss")
            label = f"{e.get('reason')} ({_fmt(loss)})" if _num(loss) is not None else str(e.get("reason"))
            ax.plot([e["step"]], [top], "v", color="tab:purple", ms=7)
            ax.annotate(label, (e["step"], top), textcoords="offset points", xytext=(4, -12),
                        fontsize=7, color="tab:purple")
    ax.set_ylabel("loss")
    ax.set_title(f"{run_dir.name}: training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")  # loss falls: the lower left stays empty
    if has_lr:
        axes[1][0].set_ylabel("learning rate")
        axes[1][0].grid(alpha=0.3)
    axes[-1][0].set_xlabel("step")
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def follow(run_dir: str | os.PathLike, *, skip: int = 0, poll_s: float = 0.5, out=None,
           stop_on_finish: bool = True, refresh: Callable[[], Any] | None = None,
           refresh_every: float = 5.0) -> None:
    """Print chronicle entries as events are appended (``opt-ray logbook --follow``),
    after the first ``skip`` events (already shown), until a ``finish`` event.
    ``refresh`` (a bucket run's ``RunMirror.pull``: it appends the bucket's new events to
    this staging copy) is called every ``refresh_every`` seconds; its errors are printed
    to stderr and the next call retries."""
    out = out or sys.stdout
    path = Path(run_dir) / LOGBOOK
    pos = 0
    pending = ""
    seen = 0
    refreshed = time.monotonic()
    while True:
        if refresh is not None and time.monotonic() - refreshed >= refresh_every:
            refreshed = time.monotonic()
            try:
                refresh()
            except Exception as e:  # noqa: BLE001 - object-store errors come in many types
                print(f"opt-ray logbook: could not refresh ({type(e).__name__}: {e}); "
                      f"retrying", file=sys.stderr, flush=True)
        if path.exists():
            with open(path) as f:
                f.seek(pos)
                chunk = f.read()
                pos = f.tell()
            pending += chunk
            *complete, pending = pending.split("\n")
            for line in complete:
                try:
                    e = json.loads(line)
                except json.JSONDecodeError:
                    continue
                seen += 1
                if seen <= skip:
                    continue
                print(format_entry(e, describe(e)), file=out, flush=True)
                if stop_on_finish and e.get("event") == "finish":
                    return
        time.sleep(poll_s)


def iter_kinds(events: Iterable[dict[str, Any]]) -> list[str]:
    """The event kinds in order (handy in tests and scripts)."""
    return [e.get("event") for e in events]
