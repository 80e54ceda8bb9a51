"""Assemble the gRPC server: ControlService + health + reflection, behind the token check.

``build_server`` is what ``opt-ray control`` and the tests use; it binds one address
(127.0.0.1 by default, so nothing is reachable from other machines unless asked) with
TLS when credentials are given, and returns the started server.
"""

from __future__ import annotations

from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from opt_ray.control.auth import BearerTokenInterceptor
from opt_ray.control.service import M_REJECTED, ControlService
from opt_ray.errors import UserError
from opt_ray.v1 import control_pb2 as pb
from opt_ray.v1 import control_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ControlService"].full_name


def build_server(service: ControlService, *, token: str, host: str = "127.0.0.1",
                 port: int = 50051, credentials: grpc.ServerCredentials | None = None,
                 max_workers: int = 32) -> tuple[grpc.Server, int]:
    """Start the server; returns (server, bound port). ``port=0`` picks a free port.

    The thread pool bounds concurrent calls; each WatchJob stream holds one thread for
    its lifetime, hence the generous default.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="opt-ray-grpc"),
        interceptors=[BearerTokenInterceptor(token, on_reject=lambda m: M_REJECTED.inc())])
    pb_grpc.add_ControlServiceServicer_to_server(service, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    address = f"{host}:{port}"
    try:
        bound = (server.add_secure_port(address, credentials) if credentials is not None
                 else server.add_insecure_port(address))
    except RuntimeError as e:
        raise UserError(f"cannot listen on {address}: {e}; choose another --port/--host") from e
    if bound == 0:
        raise UserError(f"cannot listen on {address} (in use?); choose another --port")
    server.start()
    service.start()
    return server, bound


def stop_server(server: grpc.Server, service: ControlService, grace: float = 2.0) -> None:
    server.stop(grace).wait()
    service.stop()
