"""`opt-ray eval`: zero-/few-shot tasks through lm-evaluation-harness, or loss / perplexity
on token shards.

Tasks mode (``--tasks``) runs lm-eval's ``simple_evaluate`` over ``OptLM``, the project's
own lm-eval adapter (``opt_ray.eval.lm``), optionally data-parallel over Ray actors
(``--workers``). Results are lm-eval's JSON layout plus its table; when the checkpoint
belongs to a training run the scores go into the run's logbook (an ``eval`` event), so
the chronicle shows the accuracy curve. Shards mode (``--data``) is the token-weighted
mean loss through the model's own fused loss (``lm_head_loss``, what training computes).
"""

from __future__ import annotations

import argparse
import sys

from opt_ray.errors import UserError

LM_EVAL_MISSING = ("lm-eval is not installed; `opt-ray eval --tasks` needs it: "
                   "pip install 'opt-ray[eval]'")


def add_parser(sub: argparse._SubParsersAction) -> None:
    from opt_ray.ray_util import add_ray_args

    p = sub.add_parser(
        "eval", help="evaluate a checkpoint: lm-eval tasks (zero-/few-shot) or perplexity on shards",
        description="Evaluate a model: an HF-format directory (from `opt-ray export`), a training run "
                    "directory (its newest valid checkpoint) or one of its checkpoints/step_N, local or the "
                    "URL of a run in object storage (s3://bucket/run). With "
                    "--tasks: lm-evaluation-harness tasks (its registry, plus your YAML tasks with "
                    "--include-path), scored by the checkpoint's own model and tokenizer; prints lm-eval's "
                    "table, writes its JSON with --output, and records the scores in the run's logbook. "
                    "With --data: mean next-token loss and perplexity on token shards (one JSON line).")
    p.add_argument("checkpoint", metavar="RUN_DIR|CKPT|HF_DIR", help="model to evaluate (a run or "
                   "checkpoint may be a URL: s3://bucket/run[/checkpoints/step_N])")
    from opt_ray.config import add_dataclass_args
    from opt_ray.eval.config import EvalConfig

    t = p.add_argument_group("lm-eval tasks (needs `pip install 'opt-ray[eval]'`)")
    add_dataclass_args(t, EvalConfig)
    add_ray_args(t)
    d = p.add_argument_group("perplexity on token shards")
    d.add_argument("--data", default=None, help="token shards (from `opt-ray tokenize`): a "
                   "directory or a bucket URL (s3://bucket/shards)")
    d.add_argument("--split", default="valid", help="shard split (default valid)")
    d.add_argument("--max-rows", type=int, default=None, help="evaluate at most this many rows")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if bool(args.tasks) == bool(args.data):
        raise UserError("pass either --tasks T1,T2 (lm-eval tasks) or --data SHARDS (perplexity "
                        "on token shards)")
    if args.data:
        return run_shards(args)
    return run_tasks(args)


# ------------------------------------------------------------------------------ shards
def evaluate(model, data, *, batch_size: int = 8, max_rows: int | None = None) -> dict:
    """Token-weighted mean next-token loss over the first ``max_rows`` rows of ``data``,
    computed by the model's own loss (``model(inputs, targets=...)``: the fused chunked
    ``lm_head_loss`` training uses)."""
    import math

    import torch

    if data.vocab_size > model.config.vocab_size:
        raise UserError(f"the shards' vocabulary ({data.vocab_size}) is larger than the model's "
                        f"({model.config.vocab_size}); evaluate on shards made with its tokenizer")
    n = min(len(data), max_rows or len(data))
    total, tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, n, batch_size):
            batch = torch.from_numpy(data.batch(range(start, min(start + batch_size, n))))
            batch = batch.to(next(model.parameters()).device)
            count = batch[:, 1:].numel()
            total += float(model(batch[:, :-1], targets=batch[:, 1:])) * count
            tokens += count
    loss = total / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "rows": n, "tokens": tokens}


def run_shards(args: argparse.Namespace) -> int:
    """Perplexity on shards, in this process or, when this driver runs on a Ray cluster
    with GPUs and has none itself (``ray job submit`` on a CPU head node), in one Ray task
    with a GPU (``eval.devices.place``)."""
    import json

    from opt_ray.eval.devices import place
    from opt_ray.eval.loading import locate

    if args.workers != 1:
        raise UserError(f"--workers {args.workers} applies to --tasks; perplexity on shards (--data) "
                        f"runs on one copy of the model (one GPU, or --tp N of them): drop --workers")
    if args.tp < 1:
        raise UserError(f"--tp must be >= 1, got {args.tp}")
    ckpt = locate(args.checkpoint)   # verified here, once; a bad one is one line, before Ray
    where = place(args.device, args.dtype, args.tp, address=args.address, num_cpus=args.num_cpus,
                  tp=args.tp)
    job = (ckpt, args.data, args.split, where.device, where.dtype, args.batch_size, args.max_rows)
    if args.tp > 1:
        # One copy of the model split over --tp actors of one node (actors.eval.WorkerPool);
        # the shards and their tokenizer are checked here first, before any actor starts.
        from actors.eval import WorkerPool
        from opt_ray.data.shards import ShardDataset
        from opt_ray.eval.loading import load_tokenizer
        ShardDataset(args.data, split=args.split, tokenizer=load_tokenizer(ckpt))
        pool = WorkerPool(ckpt, workers=args.tp, tp=args.tp, dtype=where.dtype, device=where.device,
                          batch_size=args.batch_size)
        try:
            out = pool.perplexity(ckpt, args.data, args.split, args.batch_size, args.max_rows)
        finally:
            pool.close()
    elif where.actors:
        import ray
        from opt_ray.ray_util import user_error
        try:
            out = ray.get(ray.remote(num_cpus=1, num_gpus=1)(shards_perplexity).remote(*job))
        except ray.exceptions.RayTaskError as e:
            if (bad := user_error(e)) is not None:
                raise bad from None       # bad input: one line, exit 2
            raise
    else:
        out = shards_perplexity(*job)
    print(json.dumps({"model": str(args.checkpoint), "data": args.data, "split": args.split, **out}))
    return 0


def shards_perplexity(ckpt, data: str, split: str, device: str, dtype: str,
                      batch_size: int, max_rows: int | None) -> dict:
    """``evaluate`` of ``ckpt`` (``eval.loading.locate``'s) on the ``split`` of the shards
    ``data``, the model in ``dtype`` on ``device`` (where this runs: a GPU Ray gave this
    task, or this process)."""
    import torch

    from opt_ray.data.shards import ShardDataset
    from opt_ray.devices import local_device
    from opt_ray.eval.loading import load_model, load_tokenizer

    device = local_device(device)
    # The shards' tokenizer must be the model's (issue 12): ShardDataset compares them.
    ds = ShardDataset(data, split=split, tokenizer=load_tokenizer(ckpt))
    model = load_model(ckpt, dtype=getattr(torch, dtype)).to(device)
    return evaluate(model, ds, batch_size=batch_size, max_rows=max_rows)


# ------------------------------------------------------------------------------ tasks
def run_tasks(args: argparse.Namespace) -> int:
    import os

    from opt_ray.config import from_args
    from opt_ray.eval.config import EvalConfig

    cfg = from_args(EvalConfig, args)   # bad values fail here, before anything loads
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise UserError(LM_EVAL_MISSING) from e
    from opt_ray.eval.loading import locate

    if not cfg.tasks:
        raise UserError("--tasks is empty; name at least one lm-eval task")
    if cfg.output:
        _check_writable(cfg.output)
    ckpt = locate(args.checkpoint)   # a missing tokenizer fails before anything loads
    results = evaluate_tasks(ckpt.path, cfg, address=args.address, num_cpus=args.num_cpus)
    from lm_eval.utils import handle_non_serializable, make_table

    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    if cfg.output:
        import json

        from opt_ray.artifacts import write_text_atomic
        write_text_atomic(cfg.output, json.dumps(results, indent=2, default=handle_non_serializable,
                                                 ensure_ascii=False) + "\n")
        print(f"results written to {os.path.abspath(cfg.output)}", file=sys.stderr)
    if cfg.logbook and ckpt.run_dir is not None:
        from opt_ray.logbook import LOGBOOK, Logbook
        Logbook(ckpt.run_dir).event(
            "eval", checkpoint=str(ckpt.weights), step=ckpt.step, tasks=list(cfg.tasks),
            num_fewshot=cfg.num_fewshot, limit=cfg.limit, results=scores(results))
        where = ckpt.run_dir / LOGBOOK
        if ckpt.run_url is not None:  # a bucket run: its logbook there gains the event
            from opt_ray.run_dir import RunMirror
            RunMirror(ckpt.run_url, ckpt.run_dir).try_push([LOGBOOK])
            where = f"{ckpt.run_url}/{LOGBOOK}"
        print(f"scores recorded in {where}", file=sys.stderr)
    return 0


def evaluate_tasks(checkpoint, cfg=None, *, address: str | None = None,
                   num_cpus: int | None = None, **overrides) -> dict:
    """lm-eval's ``simple_evaluate`` of ``cfg.tasks`` on ``checkpoint`` through ``OptLM``;
    returns lm-eval's results dict. ``cfg`` is an ``EvalConfig`` (or its fields as keyword
    arguments). Task problems are found before the model loads."""
    from lm_eval import simple_evaluate

    from opt_ray.eval import tasks as T
    from opt_ray.eval.config import EvalConfig
    from opt_ray.eval.lm import OptLM

    if cfg is None:
        cfg = EvalConfig(**overrides)
    elif overrides:
        cfg = EvalConfig(**{**cfg.to_dict(), **overrides})
    tm = T.task_manager(cfg.tasks, cfg.include_path)
    names = T.check_names(tm, cfg.tasks)
    T.check_local_data(tm, names)
    task_objs = T.load_tasks(tm, names)
    from opt_ray.eval.devices import place
    where = place(cfg.device, cfg.dtype, cfg.workers, address=address, num_cpus=num_cpus, tp=cfg.tp)
    lm = OptLM.from_checkpoint(checkpoint, batch_size=cfg.batch_size, workers=cfg.workers,
                               add_bos_token=cfg.add_bos_token, dtype=where.dtype,
                               device=where.device, actors=where.actors, seed=cfg.seed or 0,
                               tp=cfg.tp)
    seed = cfg.seed
    seeds = {} if seed is None else {"random_seed": seed, "numpy_random_seed": seed,
                                     "torch_random_seed": seed, "fewshot_random_seed": seed}
    try:
        results = simple_evaluate(model=lm, tasks=task_objs, task_manager=tm,
                                  num_fewshot=cfg.num_fewshot, limit=cfg.limit,
                                  batch_size=cfg.batch_size, log_samples=cfg.log_samples, **seeds)
    finally:
        if hasattr(lm.engine, "close"):    # the actors and their placement groups
            lm.engine.close()
    results["config"]["model"] = str(checkpoint)
    return results


def scores(results: dict) -> dict:
    """task -> {metric: value}: the numbers of lm-eval's results (stderr 'N/A' and the
    name/alias bookkeeping left out), groups included."""
    out = {}
    for section in ("results", "groups"):
        for task, metrics in (results.get(section) or {}).items():
            out[task] = {k: v for k, v in metrics.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "sample_len"}
    return out


def _check_writable(path: str) -> None:
    import os

    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UserError(f"--output {path} is a directory; pass a file name such as results.json")
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise UserError(f"--output {path}: directory {parent} does not exist or is not writable")
