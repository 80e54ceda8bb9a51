"""Fault injection for tests and drills: ``opt-ray train --chaos kill:rank=1:step=5,...``.

Events (``rank`` defaults to 0 where it matters; ``step`` is the optimizer step):

- ``kill:rank=R:step=S``      rank R SIGKILLs itself at the start of step S
- ``hang:rank=R:step=S``      rank R sleeps forever at the start of step S, before its
                              first collective, so its peers' collectives time out
- ``killsave:rank=R:step=S``  rank R SIGKILLs itself in the middle of saving the step-S
                              checkpoint (shards written, not yet committed)
- ``corrupt:step=S``          after the step-S checkpoint is committed, one of its files
                              is overwritten with garbage (its manifest checksum then fails)
- ``nan:step=S``              the loss of step S becomes NaN (every rank)
- ``spike:step=S:factor=F``   the loss of step S is multiplied by F (default 10)

Each event fires once per run, not again when the gang replays the step after a
restart or a rollback: before firing, the firing rank creates
``RUN_DIR/chaos/<event>.fired`` with ``O_EXCL`` (the file is the record, and the logbook
gets a ``chaos`` event).
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opt_ray.errors import UserError
from opt_ray.logbook import Logbook

KINDS = ("kill", "hang", "killsave", "corrupt", "nan", "spike")
_PER_RANK = ("kill", "hang", "killsave")


@dataclass(frozen=True)
class ChaosEvent:
    kind: str
    step: int
    rank: int = 0
    factor: float = 10.0

    @property
    def id(self) -> str:
        return f"{self.kind}-rank{self.rank}-step{self.step}"


def parse_chaos(spec: str | None) -> list[ChaosEvent]:
    """Parse ``kind:key=value:...`` items separated by commas. Raises ``UserError``."""
    events: list[ChaosEvent] = []
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        kind, *pairs = item.split(":")
        if kind not in KINDS:
            raise UserError(f"--chaos: unknown event {kind!r} in {item!r}; use one of {', '.join(KINDS)} "
                            f"(e.g. kill:rank=1:step=5)")
        kw: dict[str, Any] = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or key not in ("rank", "step", "factor"):
                raise UserError(f"--chaos: bad field {pair!r} in {item!r}; fields are rank=R, step=S "
                                f"and (spike) factor=F")
            try:
                kw[key] = float(value) if key == "factor" else int(value)
            except ValueError as e:
                raise UserError(f"--chaos: {key}={value!r} in {item!r} is not a number") from e
        if "step" not in kw or kw["step"] < 1:
            raise UserError(f"--chaos: {item!r} needs step=S with S >= 1")
        events.append(ChaosEvent(kind, **kw))
    return events


@dataclass
class Chaos:
    """The chaos plan as seen from one rank; every hook is a no-op without events."""
    events: list[ChaosEvent]
    run_dir: Path
    rank: int
    _fired_here: set[str] = field(default_factory=set)

    @classmethod
    def from_spec(cls, spec: str | None, run_dir: str | os.PathLike, rank: int) -> "Chaos":
        return cls(parse_chaos(spec), Path(run_dir), rank)

    def _claim(self, ev: ChaosEvent, **fields: Any) -> bool:
        """True exactly once per run for ``ev`` (across restarts and processes)."""
        if ev.id in self._fired_here:
            return False
        self._fired_here.add(ev.id)
        d = self.run_dir / "chaos"
        d.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(d / f"{ev.id}.fired", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        os.write(fd, f"{time.time()}\n".encode())
        os.fsync(fd)
        os.close(fd)
        Logbook(self.run_dir).event("chaos", kind=ev.kind, step=ev.step, rank=self.rank, **fields)
        return True

    def _mine(self, kind: str, step: int) -> list[ChaosEvent]:
        return [e for e in self.events if e.kind == kind and e.step == step
                and (e.kind not in _PER_RANK or e.rank == self.rank)]

    def at_step_start(self, step: int) -> None:
        """Kill or hang this rank when the plan says so."""
        for ev in self._mine("kill", step):
            if self._claim(ev, pid=os.getpid()):
                os.kill(os.getpid(), signal.SIGKILL)
        for ev in self._mine("hang", step):
            if self._claim(ev, pid=os.getpid()):
                while True:  # a hung rank: alive, silent, never reaching the collective
                    time.sleep(3600)

    def during_save(self, step: int) -> None:
        """Called between writing a checkpoint's shards and committing it."""
        for ev in self._mine("killsave", step):
            if self._claim(ev, pid=os.getpid()):
                os.kill(os.getpid(), signal.SIGKILL)

    def after_save(self, step: int, ckpt_dir) -> None:
        """Corrupt the just-committed checkpoint (call on one rank only); ``ckpt_dir`` is a
        local path or an object-storage URL."""
        from opt_ray.train.checkpoint import MANIFEST, Loc

        for ev in self._mine("corrupt", step):
            # The largest file: a model/optimizer shard, the part that matters.
            d = Loc(ckpt_dir)
            files = sorted((name for name in d.files() if name != MANIFEST),
                           key=lambda name: (-d.child(name).size(), name))
            if files and self._claim(ev, file=str(d.child(files[0]))):
                f = d.child(files[0])
                data = bytearray(f.read_bytes())
                garbage = b"\x00chaos\x00" * 8
                data[:len(garbage)] = garbage
                with f.fs.open(f.path, "wb") as out:
                    out.write(bytes(data))

    def loss_factor(self, step: int) -> float:
        """Multiply this step's loss by the returned factor (NaN or a spike); 1.0 normally.
        Every rank applies it, so the claim is per rank (``rank`` in the id is this rank)."""
        factor = 1.0
        for kind in ("nan", "spike"):
            for ev in self._mine(kind, step):
                mine = ChaosEvent(ev.kind, ev.step, self.rank, ev.factor)
                if self._claim(mine):
                    factor *= math.nan if kind == "nan" else ev.factor
        return factor
