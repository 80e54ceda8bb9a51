"""`opt-ray bench`: run the side-by-side benchmarks of ``bench/`` and print JSON."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from opt_ray.errors import UserError

# The benchmarks live beside the package in a source checkout (they need the reference
# implementations from the `test` extra), not inside the installed package.
REPO = Path(__file__).resolve().parents[2]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run the side-by-side benchmarks and print JSON",
                       description="Run benchmarks from the source checkout's bench/ directory, "
                                   "each side by side with its reference in one process run; "
                                   "prints one JSON object per benchmark. Results are recorded "
                                   "in bench/RESULTS.md.")
    p.add_argument("names", nargs="*", help="benchmarks to run (default: all); --list shows them")
    p.add_argument("--list", action="store_true", help="list the available benchmarks")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not (REPO / "bench" / "run_all.py").exists():
        raise UserError("the benchmarks ship with the source checkout (bench/), not the installed "
                        "package; run 'opt-ray bench' from a clone installed with 'make install'")
    sys.path.insert(0, str(REPO))
    from bench import run_all

    names = run_all.available()
    if args.list:
        print("\n".join(names))
        return 0
    unknown = sorted(set(args.names) - set(names))
    if unknown:
        raise UserError(f"unknown benchmark(s) {unknown}; available: {', '.join(names)}")
    failed = 0
    for name in args.names or names:
        res = run_all.run(name)
        failed += "error" in res
        print(json.dumps(res), flush=True)
    return 1 if failed else 0
