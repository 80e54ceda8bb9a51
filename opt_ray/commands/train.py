"""`opt-ray train`: train an OPT model on a fault-tolerant, elastic Ray Train gang.

Every flag maps to a ``TrainConfig`` field. Re-running with the same ``--output`` resumes
from its newest valid checkpoint (on any number of workers or tensor-parallel degree).
"""

from __future__ import annotations

import argparse

from opt_ray.ray_util import add_ray_args


def _workers(text: str) -> int | tuple[int, int]:
    try:
        if ":" in text:
            lo, hi = text.split(":", 1)
            return int(lo), int(hi)
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--workers takes N or MIN:MAX (e.g. 2 or 1:4), got {text!r}") from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train an OPT model on a fault-tolerant, elastic Ray Train gang",
                       description="Train an OPT model (the paper's recipe) on a Ray Train gang: FSDP2 "
                                   "+ optional tensor parallelism, DCP checkpoints, restarts from the "
                                   "newest valid checkpoint after a worker loss or hang.")
    p.add_argument("--preset", default="tiny", help="model size from the paper's Table 1, or tiny")
    p.add_argument("--data", required=True, help="token shards directory (from `opt-ray tokenize`)")
    p.add_argument("--output", required=True, help="run directory (resumed if it has checkpoints)")
    p.add_argument("--workers", type=_workers, default=1,
                   help="N workers, or MIN:MAX for an elastic gang (default 1)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (divides the workers)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps in total")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default=None,
                   help="default: bf16 on CPU, fp16 with dynamic loss scaling on GPU")
    p.add_argument("--batch-tokens", type=int, default=None,
                   help="tokens per optimizer step (default: the preset's); reached by gradient "
                        "accumulation whatever the number of workers")
    p.add_argument("--micro-batch", type=int, default=8, help="rows per forward/backward pass")
    p.add_argument("--lr", type=float, default=None, help="peak LR (default: the preset's)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="default: 375M tokens (the paper), at most a tenth of --steps")
    p.add_argument("--decay-steps", type=int, default=None,
                   help="step at which the LR reaches 10%% of peak (default: --steps)")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    p.add_argument("--keep", type=int, default=2, help="checkpoints kept (>= 2), plus milestones")
    p.add_argument("--milestone-every", type=int, default=None,
                   help="also keep every checkpoint whose step is a multiple of this")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels: a restarted run ends bit-identical to an "
                        "uninterrupted one (same world size)")
    p.add_argument("--max-failures", type=int, default=3,
                   help="gang restarts allowed before the run fails (-1: unlimited)")
    p.add_argument("--collective-timeout", type=float, default=300.0,
                   help="seconds before a hung collective fails the gang (default 300)")
    p.add_argument("--chaos", default="",
                   help="fault injection, e.g. kill:rank=1:step=5,hang:rank=0:step=8,corrupt:step=6,"
                        "killsave:rank=0:step=4,nan:step=10,spike:step=12:factor=10")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per worker (default: Ray's, one per CPU the worker "
                        "reserves); e.g. the machine's cores for a single CPU worker")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each layer's activations in backward (less memory)")
    p.add_argument("--resume-from", type=int, default=None, metavar="STEP",
                   help="roll back to the checkpoint of step STEP of --output and continue from "
                        "there; newer checkpoints are moved aside to RUN_DIR/abandoned/")
    p.add_argument("--no-guard", dest="guard", action="store_false",
                   help="disable the divergence guard (rollback on NaN / loss spikes)")
    g = p.add_argument_group("divergence guard policy (defaults: the OPT-175B team's interventions)")
    g.add_argument("--guard-spike-factor", type=float, dest="spike_factor",
                   help="a loss above this x its running mean is a spike (default 1.5)")
    g.add_argument("--guard-lr-factor", type=float, dest="lr_factor",
                   help="LR multiplier per rollback, compounding (default 0.5)")
    g.add_argument("--guard-clip", type=float, dest="clip_after_rollback",
                   help="gradient clipping after a rollback (default 0.3, as OPT lowered 1.0 -> 0.3)")
    g.add_argument("--guard-skip-batches", type=int, dest="skip_batches",
                   help="batches up to the detection that are skipped after a rollback (default 1)")
    g.add_argument("--guard-max-rollbacks", type=int, dest="max_rollbacks",
                   help="rollbacks before the run stops with a report (default 3)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_ray_args(p)
    p.set_defaults(func=run)


GUARD_FLAGS = ("spike_factor", "lr_factor", "clip_after_rollback", "skip_batches", "max_rollbacks")


def config_from_args(args: argparse.Namespace):
    from opt_ray.train.loop import TrainConfig

    return TrainConfig(
        data=args.data, output=args.output, preset=args.preset, steps=args.steps,
        workers=args.workers, tp=args.tp, precision=args.precision, batch_tokens=args.batch_tokens,
        micro_batch=args.micro_batch, lr=args.lr, warmup_steps=args.warmup_steps,
        decay_steps=args.decay_steps, grad_clip=args.grad_clip, dropout=args.dropout, seed=args.seed,
        checkpoint_every=args.checkpoint_every, keep=args.keep, milestone_every=args.milestone_every,
        deterministic=args.deterministic, max_failures=args.max_failures,
        collective_timeout=args.collective_timeout, chaos=args.chaos,
        activation_checkpointing=args.activation_checkpointing, guard=args.guard,
        resume_from=args.resume_from, num_threads=args.threads,
        guard_policy={k: getattr(args, k) for k in GUARD_FLAGS if getattr(args, k) is not None})


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from actors.train import FailureBudgetExceeded, run_gang
    from opt_ray.data.shards import ShardDataset

    cfg = config_from_args(args)
    ShardDataset(cfg.data, verify=False)  # a bad --data fails here, before any worker starts
    if cfg.resume_from:
        _check_resume_from(Path(cfg.output), cfg.resume_from)
    if args.num_cpus:
        from opt_ray.ray_util import init_ray
        init_ray(args.address, num_cpus=args.num_cpus)
    try:
        metrics = run_gang(cfg, address=args.address, progress=args.progress)
    except FailureBudgetExceeded as e:
        print(f"opt-ray train: failed: {e}", file=sys.stderr)
        return 1
    run_dir = Path(cfg.output)
    print(f"trained to step {metrics.get('step', cfg.steps)}; run directory {run_dir} "
          f"(checkpoints in {run_dir / 'checkpoints'}, metrics in {run_dir / 'metrics.jsonl'})")
    return 0


def _check_resume_from(run_dir, step: int) -> None:
    """Fail before any worker starts when the requested checkpoint is not there."""
    from opt_ray.train.checkpoint import CheckpointError, committed, verify

    steps = {s: p for s, p in committed(run_dir / "checkpoints")}
    if step not in steps or verify(steps[step]) is not None:
        valid = [s for s, p in steps.items() if verify(p) is None]
        raise CheckpointError(f"--resume-from {step}: no valid checkpoint of step {step} in "
                              f"{run_dir / 'checkpoints'}; valid steps: {valid or 'none'}")
