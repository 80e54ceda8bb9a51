"""Bearer-token authentication for the control server, and TLS credentials from files.

Every call must carry the metadata ``authorization: Bearer <token>``. The token is
compared with ``hmac.compare_digest`` so the comparison time does not depend on how many
leading characters match. The standard health service and server reflection are exempt:
load balancers and ``grpcurl`` probe them without credentials, and they reveal nothing
a client could not learn from the committed .proto.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path
from typing import Callable

import grpc

from opt_ray.errors import UserError

TOKEN_ENV = "OPT_RAY_TOKEN"

# Method-name prefixes that need no token.
EXEMPT_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


def read_token(token_file: str | os.PathLike | None = None, *, env: str = TOKEN_ENV) -> str:
    """The token from ``token_file`` if given, else from ``$OPT_RAY_TOKEN``.

    Raises ``UserError`` naming the source when there is none, or when it is empty or
    too short to be a secret (a token is a shared secret, not a password to remember).
    """
    if token_file:
        path = Path(token_file)
        try:
            token = path.read_text().strip()
        except OSError as e:
            raise UserError(f"cannot read --token-file {path}: {e.strerror}; create it with "
                            f"e.g. 'python -c \"import secrets; print(secrets.token_urlsafe(32))\" "
                            f"> {path}'") from e
        source = f"--token-file {path}"
    else:
        token = os.environ.get(env, "").strip()
        source = f"${env}"
        if not token:
            raise UserError(f"no control token: pass --token-file FILE or set ${env}")
    if len(token) < 16:
        raise UserError(f"the token from {source} is {len(token)} characters; use at least 16 "
                        f"random characters (e.g. secrets.token_urlsafe(32))")
    return token


def _deny(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming shape as ``handler`` that aborts UNAUTHENTICATED."""
    def abort(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Rejects every call without the right ``authorization: Bearer`` metadata."""

    def __init__(self, token: str, *, on_reject: Callable[[str], None] | None = None):
        self._expected = ("Bearer " + token).encode()
        self._on_reject = on_reject

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(EXEMPT_PREFIXES):
            return continuation(handler_call_details)
        presented = ""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                presented = value if isinstance(value, str) else value.decode("latin-1")
                break
        if presented and hmac.compare_digest(presented.encode(), self._expected):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:  # unknown method: let gRPC answer UNIMPLEMENTED
            return None
        if self._on_reject:
            self._on_reject(method)
        why = "missing" if not presented else "invalid"
        return _deny(handler, f"{why} bearer token: send metadata 'authorization: Bearer <token>' "
                              f"(opt-ray ctl reads it from --token-file or ${TOKEN_ENV})")


def _read_bytes(path: str | os.PathLike, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {flag} {path}: {e.strerror}") from e


def server_credentials(cert: str | None, key: str | None,
                       client_ca: str | None = None) -> grpc.ServerCredentials | None:
    """TLS credentials from PEM files; ``client_ca`` turns on mutual TLS (client
    certificates signed by that CA are required). None when TLS is off."""
    if not cert and not key:
        if client_ca:
            raise UserError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS)")
        return None
    if not (cert and key):
        raise UserError("TLS needs both --tls-cert and --tls-key")
    ca = _read_bytes(client_ca, "--tls-client-ca") if client_ca else None
    return grpc.ssl_server_credentials(
        [(_read_bytes(key, "--tls-key"), _read_bytes(cert, "--tls-cert"))],
        root_certificates=ca, require_client_auth=ca is not None)


def channel_credentials(ca: str | None, cert: str | None = None,
                        key: str | None = None) -> grpc.ChannelCredentials:
    """Client TLS credentials: ``ca`` verifies the server (None: system roots);
    ``cert``/``key`` present a client certificate for mutual TLS."""
    if bool(cert) != bool(key):
        raise UserError("a client certificate needs both --tls-cert and --tls-key")
    return grpc.ssl_channel_credentials(
        root_certificates=_read_bytes(ca, "--tls-ca") if ca else None,
        private_key=_read_bytes(key, "--tls-key") if key else None,
        certificate_chain=_read_bytes(cert, "--tls-cert") if cert else None)

