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


def _limit(s: str) -> float | int:
    v = float(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"--limit must be > 0, got {s}")
    return int(v) if v >= 1 and v == int(v) else v


def _bool(s: str) -> bool:
    if s.lower() in ("true", "1", "yes"):
        return True
    if s.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def _positive(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {s}")
    return v


def add_parser(sub: argparse._SubParsersAction) -> None:
    from opt_ray.ray_util import add_ray_args

    p = sub.add_parser(
        "eval", help="evaluate a checkpoint: lm-eval tasks (zero-/few-shot) or perplexity on shards",
        description="Evaluate a model: an HF-format directory (from `opt-ray export`), a training run "
                    "directory (its newest valid checkpoint) or one of its checkpoints/step_N. With "
                    "--tasks: lm-evaluation-harness tasks (its registry, plus your YAML tasks with "
                    "--include-path), scored by the checkpoint's own model and tokenizer; prints lm-eval's "
                    "table, writes its JSON with --output, and records the scores in the run's logbook. "
                    "With --data: mean next-token loss and perplexity on token shards (one JSON line).")
    p.add_argument("checkpoint", metavar="RUN_DIR|CKPT|HF_DIR", help="model to evaluate")
    t = p.add_argument_group("lm-eval tasks (needs `pip install 'opt-ray[eval]'`)")
    t.add_argument("--tasks", default=None,
                   help="comma-separated lm-eval task, group or tag names (globs allowed), e.g. "
                        "hellaswag,piqa,arc_easy")
    t.add_argument("--num-fewshot", type=int, default=None,
                   help="few-shot examples per prompt (default: each task's own, else 0)")
    t.add_argument("--include-path", default=None,
                   help="directory of extra lm-eval YAML tasks (e.g. dataset_path: json with local files)")
    t.add_argument("--limit", type=_limit, default=None,
                   help="evaluate at most N documents per task (a number < 1 is a fraction)")
    t.add_argument("--workers", type=_positive, default=1,
                   help="Ray actors scoring requests in parallel, each with its own copy of the model")
    t.add_argument("--output", default=None, help="write lm-eval's results JSON here")
    t.add_argument("--log-samples", action="store_true",
                   help="include every document's requests and scores in --output")
    t.add_argument("--seed", type=int, default=None,
                   help="seed for lm-eval's sampling of documents and few-shot examples, and for "
                        "sampled generation (default: lm-eval's seeds)")
    t.add_argument("--add-bos-token", type=_bool, default=None, metavar="true|false",
                   help="prepend bos to every input (default: as the tokenizer does; OPT's prepends </s>)")
    t.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="weights' dtype for scoring (log-softmax is fp32 either way)")
    t.add_argument("--no-logbook", dest="logbook", action="store_false",
                   help="do not record the scores in the run's logbook")
    add_ray_args(t)
    d = p.add_argument_group("perplexity on token shards")
    d.add_argument("--data", default=None, help="token shards directory (from `opt-ray tokenize`)")
    d.add_argument("--split", default="valid", help="shard split (default valid)")
    d.add_argument("--max-rows", type=int, default=None, help="evaluate at most this many rows")
    p.add_argument("--batch-size", type=_positive, default=8, help="sequences per forward pass")
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
            count = batch[:, 1:].numel()
            total += float(model(batch[:, :-1], targets=batch[:, 1:])) * count
            tokens += count
    loss = total / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "rows": n, "tokens": tokens}


def run_shards(args: argparse.Namespace) -> int:
    import json

    from opt_ray.data.shards import ShardDataset
    from opt_ray.eval.loading import load_model, load_tokenizer, locate

    ckpt = locate(args.checkpoint)
    # The shards' tokenizer must be the model's (issue 12): ShardDataset compares them.
    data = ShardDataset(args.data, split=args.split, tokenizer=load_tokenizer(ckpt))
    model = load_model(ckpt)
    out = evaluate(model, data, batch_size=args.batch_size, max_rows=args.max_rows)
    print(json.dumps({"model": str(args.checkpoint), "data": args.data, "split": args.split, **out}))
    return 0


# ------------------------------------------------------------------------------ tasks
def run_tasks(args: argparse.Namespace) -> int:
    import os

    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise UserError(LM_EVAL_MISSING) from e
    from opt_ray.eval.loading import locate

    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    if not names:
        raise UserError("--tasks is empty; name at least one lm-eval task")
    if args.output:
        _check_writable(args.output)
    ckpt = locate(args.checkpoint)   # a missing tokenizer fails before anything loads
    results = evaluate_tasks(
        ckpt.path, names, num_fewshot=args.num_fewshot, include_path=args.include_path,
        limit=args.limit, batch_size=args.batch_size, workers=args.workers, seed=args.seed,
        add_bos_token=args.add_bos_token, dtype=args.dtype, log_samples=args.log_samples,
        address=args.address, num_cpus=args.num_cpus)
    from lm_eval.utils import handle_non_serializable, make_table

    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    if args.output:
        import json

        from opt_ray.artifacts import write_text_atomic
        write_text_atomic(args.output, json.dumps(results, indent=2, default=handle_non_serializable,
                                                  ensure_ascii=False) + "\n")
        print(f"results written to {os.path.abspath(args.output)}", file=sys.stderr)
    if args.logbook and ckpt.run_dir is not None:
        from opt_ray.logbook import Logbook
        Logbook(ckpt.run_dir).event(
            "eval", checkpoint=str(ckpt.weights), step=ckpt.step, tasks=names,
            num_fewshot=args.num_fewshot, limit=args.limit, results=scores(results))
        print(f"scores recorded in {ckpt.run_dir / 'logbook.jsonl'}", file=sys.stderr)
    return 0


def evaluate_tasks(checkpoint, names: list[str], *, num_fewshot: int | None = None,
                   include_path: str | None = None, limit: float | int | None = None,
                   batch_size: int = 8, workers: int = 1, seed: int | None = None,
                   add_bos_token: bool | None = None, dtype: str = "float32",
                   log_samples: bool = False, address: str | None = None,
                   num_cpus: int | None = None) -> dict:
    """lm-eval's ``simple_evaluate`` of ``names`` on ``checkpoint`` through ``OptLM``;
    returns lm-eval's results dict. Task problems are found before the model loads."""
    from lm_eval import simple_evaluate

    from opt_ray.eval import tasks as T
    from opt_ray.eval.lm import OptLM

    if num_fewshot is not None and num_fewshot < 0:
        raise UserError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    tm = T.task_manager(names, include_path)
    names = T.check_names(tm, names)
    T.check_local_data(tm, names)
    task_objs = T.load_tasks(tm, names)
    if workers > 1:
        from opt_ray.ray_util import init_ray
        init_ray(address, num_cpus=num_cpus)
    lm = OptLM.from_checkpoint(checkpoint, batch_size=batch_size, workers=workers,
                               add_bos_token=add_bos_token, dtype=dtype, seed=seed or 0)
    seeds = {} if seed is None else {"random_seed": seed, "numpy_random_seed": seed,
                                     "torch_random_seed": seed, "fewshot_random_seed": seed}
    results = simple_evaluate(model=lm, tasks=task_objs, task_manager=tm, num_fewshot=num_fewshot,
                              limit=limit, batch_size=batch_size, log_samples=log_samples, **seeds)
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
