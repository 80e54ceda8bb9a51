"""`opt-ray tokenize`: tokenize a dedup output into packed Arrow token shards."""

from __future__ import annotations

import argparse

from opt_ray.errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenize", help="tokenize a dedup output into packed Arrow token shards", description="tokenize a dedup output into packed Arrow token shards.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise UserError("'opt-ray tokenize' is not implemented yet")
