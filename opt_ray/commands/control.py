"""`opt-ray control`: run the gRPC control server.

Without ``--address`` it starts an embedded local Ray (dashboard on, 127.0.0.1) in this
process; with ``--address`` it joins that cluster as a driver (for health and metrics)
and submits jobs to its dashboard job server (``--dashboard-address``, default: the one
the cluster reports). Every stage it submits is a Ray job in the dashboard's Jobs view.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

from opt_ray.errors import UserError
from opt_ray.run_dir import is_url


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "control", help="run the gRPC control server",
        description="Run the gRPC control server: submit pipeline stages as Ray jobs, track "
                    "them in a persisted registry, scale and roll back training, deploy "
                    "serving. Every call needs the bearer token; health and reflection are "
                    "open.")
    p.add_argument("--address", default=None,
                   help="Ray cluster (GCS) address to join, e.g. 127.0.0.1:6379; default: "
                        "start an embedded local Ray with its dashboard on 127.0.0.1")
    p.add_argument("--dashboard-address", default=None,
                   help="Ray job server (dashboard) HTTP address; default: the one the "
                        "cluster reports")
    p.add_argument("--dashboard-port", type=int, default=8265,
                   help="dashboard port of the embedded Ray (default: 8265)")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="CPUs the embedded local Ray advertises (default: this machine's)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port (default: 50051)")
    p.add_argument("--token-file", default=None,
                   help="file holding the bearer token clients must send (default: "
                        "$OPT_RAY_TOKEN)")
    p.add_argument("--state-dir", required=True,
                   help="directory of the job registry; restarting with the same directory "
                        "reattaches to running jobs")
    p.add_argument("--tls-cert", default=None, help="server certificate (PEM) to enable TLS")
    p.add_argument("--tls-key", default=None, help="server private key (PEM)")
    p.add_argument("--tls-client-ca", default=None,
                   help="CA (PEM) for client certificates: turns on mutual TLS")
    p.add_argument("--allowed-root", action="append", default=None, metavar="DIR|URL",
                   help="directory that spec paths must lie inside, or a bucket prefix "
                        "(s3://bucket/prefix) that training runs' outputs may lie under "
                        "(repeatable; default: the current directory)")
    p.add_argument("--opt-ray-bin", default=None,
                   help="the opt-ray executable job entrypoints start with (default: "
                        "'opt-ray' on PATH, else the one next to this Python)")
    p.add_argument("--ray-auth-token-file", default=None,
                   help="Ray's own auth token (clusters with RAY_AUTH_MODE=token), sent to "
                        "the job server; not needed when this process already has Ray's "
                        "token settings in its environment")
    p.add_argument("--poll-interval", type=float, default=1.0,
                   help="seconds between status polls of active jobs (default: 1)")
    p.set_defaults(func=run)


def default_opt_ray_bin() -> str:
    """'opt-ray' when the job driver's PATH will find it, else this venv's absolute one."""
    if shutil.which("opt-ray"):
        return "opt-ray"
    sibling = Path(sys.executable).parent / "opt-ray"
    return str(sibling) if sibling.exists() else "opt-ray"


def _connect_ray(args: argparse.Namespace) -> tuple[str, str]:
    """Join or start Ray; returns (dashboard/job server URL, GCS address) of that one
    cluster. Both are explicit from here on: jobs go to this cluster's job server and
    their drivers connect to this cluster, whatever else runs on the machine."""
    import ray

    from opt_ray.ray_util import cluster_address, start_local_ray
    try:
        if args.address:
            ctx = ray.init(address=args.address, log_to_driver=False)
        else:
            ctx = start_local_ray(num_cpus=args.num_cpus, include_dashboard=True,
                                  dashboard_host="127.0.0.1", dashboard_port=args.dashboard_port,
                                  log_to_driver=False)
    except (ConnectionError, ValueError, RuntimeError) as e:
        where = f"--address {args.address}" if args.address else "an embedded local Ray"
        raise UserError(f"cannot start or join {where}: {e}") from e
    url = args.dashboard_address or ctx.dashboard_url
    if not url:
        raise UserError("the Ray cluster reports no dashboard; start it with "
                        "--include-dashboard true or pass --dashboard-address")
    return url, cluster_address(ctx)


def run(args: argparse.Namespace) -> int:
    from opt_ray.control.auth import read_token, server_credentials
    from opt_ray.control.ray_jobs import RayJobBackend
    from opt_ray.control.registry import Registry
    from opt_ray.control.server import build_server, stop_server
    from opt_ray.control.service import ControlService
    from opt_ray.control.specs import SpecValidator

    token = read_token(args.token_file)
    creds = server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca)
    roots = args.allowed_root or [os.getcwd()]
    for r in roots:
        if not is_url(r) and not Path(r).is_dir():
            raise UserError(f"--allowed-root {r} is not a directory")
    registry = Registry(args.state_dir)
    headers = None
    if args.ray_auth_token_file:
        ray_token = read_token(args.ray_auth_token_file, env="RAY_AUTH_TOKEN")
        headers = {"Authorization": f"Bearer {ray_token}"}

    dashboard, gcs_address = _connect_ray(args)
    backend = RayJobBackend(dashboard, headers=headers, driver_connected=True,
                            ray_address=gcs_address)
    service = ControlService(registry, SpecValidator(roots), backend,
                             opt_ray_bin=args.opt_ray_bin or default_opt_ray_bin(),
                             poll_interval=args.poll_interval)
    server, port = build_server(service, token=token, host=args.host, port=args.port,
                                credentials=creds)
    if creds is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print("opt-ray control: WARNING: listening beyond this machine without TLS; the "
              "bearer token travels in plaintext (pass --tls-cert/--tls-key)", file=sys.stderr)
    active = registry.active_job_ids()
    print(f"opt-ray control: listening on {args.host}:{port} "
          f"({'mutual TLS' if args.tls_client_ca else 'TLS' if creds else 'plaintext'}); "
          f"Ray dashboard {backend.dashboard_url}; state {registry.state_dir} "
          f"({len(registry.jobs())} jobs, {len(active)} active, reattaching); "
          f"allowed roots {', '.join(map(str, service.validator.roots + service.validator.url_roots))}",
          flush=True)

    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    print("opt-ray control: shutting down; " + ("jobs keep running in Ray" if args.address else
          "the embedded Ray and its jobs stop with it (use --address for jobs that outlive "
          "the control server)"), flush=True)
    stop_server(server, service)
    return 0
