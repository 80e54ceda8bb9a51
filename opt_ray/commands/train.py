"""`opt-ray train`: train an OPT model on a fault-tolerant, elastic Ray Train gang.

Every flag maps to a ``TrainConfig`` field. Re-running with the same ``--output`` resumes
from its newest valid checkpoint (on any number of workers or tensor-parallel degree).
"""

from __future__ import annotations

import argparse

from opt_ray.ray_util import add_ray_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    from opt_ray.config import TrainConfig, add_dataclass_args

    p = sub.add_parser("train", help="train an OPT model on a fault-tolerant, elastic Ray Train gang",
                       description="Train an OPT model (the paper's recipe) on a Ray Train gang: FSDP2 "
                                   "+ optional tensor parallelism, DCP checkpoints, restarts from the "
                                   "newest valid checkpoint after a worker loss or hang. Every "
                                   "configuration error is reported before Ray starts.")
    # Flags, defaults and help come from TrainConfig's fields (opt_ray/config.py).
    add_dataclass_args(p, TrainConfig)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_ray_args(p)
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    """The ``TrainConfig`` the flags describe (validated on construction)."""
    from opt_ray.config import TrainConfig, from_args

    return from_args(TrainConfig, args)


def run(args: argparse.Namespace) -> int:
    import sys

    from opt_ray.train.loop import preflight

    cfg = config_from_args(args)
    # Everything knowable before Ray starts is checked here: a bad input is one line and
    # exit 2, not a gang that fails and restarts.
    preflight(cfg)
    if cfg.resume_from:
        _check_resume_from(cfg.checkpoint_location, cfg.resume_from)
    from actors.train import FailureBudgetExceeded, run_gang

    if args.num_cpus:
        from opt_ray.ray_util import init_ray
        init_ray(args.address, num_cpus=args.num_cpus)
    try:
        metrics = run_gang(cfg, address=args.address, progress=args.progress)
    except FailureBudgetExceeded as e:
        print(f"opt-ray train: failed: {e}", file=sys.stderr)
        return 1
    print(f"trained to step {metrics.get('step', cfg.steps)}; run directory {cfg.output} "
          f"(checkpoints in {cfg.checkpoint_location}, metrics in {cfg.output}/metrics.jsonl)")
    return 0


def _check_resume_from(checkpoints: str, step: int) -> None:
    """Fail before any worker starts when the requested checkpoint is not there."""
    from opt_ray.train.checkpoint import CheckpointError, committed, verify

    steps = {s: p for s, p in committed(checkpoints)}
    if step not in steps or verify(steps[step]) is not None:
        valid = [s for s, p in steps.items() if verify(p) is None]
        raise CheckpointError(f"--resume-from {step}: no valid checkpoint of step {step} in "
                              f"{checkpoints}; valid steps: {valid or 'none'}")
