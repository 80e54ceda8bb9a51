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


def ray_encode_map(tok: Any, eos_id: int, dtype: Any, workers: int, *,
                   in_flight_per_worker: int = 2) -> EncodeMap:
    """An ``EncodeMap`` over ``workers`` actors with at most ``in_flight_per_worker``
    batches queued per actor (enough to hide the driver's reading, bounded memory)."""
    available = int(ray.cluster_resources().get("CPU", workers))
    if workers > available:
        print(f"tokenize: {workers} workers requested, the cluster has {available} CPUs; "
              f"using {available}", flush=True)
        workers = max(1, available)

    def run(batches: Iterator[TextBatch]) -> Iterator[EncodedBatch]:
        tok_json = tok.to_str()
        pool = [TokenizeWorker.remote(tok_json, eos_id, str(dtype)) for _ in range(workers)]
        pending: collections.deque = collections.deque()
        try:
            for i, b in enumerate(batches):
                pending.append(pool[i % workers].encode.remote(b))
                if len(pending) >= workers * in_flight_per_worker:
                    yield ray.get(pending.popleft())
            while pending:
                yield ray.get(pending.popleft())
        finally:
            for a in pool:
                ray.kill(a)
    return run
