"""Where `opt-ray eval` scores: in this process or on Ray actors, on CPUs or one GPU each
(``opt_ray.devices``: on a Ray cluster (``--workers > 1``, or a driver given one by
``--address`` / ``RAY_ADDRESS``, as ``ray job submit`` does) GPUs come from the cluster's
resources, never from this machine's CUDA; in a lone process from this machine's CUDA).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from opt_ray.devices import auto_dtype, check_tensor_groups, cluster_device, local_device, node_gpus


@dataclass(frozen=True)
class Placement:
    device: str     # "cuda" or "cpu"
    dtype: str      # "float32", "bfloat16" or "float16"
    actors: bool    # score on Ray actors (``actors.eval.WorkerPool``), else in this process


def place(device: str, dtype: str, workers: int, *, address: str | None = None,
          num_cpus: int | None = None, tp: int = 1) -> Placement:
    """The placement for ``--device``, ``--dtype``, ``--workers`` and ``--tp``; starts or
    joins Ray when the work goes to actors. Raises ``UserError`` when GPUs are demanded
    where there are none, when the cluster has fewer GPUs than workers (one each), or no
    node with ``tp`` of them (a tensor-parallel group shares one node)."""
    on_cluster = workers > 1 or tp > 1 or bool(address or os.environ.get("RAY_ADDRESS"))
    if device == "cpu" or not on_cluster:
        use = local_device(device, fix="run on a GPU machine, or give a Ray cluster with GPUs "
                                       "(--address, RAY_ADDRESS, or --workers > 1 for one)")
        if workers > 1 or tp > 1:
            _init(address, num_cpus)
        return Placement(use, auto_dtype(dtype, use), workers > 1 or tp > 1)
    import ray
    _init(address, num_cpus)
    use = cluster_device(device, ray.cluster_resources(), workers)
    if use == "cuda" and tp > 1:
        check_tensor_groups(workers // tp, tp, node_gpus(), what=f"--workers {workers} --tp {tp}",
                            tp_flag="--tp", count_flag="--workers", count_per_copy=tp)
    return Placement(use, auto_dtype(dtype, use), use == "cuda" or workers > 1 or tp > 1)


def _init(address: str | None, num_cpus: int | None) -> None:
    from opt_ray.ray_util import init_ray
    init_ray(address, num_cpus=num_cpus)
