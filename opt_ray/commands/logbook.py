"""`opt-ray logbook`: print a run's logbook as a readable chronicle (and plot its loss curve)."""

from __future__ import annotations

import argparse

from opt_ray.errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("logbook", help="print a run's logbook as a readable chronicle (and plot its loss curve)", description="print a run's logbook as a readable chronicle (and plot its loss curve).")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise UserError("'opt-ray logbook' is not implemented yet")
