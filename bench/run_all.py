"""Run every side-by-side benchmark in turn (``make bench``); each prints JSON.

A benchmark is a module ``bench/<name>.py`` runnable as ``python -m bench.<name>`` that
prints one JSON object last (on one line or indented). Run one alone with
``opt-ray bench NAME``. ``step_trace`` is a GPU diagnostic with its own output folder
(``bench/gpu_checks.sh`` runs it), not a side-by-side benchmark: it is not listed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ORDER = ["train_step", "dedup", "tokenize", "train_gang", "serve"]


NOT_BENCHMARKS = ("__init__", "run_all", "step_trace")


def available() -> list[str]:
    found = {p.stem for p in BENCH_DIR.glob("*.py") if p.stem not in NOT_BENCHMARKS}
    return [n for n in ORDER if n in found] + sorted(found - set(ORDER))


def last_json(text: str) -> dict | None:
    """The last JSON object in ``text``: one that starts at a line's first column and
    runs to the end (a one-line object, or an indented one whose inner lines are
    indented); None if there is none."""
    lines = text.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("{"):
            try:
                return json.loads("\n".join(lines[i:]))
            except json.JSONDecodeError:
                continue
    return None


def run(name: str, extra: list[str] | None = None) -> dict:
    proc = subprocess.run([sys.executable, "-m", f"bench.{name}", *(extra or [])],
                          cwd=BENCH_DIR.parent, capture_output=True, text=True)
    res = last_json(proc.stdout) if proc.returncode == 0 else None
    if res is None:
        return {"bench": name, "error": f"exit {proc.returncode}" if proc.returncode else "no JSON on stdout",
                "stderr_tail": proc.stderr[-2000:]}
    return res


def main() -> int:
    failed = 0
    for name in available():
        print(f"# bench {name}", file=sys.stderr, flush=True)
        res = run(name)
        failed += "error" in res
        print(json.dumps(res), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
