"""The divergence guard: OPT-175B's manual divergence interventions, as a policy.

When OPT-175B diverged, the team rolled back to an earlier checkpoint whose fp16 loss
scale was still healthy (>= 1.0), lowered the learning rate, tightened gradient clipping
(1.0 -> 0.3) and skipped the data around the blow-up (see ../shared/OPT_FACTS.md). This
module decides *when* to do that and *what* to do; the training loop does it.

Pure Python (no torch), so it is tested on synthetic loss streams. The loop's side:

    guard = DivergenceGuard(GuardConfig())
    for step in ...:
        ... train one optimizer step -> loss, grad_norm, scaler scale (fp16) or None ...
        verdict = guard.observe(step, loss, grad_norm, loss_scale, batch=sampler_pos)
        if verdict is not None:
            target = guard.pick_checkpoint(checkpointer.available_steps())
            if verdict.give_up:                       # retries spent or nothing to go to
                guard.save(run_dir / "guard.json")    # so a restarted gang knows
                raise DivergenceError(verdict)        # exits non-zero with verdict.report
            ... load checkpoint `target` (but keep this guard's state, not the old one's),
            lr multiplier = verdict.lr_scale, clip = verdict.new_clip or clip,
            drop checkpoints verdict.invalidate_checkpoints, skip verdict.skip_steps ...
        if step % save_every == 0:
            ... save, with guard.state_dict() inside ...
            guard.record_checkpoint(step, loss_scale)

    and at every (re)start, after loading guard state from the checkpoint / guard.json:
    ``guard.raise_if_gave_up()`` (Ray Train retries a worker's DivergenceError like any
    failure; the restarted gang must not train on as if nothing happened).

Vocabulary. A *step* is the global optimizer-step index; the checkpoint "at step s"
holds the state after step s. The *onset* of trouble is the first step of the
uninterrupted streak of elevated losses (above ``onset_factor`` x the running mean) that
ended in the detection, so the guard rolls back to a checkpoint from before the loss
started creeping up, not merely the newest one.
"""

from __future__ import annotations

import json
import math
import os
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from opt_ray.config import GuardConfig
from opt_ray.errors import UserError

REASONS = ("nan", "spike", "loss_scale_floor")


# The policy is part of the one config tree (opt_ray.config); re-exported here.
__all__ = ["GuardConfig", "Verdict", "DivergenceError", "DivergenceGuard"]


@dataclass
class Verdict:
    """What the guard found at ``step`` and what the loop should do about it."""
    reason: str                       # "nan" | "spike" | "loss_scale_floor"
    step: int                         # the step at which it was detected
    onset_step: int                   # the first step of the trouble (<= step)
    loss: float | None
    grad_norm: float | None
    loss_scale: float | None
    running_mean: float | None        # the healthy baseline the loss was compared with
    attempt: int                      # 1 for the first rollback, 2 for the second, ...
    max_rollbacks: int
    lr_factor: float                  # this rollback's LR cut
    lr_scale: float                   # cumulative multiplier to apply to the LR schedule
    new_clip: float | None            # gradient clipping to use from now on (None: keep)
    skip_steps: list[int] = field(default_factory=list)   # steps whose batches to skip
    skip_batches: list[Any] = field(default_factory=list)  # their batch ids, where given
    rollback_to: int | None = None    # filled by DivergenceGuard.pick_checkpoint
    invalidate_checkpoints: list[int] = field(default_factory=list)  # from the bad trajectory
    give_up: bool = False
    report: str = ""                  # filled when give_up: what happened, what was tried

    @property
    def message(self) -> str:
        """One line for logs and progress bars."""
        what = {"nan": "non-finite loss/grad norm", "spike": "loss spike",
                "loss_scale_floor": "fp16 loss scale at its floor"}[self.reason]
        loss = "nan" if self.loss is None else f"{self.loss:.4g}"
        base = "" if self.running_mean is None else f" (running mean {self.running_mean:.4g})"
        return f"{what} at step {self.step}: loss {loss}{base}, trouble began at step {self.onset_step}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["message"] = self.message
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Verdict":
        d = dict(d)
        d.pop("message", None)
        return cls(**d)


class DivergenceError(UserError):
    """The guard gave up: rollbacks exhausted or no healthy checkpoint. ``str(e)`` is the
    report; the CLI prints it and exits non-zero."""

    def __init__(self, verdict: Verdict):
        self.verdict = verdict
        super().__init__(verdict.report or verdict.message)


def _finite(x: float | None) -> bool:
    return x is None or math.isfinite(x)


class DivergenceGuard:
    """Watches (step, loss, grad norm, loss scale) and returns a ``Verdict`` on divergence.

    State (rollbacks so far, LR scale, clip, skipped steps, checkpoint health, the running
    window) round-trips through ``state_dict``/``load_state_dict`` so a restarted run
    remembers what was already tried.
    """

    def __init__(self, cfg: GuardConfig | None = None):
        self.cfg = cfg if cfg is not None else GuardConfig()
        self._losses: deque[tuple[int, float]] = deque(maxlen=self.cfg.window)
        self._grads: deque[tuple[int, float]] = deque(maxlen=self.cfg.window)
        self._healthy_seen = 0            # healthy observations so far (for min_steps)
        # The current streak of elevated (step, loss, grad norm): kept out of the baseline.
        self._streak: list[tuple[int, float, float | None]] = []
        self._low_scale_since: int | None = None  # first step with fp16 scale below healthy
        self._checkpoints: dict[int, dict[str, Any]] = {}
        self._bad_checkpoints: set[int] = set()
        self.verdicts: list[Verdict] = []
        self.pending: Verdict | None = None
        self.lr_scale = 1.0
        self.clip: float | None = None
        self.skip_steps: list[int] = []
        self.skip_batches: list[Any] = []
        self._batch_ids: dict[int, Any] = {}

    # ---------------------------------------------------------------------------------
    # Detection
    # ---------------------------------------------------------------------------------

    @property
    def rollbacks(self) -> int:
        """Rollbacks decided so far (give-ups excluded)."""
        return sum(1 for v in self.verdicts if not v.give_up)

    @property
    def gave_up(self) -> Verdict | None:
        """The give-up verdict, if the guard gave up (then the run must not go on)."""
        return next((v for v in reversed(self.verdicts) if v.give_up), None)

    def raise_if_gave_up(self) -> None:
        """Raise ``DivergenceError`` when restored state says the guard already gave up.

        A gang restarted by Ray Train after the guard's ``DivergenceError`` would otherwise
        resume from the last checkpoint and carry on as if nothing happened (the injected
        or data-borne trouble may not recur). Call after loading guard state at (re)start,
        and ``save`` the guard before raising on a give-up so the restart sees it."""
        v = self.gave_up
        if v is not None:
            raise DivergenceError(v)

    def running_mean(self) -> float | None:
        if not self._losses:
            return None
        return sum(l for _, l in self._losses) / len(self._losses)

    def observe(self, step: int, loss: float | None, grad_norm: float | None = None,
                loss_scale: float | None = None, batch: Any = None) -> Verdict | None:
        """Judge one optimizer step. Returns None while healthy, else a ``Verdict``.

        ``loss_scale`` is the fp16 scaler's scale (None for bf16/fp32). ``batch`` is an
        optional JSON-able id of the step's batch (e.g. the sampler position), echoed in
        ``Verdict.skip_batches`` so the loop can skip by id instead of by step.
        """
        if not self.cfg.enabled:
            return None
        cfg = self.cfg
        loss = None if loss is None else float(loss)
        grad_norm = None if grad_norm is None else float(grad_norm)
        if batch is not None:
            self._batch_ids[step] = batch
            # Only recent ids can ever be skipped; keep the map bounded.
            for old in [s for s in self._batch_ids if s < step - cfg.window - cfg.skip_batches]:
                del self._batch_ids[old]

        if loss_scale is not None and loss_scale < cfg.min_checkpoint_loss_scale:
            if self._low_scale_since is None:
                self._low_scale_since = step
        elif loss_scale is not None:
            self._low_scale_since = None

        mean = self.running_mean()
        reason = None
        if cfg.check_nan and (loss is None or not _finite(loss)):
            reason = "nan"
        elif cfg.check_nan and loss_scale is None and not _finite(grad_norm):
            # Under fp16 an inf grad norm is an overflow the scaler skips; elsewhere it is
            # a real divergence.
            reason = "nan"
        elif (cfg.loss_scale_floor is not None and loss_scale is not None
              and loss_scale <= cfg.loss_scale_floor):
            reason = "loss_scale_floor"
        elif loss is None or not math.isfinite(loss):
            return None  # NaN checks are off: nothing sensible to compare or keep
        elif self._healthy_seen >= cfg.min_steps and mean is not None and loss > cfg.spike_factor * mean:
            reason = "spike"
        elif (cfg.grad_spike_factor is not None and self._healthy_seen >= cfg.min_steps
              and grad_norm is not None and self._grads
              and grad_norm > cfg.grad_spike_factor * (sum(g for _, g in self._grads) / len(self._grads))):
            reason = "spike"

        if reason is None:
            self._note_healthy(step, loss, grad_norm, mean)
            return None
        return self._decide(reason, step, loss, grad_norm, loss_scale, mean)

    def _note_healthy(self, step: int, loss: float, grad_norm: float | None,
                      mean: float | None) -> None:
        cfg = self.cfg
        elevated = (self._healthy_seen >= cfg.min_steps and mean is not None
                    and loss > cfg.onset_factor * mean)
        if elevated:
            # Keep the rise out of the baseline, and remember when it began.
            self._streak.append((step, loss, grad_norm))
            if len(self._streak) < cfg.onset_patience:
                return
        # A healthy step ends the streak (it was noise); a streak that outlasted
        # onset_patience is a new normal. Either way the baseline takes it in.
        joining = self._streak if elevated else self._streak + [(step, loss, grad_norm)]
        for s, l, g in joining:
            self._losses.append((s, l))
            if g is not None and math.isfinite(g):
                self._grads.append((s, g))
            self._healthy_seen += 1
        self._streak = []

    def _onset(self, step: int) -> int:
        candidates = [step]
        if self._streak:
            candidates.append(self._streak[0][0])
        if self._low_scale_since is not None:
            candidates.append(self._low_scale_since)
        return min(candidates)

    def _decide(self, reason: str, step: int, loss: float | None, grad_norm: float | None,
                loss_scale: float | None, mean: float | None) -> Verdict:
        cfg = self.cfg
        onset = self._onset(step)
        attempt = self.rollbacks + 1
        lo = max(step - cfg.skip_batches + 1, 0)
        skip = list(range(lo, step + 1)) if cfg.skip_batches else []
        v = Verdict(
            reason=reason, step=step, onset_step=onset,
            loss=loss if loss is not None and math.isfinite(loss) else None,
            grad_norm=grad_norm if grad_norm is not None and math.isfinite(grad_norm) else None,
            loss_scale=loss_scale, running_mean=mean, attempt=attempt,
            max_rollbacks=cfg.max_rollbacks, lr_factor=cfg.lr_factor,
            lr_scale=self.lr_scale * cfg.lr_factor,
            new_clip=cfg.clip_after_rollback if cfg.clip_after_rollback is not None else self.clip,
            skip_steps=skip,
            skip_batches=[self._batch_ids[s] for s in skip if s in self._batch_ids],
        )
        if attempt > cfg.max_rollbacks:
            v.lr_scale, v.new_clip, v.skip_steps, v.skip_batches = self.lr_scale, self.clip, [], []
            self._give_up(v, f"the limit of {cfg.max_rollbacks} rollback(s) (guard.max_rollbacks) is spent")
        self.pending = v
        return v

    def _give_up(self, v: Verdict, why: str) -> None:
        v.give_up = True
        v.report = self.report(v, why)
        self.verdicts.append(v)

    # ---------------------------------------------------------------------------------
    # Checkpoints and rollback
    # ---------------------------------------------------------------------------------

    def record_checkpoint(self, step: int, loss_scale: float | None = None,
                          healthy: bool | None = None) -> None:
        """Note a checkpoint saved at ``step``. ``healthy`` None: the guard judges (not
        inside an elevated-loss streak and, under fp16, scale >= min_checkpoint_loss_scale)."""
        if healthy is None:
            healthy = not self._streak and (
                loss_scale is None or loss_scale >= self.cfg.min_checkpoint_loss_scale)
        self._checkpoints[int(step)] = {"loss_scale": loss_scale, "healthy": bool(healthy)}
        self._bad_checkpoints.discard(int(step))

    def is_usable(self, step: int) -> bool:
        """Whether a checkpoint may be rolled back (or restarted) to, as far as the guard knows."""
        if step in self._bad_checkpoints:
            return False
        meta = self._checkpoints.get(step)
        if meta is None:
            return True  # not seen by this guard (e.g. written before it existed)
        if not meta["healthy"]:
            return False
        ls = meta["loss_scale"]
        return ls is None or ls >= self.cfg.min_checkpoint_loss_scale

    def pick_checkpoint(self, available_steps: Iterable[int]) -> int | None:
        """Choose the rollback target for the pending verdict and commit to it.

        The last usable checkpoint strictly before the onset of trouble (the checkpoint
        at step s is the state after step s, so s < onset is untouched by it). Fills
        ``rollback_to`` and ``invalidate_checkpoints`` (later checkpoints, from the
        diverging trajectory), records the LR/clip/skip decisions in the guard's state and
        truncates the running window to the target. Returns None, and turns the verdict
        into a give-up with a report, when no checkpoint qualifies or retries are spent.
        """
        v = self.pending
        if v is None:
            raise RuntimeError("pick_checkpoint() called without a pending verdict from observe()")
        self.pending = None
        if v.give_up:
            return None
        steps = sorted({int(s) for s in available_steps})
        usable = [s for s in steps if s < v.onset_step and self.is_usable(s)]
        if not usable:
            seen = ", ".join(map(str, steps)) or "none"
            self._give_up(v, f"no healthy checkpoint before step {v.onset_step} "
                             f"(available: {seen}); save checkpoints more often "
                             f"(--save-every) or start from an earlier one")
            return None
        target = usable[-1]
        v.rollback_to = target
        v.invalidate_checkpoints = [s for s in steps if s > target]
        self._bad_checkpoints.update(v.invalidate_checkpoints)
        # Skipped steps at or before the target were trained on in the good trajectory.
        v.skip_steps = [s for s in v.skip_steps if s > target]
        v.skip_batches = [self._batch_ids[s] for s in v.skip_steps if s in self._batch_ids]
        self.skip_steps = sorted(set(self.skip_steps) | set(v.skip_steps))
        self.skip_batches = self.skip_batches + [b for b in v.skip_batches if b not in self.skip_batches]
        self.lr_scale = v.lr_scale
        self.clip = v.new_clip
        self.verdicts.append(v)
        # Forget what the diverging trajectory taught the baseline; the replay re-observes it.
        self._losses = deque(((s, l) for s, l in self._losses if s <= target), maxlen=self.cfg.window)
        self._grads = deque(((s, g) for s, g in self._grads if s <= target), maxlen=self.cfg.window)
        self._streak, self._low_scale_since = [], None
        return target

    def should_skip(self, step: int) -> bool:
        """Whether the batch that step ``step`` consumed in a diverged trajectory is skipped."""
        return step in self.skip_steps

    # ---------------------------------------------------------------------------------
    # Reporting and persistence
    # ---------------------------------------------------------------------------------

    def report(self, final: Verdict | None = None, why: str = "") -> str:
        """A few lines saying what went wrong and what was tried (for the give-up error)."""
        lines = []
        if final is not None:
            lines.append(f"training stopped: {final.message}; {why or 'the guard gave up'}.")
        tried = [v for v in self.verdicts if not v.give_up]
        if tried:
            lines.append(f"tried {len(tried)} rollback(s):")
            for v in tried:
                clip = f", clip {v.new_clip}" if v.new_clip is not None else ""
                skip = f", skipped batches of steps {v.skip_steps}" if v.skip_steps else ""
                lines.append(f"  {v.attempt}. {v.message} -> rolled back to step {v.rollback_to}, "
                             f"LR x{v.lr_scale:g}{clip}{skip}")
        else:
            lines.append("no rollback was tried.")
        lines.append("next: lower the peak LR (--lr), tighten clipping, raise guard.max_rollbacks, "
                     "or inspect the data near the failing steps; `opt-ray logbook RUN_DIR` has the chronicle.")
        return "\n".join(lines)

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state; store it in every checkpoint."""
        return {
            "version": 1,
            "losses": [list(x) for x in self._losses],
            "grads": [list(x) for x in self._grads],
            "healthy_seen": self._healthy_seen,
            "streak": [list(x) for x in self._streak],
            "low_scale_since": self._low_scale_since,
            "checkpoints": {str(k): v for k, v in self._checkpoints.items()},
            "bad_checkpoints": sorted(self._bad_checkpoints),
            "verdicts": [v.to_dict() for v in self.verdicts],
            "lr_scale": self.lr_scale,
            "clip": self.clip,
            "skip_steps": list(self.skip_steps),
            "skip_batches": list(self.skip_batches),
            "batch_ids": {str(k): v for k, v in self._batch_ids.items()},
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        try:
            self._losses = deque((tuple(x) for x in sd["losses"]), maxlen=self.cfg.window)
            self._grads = deque((tuple(x) for x in sd["grads"]), maxlen=self.cfg.window)
            self._healthy_seen = int(sd["healthy_seen"])
            self._streak = [tuple(x) for x in sd["streak"]]
            self._low_scale_since = sd["low_scale_since"]
            self._checkpoints = {int(k): dict(v) for k, v in sd["checkpoints"].items()}
            self._bad_checkpoints = set(int(s) for s in sd["bad_checkpoints"])
            self.verdicts = [Verdict.from_dict(v) for v in sd["verdicts"]]
            self.lr_scale = float(sd["lr_scale"])
            self.clip = sd["clip"]
            self.skip_steps = [int(s) for s in sd["skip_steps"]]
            self.skip_batches = list(sd["skip_batches"])
            self._batch_ids = {int(k): v for k, v in sd["batch_ids"].items()}
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"divergence guard state is malformed ({e!r}); it must come from "
                             f"DivergenceGuard.state_dict()") from e
        self.pending = None

    def save(self, path: str | os.PathLike) -> None:
        """Write the state as JSON atomically (for a run-level copy next to the checkpoints,
        so a crash between a rollback and the next checkpoint does not forget it)."""
        from opt_ray.artifacts import write_json_atomic
        write_json_atomic(path, self.state_dict())

    def load(self, path: str | os.PathLike) -> bool:
        """Load state written by ``save``; False when the file does not exist."""
        path = Path(path)
        if not path.exists():
            return False
        try:
            sd = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: divergence guard state is not valid JSON; delete it to "
                             f"start the guard afresh") from e
        self.load_state_dict(sd)
        return True
