"""Ray adapters for the dedup stage: worker actors and bucket actors (thin; the algorithm
lives in ``opt_ray.data.dedup``).

- ``DedupWorker`` signs a batch and returns ``1 + num_buckets`` objects: the digests (to
  the driver) and one band-key partition per bucket actor. The driver hands each
  partition's *reference* to its bucket actor, so band keys travel worker -> object
  store -> bucket actor without passing through the driver. Workers also verify
  candidate pairs.
- ``BucketActor`` holds one ``BucketTable`` (keys routed by ``key % num_buckets``).

Failure: workers are stateless and their tasks pure, so a killed worker is restarted
(``max_restarts``) and its in-flight tasks re-run (``max_task_retries``) with identical
results. A bucket add is idempotent per batch id; a restarted bucket actor comes back
empty, which the driver detects (it knows how many batches each one should hold) and
repairs by re-sending the partition references it kept.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import ray

from opt_ray.data.dedup import BucketTable, DedupConfig, process_batch, unique_pairs, verify_pairs

RETRIES = 5


@ray.remote(num_cpus=1, max_restarts=RETRIES, max_task_retries=RETRIES)
class DedupWorker:
    def __init__(self, cfg: DedupConfig) -> None:
        self.cfg = cfg

    def pid(self) -> int:
        return os.getpid()

    def cpu_seconds(self) -> float:
        """CPU time this worker process has used (benchmarks' accounting)."""
        return time.process_time()

    def process(self, base: int, texts: list[str]) -> tuple:
        dig, parts = process_batch(texts, base, self.cfg)
        return (dig, *parts)

    def verify(self, pairs: np.ndarray, texts: dict[int, str]) -> np.ndarray:
        c = self.cfg
        return verify_pairs(pairs, texts, c.ngram, exact=c.verify, num_perm=c.num_perm,
                            seed=c.seed)


@ray.remote(num_cpus=0, max_restarts=RETRIES, max_task_retries=RETRIES)
class BucketActor:
    def __init__(self) -> None:
        self.table = BucketTable()

    def pid(self) -> int:
        return os.getpid()

    def add(self, batch_id: int, part: tuple[np.ndarray, np.ndarray]) -> None:
        self.table.add(batch_id, *part)

    def clear(self) -> None:
        self.table = BucketTable()

    def candidate_pairs(self, drop: np.ndarray, expected_batches: int) -> np.ndarray | None:
        if len(self.table) != expected_batches:
            return None   # restarted and lost state: the driver re-sends
        return self.table.candidate_pairs(drop)


class RayBackend:
    """``opt_ray.data.dedup.Backend`` on Ray: ``num_workers`` worker actors, batches to the
    least-loaded one, and ``cfg.num_buckets`` bucket actors."""

    def __init__(self, cfg: DedupConfig, num_workers: int) -> None:
        self.cfg = cfg
        self.num_workers = num_workers
        self.workers = [DedupWorker.remote(cfg) for _ in range(num_workers)]
        self.buckets = [BucketActor.remote() for _ in range(cfg.num_buckets)]
        self._load = [0] * num_workers
        # digest ref -> (batch id, worker index, partition refs)
        self._pending: dict[Any, tuple[int, int, list]] = {}
        # bucket index -> {batch id: partition ref}, kept to re-fill a restarted bucket
        self._parts: list[dict[int, Any]] = [{} for _ in self.buckets]
        self._adds: list = []
        self.repairs = 0   # bucket actors re-filled after a restart lost their state

    def start(self) -> None:
        """Forget any previous run: the backend's actors can serve several runs."""
        assert not self._pending, "start() while batches are in flight"
        ray.get([b.clear.remote() for b in self.buckets])
        self._parts = [{} for _ in self.buckets]
        self._adds = []

    def worker_pids(self) -> list[int]:
        return ray.get([w.pid.remote() for w in self.workers])

    def submit_batch(self, batch_id: int, base: int, texts: list[str]) -> None:
        k = min(range(self.num_workers), key=self._load.__getitem__)
        refs = self.workers[k].process.options(
            num_returns=1 + self.cfg.num_buckets).remote(base, texts)
        self._load[k] += 1
        self._pending[refs[0]] = (batch_id, k, refs[1:])

    def in_flight(self) -> int:
        return len(self._pending)

    def done_batches(self, block: bool) -> list[tuple[int, np.ndarray]]:
        if not self._pending:
            return []
        pending = list(self._pending)
        if block:
            ray.wait(pending, num_returns=1, timeout=None)
        ready, _ = ray.wait(pending, num_returns=len(pending), timeout=0)
        out = []
        for ref in ready:
            batch_id, k, parts = self._pending.pop(ref)
            self._load[k] -= 1
            for b, part in enumerate(parts):
                self._parts[b][batch_id] = part
                self._adds.append(self.buckets[b].add.remote(batch_id, part))
            out.append((batch_id, ray.get(ref)))
        return out

    def candidate_pairs(self, drop: np.ndarray) -> np.ndarray:
        ray.get(self._adds)
        self._adds = []
        drop_ref = ray.put(drop)
        results = ray.get([b.candidate_pairs.remote(drop_ref, len(p))
                           for b, p in zip(self.buckets, self._parts)])
        for k, res in enumerate(results):
            if res is None:
                self.repairs += 1
                ray.get([self.buckets[k].add.remote(bid, part)
                         for bid, part in self._parts[k].items()])
                results[k] = ray.get(self.buckets[k].candidate_pairs.remote(
                    drop_ref, len(self._parts[k])))
                if results[k] is None:
                    raise RuntimeError(f"bucket actor {k} keeps losing its state; re-run")
        return unique_pairs(results)

    def verify(self, chunks: list[tuple[np.ndarray, dict[int, str]]]) -> list[np.ndarray]:
        refs = [self.workers[i % self.num_workers].verify.remote(p, t)
                for i, (p, t) in enumerate(chunks)]
        return ray.get(refs)

    def close(self) -> None:
        try:   # let queued bucket adds land first, so killing them is quiet
            ray.get(self._adds, timeout=30)
        except Exception:  # noqa: BLE001 - closing anyway; the run's own errors surfaced
            pass
        for a in self.workers + self.buckets:
            ray.kill(a)
