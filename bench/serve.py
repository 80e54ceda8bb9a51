"""Serving engine vs ``transformers`` generate, side by side in one process (issue 7).

vLLM's benchmark method scaled down to a 2-core CPU: a fixed, seeded set of requests
(prompt lengths and output lengths drawn once; ``ignore_eos`` so every request produces
exactly its output length on random weights), on a 125m-shape random-weight checkpoint.

Measured, in this order, interleaving engine and reference so load drift hits both:
  * single request, one at a time: engine vs HF ``generate`` at batch 1 (decode tok/s);
  * 8 concurrent requests: the engine with 8 slots (requests refill slots as others
    finish) vs HF static batches of 8 (left-padded, every row runs until the longest
    output in its batch is done; only each request's own tokens count as output);
  * Poisson arrivals at several rates through ``EngineLoop`` (the path a Serve replica
    uses): TTFT, TPOT, end-to-end latency p50/p99, output tokens/s.

Prints one JSON object (last line). ``python -m bench.serve [--quick] [--dtype bfloat16]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    i = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[i]


def build_125m(path: Path, dtype: str) -> None:
    from transformers import OPTConfig, OPTForCausalLM

    from tests.serve_helpers import build_tokenizer
    build_tokenizer(path)
    cfg = OPTConfig(vocab_size=50272, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    ffn_dim=3072, max_position_embeddings=2048, word_embed_proj_dim=768,
                    pad_token_id=1, bos_token_id=2, eos_token_id=2, dropout=0.0)
    torch.manual_seed(0)
    OPTForCausalLM(cfg).save_pretrained(str(path))


def make_requests(n: int, seed: int, prompt_range: tuple[int, int], out_range: tuple[int, int]):
    rng = random.Random(seed)
    return [([rng.randrange(4, 50000) for _ in range(rng.randint(*prompt_range))], rng.randint(*out_range))
            for _ in range(n)]


# ---- transformers reference -------------------------------------------------------------

def hf_static(hf, reqs, batch: int) -> dict:
    """Static batching: left-pad each batch, generate until its longest output is done."""
    useful = generated = 0
    t0 = time.perf_counter()
    for i in range(0, len(reqs), batch):
        chunk = reqs[i:i + batch]
        L = max(len(p) for p, _ in chunk)
        ids = torch.tensor([[1] * (L - len(p)) + p for p, _ in chunk])
        mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p, _ in chunk])
        new = max(m for _, m in chunk)
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                              min_new_tokens=new, pad_token_id=1)
        generated += (out.shape[1] - L) * len(chunk)
        useful += sum(m for _, m in chunk)
    dt = time.perf_counter() - t0
    return {"output_tokens": useful, "generated_incl_padding": generated, "seconds": round(dt, 2),
            "output_tokens_per_s": round(useful / dt, 2)}


# ---- engine -------------------------------------------------------------------------------

def engine_closed_loop(engine, reqs, tag: str) -> dict:
    """All requests queued at once; the engine keeps its slots full."""
    from opt_ray.serve.engine import EngineRequest
    from opt_ray.serve.sampling import SamplingParams
    t0 = time.perf_counter()
    n0 = engine.output_tokens
    for i, (p, m) in enumerate(reqs):
        engine.add_request(EngineRequest(f"{tag}-{i}", p, SamplingParams(max_tokens=m, temperature=0, ignore_eos=True)))
    while engine.has_work():
        engine.step()
    dt = time.perf_counter() - t0
    toks = engine.output_tokens - n0
    return {"output_tokens": toks, "seconds": round(dt, 2), "output_tokens_per_s": round(toks / dt, 2)}


async def _poisson(engine, reqs, rate: float, seed: int) -> dict:
    from opt_ray.serve.engine import EngineLoop, EngineRequest
    from opt_ray.serve.sampling import SamplingParams
    loop = EngineLoop(engine)
    rng = random.Random(seed)
    ttft, tpot, e2e, toks = [], [], [], 0

    async def one(i, p, m, delay):
        nonlocal toks
        await asyncio.sleep(delay)
        t0 = time.perf_counter()
        first = last = None
        n = 0
        async for out in loop.generate(EngineRequest(f"p{rate}-{i}", p, SamplingParams(max_tokens=m, temperature=0, ignore_eos=True))):
            k = sum(len(c.token_ids) for c in out.outputs)
            if k:
                last = time.perf_counter()
                first = first or last
                n += k
        ttft.append(first - t0)
        e2e.append(last - t0)
        if n > 1:
            tpot.append((last - first) / (n - 1))
        toks += n

    delays, t = [], 0.0
    for _ in reqs:
        t += rng.expovariate(rate)
        delays.append(t)
    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(one(i, p, m, d) for i, ((p, m), d) in enumerate(zip(reqs, delays))))
    finally:
        loop.stop()
    dt = time.perf_counter() - t0
    r = lambda x: round(x, 3)  # noqa: E731
    return {"rate_req_per_s": rate, "requests": len(reqs), "seconds": r(dt),
            "output_tokens_per_s": round(toks / dt, 2),
            "ttft_s": {"p50": r(_pct(ttft, 50)), "p99": r(_pct(ttft, 99))},
            "tpot_s": {"p50": r(_pct(tpot, 50)), "p99": r(_pct(tpot, 99))},
            "e2e_s": {"p50": r(_pct(e2e, 50)), "p99": r(_pct(e2e, 99))}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer and shorter requests")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="weights/KV dtype for both sides (default float32)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rates", default="0.5,1,2", help="Poisson arrival rates (req/s)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import OPTForCausalLM

    from opt_ray.serve.engine import EngineConfig, engine_from_checkpoint

    n_single, n_conc, n_poisson = (2, 16, 12) if args.quick else (4, 16, 16)
    out_range = (8, 32) if args.quick else (16, 64)
    single = make_requests(n_single, 1, (16, 64), (out_range[1], out_range[1]))
    conc = make_requests(n_conc, 2, (8, 96), out_range)
    poisson = make_requests(n_poisson, 3, (8, 96), out_range)

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "opt-125m-random"
        build_125m(ckpt, args.dtype)
        dt = getattr(torch, args.dtype)
        hf = OPTForCausalLM.from_pretrained(str(ckpt), dtype=dt).eval()
        engine = engine_from_checkpoint(ckpt, EngineConfig(max_num_seqs=8, max_model_len=256, dtype=args.dtype))
        # Warm-up both (first calls allocate and pick kernels).
        hf_static(hf, single[:1], 1)
        engine_closed_loop(engine, single[:1], "warm")

        res: dict = {"bench": "serve", "model": "125m shape, random weights", "dtype": args.dtype,
                     "threads": args.threads, "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
                     "torch": torch.__version__}
        # Single request: one at a time on each side.
        e1_times, e1_toks = 0.0, 0
        for i, r in enumerate(single):
            x = engine_closed_loop(engine, [r], f"s{i}")
            e1_times += x["seconds"]
            e1_toks += x["output_tokens"]
        h1 = hf_static(hf, single, 1)
        res["single_request"] = {
            "engine_tokens_per_s": round(e1_toks / e1_times, 2), "hf_batch1_tokens_per_s": h1["output_tokens_per_s"],
            "ratio": round(e1_toks / e1_times / h1["output_tokens_per_s"], 2)}
        e8 = engine_closed_loop(engine, conc, "conc")
        h8 = hf_static(hf, conc, 8)
        res["concurrent_8"] = {"engine": e8, "hf_static_batch8": h8,
                               "ratio": round(e8["output_tokens_per_s"] / h8["output_tokens_per_s"], 2)}
        res["poisson"] = [asyncio.run(_poisson(engine, poisson, float(rate), 10))
                          for rate in args.rates.split(",")]
        res["engine_stats_after"] = {k: v for k, v in engine.stats().__dict__.items()
                                     if k in ("num_slots", "free_slots", "kv_cache_bytes")}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
