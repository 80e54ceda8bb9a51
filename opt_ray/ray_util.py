"""Connecting to Ray: an existing cluster with ``--address``, else an embedded local one.

Every command takes ``--address``; without it (and without ``RAY_ADDRESS``, which Ray's
own ``ray job submit`` sets for the job's driver) the command starts a local Ray inside
the process, so the whole pipeline runs on one laptop.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import tempfile
from typing import Any


def add_ray_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None,
                   help="Ray cluster address (e.g. 'auto' or ray://host:10001); default: "
                        "$RAY_ADDRESS if set, else an embedded local Ray")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="CPUs the embedded local Ray advertises (default: this machine's)")


def init_ray(address: str | None = None, *, num_cpus: int | None = None,
             dashboard: bool = False, **kwargs: Any) -> None:
    """Idempotent ``ray.init``: joins ``address`` (or $RAY_ADDRESS) or starts a local Ray."""
    import ray
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # Worker processes import opt_ray and actors from this checkout even when the
    # package is not installed into the workers' interpreter.
    if address:
        ray.init(address=address, log_to_driver=True, **kwargs)
    else:
        ray.init(**local_ray_kwargs(), num_cpus=num_cpus, include_dashboard=dashboard,
                 log_to_driver=True, **kwargs)


def local_ray_kwargs() -> dict[str, Any]:
    """``ray.init`` arguments that start a Ray of this process's own.

    Without an address ``ray.init`` joins the latest cluster it finds in the shared
    ``/tmp/ray`` (someone else's, on a shared machine). ``address="local"`` always starts a
    new one, and a temp dir of its own keeps its sockets and session files apart; the dir
    is removed at exit. The path stays short: Ray's unix socket paths must fit 107 bytes.
    """
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    atexit.register(shutil.rmtree, temp_dir, ignore_errors=True)
    return {"address": "local", "_temp_dir": temp_dir}
