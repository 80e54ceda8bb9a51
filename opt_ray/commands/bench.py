"""`opt-ray bench`: run the side-by-side benchmarks and print JSON."""

from __future__ import annotations

import argparse

from opt_ray.errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run the side-by-side benchmarks and print JSON", description="run the side-by-side benchmarks and print JSON.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise UserError("'opt-ray bench' is not implemented yet")
