"""`opt-ray control`: run the gRPC control server."""

from __future__ import annotations

import argparse

from opt_ray.errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("control", help="run the gRPC control server", description="run the gRPC control server.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise UserError("'opt-ray control' is not implemented yet")
