"""Ray Serve application for generation: ``OpenAIIngress.bind(GenerationEngine.bind(...))``.

- ``GenerationEngine``: one continuous-batching ``Engine`` per replica, driven by an
  ``EngineLoop`` thread; streams typed ``RequestOutput`` deltas to its caller. Replicas
  scale by count or autoscaling; ``check_health`` fails once the engine is dead, so Serve
  replaces the replica; on shutdown Serve stops routing to it and waits up to
  ``graceful_shutdown_timeout_s`` for its requests to finish (the drain).
- ``OpenAIIngress``: FastAPI ``POST /v1/completions`` (``stream: true`` as server-sent
  events) and ``GET /v1/models`` behind Serve's HTTP proxy, and the gRPC
  ``opt_ray.v1.GenerationService`` (``Generate`` unary, ``GenerateStream``
  server-streaming) on a ``grpc.aio`` server inside the ingress replica. It tokenizes and
  validates (``opt_ray.serve.api``), so bad input never reaches an engine replica.

Why not Serve's own gRPC proxy (``gRPCOptions``): in Ray 2.60 it always binds ``[::]``
(all interfaces) with no host option, while this service must be able to listen on
127.0.0.1 only; a server in the ingress replica binds the host we are given, and client
cancellation reaches our handler directly as task cancellation.

Ray touch points are only in this file; everything it calls runs without Ray.
"""


import asyncio
import dataclasses
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from opt_ray import metrics
from opt_ray.serve import api
from opt_ray.serve.api import ApiError, CompletionRequest
from opt_ray.serve.engine import (CompletionOutput, EngineConfig, EngineLoop, EngineRequest,
                                  QueueFullError, RequestError, engine_from_checkpoint,
                                  resolve_checkpoint)

APP_NAME = "opt-ray"
logger = logging.getLogger("ray.serve")

_LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
REQUESTS = metrics.counter("serve_requests", "Generation requests by outcome", ("status",))
QUEUE_DEPTH = metrics.gauge("serve_queue_depth", "Requests waiting for a KV slot in this replica", ("replica",))
TTFT = metrics.histogram("serve_ttft_s", "Time to first token (s)", _LATENCY_BUCKETS)
TPOT = metrics.histogram("serve_tpot_s", "Time per output token after the first (s)", _LATENCY_BUCKETS)
TOKENS_PER_S = metrics.gauge("serve_tokens_per_s", "Output tokens per second of this replica", ("replica",))


@serve.deployment(
    name="GenerationEngine",
    ray_actor_options={"num_cpus": 1},
    health_check_period_s=5,
    health_check_timeout_s=30,
    graceful_shutdown_wait_loop_s=1,
    graceful_shutdown_timeout_s=30,
)
class GenerationEngine:
    """A replica holding the model, its KV cache and the engine thread."""

    def __init__(self, checkpoint: str, engine_config: dict[str, Any]):
        self.engine = engine_from_checkpoint(checkpoint, EngineConfig(**engine_config))
        self.loop = EngineLoop(self.engine)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._stop = threading.Event()
        threading.Thread(target=self._report, name="opt-ray-metrics", daemon=True).start()

    async def generate(self, req: EngineRequest) -> AsyncIterator:
        """Stream the request's ``RequestOutput`` deltas; cancelling the call aborts it."""
        t0 = time.monotonic()
        first = last = None
        tokens = 0
        status = "cancelled"
        try:
            async for out in self.loop.generate(req):
                n = sum(len(c.token_ids) for c in out.outputs)
                if n:
                    last = time.monotonic()
                    if first is None:
                        first = last
                        TTFT.observe(first - t0)
                    tokens += n
                yield out
            status = "ok"
        except QueueFullError:
            status = "rejected"
            raise
        except RequestError:
            status = "invalid"
            raise
        except Exception:
            status = "error"
            raise
        finally:
            REQUESTS.inc(tags={"status": status})
            if first is not None and tokens > req.params.n:
                TPOT.observe((last - first) / (tokens / req.params.n - 1))

    def stats(self) -> dict[str, Any]:
        return {"replica": self.replica, **dataclasses.asdict(self.engine.stats())}

    def check_health(self) -> None:
        # The fatal tier: a dead engine fails the health check and Serve replaces us.
        if self.loop.dead is not None:
            raise RuntimeError(f"engine is dead: {self.loop.dead}")

    def _report(self) -> None:
        tags = {"replica": self.replica}
        prev, t_prev = self.engine.output_tokens, time.monotonic()
        while not self._stop.wait(1.0):
            st = self.engine.stats()
            now = time.monotonic()
            QUEUE_DEPTH.set(st.waiting_requests, tags=tags)
            TOKENS_PER_S.set((st.output_tokens - prev) / (now - t_prev), tags=tags)
            prev, t_prev = st.output_tokens, now

    def __del__(self):
        # Serve has already drained ongoing requests (graceful_shutdown_timeout_s).
        self._stop.set()
        self.loop.stop(drain_timeout_s=5.0)


app = FastAPI(title="opt-ray generation", docs_url=None, redoc_url=None)


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("gRPC server failed: %r", task.exception())


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers())


def _as_api_error(e: BaseException) -> ApiError | None:
    """Engine-side request errors (they cross the handle as Ray-wrapped exceptions of the
    same class) and Serve's own back-pressure, as the error the client should see."""
    from ray.serve.exceptions import BackPressureError
    cause = getattr(e, "cause", None) or e
    if isinstance(e, QueueFullError) or isinstance(cause, QueueFullError):
        return api.queue_full()
    if isinstance(e, BackPressureError) or isinstance(cause, BackPressureError):
        return api.queue_full("all replicas are busy")
    if isinstance(e, RequestError) or isinstance(cause, RequestError):
        return ApiError(str(cause))
    return None


@serve.deployment(name="OpenAIIngress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress(app)
class OpenAIIngress:
    """HTTP and gRPC front door: tokenize, validate, forward to an engine replica."""

    def __init__(self, engine: DeploymentHandle, checkpoint: str, model_name: str,
                 engine_config: dict[str, Any], grpc_address: str | None = None):
        from opt_ray.serve.loading import load_tokenizer_dir
        path = resolve_checkpoint(checkpoint)
        cfg = json.loads((path / "config.json").read_text())
        ctx = int(cfg["max_position_embeddings"])
        self.max_model_len = min(engine_config.get("max_model_len") or ctx, ctx)
        self.vocab_size = int(cfg["vocab_size"])
        self.tokenizer = load_tokenizer_dir(path)
        self.model_name = model_name
        self.engine = engine
        self._grpc_server = None
        if grpc_address:
            # Serve calls the constructor on the replica's event loop; the server runs there.
            # Keep a reference: the loop holds tasks only weakly.
            self._grpc_task = asyncio.get_running_loop().create_task(self._serve_grpc(grpc_address))
            self._grpc_task.add_done_callback(_log_failure)

    async def _serve_grpc(self, address: str) -> None:
        import grpc

        from actors.serve import _GrpcServicer  # by module: Serve may ship this class by value
        from opt_ray.v1 import generate_pb2_grpc
        server = grpc.aio.server()
        generate_pb2_grpc.add_GenerationServiceServicer_to_server(_GrpcServicer(self), server)
        server.add_insecure_port(address)
        await server.start()
        self._grpc_server = server
        logger.info("gRPC opt_ray.v1.GenerationService listening on %s", address)

    def _parse(self, body: Any) -> CompletionRequest:
        return api.parse_completion(body, model_name=self.model_name, tokenizer=self.tokenizer,
                                    max_model_len=self.max_model_len, vocab_size=self.vocab_size)

    async def _start(self, req: CompletionRequest):
        """Submit to an engine replica and wait for its first output, so that a rejection
        (429) is known before any response status is sent. Returns (first, rest)."""
        gen = None
        try:
            gen = self.engine.options(stream=True).generate.remote(
                EngineRequest(req.request_id, req.prompt_token_ids, req.params))
            first = await gen.__anext__()
        except BaseException as e:
            if gen is not None:
                gen.cancel()
            err = _as_api_error(e)
            if err is not None:
                raise err from e
            logger.warning("request %s failed: %r", req.request_id, e)
            raise
        return first, gen

    # ---- HTTP ----------------------------------------------------------------------------

    @app.get("/v1/models")
    async def models(self) -> JSONResponse:
        return JSONResponse(api.models_response(self.model_name, self.max_model_len))

    @app.get("/health")
    async def health(self) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/v1/stats")
    async def stats(self) -> JSONResponse:
        """Engine stats of one replica (the one the router picks): slots, KV, queue."""
        return JSONResponse(await self.engine.stats.remote())

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        try:
            body = await request.json()
        except ValueError as e:
            return _error_response(ApiError(f"request body is not valid JSON: {e}"))
        try:
            req = self._parse(body)
            first, rest = await self._start(req)
        except ApiError as e:
            return _error_response(e)
        if req.stream:
            return StreamingResponse(self._sse(req, first, rest), media_type="text/event-stream")
        acc = api.Accumulator(req)
        try:
            acc.add(first)
            async for out in rest:
                acc.add(out)
        finally:
            rest.cancel()      # no-op when finished; frees the slot if we were cancelled
        return JSONResponse(api.completion_response(acc, self.tokenizer))

    async def _sse(self, req: CompletionRequest, first, rest) -> AsyncIterator[str]:
        acc = api.Accumulator(req)
        try:
            is_first, out = True, first
            while True:
                acc.add(out)
                for chunk in api.stream_chunks(req, out, self.tokenizer, first=is_first):
                    yield f"data: {json.dumps(chunk)}\n\n"
                is_first = False
                if out.finished:
                    break
                out = await rest.__anext__()
            if req.include_usage:
                yield f"data: {json.dumps(api.usage_chunk(acc))}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            # Client gone mid-stream: cancelling the engine call aborts the request there,
            # which frees its slot and KV memory on the next engine step.
            rest.cancel()

    # ---- gRPC (called by _GrpcServicer; errors are ApiError) ------------------------------

    async def Generate(self, request):
        req = self._parse(api.body_from_grpc(request))
        acc = api.Accumulator(req)
        first, rest = await self._start(req)
        try:
            acc.add(first)
            async for out in rest:
                acc.add(out)
        finally:
            rest.cancel()
        choices = [dataclasses.replace(c, text=(req.prompt_text if req.params.echo else "") + c.text)
                   for _, c in sorted(acc.choices.items())]
        return api.grpc_response(req, choices, self.tokenizer, acc.usage())

    async def GenerateStream(self, request):
        req = self._parse(api.body_from_grpc(request))
        acc = api.Accumulator(req)
        out, rest = await self._start(req)
        try:
            is_first = True
            while True:
                acc.add(out)
                choices = [c for c in out.outputs if c.finish_reason != "abort"]
                if is_first and req.params.echo:
                    choices = [CompletionOutput(i, req.prompt_text, []) for i in range(req.params.n)] + choices
                is_first = False
                if choices or out.finished:
                    yield api.grpc_response(req, choices, self.tokenizer,
                                            acc.usage() if out.finished else None)
                if out.finished:
                    break
                out = await rest.__anext__()
        finally:
            rest.cancel()      # the client cancelled: abort in the engine, free the slot

    async def __del__(self):
        if self._grpc_server is not None:
            await self._grpc_server.stop(grace=5)


class _GrpcServicer:
    """opt_ray.v1.GenerationService over the ingress: ApiError -> gRPC status."""

    def __init__(self, ingress: OpenAIIngress):
        self.ingress = ingress

    async def Generate(self, request, context):
        try:
            return await self.ingress.Generate(request)
        except ApiError as e:
            await _abort(context, e)

    async def GenerateStream(self, request, context):
        try:
            async for resp in self.ingress.GenerateStream(request):
                yield resp
        except ApiError as e:
            await _abort(context, e)


async def _abort(context, e: ApiError) -> None:
    import grpc
    if e.retry_after_s is not None:
        context.set_trailing_metadata((("retry-after", str(e.retry_after_s)),))
    await context.abort(getattr(grpc.StatusCode, e.grpc_code), e.message)


# --------------------------------------------------------------------------------------
# Building and starting the application
# --------------------------------------------------------------------------------------

def build_app(checkpoint: str | Path, *, model_name: str | None = None,
              engine_config: EngineConfig | None = None, replicas: int = 1,
              max_replicas: int | None = None, host: str = "127.0.0.1",
              grpc_port: int | None = 9000):
    """The Serve application. ``replicas`` engine replicas, or autoscaling between
    ``replicas`` and ``max_replicas`` on ongoing requests per replica. The gRPC service
    listens on host:grpc_port (None: no gRPC)."""
    path = resolve_checkpoint(checkpoint)
    ecfg = engine_config or EngineConfig()
    cfg = dataclasses.asdict(ecfg)
    # Each replica admits its running batch plus its own bounded queue; past that the
    # router's queue (max_queued_requests) is bounded too, and both overflow to 429.
    per_replica = ecfg.max_num_seqs + ecfg.max_waiting + 1
    # The router queue also absorbs the first burst while a new handle learns about the
    # replicas, so it gets room for a full batch beyond the replicas' own queues.
    from ray.serve.config import BackpressureConfig
    opts: dict[str, Any] = {"max_ongoing_requests": per_replica,
                            "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=1),
                            "max_queued_requests": ecfg.max_waiting * max(replicas, 1) + ecfg.max_num_seqs}
    if max_replicas and max_replicas > replicas:
        opts["autoscaling_config"] = {"min_replicas": replicas, "max_replicas": max_replicas,
                                      "target_ongoing_requests": ecfg.max_num_seqs,
                                      "upscale_delay_s": 5, "downscale_delay_s": 60}
    else:
        opts["num_replicas"] = replicas
    engine = GenerationEngine.options(**opts).bind(str(path), cfg)
    grpc_address = f"{host}:{grpc_port}" if grpc_port else None
    return OpenAIIngress.bind(engine, str(path), model_name or path.name, cfg, grpc_address)


def start(app, *, host: str = "127.0.0.1", http_port: int = 8000, name: str = APP_NAME) -> None:
    """Start Serve's HTTP proxy on host:http_port and deploy; returns once it runs."""
    serve.start(http_options={"host": host, "port": http_port})
    serve.run(app, name=name, route_prefix="/", blocking=False)


def app_builder(args: dict[str, Any]):
    """Entry point for Serve config files and ``serve run``:
    ``serve run actors.serve:app_builder checkpoint=PATH replicas=2 max_num_seqs=8``.
    Keys: checkpoint (required), model_name, replicas, max_replicas, host, grpc_port
    (0 = none), and any ``EngineConfig`` field."""
    from opt_ray.errors import UserError
    args = dict(args)
    if "checkpoint" not in args:
        raise UserError("app_builder needs checkpoint=PATH (an HF-format dir)")
    engine_fields = {f.name: f for f in dataclasses.fields(EngineConfig)}
    engine_kw = {k: (v if k in ("dtype", "device") else int(v)) for k, v in args.items() if k in engine_fields}
    unknown = set(args) - set(engine_fields) - {"checkpoint", "model_name", "replicas", "max_replicas",
                                                 "host", "grpc_port"}
    if unknown:
        raise UserError(f"app_builder: unknown argument(s) {sorted(unknown)}")
    max_replicas = args.get("max_replicas")
    return build_app(args["checkpoint"], model_name=args.get("model_name"),
                     engine_config=EngineConfig(**engine_kw), replicas=int(args.get("replicas", 1)),
                     max_replicas=int(max_replicas) if max_replicas else None,
                     host=args.get("host", "127.0.0.1"), grpc_port=int(args.get("grpc_port", 9000)) or None)
