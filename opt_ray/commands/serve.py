"""`opt-ray serve`: serve generation from Ray Serve replicas (OpenAI-compatible HTTP + gRPC)."""

from __future__ import annotations

import argparse
import os
import signal
import threading

from opt_ray.config import add_dataclass_args, from_args
from opt_ray.ray_util import add_ray_args, init_ray
from opt_ray.serve.engine_config import CHECKPOINT_HELP, EngineConfig
from opt_ray.serve.frontend_config import FrontendConfig, check_port_free


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve generation from Ray Serve replicas (OpenAI-compatible HTTP + gRPC)",
                       description="Deploy a continuous-batching generation app on Ray Serve: "
                                   "POST /v1/completions (OpenAI-compatible, stream: true as SSE), "
                                   "GET /v1/models, and gRPC opt_ray.v1.GenerationService. Blocks "
                                   "until Ctrl-C, then shuts the app down. With --no-ray, the same "
                                   "API from one engine in this process.")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--model-name", default=None, help="the model id clients send (default: dir name)")
    p.add_argument("--replicas", type=int, default=1, help="engine replicas (default 1)")
    p.add_argument("--max-replicas", type=int, default=None,
                   help="autoscale between --replicas and this many on ongoing requests")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=9000, help="0 = no gRPC")
    # Engine and request limits: flags, defaults and help from the config fields.
    add_dataclass_args(p, EngineConfig, dest="engine__")
    add_dataclass_args(p, FrontendConfig, dest="frontend__")
    p.add_argument("--no-ray", action="store_true",
                   help="serve from this process without Ray: one engine, the same HTTP and gRPC "
                        "API (--replicas and --address do not apply)")
    add_ray_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from opt_ray.errors import UserError
    from opt_ray.serve.engine import resolve_checkpoint
    from opt_ray.serve.loading import check_checkpoint

    if args.replicas < 1:
        raise UserError(f"--replicas must be >= 1, got {args.replicas}")
    # Everything knowable is checked before Ray starts: one line each, exit 2. Resolved
    # once: every replica serves this checkpoint (a run's newest now, while it trains on).
    checkpoint = str(resolve_checkpoint(args.checkpoint))
    model = check_checkpoint(checkpoint)
    engine_config = from_args(EngineConfig, args, dest="engine__")
    if engine_config.tensor_parallel_size > 1:
        from opt_ray.model.parallel import check_divisible
        check_divisible(model, engine_config.tensor_parallel_size)
    frontend_config = from_args(FrontendConfig, args, dest="frontend__")
    if args.grpc_port and args.grpc_port == args.http_port:
        raise UserError(f"--grpc-port {args.grpc_port} is also --http-port; give gRPC another port "
                        f"(or 0 for none)")
    if args.no_ray and (args.replicas != 1 or args.max_replicas or args.address
                        or engine_config.tensor_parallel_size > 1):
        raise UserError("--no-ray serves one engine in this process: drop --replicas, --max-replicas, "
                        "--tensor-parallel-size and --address, or drop --no-ray")
    if args.no_ray or not (args.address or os.environ.get("RAY_ADDRESS")):
        # An embedded Ray runs the proxy and the ingress here: their ports must be free.
        # (On a cluster they listen on its nodes, which this machine cannot check.)
        check_port_free(args.host, args.http_port, "--http-port")
        if args.grpc_port:
            check_port_free(args.host, args.grpc_port, "--grpc-port")
    if args.no_ray:
        return serve_local(args, checkpoint, engine_config, frontend_config)
    from ray import serve

    from actors.serve import build_app, start
    init_ray(args.address, num_cpus=args.num_cpus)
    stop = threading.Event()
    # SIGTERM is what `ray job stop` (and the control plane's RemoveServe) sends; SIGINT is
    # set explicitly because a driver started in the background inherits it ignored.
    # Either way the app is shut down before exit instead of being left running. Installed
    # after ray.init (which sets handlers of its own) and before deploying, so a stop
    # during start-up is honoured once the app is up.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.set())
    app = build_app(checkpoint, model_name=args.model_name, engine_config=engine_config,
                    replicas=args.replicas, max_replicas=args.max_replicas, host=args.host,
                    grpc_port=args.grpc_port or None, frontend_config=frontend_config)
    start(app, host=args.host, http_port=args.http_port)
    _announce(args)
    try:
        while not stop.wait(1.0):
            pass
        print("opt-ray serve: stopping", flush=True)
    finally:
        serve.shutdown()


def serve_local(args: argparse.Namespace, checkpoint: str, engine_config, frontend_config) -> int:
    """``--no-ray``: the front end over an in-process engine, until SIGINT/SIGTERM."""
    import asyncio

    from opt_ray.serve.engine import EngineLoop, engine_from_checkpoint
    from opt_ray.serve.frontend import Frontend, LocalEngineHandle
    from opt_ray.serve.grpc_service import start_grpc_server
    from opt_ray.serve.http import HttpServer

    engine = engine_from_checkpoint(checkpoint, engine_config)

    async def main() -> None:
        loop = EngineLoop(engine)
        fe = Frontend.for_checkpoint(LocalEngineHandle(loop), checkpoint, model_name=args.model_name,
                                     max_model_len=engine.max_model_len, config=frontend_config)
        http = HttpServer(fe, args.host, args.http_port)
        grpc_server = None
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        try:
            await http.start()
            if args.grpc_port:
                grpc_server = await start_grpc_server(fe, f"{args.host}:{args.grpc_port}")
            _announce(args)
            await stop.wait()
            print("opt-ray serve: stopping", flush=True)
        finally:
            if grpc_server is not None:
                await grpc_server.stop(grace=5)
            await http.stop()
            loop.stop(drain_timeout_s=5.0)
            fe.close()

    asyncio.run(main())
    return 0


def _announce(args: argparse.Namespace) -> None:
    print(f"opt-ray serve: OpenAI-compatible API at http://{args.host}:{args.http_port}/v1 "
          f"(POST /v1/completions, GET /v1/models)", flush=True)
    if args.grpc_port:
        print(f"opt-ray serve: gRPC opt_ray.v1.GenerationService at {args.host}:{args.grpc_port}", flush=True)
    print("opt-ray serve: Ctrl-C to stop", flush=True)
