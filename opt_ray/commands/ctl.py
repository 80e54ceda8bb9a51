"""`opt-ray ctl`: control-plane client: submit, status, watch, cancel, scale, rollback, serve, logbook."""

from __future__ import annotations

import argparse

from opt_ray.errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ctl", help="control-plane client: submit, status, watch, cancel, scale, rollback, serve, logbook", description="control-plane client: submit, status, watch, cancel, scale, rollback, serve, logbook.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise UserError("'opt-ray ctl' is not implemented yet")
