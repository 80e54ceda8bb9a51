"""Where `opt-ray eval` scores: in this process or on Ray actors, on CPUs or one GPU each.

As training's ``--device auto`` does, GPUs are found where the work runs: on a Ray
cluster (``--workers > 1``, or a driver given one by ``--address`` / ``RAY_ADDRESS``, as
``ray job submit`` does) from the cluster's resources, never from this machine's CUDA (a
driver often runs on a CPU head node); in a lone process from this machine's CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from opt_ray.errors import UserError


@dataclass(frozen=True)
class Placement:
    device: str     # "cuda" or "cpu"
    dtype: str      # "float32", "bfloat16" or "float16"
    actors: bool    # score on Ray actors (``actors.eval.WorkerPool``), else in this process


def place(device: str, dtype: str, workers: int, *, address: str | None = None,
          num_cpus: int | None = None) -> Placement:
    """The placement for ``--device``, ``--dtype`` and ``--workers``; starts or joins Ray
    when the work goes to a cluster. Raises ``UserError`` when GPUs are demanded where
    there are none, or when the cluster has fewer GPUs than workers (one each)."""
    import torch

    on_cluster = workers > 1 or bool(address or os.environ.get("RAY_ADDRESS"))
    if device == "cpu" or not on_cluster:
        if device == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda: this machine has no CUDA device and no Ray cluster "
                            "was given (--address, RAY_ADDRESS, or --workers > 1 for one); run on "
                            "a GPU machine or cluster, or pass --device cpu")
        use = "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"
        if workers > 1:
            _init(address, num_cpus)
        return Placement(use, resolve_dtype(dtype, use), workers > 1)
    import ray
    _init(address, num_cpus)
    gpus = float(ray.cluster_resources().get("GPU", 0))
    if gpus < 1:
        if device == "cuda":
            raise UserError("--device cuda: the Ray cluster advertises no GPUs; use --device cpu, "
                            "or --device auto to take GPUs only where they exist")
        return Placement("cpu", resolve_dtype(dtype, "cpu"), workers > 1)
    if gpus < workers:
        raise UserError(f"--workers {workers}: each worker takes one GPU and the Ray cluster "
                        f"advertises {gpus:g}; use --workers {int(gpus)} or fewer (or --device cpu)")
    return Placement("cuda", resolve_dtype(dtype, "cuda"), True)


def local_device(device: str, *, where_from_ray: bool = False) -> str:
    """This process's device for ``--device`` (``auto``: its CUDA if it has one). Raises
    ``UserError`` for ``cuda`` without a CUDA device, naming what Ray gave it when a Ray
    task or actor runs this (``where_from_ray``)."""
    import torch
    if device == "cuda" and not torch.cuda.is_available():
        import socket
        given = ""
        if where_from_ray:
            import ray
            given = f"Ray gave it GPU {ray.get_gpu_ids()} but "
        raise UserError(f"eval on {socket.gethostname()}: {given}torch sees no CUDA device (torch "
                        f"{torch.__version__}, CUDA_VISIBLE_DEVICES="
                        f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}); install a CUDA build of "
                        f"torch on the GPU nodes, or pass --device cpu")
    return "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str) -> str:
    """``--dtype auto``: bfloat16 on GPUs, float32 on CPUs."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device == "cuda" else "float32"


def _init(address: str | None, num_cpus: int | None) -> None:
    from opt_ray.ray_util import init_ray
    init_ray(address, num_cpus=num_cpus)
