"""Ray Serve application for generation: ``OpenAIIngress.bind(GenerationEngine.bind(...))``.

- ``GenerationEngine``: one continuous-batching ``Engine`` per replica, driven by an
  ``EngineLoop`` thread; streams typed ``RequestOutput`` deltas to its caller. Replicas
  scale by count or autoscaling; ``check_health`` fails once the engine is dead, so Serve
  replaces the replica; on shutdown Serve stops routing to it and waits up to
  ``graceful_shutdown_timeout_s`` for its requests to finish (the drain).
- ``OpenAIIngress``: the Ray-free front end (``opt_ray.serve.frontend``) over a handle to
  the engine deployment: its HTTP app (``opt_ray.serve.http``) behind Serve's HTTP proxy,
  and its gRPC ``opt_ray.v1.GenerationService`` (``opt_ray.serve.grpc_service``) on a
  ``grpc.aio`` server inside the ingress replica. It tokenizes and validates, so bad
  input never reaches an engine replica.

Why not Serve's own gRPC proxy (``gRPCOptions``): in Ray 2.60 it always binds ``[::]``
(all interfaces) with no host option, while this service must be able to listen on
127.0.0.1 only; a server in the ingress replica binds the host we are given, and client
cancellation reaches our handler directly as task cancellation.

Ray touch points are only in this file (deployments and wiring); the protocol runs
without Ray.
"""


import asyncio
import dataclasses
import logging
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator

from ray import serve
from ray.serve.handle import DeploymentHandle

from opt_ray import metrics
from opt_ray.devices import cluster_device
from opt_ray.errors import UserError
from opt_ray.serve import api
from opt_ray.serve.engine import (EngineConfig, EngineLoop, EngineRequest, QueueFullError,
                                  RequestError, checkpoint_name, engine_from_checkpoint,
                                  resolve_checkpoint)
from opt_ray.serve.frontend import Frontend, FrontendConfig, as_api_error
from opt_ray.serve.grpc_service import start_grpc_server
from opt_ray.serve.http import build_http_app

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
        self._stop = threading.Event()
        self.loop = None
        cfg = EngineConfig(**engine_config)
        if cfg.tensor_parallel_size > 1:
            self.engine = _tensor_parallel_engine(checkpoint, cfg)
        else:
            self.engine = engine_from_checkpoint(checkpoint, cfg)
        self.loop = EngineLoop(self.engine)
        self.replica = serve.get_replica_context().replica_id.unique_id
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
        if self.engine.peers is not None:
            # A rank that died leaves this one waiting in a collective (until the process
            # group's timeout) at the next step: the check fails at once instead.
            self.engine.peers.alive()

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
        if self.loop is not None:        # (None: the constructor failed)
            self.loop.stop(drain_timeout_s=5.0)


# --------------------------------------------------------------------------------------
# A replica split over several processes (--tensor-parallel-size)
# --------------------------------------------------------------------------------------

class _EngineRank:
    """Rank r > 0 of a tensor-parallel replica, in the replica's placement group (bundle
    r: one GPU of the replica's node): an engine over this rank's part of the model that
    follows the replica's model calls (``Engine.follow``)."""

    def __init__(self, engine_config: dict[str, Any]):
        from opt_ray.serve.engine import resolved
        self.config = resolved(EngineConfig(**engine_config))   # no CUDA here: raises now

    def start(self, checkpoint: str, rank: int, master: tuple[str, int]) -> None:
        from opt_ray.model.parallel import join_tensor_group
        join_tensor_group(self.config.tensor_parallel_size, rank, master, self.config.device)
        self.engine = engine_from_checkpoint(checkpoint, self.config)

    def follow(self, op: str, args: tuple) -> None:
        self.engine.follow(op, args)


class _RankPeers:
    """The replica's ranks > 0 (``engine.Peers``): every model call is sent to each, in
    order (one caller, so Ray runs an actor's calls in the order sent); their results
    are only checked, once per step, so a failed rank ends the engine."""

    def __init__(self, actors: list):
        self.actors, self.pending = actors, []
        self._lock = threading.Lock()      # the engine thread sends, the health check checks

    def send(self, op: str, args: tuple) -> None:
        refs = [a.follow.remote(op, args) for a in self.actors]
        with self._lock:
            self.pending += refs

    def check(self) -> None:
        import ray
        with self._lock:
            pending = list(self.pending)
        if not pending:
            return
        done, _ = ray.wait(pending, num_returns=len(pending), timeout=0)
        ray.get(done)                       # raises a rank's failure
        with self._lock:
            gone = set(done)
            self.pending = [r for r in self.pending if r not in gone]

    def alive(self) -> None:
        """``check``, and when no call is outstanding, ask every rank whether it is there
        (a call to a dead actor fails at once; one to a busy rank would wait behind its
        work, so a rank at work is judged by its calls)."""
        import ray
        self.check()
        with self._lock:
            idle = not self.pending
        if idle:
            refs = [a.__ray_ready__.remote() for a in self.actors]
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=10)
            ray.get(done)


def _tensor_parallel_engine(checkpoint: str, cfg: EngineConfig):
    """Rank 0 of a replica split ``cfg.tensor_parallel_size`` ways: starts the other ranks
    in the replica's placement group (one bundle each, on this node), joins their process
    group, and returns this rank's engine, which schedules for all of them."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from opt_ray.model.parallel import join_tensor_group
    from opt_ray.ray_util import rendezvous_address
    from opt_ray.serve.engine import resolved

    tp = cfg.tensor_parallel_size
    run = resolved(cfg)
    pg = ray.util.get_current_placement_group()
    rank_actor = ray.remote(_EngineRank)
    opts = {"num_cpus": 1, "num_gpus": 1 if run.device == "cuda" else 0}
    ranks = [rank_actor.options(**opts, scheduling_strategy=PlacementGroupSchedulingStrategy(
        pg, placement_group_bundle_index=r)).remote(dataclasses.asdict(cfg)) for r in range(1, tp)]
    # Every rank can compute (a GPU without CUDA says so here) before any waits on the others.
    ray.get([r.__ray_ready__.remote() for r in ranks])
    master = rendezvous_address()
    started = [r.start.remote(checkpoint, i, master) for i, r in enumerate(ranks, 1)]
    join_tensor_group(tp, 0, master, run.device)
    engine = engine_from_checkpoint(checkpoint, run, peers=_RankPeers(ranks))
    ray.get(started)
    engine.ranks = ranks       # held: the rank actors live as long as this replica
    return engine


class RayEngineHandle:
    """A ``GenerationEngine`` deployment handle as the front end's engine handle: streams
    the replica's outputs; closing the stream cancels the call, which aborts the request
    in the replica. Ray-wrapped request errors and Serve's back-pressure become the
    ``ApiError`` the client should see."""

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle

    async def generate(self, req: EngineRequest) -> AsyncIterator:
        from ray.serve.exceptions import BackPressureError
        gen = self.handle.options(stream=True).generate.remote(req)
        try:
            async for out in gen:
                yield out
        except Exception as e:
            cause = getattr(e, "cause", None) or e
            if isinstance(e, BackPressureError) or isinstance(cause, BackPressureError):
                raise api.queue_full("all replicas are busy") from e
            err = as_api_error(e)
            if err is not None:
                raise err from e
            raise
        finally:
            gen.cancel()      # no-op when finished; frees the slot when we were cancelled

    async def stats(self) -> dict[str, Any]:
        return await self.handle.stats.remote()


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("gRPC server failed: %r", task.exception())


@serve.deployment(name="OpenAIIngress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress()
class OpenAIIngress:
    """HTTP and gRPC front door: the Ray-free front end (``opt_ray.serve.frontend``) over
    the engine deployment. Tokenizes and validates, so bad input never reaches an engine
    replica."""

    def __init__(self, engine: DeploymentHandle, checkpoint: str, model_name: str,
                 engine_config: dict[str, Any], grpc_address: str | None = None,
                 frontend_config: dict[str, Any] | None = None):
        self.frontend = Frontend.for_checkpoint(
            RayEngineHandle(engine), checkpoint, model_name=model_name,
            max_model_len=engine_config.get("max_model_len"),
            config=FrontendConfig(**(frontend_config or {})))
        self._grpc_server = None
        if grpc_address:
            # Serve calls the constructor on the replica's event loop; the server runs there.
            # Keep a reference: the loop holds tasks only weakly.
            self._grpc_task = asyncio.get_running_loop().create_task(self._serve_grpc(grpc_address))
            self._grpc_task.add_done_callback(_log_failure)

    def __serve_build_asgi_app__(self):
        return build_http_app(self.frontend)

    async def _serve_grpc(self, address: str) -> None:
        self._grpc_server = await start_grpc_server(self.frontend, address)

    async def __del__(self):
        if self._grpc_server is not None:
            await self._grpc_server.stop(grace=5)
        self.frontend.close()


# --------------------------------------------------------------------------------------
# Building and starting the application
# --------------------------------------------------------------------------------------

def replica_placement(device: str, resources: dict[str, float], replicas: int,
                      tp: int = 1) -> tuple[str, dict[str, Any]]:
    """``(device, ray_actor_options)`` of the engine replicas for ``--device`` on a cluster
    advertising ``resources`` (``ray.cluster_resources()``; ``opt_ray.devices``): one
    GPU per replica when the cluster has any, reserved through Ray (without a reservation
    every replica of a node would see all its GPUs and load onto the first); with ``tp``
    > 1, one GPU per process of a replica, all on one node. Raises ``UserError`` for
    ``--device cuda`` on a cluster without GPUs and for more replicas than fit."""
    hint = " (--max-replicas may go past it for an autoscaling cluster)"
    device = cluster_device(device, resources, replicas if tp == 1 else None, flag="--replicas",
                            each="replica", hint=hint)
    if device == "cuda" and tp > 1:
        from opt_ray.devices import check_tensor_groups, node_gpus
        check_tensor_groups(replicas, tp, node_gpus(), what=f"--replicas {replicas} "
                            f"--tensor-parallel-size {tp}", tp_flag="--tensor-parallel-size",
                            count_flag="--replicas", count_per_copy=1)
    return device, {"num_cpus": 1, **({"num_gpus": 1} if device == "cuda" else {})}


def build_app(checkpoint: str | Path, *, model_name: str | None = None,
              engine_config: EngineConfig | None = None, replicas: int = 1,
              max_replicas: int | None = None, host: str = "127.0.0.1",
              grpc_port: int | None = 9000, frontend_config: FrontendConfig | None = None):
    """The Serve application. ``replicas`` engine replicas, or autoscaling between
    ``replicas`` and ``max_replicas`` on ongoing requests per replica. The gRPC service
    listens on host:grpc_port (None: no gRPC)."""
    path = resolve_checkpoint(checkpoint)
    ecfg = engine_config or EngineConfig()
    import ray
    tp = ecfg.tensor_parallel_size
    device, actor_options = replica_placement(
        ecfg.device, ray.cluster_resources() if ray.is_initialized() else {}, replicas, tp)
    ecfg = dataclasses.replace(ecfg, device=device)
    cfg = dataclasses.asdict(ecfg)
    # Each replica admits its running batch plus its own bounded queue; past that the
    # router's queue (max_queued_requests) is bounded too, and both overflow to 429.
    per_replica = ecfg.max_num_seqs + ecfg.max_waiting + 1
    # The router queue also absorbs the first burst while a new handle learns about the
    # replicas, so it gets room for a full batch beyond the replicas' own queues.
    from ray.serve.config import BackpressureConfig
    opts: dict[str, Any] = {"ray_actor_options": actor_options,
                            "max_ongoing_requests": per_replica,
                            "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=1),
                            "max_queued_requests": ecfg.max_waiting * max(replicas, 1) + ecfg.max_num_seqs}
    if tp > 1:
        # The replica (rank 0) takes the first bundle, its other ranks one each: one node.
        opts["placement_group_bundles"] = [{"CPU": 1, **({"GPU": 1} if device == "cuda" else {})}] * tp
        opts["placement_group_strategy"] = "STRICT_PACK"
    if max_replicas and max_replicas > replicas:
        opts["autoscaling_config"] = {"min_replicas": replicas, "max_replicas": max_replicas,
                                      "target_ongoing_requests": ecfg.max_num_seqs,
                                      "upscale_delay_s": 5, "downscale_delay_s": 60}
    else:
        opts["num_replicas"] = replicas
    engine = GenerationEngine.options(**opts).bind(str(path), cfg)
    grpc_address = f"{host}:{grpc_port}" if grpc_port else None
    return OpenAIIngress.bind(engine, str(path), model_name or checkpoint_name(path), cfg, grpc_address,
                              dataclasses.asdict(frontend_config or FrontendConfig()))


def start(app, *, host: str = "127.0.0.1", http_port: int = 8000, name: str = APP_NAME) -> None:
    """Start Serve's HTTP proxy on host:http_port and deploy; returns once it runs."""
    serve.start(http_options={"host": host, "port": http_port})
    serve.run(app, name=name, route_prefix="/", blocking=False)


def app_builder(args: dict[str, Any]):
    """Entry point for Serve config files and ``serve run``:
    ``serve run actors.serve:app_builder checkpoint=PATH replicas=2 max_num_seqs=8``.
    Keys: checkpoint (required), model_name, replicas, max_replicas, host, grpc_port
    (0 = none), and any ``EngineConfig`` or ``FrontendConfig`` field."""
    args = dict(args)
    if "checkpoint" not in args:
        raise UserError("app_builder needs checkpoint=PATH (an HF-format dir or a training run)")
    engine_fields = {f.name: f for f in dataclasses.fields(EngineConfig)}
    engine_kw = {k: (v if k in ("dtype", "device") else int(v)) for k, v in args.items() if k in engine_fields}
    frontend_fields = {f.name for f in dataclasses.fields(FrontendConfig)}
    frontend_kw = {k: int(v) for k, v in args.items() if k in frontend_fields}
    unknown = set(args) - set(engine_fields) - frontend_fields - {
        "checkpoint", "model_name", "replicas", "max_replicas", "host", "grpc_port"}
    if unknown:
        raise UserError(f"app_builder: unknown argument(s) {sorted(unknown)}")
    max_replicas = args.get("max_replicas")
    return build_app(args["checkpoint"], model_name=args.get("model_name"),
                     engine_config=EngineConfig(**engine_kw), replicas=int(args.get("replicas", 1)),
                     max_replicas=int(max_replicas) if max_replicas else None,
                     host=args.get("host", "127.0.0.1"), grpc_port=int(args.get("grpc_port", 9000)) or None,
                     frontend_config=FrontendConfig(**frontend_kw))
