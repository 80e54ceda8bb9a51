"""The training gang on Ray Train: ``TorchTrainer`` wiring around ``opt_ray.train.loop``.

Thin by design. The Ray touch points:
- ``ScalingConfig(num_workers=N or (MIN, MAX))``: a fixed or elastic gang, one CPU (or GPU)
  per worker;
- ``TorchConfig(backend=gloo|nccl, timeout_s=--collective-timeout)``: a hung collective
  raises after the timeout, so a hang becomes an ordinary worker failure;
- ``FailureConfig(max_failures)``: the gang is restarted after a failure and the loop
  resumes from the newest valid checkpoint; past the budget ``fit`` fails and
  ``run_gang`` raises ``FailureBudgetExceeded`` with the reason;
- ``ray.train.report``: each checkpoint, written by the loop inside the run directory
  (which is Ray Train's experiment directory), is registered without a copy;
- a controller callback writes ``worker_lost`` events to the logbook, and a driver
  thread shows a progress bar from ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from opt_ray.errors import UserError
from opt_ray.logbook import Logbook
from opt_ray.train.loop import METRICS, TrainConfig


class FailureBudgetExceeded(UserError):
    """The gang failed more often than ``--max-failures`` allows."""


def _attempt_counter(run_dir: Path, run_id: str) -> int:
    """How many times this invocation's gang started before (rank 0 calls it once per start)."""
    d = run_dir / ".attempts"
    d.mkdir(parents=True, exist_ok=True)
    n = len(list(d.glob(f"{run_id}-*")))
    (d / f"{run_id}-{n}").touch()
    return n


def train_worker(config: dict[str, Any]) -> None:
    """The per-worker function Ray Train runs: the library loop with Ray hooks."""
    import ray.train
    from ray.train import Checkpoint
    from ray.train.v2.api.report_config import CheckpointUploadMode

    from opt_ray.train.loop import Hooks, train

    cfg = TrainConfig.from_dict(config)
    rank = ray.train.get_context().get_world_rank()

    def report(metrics: dict[str, Any], ckpt: Path | None) -> None:
        # Rank 0 registers the committed checkpoint (already in the experiment dir, so no
        # upload); every rank must call report, it is a barrier.
        checkpoint = Checkpoint.from_directory(str(ckpt)) if ckpt is not None and rank == 0 else None
        ray.train.report(metrics, checkpoint=checkpoint,
                         checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)

    def attempt() -> int:
        return _attempt_counter(Path(cfg.output), cfg.run_id) if rank == 0 else 0

    train(cfg, Hooks(report=report, attempt=attempt))


def _callbacks(run_dir: Path) -> list[Any]:
    from ray.train import UserCallback

    class GangEvents(UserCallback):
        """Runs on the Ray Train controller: record which workers failed and why."""

        def after_exception(self, run_context, worker_exceptions) -> None:
            Logbook(run_dir).event("worker_lost", ranks=sorted(worker_exceptions),
                                   errors={str(r): repr(e)[:500] for r, e in worker_exceptions.items()})

    return [GangEvents()]


class _Progress:
    """A tqdm bar on the driver, fed by tailing ``metrics.jsonl``."""

    def __init__(self, run_dir: Path, total: int):
        self.path = run_dir / METRICS
        self.total = total
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "_Progress":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        from tqdm import tqdm

        bar = tqdm(total=self.total, desc="train", unit="step", dynamic_ncols=True)
        try:
            while not self._stop.wait(1.0):
                self._refresh(bar)
            self._refresh(bar)
        finally:
            bar.close()

    def _refresh(self, bar) -> None:
        try:
            lines = self.path.read_text().splitlines()
        except OSError:
            return
        for line in reversed(lines):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec["step"] == bar.n:
                return  # nothing new: no redraw (each one is a line in a captured log)
            bar.n = rec["step"]
            bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}",
                            tok_s=f"{rec['tokens_per_s']:.0f}", refresh=False)
            bar.refresh()
            return


def run_gang(cfg: TrainConfig, *, address: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Train with a Ray Train gang; returns the last metrics. Raises
    ``FailureBudgetExceeded`` when the run fails for good."""
    import ray
    import torch
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from opt_ray.ray_util import init_ray

    run_dir = Path(cfg.output).absolute()
    cfg.output = str(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    init_ray(address)
    use_gpu = torch.cuda.is_available()
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=cfg.to_dict(),
        scaling_config=ScalingConfig(
            num_workers=cfg.workers if isinstance(cfg.workers, tuple) else int(cfg.workers),
            use_gpu=use_gpu, resources_per_worker={"GPU": 1} if use_gpu else {"CPU": 1}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo",
                                 timeout_s=int(cfg.collective_timeout)),
        run_config=RunConfig(
            # The run directory is Ray Train's experiment directory, so checkpoints the
            # loop commits there are registered in place.
            storage_path=str(run_dir.parent), name=run_dir.name,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            callbacks=_callbacks(run_dir)),
    )
    t0 = time.time()
    try:
        with (_Progress(run_dir, cfg.steps) if progress else _nullctx()):
            result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        gave_up = _guard_give_up(run_dir)
        if gave_up is not None:
            # Not a hardware failure: restarting cannot help, so say what the guard tried.
            Logbook(run_dir).event("failure", reason="divergence guard gave up", report=gave_up)
            raise FailureBudgetExceeded(f"the divergence guard gave up: {gave_up}; see "
                                        f"{run_dir / 'logbook.jsonl'}") from e
        reason = (f"training failed {cfg.max_failures + 1} time(s), more than --max-failures "
                  f"{cfg.max_failures} allows; last error: {_short(e)}")
        Logbook(run_dir).event("failure_budget_exceeded", max_failures=cfg.max_failures,
                               reason=reason, seconds=round(time.time() - t0, 1))
        raise FailureBudgetExceeded(reason + f"; see {run_dir / 'logbook.jsonl'}") from e
    metrics = dict(result.metrics or {})
    return metrics


def _guard_give_up(run_dir: Path) -> str | None:
    """The guard's give-up report when the run stopped on one (``RUN_DIR/guard.json``)."""
    from opt_ray.train.guard import DivergenceGuard, GuardConfig

    guard = DivergenceGuard(GuardConfig())
    try:
        if not guard.load(run_dir / "guard.json"):
            return None
    except ValueError:
        return None
    verdict = guard.gave_up
    return None if verdict is None else (verdict.report or verdict.reason)


def _short(e: BaseException, limit: int = 600) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + " ..."


class _nullctx:
    def __enter__(self) -> None: ...
    def __exit__(self, *exc: Any) -> None: ...
