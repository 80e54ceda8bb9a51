"""The paper's learning-rate schedule: linear warmup, then linear decay to 10% of peak.

OPT warmed up over 375M tokens (2000 steps for 175B) and decayed linearly to 10% of the
peak over 300B tokens. A run here is much shorter, so ``LRSchedule`` takes its warmup and
decay lengths in optimizer steps; the training config maps the paper's token counts onto
the run (see ``TrainConfig.resolved_schedule``).

The schedule is a pure function of the step plus one mutable factor, ``lr_factor``, that
the divergence guard lowers after a rollback (OPT's "lower the LR" intervention). Its state
is that factor, saved with every checkpoint, so a replayed run sets the same LRs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from opt_ray.errors import UserError


@dataclass
class LRSchedule:
    peak_lr: float
    warmup_steps: int
    decay_steps: int          # the step at which the LR reaches min_lr_ratio * peak
    min_lr_ratio: float = 0.1
    lr_factor: float = 1.0    # lowered by the divergence guard; checkpointed

    def __post_init__(self) -> None:
        if self.peak_lr <= 0:
            raise UserError(f"peak LR must be > 0, got {self.peak_lr!r}; pass --lr with a positive value")
        if self.warmup_steps < 0 or self.decay_steps < 0:
            raise UserError(f"warmup ({self.warmup_steps}) and decay ({self.decay_steps}) steps must "
                            f"be >= 0; fix --warmup-steps")

    def lr(self, step: int) -> float:
        """LR for optimizer step ``step`` (1-based: the first update is step 1)."""
        peak = self.peak_lr * self.lr_factor
        if self.warmup_steps and step <= self.warmup_steps:
            return peak * step / self.warmup_steps
        span = max(self.decay_steps - self.warmup_steps, 1)
        frac = min(max(step - self.warmup_steps, 0) / span, 1.0)
        return peak * (1.0 - (1.0 - self.min_lr_ratio) * frac)

    def apply(self, optimizer: Any, step: int) -> float:
        """Set every param group's LR for ``step``; returns it."""
        lr = self.lr(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict[str, Any]:
        return {"peak_lr": self.peak_lr, "warmup_steps": self.warmup_steps,
                "decay_steps": self.decay_steps, "min_lr_ratio": self.min_lr_ratio,
                "lr_factor": self.lr_factor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Only the factor carries over: the shape of the schedule is the current config's,
        # so a resumed run may extend --steps (the decay then stretches to the new end).
        self.lr_factor = float(state.get("lr_factor", 1.0))
