"""The training gang on Ray Train: ``TorchTrainer`` wiring around ``opt_ray.train.loop``.

Thin by design. The Ray touch points:
- ``ScalingConfig(num_workers=N or (MIN, MAX))``: a fixed or elastic gang. The device
  comes from the *cluster's* resources (``--device auto``: one GPU per worker when the
  cluster advertises GPUs, whatever the driver has), see ``gang_configs``. An elastic
  gang only takes sizes that are whole tensor-parallel groups (``TPElasticScalingPolicy``);
- ``TorchConfig(backend=nccl|gloo, timeout_s=--collective-timeout)``: a hung collective
  raises after the timeout, so a hang becomes an ordinary worker failure;
- ``FailureConfig(max_failures)``: the gang is restarted after a hardware-like failure
  and the loop resumes from the newest valid checkpoint of its own checkpoint directory;
  past the budget ``fit`` fails and ``run_gang`` raises ``FailureBudgetExceeded``. A
  ``UserError`` raised by the loop (bad config, a checkpoint that does not fit) is not
  retried: the controller callback stops the gang at once and ``run_gang`` raises it;
- ``RunConfig``: Ray Train's own bookkeeping goes to a fresh directory per driver
  invocation (``RUN_DIR/.ray_train/<run_id>``) and no checkpoint is registered with it.
  The loop owns its checkpoints (pruned by ``--keep``, rolled back, moved aside); a Ray
  Train snapshot that referred to them would refuse the next invocation once they are
  gone (``CheckpointManagerInitializationError``). Resuming is the loop's job alone;
- the driver keeps ``RUN_DIR/driver.json`` while it runs. Ctrl-C / SIGTERM (``ray job
  stop``, ``opt-ray ctl scale``) write an ``interrupted`` event and print the command that
  resumes; a driver that was SIGKILLed leaves the file behind and the next invocation
  writes the event for it;
- a controller callback writes ``worker_lost`` events to the logbook, and a driver
  thread shows a progress bar from ``metrics.jsonl``;
- two of Ray Train's own callbacks are left out where they only cost: the DatasetManager
  actor (the gang passes no Ray Datasets) and, on a Ray without a dashboard, the
  placement-group cleaner (see ``GangTrainer._create_default_callbacks``). This module
  imports no torch: the driver and the controller load it too.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from opt_ray.config import TrainConfig
from opt_ray.errors import UserError
from opt_ray.logbook import METRICS, Logbook
from opt_ray.run_dir import DRIVER as DRIVER_FILE

USER_ERRORS = ".user_errors"


class FailureBudgetExceeded(UserError):
    """The gang failed more often than ``--max-failures`` allows."""


def _attempts_dir(cfg: TrainConfig):
    """Where gang starts are counted: in the run directory, or with a bucket ``--output``
    in the bucket, since after a node loss rank 0 may start on another node whose staging
    directory has never seen this run."""
    from opt_ray.storage import Loc

    return Loc(cfg.output).child(".attempts")


def _attempt_counter(cfg: TrainConfig) -> int:
    """How many times this invocation's gang started before (rank 0 calls it once per
    start), counted where every node sees it (``_attempts_dir``)."""
    d = _attempts_dir(cfg)
    n = len(d.glob(f"{cfg.run_id}-*"))
    d.child(f"{cfg.run_id}-{n}").write_text("")
    return n


def _clear_attempt_counter(cfg: TrainConfig) -> None:
    """The driver's last act: this invocation's gang-start objects go (the next one counts
    from 0 under its own id), and with them an emptied ``.attempts`` directory."""
    d = _attempts_dir(cfg)
    try:
        for rel in d.glob(f"{cfg.run_id}-*"):
            d.child(rel).rm()
        if d.local and d.isdir() and not d.names():
            os.rmdir(d.path)
    except Exception as e:  # noqa: BLE001 - a store error costs a few empty objects, not the run
        print(f"opt-ray train: could not remove {d}/{cfg.run_id}-* ({type(e).__name__}: {e})",
              file=sys.stderr)


# --------------------------------------------------------------------------------------
# User errors inside a worker: recorded, never retried
# --------------------------------------------------------------------------------------

def _record_user_error(run_dir: Path, run_id: str, rank: int, e: UserError) -> None:
    d = run_dir / USER_ERRORS
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{run_id}-{rank}.tmp"
    tmp.write_text(json.dumps({"rank": rank, "type": type(e).__name__, "message": str(e)}))
    os.replace(tmp, d / f"{run_id}-{rank}.json")


def _user_error(run_dir: Path, run_id: str) -> dict[str, Any] | None:
    """The first user error a worker of this invocation recorded, if any."""
    for p in sorted((run_dir / USER_ERRORS).glob(f"{run_id}-*.json")):
        try:
            return json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
    return None


class _UserErrorStop(Exception):
    """Raised on the Ray Train controller to stop the gang without a retry."""


def train_worker(config: dict[str, Any]) -> None:
    """The per-worker function Ray Train runs: the library loop with Ray hooks."""
    import ray.train

    from opt_ray.train.loop import Hooks, train

    cfg = TrainConfig.from_dict(config)
    rank = ray.train.get_context().get_world_rank()

    def report(metrics: dict[str, Any], ckpt: Path | None) -> None:
        # Metrics only: checkpoints stay the loop's (see the module docstring). Every rank
        # calls report; it is a barrier.
        ray.train.report(metrics)

    def attempt() -> int:
        return _attempt_counter(cfg) if rank == 0 else 0

    try:
        train(cfg, Hooks(report=report, attempt=attempt))
    except UserError as e:
        # Restarting cannot fix bad input: record it for the controller and the driver.
        _record_user_error(cfg.run_dir, cfg.run_id, rank, e)
        raise


def _callbacks(output: str, run_id: str) -> list[Any]:
    from ray.train import UserCallback

    from opt_ray.run_dir import LOGBOOK, RunMirror, local_run_dir

    class GangEvents(UserCallback):
        """Runs on the Ray Train controller: record which workers failed and why; stop
        the gang without a retry when one failed on a user error."""

        def after_exception(self, run_context, worker_exceptions) -> None:
            run_dir = local_run_dir(output)  # on the controller's node
            user = _user_error(run_dir, run_id)
            if user is None:
                # The worker recorded it on its own node (another one, with a bucket
                # --output): recorded here too, on the driver's node, for the driver.
                for rank, e in sorted(worker_exceptions.items()):
                    base = getattr(e, "_base_exc", e)
                    if isinstance(base, UserError):
                        _record_user_error(run_dir, run_id, rank, base)
                        user = {"message": str(base)}
                        break
            if user is not None:
                raise _UserErrorStop(user["message"])
            Logbook(run_dir).event("worker_lost", ranks=sorted(worker_exceptions),
                                   errors={str(r): repr(e)[:500] for r, e in worker_exceptions.items()})
            mirror = RunMirror.of(output)
            if mirror is not None:
                mirror.try_push([LOGBOOK])

    return [GangEvents()]


# --------------------------------------------------------------------------------------
# Devices and gang sizes, from the cluster's resources
# --------------------------------------------------------------------------------------

def gang_configs(cfg: TrainConfig, resources: dict[str, float]):
    """``(ScalingConfig, TorchConfig, device)`` for ``cfg`` on a cluster advertising
    ``resources`` (``ray.cluster_resources()``). ``--device auto`` uses GPUs when the
    cluster has any, never the driver's CUDA (the driver is often a CPU head node); one
    GPU per worker, NCCL on GPUs, gloo on CPUs. Raises ``UserError`` for ``--device
    cuda`` on a cluster without GPUs."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig

    from opt_ray.devices import cluster_device

    use_gpu = cluster_device(getattr(cfg, "device", "auto"), resources) == "cuda"
    workers = cfg.workers if isinstance(cfg.workers, tuple) else int(cfg.workers)
    scaling = ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                            resources_per_worker={"GPU": 1} if use_gpu else {"CPU": 1})
    torch_config = TorchConfig(backend="nccl" if use_gpu else "gloo",
                               timeout_s=int(cfg.collective_timeout))
    return scaling, torch_config, "cuda" if use_gpu else "cpu"


def _tp_elastic_policy_cls():
    from ray.train.v2._internal.execution.scaling_policy import ElasticScalingPolicy

    class TPElasticScalingPolicy(ElasticScalingPolicy):
        """Ray Train's elastic policy, rounding every gang size down to a multiple of the
        tensor-parallel degree: a gang of 3 with --tp 2 would fail in the loop and burn a
        retry; with 3 workers' worth of resources it runs on 2."""

        def __init__(self, scaling_config, tp: int):
            super().__init__(scaling_config)
            self.tp = tp

        def _count_possible_workers(self, reserved_resources) -> int:
            n = super()._count_possible_workers(reserved_resources)
            return n - n % self.tp

    return TPElasticScalingPolicy


def tp_elastic_policy(scaling_config, tp: int):
    """The elastic scaling policy whose gangs are whole tensor-parallel groups."""
    return _tp_elastic_policy_cls()(scaling_config, tp)


def _trainer_cls():
    from ray.train.torch import TorchTrainer

    class GangTrainer(TorchTrainer):
        """``TorchTrainer`` with the TP-aware elastic policy and a driver-side signal
        handler (``on_signal``) in place of Ray Train's SIGINT-only one."""

        def __init__(self, *args: Any, tp: int = 1, on_signal=None, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self._tp = tp
            self._on_signal = on_signal

        def _initialize_and_run_controller(self, **kwargs: Any):
            if self._tp > 1 and self.scaling_config.elasticity_enabled:
                kwargs["scaling_policy"] = tp_elastic_policy(self.scaling_config, self._tp)
            return super()._initialize_and_run_controller(**kwargs)

        def _create_default_callbacks(self):
            from ray._private.worker import get_dashboard_url
            from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
            from ray.train.v2._internal.callbacks.placement_group_callback import (
                PlacementGroupCleanerCallback)

            unwanted: list[type] = []
            if not self.datasets:
                # The gang reads its shards itself and passes no Ray Datasets, but the
                # DatasetsCallback starts a DatasetManager actor on every gang start and
                # restart anyway: one more process that imports ray.data (~3 s of a core).
                unwanted.append(DatasetsCallback)
            if not get_dashboard_url():
                # The cleaner watches the controller through the state API, which lives
                # in the dashboard: on a Ray without one (`opt-ray train`'s embedded Ray)
                # it could never see the controller die, and it logged "Failed to query
                # Ray Train Controller actor state" every second of the run. There, the
                # gang's placement group goes with the driver's cluster anyway.
                unwanted.append(PlacementGroupCleanerCallback)
            return [c for c in super()._create_default_callbacks()
                    if not isinstance(c, tuple(unwanted))]

        def _register_sigint_handler(self, controller) -> None:
            if self._on_signal is None:
                return super()._register_sigint_handler(controller)
            import ray

            def handler(signum, frame):
                # Stop the gang first (rather than when the driver's process is reaped),
                # then log: a gang still running could commit one more checkpoint after
                # the `interrupted` event had named the one before it.
                try:
                    ray.get(controller.abort.remote(), timeout=10)
                except Exception:  # the controller is gone already: nothing to stop
                    pass
                self._on_signal(signal.Signals(signum).name)
                raise KeyboardInterrupt

            signal.signal(signal.SIGINT, handler)
            signal.signal(signal.SIGTERM, handler)

    return GangTrainer


# --------------------------------------------------------------------------------------
# The driver: interruptions and the command that resumes
# --------------------------------------------------------------------------------------

def resume_command(cfg: TrainConfig, argv: list[str] | None = None) -> str:
    """The command that continues this run from its newest checkpoint: this process's
    ``opt-ray train`` command line without ``--resume-from`` (which would roll back again)."""
    argv = list(sys.argv if argv is None else argv)
    if "train" in argv[1:]:
        i = argv.index("train", 1)
        rest, out, skip = argv[i + 1:], [], False
        for a in rest:
            if skip:
                skip = False
                continue
            if a == "--resume-from":
                skip = True
                continue
            if a.startswith("--resume-from="):
                continue
            out.append(a)
        return shlex.join(["opt-ray", *argv[1:i], "train", *out])
    from opt_ray.config import to_argv
    # Not started from the CLI (a library call): every setting that differs from train's
    # defaults, so that the command trains the same run; faults are not injected again.
    return shlex.join(["opt-ray", "train", "--data", cfg.data, "--output", cfg.output,
                       *to_argv(cfg, skip=("data", "output", "resume_from", "chaos"))])


def _newest_checkpoint_step(cfg: TrainConfig) -> int | None:
    from opt_ray.train.checkpoint import committed

    root = cfg.checkpoint_location
    try:
        steps = committed(root)
    except Exception:  # an unreachable object store: the event still gets written
        return None
    return steps[-1][0] if steps else None


def _record_stale_driver(run_dir: Path, cfg: TrainConfig) -> None:
    """A driver that died without cleaning up (SIGKILL, a lost head node) left its
    ``driver.json``: log its interruption before this invocation starts."""
    path = run_dir / DRIVER_FILE
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        old = {}
    Logbook(run_dir).event(
        "interrupted", step=_newest_checkpoint_step(cfg),
        reason=(f"the driver (pid {old.get('pid')} on {old.get('host')}, started "
                f"{old.get('started')}) stopped without finishing: killed or lost"),
        resume=old.get("resume") or resume_command(cfg))
    path.unlink(missing_ok=True)


def run_gang(cfg: TrainConfig, *, address: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Train with a Ray Train gang; returns the last metrics. Raises
    ``FailureBudgetExceeded`` when the run fails for good, ``UserError`` when a worker
    stopped on bad input, ``KeyboardInterrupt`` on Ctrl-C / SIGTERM (after logging it and
    printing the command that resumes)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    from opt_ray.ray_util import init_ray

    from opt_ray.run_dir import LOGBOOK, RunMirror

    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    # --output s3://...: the staging directory starts from the bucket's copy of the run
    # (driver.json included: a driver lost with its machine is noticed from another one).
    mirror = RunMirror.of(cfg.output)
    if mirror is not None:
        mirror.pull()
    _record_stale_driver(run_dir, cfg)
    resume = resume_command(cfg)
    driver_file = run_dir / DRIVER_FILE
    driver_file.write_text(json.dumps({
        "pid": os.getpid(), "host": socket.gethostname(), "run_id": cfg.run_id, "resume": resume,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
    if mirror is not None:
        mirror.try_push([LOGBOOK, DRIVER_FILE])
    interrupted: list[str] = []

    def on_signal(name: str) -> None:
        if interrupted:
            return
        interrupted.append(name)
        _wait_for_ranks_to_exit(run_dir)  # after the abort: the step logged is the last one
        Logbook(run_dir).event("interrupted", step=_newest_checkpoint_step(cfg),
                               reason=f"{name} to the driver", resume=resume)
        # Recorded: a SIGKILL that follows (`ray job stop` escalates after a few seconds)
        # must not make the next driver log this interruption a second time.
        driver_file.unlink(missing_ok=True)
        print(f"\nopt-ray train: {name}: stopping the gang; the run resumes from its newest "
              f"checkpoint with:\n  {resume}", file=sys.stderr, flush=True)

    ray_dir = run_dir / ".ray_train"
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    t0 = time.time()
    try:
        init_ray(address)
        scaling, torch_config, device = gang_configs(cfg, ray.cluster_resources())
        if hasattr(cfg, "device"):
            cfg.device = device  # workers use what the gang reserved, not their own guess
        trainer = _trainer_cls()(
            train_worker,
            train_loop_config=cfg.to_dict(),
            scaling_config=scaling,
            torch_config=torch_config,
            run_config=RunConfig(
                # A fresh Ray Train run per invocation, holding no checkpoint (see above).
                storage_path=str(ray_dir), name=cfg.run_id,
                failure_config=FailureConfig(max_failures=cfg.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=None),
                callbacks=_callbacks(cfg.output, cfg.run_id)),
            tp=cfg.tp, on_signal=on_signal,
        )
        try:
            with (_Progress(run_dir, cfg.steps, mirror) if progress else _nullctx()):
                result = trainer.fit()
        except ray.train.TrainingFailedError as e:
            if interrupted:
                raise KeyboardInterrupt from e
            if mirror is not None:
                mirror.pull()  # guard.json as rank 0 left it, wherever it ran
            _raise_failure(run_dir, cfg, e, t0)
        if interrupted:  # the gang was aborted by a signal: not a finished run
            raise KeyboardInterrupt
        return dict(result.metrics or {})
    except KeyboardInterrupt:
        on_signal("SIGINT")  # no-op when the handler already logged it
        raise
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
        driver_file.unlink(missing_ok=True)
        if mirror is not None:
            _unmirror(mirror, DRIVER_FILE)
            mirror.try_push([LOGBOOK])
        shutil.rmtree(ray_dir / cfg.run_id, ignore_errors=True)
        if ray_dir.is_dir() and not any(ray_dir.iterdir()):
            ray_dir.rmdir()
        shutil.rmtree(run_dir / USER_ERRORS, ignore_errors=True)
        _clear_attempt_counter(cfg)


def _wait_for_ranks_to_exit(run_dir: Path, timeout: float = 10.0) -> None:
    """Until the gang's processes on this node are gone (their ``RUN_DIR/pids`` files):
    Ray Train's abort asks its workers to stop and then kills them without waiting, so a
    rank may still commit a checkpoint for a moment after it returns."""
    pids = []
    for f in (run_dir / "pids").glob("rank*.pid"):
        try:
            pids.append(int(f.read_text().strip()))
        except (OSError, ValueError):
            continue
    deadline = time.time() + timeout
    while pids and time.time() < deadline:
        alive = []
        for pid in pids:
            try:
                os.kill(pid, 0)
                alive.append(pid)
            except (ProcessLookupError, PermissionError):
                continue
        pids = alive
        if pids:
            time.sleep(0.1)


def _unmirror(mirror: Any, name: str) -> None:
    try:
        mirror.remove(name)
    except Exception as e:  # noqa: BLE001
        print(f"opt-ray train: could not remove {mirror.url}/{name} ({type(e).__name__}: {e}); "
              f"the next driver will log a stale interruption", file=sys.stderr)


def _raise_failure(run_dir: Path, cfg: TrainConfig, e: BaseException, t0: float) -> None:
    gave_up = _guard_give_up(run_dir)
    if gave_up is not None:
        # Not a hardware failure: restarting cannot help, so say what the guard tried.
        Logbook(run_dir).event("failure", reason="divergence guard gave up", report=gave_up)
        raise FailureBudgetExceeded(f"the divergence guard gave up: {gave_up}; see "
                                    f"{run_dir / 'logbook.jsonl'}") from e
    user = _user_error(run_dir, cfg.run_id)
    if user is not None:
        Logbook(run_dir).event("failure", reason=f"stopped without a retry on bad input: "
                                                 f"{user['message']}")
        raise UserError(user["message"]) from e
    reason = (f"training failed {cfg.max_failures + 1} time(s), more than --max-failures "
              f"{cfg.max_failures} allows; last error: {_short(e)}")
    Logbook(run_dir).event("failure_budget_exceeded", max_failures=cfg.max_failures,
                           reason=reason, seconds=round(time.time() - t0, 1))
    raise FailureBudgetExceeded(reason + f"; see {run_dir / 'logbook.jsonl'}") from e


class _Progress:
    """A tqdm bar on the driver, fed by tailing ``metrics.jsonl``.

    With ``--output s3://...`` rank 0 may run on another node, whose staging directory
    is not this one: ``mirror`` is then pulled every ``pull_every`` seconds, so the bar
    moves at each of rank 0's pushes (every checkpoint, and every ``--mirror-every``
    seconds between). A pull changes nothing while
    this node's copy is the newest push (rank 0 on this node: the bar reads its file)."""

    def __init__(self, run_dir: Path, total: int, mirror: Any = None, pull_every: float = 10.0):
        self.path = run_dir / METRICS
        self.total = total
        self.mirror, self.pull_every = mirror, pull_every
        self.step = 0  # the newest step shown
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
        pulled = time.monotonic()
        try:
            while not self._stop.wait(1.0):
                if self.mirror is not None and time.monotonic() - pulled >= self.pull_every:
                    pulled = time.monotonic()
                    try:
                        self.mirror.pull()
                    except Exception:  # the bucket unreachable for now: the next pull
                        pass
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
            bar.n = self.step = rec["step"]
            bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}",
                            tok_s=f"{rec['tokens_per_s']:.0f}", refresh=False)
            bar.refresh()
            return


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
