"""The run logbook: every event appended as one JSON line to ``RUN_DIR/logbook.jsonl``.

Writers call ``Logbook(run_dir).event("checkpoint_saved", step=100, path=...)``; the
chronicle (Markdown + loss plot) is rendered from the same file. Appends are single
``write`` calls on an ``O_APPEND`` file, so several processes may log to one run.

OPT-175B's team kept their logbook by hand (35+ manual restarts, rollbacks, LR and
clipping changes, skipped data). Here the training stack writes it, and
``render_markdown`` turns it into a chronicle in the same spirit: dated entries, what
happened, what was done, the loss at the time. The event kinds and their fields are in
``EVENTS`` (and in logbook/README.md); unknown kinds are kept and rendered generically,
so a writer never breaks the reader.

Helpers for writers: ``log_start`` (config, versions, hardware), ``log_verdict`` (the
divergence guard's decision as the ordered events divergence_detected -> rollback ->
lr_change -> clip_change -> data_skipped), ``log_resume`` (records a version_mismatch
when a checkpoint was written under other library versions).
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

LOGBOOK = "logbook.jsonl"
METRICS = "metrics.jsonl"

# kind -> (what it means, the fields writers give; every event also has `time`, `event`).
# A field in [brackets] is optional.
EVENTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "start": ("a run (or a resumed run) begins",
              ("config", "versions", "hardware", "[world_size]", "[resumed_from]")),
    "checkpoint_saved": ("a checkpoint was committed", ("step", "[path]", "[loss]", "[loss_scale]")),
    "checkpoint_rejected": ("a checkpoint failed its checks and was skipped",
                            ("step", "reason", "[path]", "[fallback_step]")),
    "worker_lost": ("a worker died, hung or was cut off", ("[rank]", "[node]", "[step]", "[error]")),
    "restart": ("the gang was restarted", ("[attempt]", "[from_step]", "[world_size]", "[reason]")),
    "resume": ("training resumed from a checkpoint", ("step", "[world_size]", "[checkpoint]")),
    "resize": ("the gang continues with another number of workers",
               ("old_world_size", "new_world_size", "[step]")),
    "divergence_detected": ("the divergence guard fired",
                            ("step", "reason", "[loss]", "[running_mean]", "[onset_step]", "[attempt]")),
    "rollback": ("rolled back to an earlier checkpoint", ("from_step", "to_step", "[invalidated]")),
    "lr_change": ("the learning rate was changed", ("step", "old", "new", "[factor]")),
    "clip_change": ("gradient clipping was changed", ("step", "old", "new")),
    "data_skipped": ("batches were skipped", ("steps", "[batches]")),
    "failure_budget": ("a failure counted against the budget, or the budget ran out",
                       ("failures", "max_failures", "[exhausted]")),
    "version_mismatch": ("resumed under other library versions than the checkpoint recorded",
                         ("diff", "[step]", "[checkpoint]")),
    "chaos": ("a fault was injected on purpose (drills)", ("kind", "step", "[rank]")),
    # Kinds the training loop, checkpointer and gang write besides the ones above.
    "divergence": ("the divergence guard fired (the loop's name; fields of guard.Verdict)",
                   ("step", "reason", "[loss]", "[running_mean]", "[onset_step]", "[attempt]",
                    "[rollback_to]", "[lr_scale]", "[new_clip]", "[skip_steps]", "[give_up]")),
    "divergence_give_up": ("the guard gave up; the run stops", ("report",)),
    "step_skipped": ("a step's update was skipped (fp16 overflow or NaN)", ("step", "[loss]", "[grad_norm]")),
    "checkpoint_corrupt": ("a checkpoint failed its checksum and was skipped", ("step", "reason", "[path]")),
    "checkpoint_partial_removed": ("a half-written checkpoint was cleaned up", ("path",)),
    "failure_budget_exceeded": ("the gang failed more often than --max-failures allows",
                                ("max_failures", "reason")),
    "failure": ("the run stopped for a reason restarts cannot fix (e.g. the guard gave up)",
                ("reason", "[report]")),
    "finish": ("the run ended", ("status", "[step]", "[loss]", "[reason]", "[report]")),
}


def _now() -> float:
    return time.time()


class Logbook:
    """Append-only JSON-lines event log of one run directory."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOGBOOK

    def event(self, kind: str, /, **fields: Any) -> dict[str, Any]:
        """Append one event; ``kind`` is positional-only so ``kind=`` may be a field."""
        rec = {"time": _now(), "event": kind, **fields}
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
    """Problems with one event against ``EVENTS`` (missing required fields); [] if fine."""
    kind = rec.get("event")
    if kind not in EVENTS:
        return [f"unknown event kind {kind!r}"]
    need = [f for f in EVENTS[kind][1] if not f.startswith("[")]
    return [f"{kind}: missing field {f!r}" for f in need if f not in rec]


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


def log_verdict(logbook: Logbook, verdict: Any, *, lr_before: float | None = None,
                clip_before: float | None = None) -> None:
    """Log a divergence guard ``Verdict`` as the ordered events of the intervention.

    divergence_detected, then (unless the guard gave up) rollback, lr_change, clip_change
    (when clipping changed) and data_skipped (when batches are skipped). A give-up is
    logged as divergence_detected with ``give_up`` and the report; the writer still logs
    ``finish`` with status "failed".
    """
    v = verdict.to_dict() if hasattr(verdict, "to_dict") else dict(verdict)
    # The guard stores a non-finite loss as None (not JSON); say what it was.
    loss = v.get("loss") if v.get("loss") is not None or v["reason"] != "nan" else "non-finite"
    logbook.event("divergence_detected", step=v["step"], reason=v["reason"], loss=loss,
                  grad_norm=v.get("grad_norm"), loss_scale=v.get("loss_scale"),
                  running_mean=v.get("running_mean"), onset_step=v.get("onset_step"),
                  attempt=v.get("attempt"), max_rollbacks=v.get("max_rollbacks"),
                  give_up=v.get("give_up", False), message=v.get("message"),
                  **({"report": v["report"]} if v.get("give_up") else {}))
    if v.get("give_up"):
        return
    logbook.event("rollback", from_step=v["step"], to_step=v["rollback_to"],
                  invalidated=v.get("invalidate_checkpoints", []), attempt=v.get("attempt"))
    new_lr = None if lr_before is None else lr_before * v["lr_factor"]
    logbook.event("lr_change", step=v["rollback_to"], old=lr_before, new=new_lr,
                  factor=v["lr_factor"], scale=v.get("lr_scale"))
    if v.get("new_clip") is not None and v.get("new_clip") != clip_before:
        logbook.event("clip_change", step=v["rollback_to"], old=clip_before, new=v["new_clip"])
    if v.get("skip_steps"):
        logbook.event("data_skipped", steps=v["skip_steps"], batches=v.get("skip_batches", []))


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


def describe(e: dict[str, Any]) -> str:
    """One event as a sentence: what happened and what was done."""
    k = e.get("event")
    g = e.get
    if k in ("start", "resume", "restart") and g("config") is not None and k != "start":
        # The loop writes a full start-like record on every (re)start.
        att = f" (attempt {g('attempt')})" if g("attempt") else ""
        ws = f" on {g('world_size')} worker(s)" if g("world_size") is not None else ""
        what = "Gang restarted" if k == "restart" else "Run resumed"
        ck = f" from the checkpoint of step {g('step')}" if g("checkpoint") else " from scratch"
        return f"{what}{att}{ck}{ws}; training continues at step {(g('step') or 0) + 1}."
    if k == "start":
        cfg = g("config") or {}
        bits = [f"{key} {cfg[key]}" for key in ("preset", "precision", "steps", "workers", "tp")
                if isinstance(cfg, dict) and cfg.get(key) is not None]
        if g("world_size") is not None:
            bits.append(f"world size {g('world_size')}")
        s = "Run started" + (f" ({', '.join(map(str, bits))})" if bits else "")
        if g("precision") and not (isinstance(cfg, dict) and cfg.get("precision")):
            bits.append(str(g("precision")))
        if g("resumed_from") is not None:
            s += f", resuming from step {g('resumed_from')}"
        return s + "."
    if k == "checkpoint_saved":
        ls = f", loss scale {_fmt(g('loss_scale'))}" if g("loss_scale") is not None else ""
        return f"Checkpoint saved at step {g('step')}{ls}."
    if k == "checkpoint_corrupt":
        return f"Checkpoint of step {g('step')} failed its checks ({g('reason')}); using an earlier one."
    if k == "checkpoint_partial_removed":
        return f"Removed a half-written checkpoint ({Path(str(g('path'))).name})."
    if k == "step_skipped":
        return f"Update of step {g('step')} skipped: loss {_fmt(g('loss'))}, grad norm {_fmt(g('grad_norm'))}."
    if k == "divergence_give_up":
        return "The divergence guard gave up; the run stops."
    if k == "failure":
        return f"Run failed: {g('reason')}."
    if k == "failure_budget_exceeded":
        return f"Failure budget exceeded (--max-failures {g('max_failures')}): {g('reason')}."
    if k == "checkpoint_rejected":
        fb = f"; falling back to step {g('fallback_step')}" if g("fallback_step") is not None else ""
        return f"Checkpoint of step {g('step')} rejected: {g('reason')}{fb}."
    if k == "worker_lost":
        if not g("error") and isinstance(g("errors"), dict) and g("errors"):
            return _describe_failures(g("errors"))
        ranks = g("ranks")
        who = (f"Rank {g('rank')}" if g("rank") is not None else
               f"Rank(s) {', '.join(map(str, ranks))}" if ranks else "A worker")
        where = f" on {g('node')}" if g("node") else ""
        at = f" at step {g('step')}" if g("step") is not None else ""
        err = f": {g('error')}" if g("error") else ""
        return f"{who}{where} lost{at}{err}."
    if k == "restart":
        att = f" (attempt {g('attempt')})" if g("attempt") is not None else ""
        frm = f" from the checkpoint of step {g('from_step')}" if g("from_step") is not None else ""
        ws = f" on {g('world_size')} worker(s)" if g("world_size") is not None else ""
        why = f" after {g('reason')}" if g("reason") else ""
        return f"Gang restarted{att}{why}{frm}{ws}."
    if k == "resume":
        ws = f" on {g('world_size')} worker(s)" if g("world_size") is not None else ""
        return f"Training resumed at step {g('step')}{ws}."
    if k == "resize":
        old, new = g("old_world_size", g("from_world")), g("new_world_size", g("to_world"))
        tp = (f" (tensor parallel {g('from_tp')} -> {g('to_tp')})"
              if g("from_tp") is not None and g("from_tp") != g("to_tp") else "")
        return f"Gang resized from {old} to {new} worker(s){tp}."
    if k in ("divergence_detected", "divergence"):
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
    if k == "rollback":
        inv = g("invalidated") or []
        dropped = f"; checkpoints {', '.join(map(str, inv))} discarded as part of the diverged trajectory" if inv else ""
        done = []  # the loop records the whole intervention on the rollback event
        if g("lr_factor") is not None:
            done.append(f"LR now x{_fmt(g('lr_factor'))} of the schedule")
        if g("clip") is not None:
            done.append(f"gradient clipping {_fmt(g('clip'))}")
        if g("skip_steps"):
            done.append(f"the batches of step(s) {', '.join(map(str, g('skip_steps')))} will be skipped")
        then = f"; {', '.join(done)}" if done else ""
        return (f"Rolled back from step {g('from_step', g('step'))} to the checkpoint of step "
                f"{g('to_step')}{dropped}{then}.")
    if k == "lr_change":
        if g("old") is not None and g("new") is not None:
            return f"Learning rate lowered from {_fmt(g('old'))} to {_fmt(g('new'))} (x{_fmt(g('factor'))})."
        return f"Learning rate multiplied by {_fmt(g('factor'))} (now x{_fmt(g('scale'))} of the schedule)."
    if k == "clip_change":
        return f"Gradient clipping tightened from {_fmt(g('old'))} to {_fmt(g('new'))}."
    if k == "data_skipped" and g("start") is not None:
        return (f"Skipped the batch of step {g('step')} (samples {g('start')}..{g('end')} of the "
                f"data stream); it is not trained on in this epoch.")
    if k == "data_skipped":
        steps = g("steps") or []
        b = g("batches") or []
        ids = f" (batches {', '.join(map(str, b))})" if b else ""
        return f"Skipping the data of step(s) {', '.join(map(str, steps))}{ids}."
    if k == "failure_budget":
        if g("exhausted"):
            return f"Failure budget exhausted: {g('failures')} failure(s), at most {g('max_failures')} allowed."
        return f"Failure {g('failures')} of at most {g('max_failures')} counted."
    if k == "version_mismatch":
        diff = g("diff") or {}
        parts = [f"{n} {d.get('recorded')} -> {d.get('current')}" for n, d in diff.items()
                 if isinstance(d, dict)]
        return "Resumed under other library versions than the checkpoint recorded: " + "; ".join(parts) + "."
    if k == "chaos":
        who = f" on rank {g('rank')}" if g("rank") is not None else ""
        return f"Drill: injected `{g('kind')}` at step {g('step')}{who}."
    if k == "finish":
        status = g("status", "completed")
        at = f" at step {g('step')}" if g("step") is not None else ""
        loss = f", final loss {_fmt(g('loss'))}" if g("loss") is not None else ""
        why = f": {g('reason')}" if g("reason") else ""
        return f"Run {status}{at}{loss}{why}."
    rest = {kk: vv for kk, vv in e.items() if kk not in ("time", "event")}
    return f"{k}: {json.dumps(rest, default=str)}"


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
    step = e.get("step", e.get("from_step"))
    at = (f" step {step}" if show_step and step is not None and not isinstance(step, list)
          else "")
    loss_s = f" *(loss {_fmt(loss)})*" if loss is not None and e.get("event") not in ("finish",) else ""
    return f"- **{when}**{at} — {text}{loss_s}"


def render_markdown(run_dir: str | os.PathLike, *, plot: str | None = None) -> str:
    """The run's chronicle as Markdown, in the spirit of OPT's published logbooks.

    A summary (config, versions, hardware, counts), then dated entries in the order the
    events were written: what happened, what was done, and the loss last logged before
    it. ``plot`` is a relative path of a loss-curve PNG to embed."""
    run_dir = Path(run_dir)
    events = list(Logbook(run_dir).events())
    rows = read_metrics(run_dir)
    lines = [f"# Logbook: `{run_dir.name}`", ""]
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
                     ("failure", "failure_budget_exceeded", "divergence_give_up")), None)
        if stop is not None:
            lines.append(f"- **Outcome**: failed. {describe(stop)}")
        else:
            lines.append("- **Outcome**: no `finish` event yet (still running, or the driver died)")
    if finite:
        lines.append(f"- **Loss**: {_fmt(finite[0]['loss'])} at step {finite[0]['step']} -> "
                     f"{_fmt(finite[-1]['loss'])} at step {finite[-1]['step']}")
    # Canonical name -> the kinds that count as it (the loop writes some under other names).
    groups = {"restart": ("restart",), "worker_lost": ("worker_lost",),
              "divergence": ("divergence_detected", "divergence"), "rollback": ("rollback",),
              "data_skipped": ("data_skipped",), "checkpoint_saved": ("checkpoint_saved",),
              "checkpoint_rejected": ("checkpoint_rejected", "checkpoint_corrupt"),
              "chaos": ("chaos",)}
    counts = {k: sum(kinds.count(x) for x in xs) for k, xs in groups.items()}
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
        loss = (e.get("loss") if e.get("event") in ("divergence_detected", "divergence", "checkpoint_saved")
                else None)
        if folded:
            loss = None  # a run of routine saves spans many losses; none is "the" loss
        elif loss is None:
            loss = _loss_before(rows, _num(e.get("time")), e.get("step", e.get("from_step")))
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
    "divergence_detected": ("tab:purple", "divergence"),
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
        x = _num(e.get("step", e.get("from_step")))
        if kind == "rollback":
            x = _num(e.get("to_step"))
        if kind == "restart":
            x = _num(e.get("from_step", e.get("step")))
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
        if e.get("event") in ("divergence", "divergence_detected") and _num(e.get("step")) is not None:
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
           stop_on_finish: bool = True) -> None:
    """Print chronicle entries as events are appended (``opt-ray logbook --follow``),
    after the first ``skip`` events (already shown), until a ``finish`` event."""
    out = out or sys.stdout
    path = Path(run_dir) / LOGBOOK
    pos = 0
    pending = ""
    seen = 0
    while True:
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
