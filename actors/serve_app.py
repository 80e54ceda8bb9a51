"""The Serve application builder for config files: ``import_path: actors.serve_app:app``.

``serve deploy deploy/serve-config.yaml`` and KubeRay's RayService (``serveConfigV2``)
build an application from an import path and a dict of ``args``. ``opt-ray serve`` builds
the same application from flags through ``actors.serve.build_app``; this module maps the
config file's ``args`` onto that function, so both paths deploy the same thing.

``args`` (all but ``checkpoint`` optional):
  checkpoint    HF-format dir, or a training run holding an ``opt-ray export``
  model_name    name reported by /v1/models (default: the checkpoint dir's name)
  replicas      engine replicas (the minimum when max_replicas is given)
  max_replicas  autoscale engine replicas up to this many on ongoing requests
  host          interface the gRPC GenerationService binds (0.0.0.0 in a pod)
  grpc_port     its port; null turns gRPC off
  engine        EngineConfig fields: max_num_seqs, max_model_len, kv_cache_bytes,
                max_waiting, max_prefill_tokens, dtype
"""

from __future__ import annotations

import dataclasses
from typing import Any

from opt_ray.errors import UserError

ARGS = ("checkpoint", "model_name", "replicas", "max_replicas", "host", "grpc_port", "engine")


def parse_args(args: dict[str, Any] | None) -> dict[str, Any]:
    """Validate a config file's ``args`` into keyword arguments of ``build_app``.
    Pure (no Ray), so deploy/ configs are checked by the unit tests."""
    from opt_ray.serve.engine import EngineConfig

    args = dict(args or {})
    unknown = sorted(set(args) - set(ARGS))
    if unknown:
        raise UserError(f"serve config args: unknown key(s) {unknown}; known: {list(ARGS)}")
    if not args.get("checkpoint"):
        raise UserError("serve config args: 'checkpoint' is required (an HF-format dir or a "
                        "training run with an `opt-ray export` inside)")
    engine = dict(args.pop("engine", None) or {})
    known = {f.name for f in dataclasses.fields(EngineConfig)}
    bad = sorted(set(engine) - known)
    if bad:
        raise UserError(f"serve config args.engine: unknown field(s) {bad}; known: {sorted(known)}")
    kwargs = {k: v for k, v in args.items() if k != "checkpoint"}
    kwargs["engine_config"] = EngineConfig(**engine)
    return {"checkpoint": args["checkpoint"], **kwargs}


def app(args: dict[str, Any]):
    """Serve's application builder: ``OpenAIIngress.bind(GenerationEngine.bind(...))``."""
    from actors.serve import build_app

    kw = parse_args(args)
    return build_app(kw.pop("checkpoint"), **kw)
