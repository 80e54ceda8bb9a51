"""`opt-ray export`: export a training checkpoint to HF format (safetensors) for serving."""

from __future__ import annotations

import argparse

from opt_ray.errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a training checkpoint to HF format (safetensors) for serving", description="export a training checkpoint to HF format (safetensors) for serving.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise UserError("'opt-ray export' is not implemented yet")
