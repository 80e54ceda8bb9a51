"""`opt-ray model`: inspect model presets (parameters, FLOPs, memory)."""

from __future__ import annotations

import argparse

from opt_ray.errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="inspect model presets: parameter count, FLOPs per token, memory",
                       description="Inspect model presets.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise UserError("'opt-ray model' is not implemented yet")
