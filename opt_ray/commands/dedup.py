"""`opt-ray dedup`: deduplicate a corpus with MinHash-LSH on Ray actors (Jaccard >= 0.95)."""

from __future__ import annotations

import argparse

from opt_ray.errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dedup", help="deduplicate a corpus with MinHash-LSH on Ray actors (Jaccard >= 0.95)", description="deduplicate a corpus with MinHash-LSH on Ray actors (Jaccard >= 0.95).")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise UserError("'opt-ray dedup' is not implemented yet")
