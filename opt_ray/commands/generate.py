"""`opt-ray generate`: generate text locally from a checkpoint with the serving engine."""

from __future__ import annotations

import argparse

from opt_ray.errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text locally from a checkpoint with the serving engine", description="generate text locally from a checkpoint with the serving engine.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise UserError("'opt-ray generate' is not implemented yet")
