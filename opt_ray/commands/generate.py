"""`opt-ray generate`: generate text locally from a checkpoint with the serving engine."""

from __future__ import annotations

import argparse
import json
import sys

from opt_ray.serve.engine_config import CHECKPOINT_HELP


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass in (0, 1]")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--min-tokens", type=int, default=0)
    p.add_argument("-n", type=int, default=1, help="completions to generate")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text locally from a checkpoint with the serving engine",
                       description="Generate text from a checkpoint on this machine with the same "
                                   "engine the Serve replicas run (no Ray). Streams the text as it "
                                   "is generated.")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("prompt", help="the prompt text")
    add_sampling_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    from dataclasses import fields

    from opt_ray.serve.engine_config import EngineConfig
    for f in fields(EngineConfig):       # the engine's own flags, as `opt-ray serve` has them
        if f.name in ("dtype", "device"):
            p.add_argument(f"--{f.name}", default=f.default, choices=f.metadata["choices"],
                           help=f"{f.metadata['help']} (default: {f.default})")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import asyncio

    from opt_ray.serve import api
    from opt_ray.serve.engine import EngineConfig, EngineLoop, engine_from_checkpoint, resolve_checkpoint
    from opt_ray.serve.frontend import Frontend, LocalEngineHandle
    from opt_ray.serve.loading import check_checkpoint

    path = resolve_checkpoint(args.checkpoint)
    check_checkpoint(path)
    engine = engine_from_checkpoint(path, EngineConfig(max_num_seqs=max(args.n, 1), dtype=args.dtype,
                                                            device=args.device))
    body = {"prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": args.temperature,
            "top_p": args.top_p, "top_k": args.top_k, "repetition_penalty": args.repetition_penalty,
            "seed": args.seed, "stop": args.stop, "min_tokens": args.min_tokens, "n": args.n}

    async def main() -> list[api.Accumulator]:
        loop = EngineLoop(engine)
        fe = Frontend(LocalEngineHandle(loop), engine.tokenizer, model_name="local",
                      max_model_len=engine.max_model_len, vocab_size=engine.model.config.vocab_size)
        try:
            # The same validation as the HTTP API: a bad flag is one readable line (exit 2).
            req = await fe.parse(body)
            accs = fe.accumulators(req)
            async for p, out in await fe.start(req):
                accs[p].add(out)
                if not args.json and args.n == 1:
                    sys.stdout.write("".join(c.text for c in out.outputs))
                    sys.stdout.flush()
            return accs
        finally:
            loop.stop()
            fe.close()

    accs = asyncio.run(main())
    if args.json:
        print(json.dumps(api.completion_response(accs, engine.tokenizer)))
    elif args.n == 1:
        print()
    else:
        for i, c in sorted(accs[0].choices.items()):
            print(f"--- {i} ({c.finish_reason})\n{c.text}")
    return 0
