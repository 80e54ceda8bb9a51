"""The HTTP face of the front end: an ASGI (Starlette) app over a ``Frontend``.

``POST /v1/completions`` (``stream: true`` as server-sent events), ``GET /v1/models``,
``GET /v1/stats``, ``GET /health``. The same app runs behind Ray Serve's proxy (the
ingress deployment returns it from ``__serve_build_asgi_app__``) and on its own under
uvicorn (``serve_http``: tests, a single-process server).

The body is read with its size checked first: a declared ``Content-Length`` over the
limit is refused at once (413) without reading it, and a chunked body is counted while it
arrives and dropped as soon as it passes the limit.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from opt_ray.serve.api import ApiError, body_too_large
from opt_ray.serve.frontend import Frontend


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers())


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or ``ApiError`` 413 as soon as it is known to exceed ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError as e:
            raise ApiError("Content-Length is not a number", param="body") from e
        if size > limit:
            raise body_too_large(size, limit)
    chunks, got = [], 0
    async for chunk in request.stream():
        got += len(chunk)
        if got > limit:
            raise body_too_large(None, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def build_http_app(frontend: Frontend) -> Starlette:
    """The ASGI app serving ``frontend``."""

    async def completions(request: Request):
        try:
            body = await read_body(request, frontend.config.max_body_bytes)
            req = await frontend.parse(body)
            ex = await frontend.start(req)
        except ApiError as e:
            return error_response(e)
        except ClientDisconnect:
            return JSONResponse({}, status_code=499)
        if req.stream:
            return StreamingResponse(frontend.sse(req, ex), media_type="text/event-stream")
        try:
            accs = await frontend.complete(req, ex)
        except ApiError as e:
            return error_response(e)
        return Response(await frontend.render(accs), media_type="application/json")

    async def models(request: Request):
        return JSONResponse(await frontend.models())

    async def health(request: Request):
        return JSONResponse({"status": "ok"})

    async def stats(request: Request):
        """Engine stats of one replica (the one the router picks): slots, KV, queue."""
        return JSONResponse(await frontend.stats())

    return Starlette(routes=[
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/v1/stats", stats, methods=["GET"]),
    ])


class HttpServer:
    """``build_http_app`` under uvicorn on a background asyncio task (Ray-free serving)."""

    def __init__(self, frontend: Frontend, host: str, port: int, **uvicorn_kw: Any):
        import uvicorn
        cfg = uvicorn.Config(build_http_app(frontend), host=host, port=port, log_level="warning",
                             lifespan="off", **uvicorn_kw)
        self.server = uvicorn.Server(cfg)
        self.host, self.port = host, port
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Start listening; returns once the socket is bound (raises if it cannot be)."""
        self._task = asyncio.get_running_loop().create_task(self.server.serve())
        while not self.server.started:
            if self._task.done():
                self._task.result()       # bind failure and the like
                raise RuntimeError(f"HTTP server on {self.host}:{self.port} stopped during start-up")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self.server.should_exit = True
        if self._task is not None:
            await self._task
