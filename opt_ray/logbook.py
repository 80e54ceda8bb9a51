"""The run logbook: every event appended as one JSON line to ``RUN_DIR/logbook.jsonl``.

Writers call ``Logbook(run_dir).event("checkpoint_saved", step=100, path=...)``; the
chronicle (Markdown + loss plot) is rendered from the same file. Appends are single
``write`` calls on an ``O_APPEND`` file, so several processes may log to one run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

LOGBOOK = "logbook.jsonl"


class Logbook:
    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOGBOOK

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        rec = {"time": time.time(), "event": kind, **fields}
        line = json.dumps(rec, default=str, sort_keys=False) + "\n"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
        return rec

    def events(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        with open(self.path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a torn last line from a killed writer
