"""``opt-ray``: one console script, one subcommand per stage (see ``opt-ray --help``).

Each subcommand lives in ``opt_ray/commands/<name>.py`` with ``add_parser(subparsers)``
and a ``run(args) -> int``; heavy imports (torch, ray) happen inside ``run`` so that
``--help`` stays fast. Bad input (``UserError``) exits 2 with one readable line.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from opt_ray import __version__
from opt_ray.errors import UserError

# Order is the order of the pipeline, as --help lists it.
COMMANDS = [
    "demo", "dedup", "tokenizer", "tokenize", "train", "eval", "export", "serve",
    "generate", "control", "ctl", "logbook", "model", "bench",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opt-ray",
        description="The OPT recipe as an elastic, fault-tolerant service on Ray: "
                    "dedup -> tokenize -> train -> serve, driven by a gRPC control API. "
                    "Every command runs on an embedded local Ray unless given --address.",
    )
    parser.add_argument("--version", action="version", version=f"opt-ray {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"opt_ray.commands.{name.replace('-', '_')}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"opt-ray {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"opt-ray {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
