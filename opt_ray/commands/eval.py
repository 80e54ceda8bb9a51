"""`opt-ray eval`: evaluate a checkpoint's loss / perplexity on token shards."""

from __future__ import annotations

import argparse

from opt_ray.errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint's loss / perplexity on token shards", description="evaluate a checkpoint's loss / perplexity on token shards.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise UserError("'opt-ray eval' is not implemented yet")
