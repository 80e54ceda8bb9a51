"""`opt-ray train`: train an OPT model on a fault-tolerant, elastic Ray Train gang."""

from __future__ import annotations

import argparse

from opt_ray.errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train an OPT model on a fault-tolerant, elastic Ray Train gang", description="train an OPT model on a fault-tolerant, elastic Ray Train gang.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise UserError("'opt-ray train' is not implemented yet")
