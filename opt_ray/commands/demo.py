"""`opt-ray demo`: run the whole pipeline on the built-in sample corpus on an embedded local Ray."""

from __future__ import annotations

import argparse

from opt_ray.errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on the built-in sample corpus on an embedded local Ray", description="run the whole pipeline on the built-in sample corpus on an embedded local Ray.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise UserError("'opt-ray demo' is not implemented yet")
