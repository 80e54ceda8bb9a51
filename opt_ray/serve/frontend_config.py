"""Settings of the serving front end and the start-up checks of its listening ports.

Torch-free on purpose: the CLI derives its flags from ``FrontendConfig`` when it builds
its parser, and ``--help`` must stay fast.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass, field

from opt_ray.errors import UserError


@dataclass
class FrontendConfig:
    """Limits of the protocol layer (per ingress replica / front-end process)."""
    max_body_bytes: int = field(default=8 * 1024 * 1024, metadata={
        "help": "largest request body accepted, in bytes; a larger one is refused with HTTP 413 "
                "before it is read"})
    max_prompts: int = field(default=256, metadata={
        "help": "most prompts in one completions request (each becomes an engine request)"})
    tokenizer_threads: int = field(default=2, metadata={
        "help": "threads that parse and tokenise requests off the event loop"})

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_prompts", "tokenizer_threads"):
            v = getattr(self, name)
            if type(v) is not int or v < 1:
                raise UserError(f"--{name.replace('_', '-')} must be an integer >= 1, got {v!r}")


def check_port_free(host: str, port: int, flag: str) -> None:
    """Raise ``UserError`` (one line naming the flag) when ``host:port`` cannot be bound,
    e.g. because another server listens there. Binds with SO_REUSEADDR, as servers do, so
    a port whose old connections linger in TIME_WAIT counts as free."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UserError(f"--host {host}: cannot resolve it ({e}); pass an IP address or a "
                        f"resolvable name") from e
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UserError(f"{flag} {port}: {host}:{port} is already in use (another server "
                                f"listens there); stop it or pick another port with {flag}") from e
            if e.errno == errno.EADDRNOTAVAIL:
                raise UserError(f"--host {host}: not an address of this machine ({e.strerror}); "
                                f"pass one of its addresses or 0.0.0.0") from e
            raise UserError(f"{flag} {port}: cannot listen on {host}:{port} ({e.strerror})") from e
