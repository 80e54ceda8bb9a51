"""Run every side-by-side benchmark in turn (``make bench``); each prints JSON.

A benchmark is a module ``bench/<name>.py`` runnable as ``python -m bench.<name>`` that
prints one JSON object as its last line. Run one alone with ``opt-ray bench NAME``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ORDER = ["train_step", "dedup", "tokenize", "train_gang", "serve"]


def available() -> list[str]:
    found = {p.stem for p in BENCH_DIR.glob("*.py") if p.stem not in ("__init__", "run_all")}
    return [n for n in ORDER if n in found] + sorted(found - set(ORDER))


def run(name: str, extra: list[str] | None = None) -> dict:
    proc = subprocess.run([sys.executable, "-m", f"bench.{name}", *(extra or [])],
                          cwd=BENCH_DIR.parent, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip().startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"bench": name, "error": f"exit {proc.returncode}", "stderr_tail": proc.stderr[-2000:]}
    return json.loads(lines[-1])


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
