"""The gRPC face of the front end: ``opt_ray.v1.GenerationService`` over a ``Frontend``.

``Generate`` (unary) and ``GenerateStream`` (server streaming) take one prompt (text or
token ids); the request goes through the same parsing as an HTTP body
(``api.body_from_grpc``) and the same ``Execution`` loop. ``ApiError`` becomes the
matching status code (INVALID_ARGUMENT, RESOURCE_EXHAUSTED with a ``retry-after``
trailer, UNAVAILABLE); a client cancelling its call cancels the handler task, which
closes the execution and aborts the request in the engine.
"""

from __future__ import annotations

import dataclasses
import logging

from opt_ray.serve import api
from opt_ray.serve.api import ApiError
from opt_ray.serve.engine import CompletionOutput
from opt_ray.serve.frontend import Frontend

logger = logging.getLogger("opt_ray.serve")


class GenerationServicer:
    """opt_ray.v1.GenerationService over a front end: ApiError -> gRPC status."""

    def __init__(self, frontend: Frontend):
        self.frontend = frontend

    async def Generate(self, request, context):
        fe = self.frontend
        try:
            req = await fe.parse(api.body_from_grpc(request))
            (acc,) = await fe.complete(req)
        except ApiError as e:
            await _abort(context, e)
            return None
        text = req.prompt_text if req.params.echo else ""
        choices = [dataclasses.replace(c, text=text + c.text) if not req.echo_only else
                   dataclasses.replace(c, text=text, token_ids=[], logprobs=[])
                   for _, c in sorted(acc.choices.items())]
        return api.grpc_response(req, choices, fe.tokenizer, acc.usage())

    async def GenerateStream(self, request, context):
        fe = self.frontend
        try:
            req = await fe.parse(api.body_from_grpc(request))
            ex = await fe.start(req)
        except ApiError as e:
            await _abort(context, e)
            return
        (acc,) = fe.accumulators(req)
        first = True
        try:
            async for _, out in ex:
                acc.add(out)
                choices = [c if not req.echo_only else dataclasses.replace(c, text="", token_ids=[], logprobs=[])
                           for c in out.outputs if c.finish_reason != "abort"]
                if first and req.params.echo:
                    choices = [CompletionOutput(i, req.prompt_text, []) for i in range(req.params.n)] + choices
                first = False
                if choices or out.finished:
                    yield api.grpc_response(req, choices, fe.tokenizer, acc.usage() if out.finished else None)
        except ApiError as e:
            await _abort(context, e)
        finally:
            await ex.close()      # the client cancelled: abort in the engine, free the slot


async def _abort(context, e: ApiError) -> None:
    import grpc
    if e.retry_after_s is not None:
        context.set_trailing_metadata((("retry-after", str(e.retry_after_s)),))
    await context.abort(getattr(grpc.StatusCode, e.grpc_code), e.message)


async def start_grpc_server(frontend: Frontend, address: str):
    """A started ``grpc.aio`` server for ``frontend`` on ``address`` (host:port)."""
    import grpc

    from opt_ray.v1 import generate_pb2_grpc
    server = grpc.aio.server()
    generate_pb2_grpc.add_GenerationServiceServicer_to_server(GenerationServicer(frontend), server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as e:
        raise OSError(f"gRPC cannot listen on {address}: {e}") from e
    if port == 0:
        raise OSError(f"gRPC cannot listen on {address} (in use?)")
    await server.start()
    logger.info("gRPC opt_ray.v1.GenerationService listening on %s", address)
    return server
