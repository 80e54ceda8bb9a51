"""Ray adapter for the tokenize stage: a pool of encoder actors behind an ordered map.

The library (``opt_ray.data.shards.write_shards``) reads, splits, packs and writes; this
module only replaces its in-process encoder with ``workers`` actors. Batches go out
round-robin and come back in submission order, so the shards are byte-identical to an
in-process run whatever the worker count.
"""

from __future__ import annotations

import collections
import os
from typing import Any, Iterator

import numpy as np
import ray

from opt_ray.data.shards import EncodedBatch, EncodeMap, TextBatch, encode_text_batch


@ray.remote(num_cpus=1)
class TokenizeWorker:
    """Holds one tokenizer and encodes batches with it, single-threaded."""

    def __init__(self, tokenizer_json: str, eos_id: int, dtype: str):
        # One core per actor: the tokenizers thread pool would otherwise oversubscribe
        # the node, with every actor spawning a thread per core.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_str(tokenizer_json)
        self.eos_id = eos_id
        self.dtype = dtype

    def encode(self, batch: TextBatch) -> EncodedBatch:
        return encode_text_batch(self.tok, batch, self.eos_id, self.dtype)


class TokenizePool:
    """``workers`` encoder actors; :meth:`map` is an ``EncodeMap`` for ``write_shards``.

    Batches go round-robin with at most ``in_flight_per_worker`` queued per actor (enough
    to hide the driver's reading, bounded memory) and come back in submission order.
    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, tok: Any, eos_id: int, dtype: Any, workers: int, *,
                 in_flight_per_worker: int = 2):
        available = int(ray.cluster_resources().get("CPU", workers))
        if workers > available:
            print(f"tokenize: {workers} workers requested, the cluster has {available} CPUs; "
                  f"using {available}", flush=True)
            workers = max(1, available)
        self.workers = workers
        self.in_flight = workers * in_flight_per_worker
        tok_json = tok.to_str()
        self.actors = [TokenizeWorker.remote(tok_json, eos_id, str(np.dtype(dtype)))
                       for _ in range(workers)]

    def wait_ready(self, warn_after_s: float = 30.0) -> None:
        """Block until every actor has started. Says so when that takes long: actors
        wait for free CPUs, which another job on the cluster may hold."""
        refs = [a.__ray_ready__.remote() for a in self.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=warn_after_s)
        if len(ready) < len(refs):
            print(f"tokenize: {len(refs) - len(ready)} of {len(refs)} encoder actors are still "
                  f"waiting for a free CPU after {warn_after_s:.0f}s; other work on the cluster "
                  f"holds them (lower --workers or free the cluster)", flush=True)
        ray.get(refs)

    def map(self, batches: Iterator[TextBatch]) -> Iterator[EncodedBatch]:
        pending: collections.deque = collections.deque()
        for i, b in enumerate(batches):
            pending.append(self.actors[i % self.workers].encode.remote(b))
            if len(pending) >= self.in_flight:
                yield ray.get(pending.popleft())
        while pending:
            yield ray.get(pending.popleft())

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []

    def __enter__(self) -> "TokenizePool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def ray_encode_map(tok: Any, eos_id: int, dtype: Any, workers: int) -> EncodeMap:
    """A one-shot ``EncodeMap``: starts a :class:`TokenizePool` when the stage starts
    reading and stops it when the stage is done (or fails)."""
    def run(batches: Iterator[TextBatch]) -> Iterator[EncodedBatch]:
        with TokenizePool(tok, eos_id, dtype, workers) as pool:
            pool.wait_ready()
            yield from pool.map(batches)
    return run
