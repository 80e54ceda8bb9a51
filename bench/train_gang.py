"""Training-gang benchmark: the full training step through the Ray Train gang vs the
model-only loop, recovery time after a worker kill, and the tiny preset's loss curve.

All in one process run, on the same shards (the built-in sample corpus, tokenized here):

1. model-only: a plain ``OPT`` (no FSDP, no sampler, no checkpointing) doing the same
   optimizer step (micro-batch accumulation, bf16 autocast, AdamW) on the same batches,
   with one torch thread, as each gang worker gets one CPU;
2. the gang with 1 and 2 workers (``actors.train.run_gang``), timed from the wall clock
   between consecutive optimizer steps' metrics records (so everything between two steps
   counts: sampler, data, logging, the guard), median over steps, excluding the first
   steps and checkpoint steps;
3. recovery: a 2-worker gang whose rank 1 SIGKILLs itself (``--chaos kill``); seconds from
   the kill to the first step completed after the restart, and the steps replayed;
4. loss curve: the tiny preset trained in-process on the sample corpus (one thread,
   before Ray starts, so the gang runs do not compete with it).

    python -m bench.train_gang            # prints one JSON object (last line)
"""

from __future__ import annotations

import sys
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
sys.path.insert(0, str(_BENCH.parent))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402


def build_shards(work: Path, seq_len: int) -> Path:
    from opt_ray.data.sample import write_sample_corpus
    from opt_ray.data.shards import write_shards
    from opt_ray.data.tokenizer import train_tokenizer

    corpus = write_sample_corpus(work / "corpus")
    docs = [json.loads(l) for l in corpus.read_text().splitlines()]
    tok = train_tokenizer((d["text"] for d in docs), 2048)
    return write_shards(iter(docs), tok, work / "shards", seq_len=seq_len, valid_fraction=0.02)


def model_only(shards: Path, cfg, steps: int) -> list[float]:
    """Seconds per optimizer step of the bare model doing the gang's step."""
    import math

    import torch
    import torch.nn.functional as F

    from opt_ray.config import preset
    from opt_ray.data.sampler import ResumableSampler
    from opt_ray.data.shards import ShardDataset
    from opt_ray.model.opt import OPT

    torch.set_num_threads(1)
    ds = ShardDataset(shards, verify=False)
    mcfg = preset(cfg.preset).model.replace(vocab_size=int(math.ceil(ds.vocab_size / 8) * 8))
    torch.manual_seed(0)
    model = OPT(mcfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    rows = cfg.batch_tokens // ds.seq_len
    sampler = ResumableSampler(len(ds), seed=0)
    times = []
    model.train()
    for _ in range(steps):
        t0 = time.perf_counter()
        idx = sampler.next_batch(rows)
        for m in range(0, rows, cfg.micro_batch):
            batch = torch.from_numpy(ds.batch(idx[m:m + cfg.micro_batch]))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(batch[:, :-1])
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                   reduction="sum") / (rows * ds.seq_len)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


def gang_step_seconds(run_dir: Path, checkpoint_every: int, skip: int) -> list[float]:
    ms = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    out = []
    for prev, cur in zip(ms, ms[1:]):
        if cur["step"] <= skip or prev["step"] % checkpoint_every == 0:
            continue  # warm-up, and the step after a checkpoint pays for the save
        out.append(cur["time"] - prev["time"])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--curve-steps", type=int, default=120)
    p.add_argument("--skip", default="", help="comma list of parts to skip: overhead,recovery,curve")
    args = p.parse_args(argv)
    skip_parts = set(filter(None, args.skip.split(",")))

    import ray
    import torch

    from actors.train import run_gang
    from opt_ray.logbook import Logbook
    from opt_ray.train.loop import TrainConfig, train

    work = Path(tempfile.mkdtemp(prefix="bench-train-gang-"))
    out: dict = {"bench": "train_gang", "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                   "torch": torch.__version__, "ray": ray.__version__},
                 "command": "python -m bench.train_gang " + " ".join(argv or sys.argv[1:])}
    try:
        shards = build_shards(work, args.seq_len)

        def cfg(name: str, **kw) -> TrainConfig:
            base = dict(data=str(shards), output=str(work / name), preset="tiny", steps=args.steps,
                        batch_tokens=args.batch_tokens, micro_batch=args.micro_batch, lr=1e-3,
                        checkpoint_every=args.steps, deterministic=True, guard=False)
            base.update(kw)
            return TrainConfig(**base)

        if "curve" not in skip_parts:
            c = cfg("curve", steps=args.curve_steps, checkpoint_every=args.curve_steps,
                    batch_tokens=8 * args.seq_len, lr=None, num_threads=1)
            t0 = time.time()
            train(c)
            ms = [json.loads(l) for l in (work / "curve" / "metrics.jsonl").read_text().splitlines()]
            stride = max(len(ms) // 10, 1)
            out["loss_curve"] = {"preset": "tiny", "steps": len(ms), "tokens_per_step": 8 * args.seq_len,
                                 "peak_lr": max(m["lr"] for m in ms),
                                 "initial": ms[0]["loss"], "final": ms[-1]["loss"],
                                 "points": [[m["step"], round(m["loss"], 3)] for m in ms[::stride]] +
                                           [[ms[-1]["step"], round(ms[-1]["loss"], 3)]],
                                 "wall_s": round(time.time() - t0, 1)}

        if "overhead" not in skip_parts or "recovery" not in skip_parts:
            from opt_ray.ray_util import local_ray_kwargs
            ray.init(**local_ray_kwargs(), num_cpus=4, include_dashboard=False, log_to_driver=False)
        if "overhead" not in skip_parts:
            # The machine is shared and its load drifts: the model-only loop is timed right
            # before and right after each gang run, and each gang run is compared with the
            # mean of its two neighbours.
            def baseline() -> float:
                return args.batch_tokens / statistics.median(model_only(shards, cfg("x"), args.steps)[3:])

            res = {"tokens_per_step": args.batch_tokens, "seq_len": args.seq_len, "model_only_tokens_per_s": []}
            before = baseline()
            res["model_only_tokens_per_s"].append(before)
            for n in (1, 2):
                run_gang(cfg(f"gang{n}", workers=n), progress=False)
                sec = statistics.median(gang_step_seconds(work / f"gang{n}", args.steps, 3))
                after = baseline()
                res["model_only_tokens_per_s"].append(after)
                res[f"gang_{n}w_tokens_per_s"] = args.batch_tokens / sec
                res[f"gang_{n}w_vs_model_only"] = res[f"gang_{n}w_tokens_per_s"] / ((before + after) / 2)
                before = after
            res["overhead_1w"] = 1 - res["gang_1w_vs_model_only"]
            out["overhead"] = res

        if "recovery" not in skip_parts:
            every, kill_at = 4, 7
            c = cfg("recovery", workers=2, steps=10, checkpoint_every=every,
                    chaos=f"kill:rank=1:step={kill_at}")
            t0 = time.time()
            run_gang(c, progress=False)
            wall = time.time() - t0
            ev = list(Logbook(work / "recovery").events())
            killed = next(e["time"] for e in ev if e["event"] == "chaos")
            restart = next(e for e in ev if e["event"] == "restart")
            ms = [json.loads(l) for l in (work / "recovery" / "metrics.jsonl").read_text().splitlines()]
            first = next(m for m in ms if m["time"] > killed)
            out["recovery"] = {"checkpoint_every": every, "killed_at_step": kill_at,
                               "resumed_from_step": restart["step"],
                               "steps_lost": kill_at - 1 - restart["step"],
                               "seconds_kill_to_restart_event": round(restart["time"] - killed, 2),
                               "seconds_kill_to_first_step": round(first["time"] - killed, 2),
                               "run_wall_s": round(wall, 1)}
        if ray.is_initialized():
            ray.shutdown()

    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
