"""`opt-ray eval`: evaluate a checkpoint's loss / perplexity on token shards."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint's loss / perplexity on token shards",
                       description="Mean next-token loss and perplexity of a model on a split of "
                                   "token shards. The model is a training run / checkpoint "
                                   "directory or an HF-format directory. Prints one JSON object.")
    p.add_argument("checkpoint", metavar="RUN_DIR|CKPT|HF_DIR", help="model to evaluate")
    p.add_argument("--data", required=True, help="token shards directory")
    p.add_argument("--split", default="valid", help="shard split (default valid)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward pass")
    p.add_argument("--max-rows", type=int, default=None, help="evaluate at most this many rows")
    p.set_defaults(func=run)


def evaluate(model, data, *, batch_size: int = 8, max_rows: int | None = None) -> dict:
    """Token-weighted mean cross-entropy over the first ``max_rows`` rows of ``data``."""
    import math

    import torch
    import torch.nn.functional as F

    from opt_ray.errors import UserError

    if data.vocab_size > model.config.vocab_size:
        raise UserError(f"the shards' vocabulary ({data.vocab_size}) is larger than the model's "
                        f"({model.config.vocab_size}); evaluate on shards made with its tokenizer")
    n = min(len(data), max_rows or len(data))
    total, tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, n, batch_size):
            batch = torch.from_numpy(data.batch(range(start, min(start + batch_size, n))))
            logits = model(batch[:, :-1])
            total += float(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                           batch[:, 1:].reshape(-1), reduction="sum"))
            tokens += batch[:, 1:].numel()
    loss = total / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "rows": n, "tokens": tokens}


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from opt_ray.data.shards import ShardDataset

    path = Path(args.checkpoint)
    if (path / "config.json").is_file():
        from opt_ray.model.hf import from_hf
        model = from_hf(path)
    else:
        from opt_ray.train.checkpoint import load_model
        model = load_model(path)
    data = ShardDataset(args.data, split=args.split)
    out = evaluate(model, data, batch_size=args.batch_size, max_rows=args.max_rows)
    print(json.dumps({"model": str(path), "data": args.data, "split": args.split, **out}))
    return 0
