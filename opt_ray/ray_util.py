"""Connecting to Ray: an existing cluster with ``--address``, else an embedded local one.

Every command takes ``--address``; without it (and without ``RAY_ADDRESS``, which Ray's
own ``ray job submit`` sets for the job's driver) the command starts a local Ray inside
the process, so the whole pipeline runs on one laptop.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
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
        start_local_ray(num_cpus=num_cpus, include_dashboard=dashboard, log_to_driver=True,
                        **kwargs)


def start_local_ray(**init_kwargs: Any):
    """Start a Ray of this process's own (``local_ray_kwargs``) and pin it: its GCS
    address is written to its temp dir's ``ray_current_cluster`` file, which is where
    Ray's job supervisor looks up the address it gives a submitted job's driver
    (``RAY_ADDRESS``). Without the file the supervisor falls back to every GCS process
    on the machine, and with another Ray running, a job either fails ("multiple active
    Ray instances") or lands on the other cluster. Returns ``ray.init``'s context."""
    import ray
    from ray._private.services import get_node_ip_address
    from ray._private.utils import write_ray_address

    kw = local_ray_kwargs()
    # The GCS port is chosen here, so that the cluster's address is known before it
    # starts: every Ray process of it (raylet, workers, actors) inherits RAY_ADDRESS from
    # the environment ray.init starts them with. Ray's own actors look the cluster up
    # without an address (Ray Train's placement-group cleaner calls the state API), and
    # would otherwise scan every GCS on the machine. The driver's environment is restored
    # right after, so nothing else in this process sees the variables.
    port = _free_port()
    address = f"{get_node_ip_address()}:{port}"
    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    os.environ.update({"RAY_ADDRESS": address, "RAY_GCS_SERVER_PORT": str(port)})
    try:
        with _agent_port_auto_assigned():
            ctx = ray.init(**kw, **init_kwargs)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    write_ray_address(cluster_address(ctx), kw["_temp_dir"])
    return ctx


@contextlib.contextmanager
def _agent_port_auto_assigned():
    """Let the dashboard agent of a local Ray bind a port of its own choosing.

    ``ray.init`` gives every local cluster the agent's fixed default port (52365) and has
    no argument to change it (``ray start`` has ``--dashboard-agent-listen-port``). With a
    second Ray on the machine (another ``opt-ray`` command, a test's embedded Ray) the
    agent cannot bind, and the job server answers every submission with "No available
    agent to submit job". Port 0 is Ray's own auto-assignment (the agent reports the
    port it bound), so the cluster's parameters get 0 unless the caller chose a port.
    """
    from ray._private import parameter
    original = parameter.RayParams

    class _RayParams(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("dashboard_agent_listen_port", 0)
            super().__init__(*args, **kwargs)

    parameter.RayParams = _RayParams
    try:
        yield
    finally:
        parameter.RayParams = original


def user_error(e: BaseException):
    """The ``UserError`` (bad input) a Ray task or actor call raised, when ``e`` is Ray's
    wrapping of one: its caller re-raises it, so that the CLI says it in one line and
    exits 2 (not Ray's traceback); else None."""
    import ray

    from opt_ray.errors import UserError
    if isinstance(e, ray.exceptions.RayTaskError) and isinstance(e.cause, UserError):
        return e.cause
    return None


def rendezvous_address() -> tuple[str, int]:
    """This Ray worker's node address and a free port on it: where the other processes of
    a tensor-parallel group meet the first (``model.parallel.join_tensor_group``)."""
    import ray
    return ray.util.get_node_ip_address(), _free_port()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def cluster_address(ctx: Any = None) -> str:
    """The GCS address (host:port) of the cluster this process is connected to."""
    import ray
    info = getattr(ctx, "address_info", None) or {}
    addr = info.get("gcs_address") or info.get("address")
    if not addr:
        addr = ray.get_runtime_context().gcs_address
    return str(addr)


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
