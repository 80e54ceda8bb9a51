"""Serving engine vs ``transformers`` generate, side by side in one process (issue 7).

vLLM's benchmark method scaled down to a 2-core CPU: a fixed, seeded set of requests
(prompt lengths uniform, output lengths long-tailed (log-normal, clipped) like the chat
traces vLLM replays; ``ignore_eos`` so every request produces exactly its output length
on random weights), on a 125m-shape random-weight checkpoint.

The development machines are shared and heavily loaded, so every throughput is given two
ways: per wall-clock second and per CPU-second of this process (``time.process_time``,
all threads), which does not count time the process spent descheduled. Engine and
reference run alternately, round by round, so load drift hits both.

Measured, in this order, interleaving engine and reference so load drift hits both:
  * single request, one at a time: engine vs HF ``generate`` at batch 1 (decode tok/s);
  * 8 concurrent requests (8 clients sending back to back; rounds of 32 requests): the
    engine with 8 slots (a finished request's slot is refilled the next step) vs HF
    static batches of 8 (left-padded, every row runs until the longest output in its
    batch is done; only each request's own tokens count as output);
  * Poisson arrivals at several rates through ``EngineLoop`` (the path a Serve replica
    uses): TTFT, TPOT, end-to-end latency p50/p99, output tokens/s.

The engine is the packed one (issue 15): prompts chunked and packed with the decode rows
in one unpadded forward per step. Against vLLM: ``bench/serve_vs_vllm.py``.

Prints one JSON object (last line). ``python -m bench.serve [--quick] [--dtype bfloat16]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
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


def make_requests(n: int, seed: int, prompt_range: tuple[int, int], out_median: int, out_max: int):
    """(prompt ids, output length) pairs; output lengths log-normal around out_median."""
    rng = random.Random(seed)
    return [([rng.randrange(4, 50000) for _ in range(rng.randint(*prompt_range))],
             max(4, min(out_max, round(rng.lognormvariate(math.log(out_median), 0.8)))))
            for _ in range(n)]


class Timer:
    """Wall and process-CPU seconds of a block."""

    def __enter__(self):
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c


def _rates(tokens: int, wall: float, cpu: float) -> dict:
    return {"output_tokens": tokens, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "tokens_per_s": round(tokens / wall, 2), "tokens_per_cpu_s": round(tokens / cpu, 2)}


# ---- transformers reference -------------------------------------------------------------

def hf_static(hf, reqs, batch: int) -> tuple[int, int]:
    """Static batching: left-pad each batch, generate until its longest output is done.
    Returns (useful output tokens, tokens generated including the padding rows' waste)."""
    useful = generated = 0
    for i in range(0, len(reqs), batch):
        chunk = reqs[i:i + batch]
        L = max(len(p) for p, _ in chunk)
        ids = torch.tensor([[1] * (L - len(p)) + p for p, _ in chunk], device=hf.device)
        mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p, _ in chunk], device=hf.device)
        new = max(m for _, m in chunk)
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                              min_new_tokens=new, pad_token_id=1)
        generated += (out.shape[1] - L) * len(chunk)
        useful += sum(m for _, m in chunk)
    return useful, generated


# ---- engine -------------------------------------------------------------------------------

def engine_closed_loop(engine, reqs, tag: str) -> int:
    """All requests queued at once; the engine keeps its slots full. Returns tokens."""
    from opt_ray.serve.engine import EngineRequest
    from opt_ray.serve.sampling import SamplingParams
    n0 = engine.output_tokens
    for i, (p, m) in enumerate(reqs):
        engine.add_request(EngineRequest(f"{tag}-{i}", p, SamplingParams(max_tokens=m, temperature=0, ignore_eos=True)))
    while engine.has_work():
        engine.step()
    return engine.output_tokens - n0


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
    with Timer() as t:
        try:
            await asyncio.gather(*(one(i, p, m, d) for i, ((p, m), d) in enumerate(zip(reqs, delays))))
        finally:
            loop.stop()
    r = lambda x: round(x, 3)  # noqa: E731
    return {"rate_req_per_s": rate, "requests": len(reqs), **_rates(toks, t.wall, t.cpu),
            "ttft_s": {"p50": r(_pct(ttft, 50)), "p99": r(_pct(ttft, 99))},
            "tpot_s": {"p50": r(_pct(tpot, 50)), "p99": r(_pct(tpot, 99))},
            "e2e_s": {"p50": r(_pct(e2e, 50)), "p99": r(_pct(e2e, 99))}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer and shorter requests")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="weights/KV dtype for both sides (default float32)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="where both sides run (default cpu; cuda: one GPU, both sides on it)")
    ap.add_argument("--rates", default="0.25,1", help="Poisson arrival rates (req/s)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import OPTForCausalLM

    from opt_ray.serve.engine import EngineConfig, engine_from_checkpoint

    n_single, n_conc, n_poisson = (2, 32, 8) if args.quick else (4, 64, 16)
    out_median, out_max = (16, 64) if args.quick else (24, 128)
    single = make_requests(n_single, 1, (16, 64), out_median * 2, out_median * 2)
    conc = make_requests(n_conc, 2, (8, 96), out_median, out_max)
    poisson = make_requests(n_poisson, 3, (8, 96), out_median, out_max)

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "opt-125m-random"
        build_125m(ckpt, args.dtype)
        dt = getattr(torch, args.dtype)
        hf = OPTForCausalLM.from_pretrained(str(ckpt), dtype=dt).to(args.device).eval()
        engine = engine_from_checkpoint(ckpt, EngineConfig(max_num_seqs=8, max_model_len=256, dtype=args.dtype,
                                                          threads=args.threads, device=args.device))
        # Warm-up both (first calls allocate and pick kernels).
        hf_static(hf, single[:1], 1)
        engine_closed_loop(engine, single[:1], "warm")

        res: dict = {"bench": "serve", "model": "125m shape, random weights", "dtype": args.dtype,
                     "threads": args.threads, "cpus": os.cpu_count(), "device": args.device,
                     "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None, "torch": torch.__version__,
                     "machine": platform.machine(), "load_avg_at_start": os.getloadavg()[0]}
        # Single request, one at a time, alternating sides request by request.
        te = {"tok": 0, "wall": 0.0, "cpu": 0.0}
        th = dict(te)
        for i, r in enumerate(single):
            with Timer() as t:
                te["tok"] += engine_closed_loop(engine, [r], f"s{i}")
            te["wall"] += t.wall
            te["cpu"] += t.cpu
            with Timer() as t:
                th["tok"] += hf_static(hf, [r], 1)[0]
            th["wall"] += t.wall
            th["cpu"] += t.cpu
        e1, h1 = _rates(te["tok"], te["wall"], te["cpu"]), _rates(th["tok"], th["wall"], th["cpu"])
        res["single_request"] = {"engine": e1, "hf_batch1": h1,
                                 "ratio_wall": round(e1["tokens_per_s"] / h1["tokens_per_s"], 2),
                                 "ratio_cpu": round(e1["tokens_per_cpu_s"] / h1["tokens_per_cpu_s"], 2)}
        # 8 concurrent (8 clients sending back to back): the engine gets a round of 32
        # requests at once and keeps its 8 slots full, refilling a slot the step after
        # its request ends; HF runs the same 32 as static batches of 8 in order. Rounds
        # alternate engine / HF.
        te = {"tok": 0, "wall": 0.0, "cpu": 0.0}
        th = dict(te)
        waste = 0
        for k in range(0, len(conc), 32):
            rnd = conc[k:k + 32]
            with Timer() as t:
                te["tok"] += engine_closed_loop(engine, rnd, f"c{k}")
            te["wall"] += t.wall
            te["cpu"] += t.cpu
            with Timer() as t:
                useful, generated = hf_static(hf, rnd, 8)
            th["tok"] += useful
            waste += generated - useful
            th["wall"] += t.wall
            th["cpu"] += t.cpu
        e8, h8 = _rates(te["tok"], te["wall"], te["cpu"]), _rates(th["tok"], th["wall"], th["cpu"])
        h8["padding_tokens_generated"] = waste
        res["concurrent_8"] = {"output_lengths": [m for _, m in conc], "engine": e8, "hf_static_batch8": h8,
                               "ratio_wall": round(e8["tokens_per_s"] / h8["tokens_per_s"], 2),
                               "ratio_cpu": round(e8["tokens_per_cpu_s"] / h8["tokens_per_cpu_s"], 2)}
        res["poisson"] = [asyncio.run(_poisson(engine, poisson, float(rate), 10))
                          for rate in args.rates.split(",")]
        res["engine_stats_after"] = {k: v for k, v in engine.stats().__dict__.items()
                                     if k in ("num_slots", "free_slots", "kv_cache_bytes")}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
