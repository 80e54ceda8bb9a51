"""`opt-ray serve`: serve generation from Ray Serve replicas (OpenAI-compatible HTTP + gRPC)."""

from __future__ import annotations

import argparse

from opt_ray.errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve generation from Ray Serve replicas (OpenAI-compatible HTTP + gRPC)", description="serve generation from Ray Serve replicas (OpenAI-compatible HTTP + gRPC).")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise UserError("'opt-ray serve' is not implemented yet")
