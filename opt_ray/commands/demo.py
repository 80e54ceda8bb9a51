"""`opt-ray demo`: the whole pipeline on the built-in sample corpus, on one embedded Ray.

Each stage runs through its own CLI entry point, exactly as a user would type it, inside
this one process so that they share one local Ray. The demo prints every command it
runs and where each artifact went.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

from opt_ray.errors import UserError
from opt_ray.ray_util import add_ray_args

# A demo output directory carries this marker, so re-running the demo may replace it
# without ever deleting a directory the demo did not create.
MARKER = ".opt-ray-demo"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole pipeline on the built-in sample corpus on an embedded local Ray",
        description="Run dedup -> tokenizer -> tokenize -> train -> export -> generate on the "
                    "built-in sample corpus (assembled from text shipped with Python, no "
                    "download), on an embedded local Ray unless --address is given.",
    )
    p.add_argument("--output", default="demo-out",
                   help="directory for every artifact (default: demo-out); a previous demo "
                        "output there is replaced")
    p.add_argument("--steps", type=int, default=80, help="training steps of the tiny preset (default: 80)")
    p.add_argument("--batch-tokens", type=int, default=8192,
                   help="tokens per training step (default: 8192, half the tiny preset's, so the "
                        "demo trains in about two minutes on a laptop CPU)")
    p.add_argument("--workers", type=int, default=2, help="Ray workers for dedup and tokenize (default: 2)")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary trained on the corpus (default: 4096)")
    p.add_argument("--seq-len", type=int, default=128, help="training sequence length (default: 128)")
    p.add_argument("--prompt", default="The module", help="prompt for the final generation")
    add_ray_args(p)
    p.set_defaults(func=run)


def _prepare(out: Path) -> None:
    if out.exists():
        if not (out / MARKER).exists():
            raise UserError(f"--output {out} exists and was not written by 'opt-ray demo'; "
                            f"choose another --output or remove it")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("written by opt-ray demo; safe to delete\n")


def run(args: argparse.Namespace) -> int:
    if args.steps < 1 or args.workers < 1:
        raise UserError("--steps and --workers must be >= 1")
    out = Path(args.output).absolute()
    _prepare(out)

    from opt_ray.cli import main as cli_main
    from opt_ray.data.sample import write_sample_corpus
    from opt_ray.ray_util import init_ray

    init_ray(args.address, num_cpus=args.num_cpus)
    ray_args = ["--address", args.address] if args.address else []

    corpus = write_sample_corpus(out / "corpus")
    p = {name: out / name for name in ("dedup", "tokenizer", "shards", "run", "hf")}
    stages = [
        ("dedup", ["dedup", str(corpus), "--output", str(p["dedup"]),
                   "--workers", str(args.workers), *ray_args]),
        ("tokenizer", ["tokenizer", "train", str(p["dedup"]), "--vocab-size", str(args.vocab_size),
                       "--output", str(p["tokenizer"])]),
        ("tokenize", ["tokenize", str(p["dedup"]), "--tokenizer", str(p["tokenizer"]),
                      "--seq-len", str(args.seq_len), "--output", str(p["shards"]),
                      "--workers", str(args.workers), *ray_args]),
        ("train", ["train", "--preset", "tiny", "--data", str(p["shards"]), "--output", str(p["run"]),
                   "--workers", "1", "--steps", str(args.steps), "--batch-tokens", str(args.batch_tokens),
                   "--checkpoint-every", str(max(1, args.steps // 4)),
                   # One worker: let it use every core (Ray gives it one thread by default).
                   "--threads", str(os.cpu_count() or 1), *ray_args]),
        ("export", ["export", str(p["run"]), "--output", str(p["hf"])]),
        # Sampled, seeded: a model this small repeats itself under greedy decoding.
        ("generate", ["generate", "--checkpoint", str(p["hf"]), args.prompt, "--max-tokens", "40",
                      "--temperature", "0.8", "--top-p", "0.95", "--seed", "0"]),
    ]
    timings = {}
    for name, argv in stages:
        print(f"\n== {name}: opt-ray {shlex.join(argv)}", flush=True)
        t0 = time.time()
        rc = cli_main(argv)
        timings[name] = time.time() - t0
        if rc != 0:
            print(f"opt-ray demo: stage {name!r} failed (exit {rc}); artifacts so far are in {out}",
                  file=sys.stderr)
            return rc

    print("\n== opt-ray demo finished. Artifacts:")
    print(f"  {'corpus':<10} {corpus}")
    for name, path in p.items():
        print(f"  {name:<10} {path}")
    print(f"  {'logbook':<10} opt-ray logbook {p['run']}")
    print("  seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    losses = [json.loads(line)["loss"] for line in (p["run"] / "metrics.jsonl").read_text().splitlines()
              if line.strip()]
    if losses:
        print(f"  training loss: {losses[0]:.3f} at step 1 -> {losses[-1]:.3f} at step {len(losses)}")
    return 0
