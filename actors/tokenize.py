"""Ray adapter for the tokenize stage: each input file is one retried Ray task
(``opt_ray.data.tokenize_pipeline.tokenize_split``) that reads, encodes, packs, writes
and checksums its own shards. A killed worker's task is re-run by Ray; completed files
stay done (their directory under the work dir is never rewritten).
"""

from __future__ import annotations

import ray

from actors.dedup import RayExecutor


def ray_executor(workers: int) -> RayExecutor:
    """At most ``workers`` encoder tasks at once (one CPU each), capped by the cluster's
    CPUs: more would only queue."""
    available = int(ray.cluster_resources().get("CPU", workers))
    if workers > available:
        print(f"tokenize: {workers} workers requested, the cluster has {available} CPUs; "
              f"using {available}", flush=True)
        workers = max(1, available)
    return RayExecutor(workers)
