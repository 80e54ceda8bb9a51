"""Where a piece of work computes: ``--device auto|cuda|cpu`` (``config.DEVICES``) and
``--dtype auto``, for the training gang, eval workers and serving replicas alike.

On a Ray cluster ``auto`` takes GPUs from the cluster's resources, never from the
driver's CUDA (a driver often runs on a CPU head node): one GPU per worker, reserved
through Ray, so Ray places the work on GPU nodes and each process sees only its own GPU.
In the process that computes, ``auto`` is its CUDA device when it has one.
"""

from __future__ import annotations

import os
import socket
import sys

from opt_ray.errors import UserError


def cluster_device(device: str, resources: dict[str, float], count: int | None = None, *,
                   flag: str = "--workers", each: str = "worker", hint: str = "") -> str:
    """``cuda`` or ``cpu`` for ``count`` processes of one GPU each (None: any number) on
    a cluster advertising ``resources`` (``ray.cluster_resources()``). Raises
    ``UserError`` for ``--device cuda`` on a cluster without GPUs, and for more processes
    than GPUs (``flag`` names the count; ``hint`` is said after the fix)."""
    gpus = float(resources.get("GPU", 0))
    if device == "cuda" and gpus < 1:
        shown = {k: v for k, v in sorted(resources.items()) if "/" not in k and "node:" not in k}
        raise UserError(f"--device cuda: the Ray cluster advertises no GPUs (resources: {shown}); "
                        f"use --device cpu, or --device auto to take GPUs only where they exist")
    if device == "cpu" or gpus < 1:
        return "cpu"
    if count is not None and gpus < count:
        raise UserError(f"{flag} {count}: each {each} takes one GPU and the Ray cluster "
                        f"advertises {gpus:g}; use {flag} {int(gpus)} or fewer{hint}, or "
                        f"--device cpu")
    return "cuda"


def check_tensor_groups(copies: int, tp: int, gpus_per_node: list[float], *, what: str,
                        tp_flag: str, count_flag: str, count_per_copy: int) -> None:
    """``copies`` copies of a model, each split over ``tp`` GPUs of one node (a tensor-
    parallel group all-reduces every layer: NVLink, not the network), on nodes with
    ``gpus_per_node`` GPUs. Raises ``UserError`` saying ``what`` was asked and the fix
    (``count_flag``, of which one copy takes ``count_per_copy``) when they do not fit."""
    most = max(gpus_per_node, default=0)
    if most < tp:
        raise UserError(f"{tp_flag} {tp}: the GPUs of one copy of the model share a node and the "
                        f"Ray cluster's largest node has {most:g}; use {tp_flag} {int(most)} or "
                        f"fewer, or nodes with {tp} GPUs")
    fit = sum(int(n // tp) for n in gpus_per_node)
    if fit < copies:
        raise UserError(f"{what}: {copies} copies of the model on {tp} GPUs of one node each, and "
                        f"the Ray cluster's nodes hold {fit}; use {count_flag} {fit * count_per_copy} "
                        f"or fewer, or --device cpu")


def node_gpus() -> list[float]:
    """The GPUs of each live node of the Ray cluster this process is connected to."""
    import ray
    return [n["Resources"].get("GPU", 0) for n in ray.nodes() if n["Alive"]]


def local_device(device: str, *, fix: str = "install a CUDA build of torch on the GPU nodes") -> str:
    """This process's device for ``device``: ``cpu``; ``cuda`` (it must have one); ``auto``:
    cuda when it sees a CUDA device. Raises ``UserError`` for ``cuda`` without one, naming
    the GPU Ray gave this process if it is a Ray worker that was given one."""
    import torch
    if device == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if device == "cuda":
        ray = sys.modules.get("ray")      # imported in every Ray worker; not imported here
        ids = ray.get_gpu_ids() if ray is not None and ray.is_initialized() else []
        given = f"Ray gave it GPU {ids} but " if ids else ""
        raise UserError(f"--device cuda: {socket.gethostname()}: {given}torch sees no CUDA device "
                        f"(torch {torch.__version__}, CUDA_VISIBLE_DEVICES="
                        f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}); {fix}, or pass --device cpu")
    return "cpu"


def auto_dtype(dtype: str, device: str) -> str:
    """``--dtype auto`` on ``device``: bfloat16 on a GPU (half the bytes of fp32 to hold
    and stream; bf16's range, as training's), float32 on a CPU (whose half-precision GEMMs
    are slow without native support); any other value as it is."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device == "cuda" else "float32"
