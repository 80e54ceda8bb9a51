"""`opt-ray tokenizer`: load (GPT-2 vocab/merges or tokenizer.json) or train a byte-level BPE tokenizer."""

from __future__ import annotations

import argparse

from opt_ray.errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="load (GPT-2 vocab/merges or tokenizer.json) or train a byte-level BPE tokenizer", description="load (GPT-2 vocab/merges or tokenizer.json) or train a byte-level BPE tokenizer.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise UserError("'opt-ray tokenizer' is not implemented yet")
