"""Dedup stage: signatures vs datasketch, worker scaling, end-to-end, accuracy (prints JSON).

The corpus is real text present on every machine that runs this project: the source,
docs and licence files of the Python standard library and of the packages installed in
the virtual environment (full of real near-duplicates: licence headers, vendored
copies, generated stubs, versions of the same module).

1. signatures, one core, same texts: ``opt_ray.data.minhash.signatures`` (C kernel, and
   the numpy fallback) vs the same shingling + ``datasketch.MinHash.update_batch``;
   output must be identical. Goal: >= 3x datasketch.
2. Ray scaling: signature batches through 1 and then 2 ``DedupWorker`` actors (actors
   started and warmed before timing). Goal: 2 workers >= 1.6x one.
3. end-to-end: the whole stage (read, sign, buckets, verify, write Parquet) on Ray with 2
   workers, MB/s of text in.
4. accuracy at 0.95 and 0.85 on a subset: exact-Jaccard ground truth by brute force
   (sparse doc x shingle matrix product, all pairs), pair recall (both ends of a true
   pair in one cluster), LSH candidate recall (ours and datasketch's own optimal bands),
   and false removals (removed without a true partner >= threshold). Goal: recall >=
   0.99, no false removal.

Run: ``python -m bench.dedup [--mb 8] [--subset 5000] [--trials 2] [--no-ray]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

EXTS = (".py", ".pyi", ".txt", ".rst", ".md", ".cfg", ".toml")


def real_corpus() -> list[tuple[str, str]]:
    """``(path, text)`` of the stdlib's and the venv's text files, sorted by path."""
    import sysconfig
    roots = {Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])}
    out = []
    for root in sorted(roots):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for fn in sorted(filenames):
                if not (fn.endswith(EXTS) or fn.startswith(("LICENSE", "LICENCE", "COPYING"))):
                    continue
                p = Path(dirpath) / fn
                try:
                    if not 200 <= p.stat().st_size <= 256_000:
                        continue
                    out.append((str(p), p.read_bytes().decode("utf-8")))
                except (OSError, UnicodeDecodeError):
                    continue
    return out


def sample(corpus, mb: float, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    docs = corpus[:]
    rng.shuffle(docs)
    out, total = [], 0
    for d in docs:
        if total >= mb * 1e6:
            break
        out.append(d)
        total += len(d[1].encode())
    return out


def accuracy_subset(corpus, n: int, seed: int = 1) -> list[tuple[str, str]]:
    """Half: all files of randomly drawn base names that occur more than once (vendored
    copies, versions of a module, licences: where real near-duplicates live); half:
    random other files. Brute-force ground truth decides what is a duplicate."""
    rng = random.Random(seed)
    by_name: dict[str, list] = {}
    for d in corpus:
        by_name.setdefault(Path(d[0]).name, []).append(d)
    names = sorted(k for k, v in by_name.items() if 1 < len(v) <= 50)
    rng.shuffle(names)
    out: list = []
    for name in names:
        if len(out) >= n // 2:
            break
        out.extend(by_name[name])
    taken = {p for p, _ in out}
    rest = [d for d in corpus if d[0] not in taken]
    out.extend(rng.sample(rest, n - len(out)))
    return out


def best_of(trials: int, fn, clock=time.perf_counter) -> float:
    best = float("inf")
    for _ in range(trials):
        t = clock()
        fn()
        best = min(best, clock() - t)
    return best


def bench_signatures(texts: list[str], trials: int) -> dict:
    import numpy as np
    from datasketch import MinHash

    from opt_ray.data import minhash, minhash_kernel
    mb = sum(len(t.encode()) for t in texts) / 1e6

    def reference():
        out = []
        for t in texts:
            m = MinHash(num_perm=128, seed=1)
            m.update_batch([s.encode("utf-8") for s in minhash.shingles(t, 5)])
            out.append(m.hashvalues)
        return np.array(out)

    ref = reference()
    # CPU seconds of this process (process_time) are the per-core figure: the shared
    # machine's load inflates wall time unevenly. Wall-clock ratios are reported too.
    res = {"mb": round(mb, 2), "docs": len(texts), "clock": "process_time (CPU s)"}
    t_ref = best_of(trials, reference, time.process_time)
    w_ref = best_of(1, reference)
    res["datasketch_mb_s"] = round(mb / t_ref, 2)
    paths = [("c", True), ("numpy", False)] if minhash_kernel.load() else [("numpy", False)]
    for name, use_c in paths:
        sig = minhash.signatures(texts, use_c=use_c)
        assert (sig == ref).all(), f"{name} path differs from datasketch"
        t = best_of(trials, lambda: minhash.signatures(texts, use_c=use_c), time.process_time)
        w = best_of(1, lambda: minhash.signatures(texts, use_c=use_c))
        res[f"{name}_mb_s"] = round(mb / t, 2)
        res[f"{name}_vs_datasketch"] = round(t_ref / t, 2)
        res[f"{name}_vs_datasketch_wall"] = round(w_ref / w, 2)
        res[f"{name}_identical"] = True
    return res


def bench_scaling(texts: list[str], trials: int) -> dict:
    """Signature throughput through 1 vs 2 worker actors. Both settings use the same two
    warm actors (the 1-worker runs submit to the first only) and alternate trial by
    trial, so a burst of load from other users of the machine hits both alike."""
    import ray

    from actors.dedup import RayBackend
    from opt_ray.data.dedup import DedupConfig
    cfg = DedupConfig()
    mb = sum(len(t.encode()) for t in texts) / 1e6
    # ~256 KB batches: enough tasks to keep two workers busy.
    batches, cur, size = [], [], 0
    for t in texts:
        cur.append(t)
        size += len(t)
        if size >= 256_000:
            batches.append(cur)
            cur, size = [], 0
    batches += [cur] if cur else []
    backend = RayBackend(cfg, 2)
    for w in backend.workers:        # actors up and warm (kernel loaded)
        ray.get(w.process.options(num_returns=1 + cfg.num_buckets).remote(0, ["warm up"])[0])

    cpu = {"driver": 0.0, "workers": 0.0}

    def run(workers: int) -> float:
        backend.num_workers = workers   # least-loaded choice among the first `workers`
        w0 = sum(ray.get([w.cpu_seconds.remote() for w in backend.workers]))
        c0 = time.process_time()
        t0 = time.perf_counter()
        n = 0
        for b, batch in enumerate(batches):
            backend.submit_batch(b, n, batch)
            n += len(batch)
            while backend.in_flight() >= 2 * workers:
                backend.done_batches(block=True)
        while backend.in_flight():
            backend.done_batches(block=True)
        wall = time.perf_counter() - t0
        cpu["driver"] += time.process_time() - c0
        cpu["workers"] += sum(ray.get([w.cpu_seconds.remote() for w in backend.workers])) - w0
        return wall

    times: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(max(trials, 3)):
        for workers in (1, 2):
            times[workers].append(run(workers))
    backend.num_workers = 2
    backend.close()
    res = {f"workers_{w}_mb_s": round(mb / min(ts), 2) for w, ts in times.items()}
    res["speedup_2_vs_1"] = round(min(times[1]) / min(times[2]), 2)
    res["speedup_per_trial"] = [round(a / b, 2) for a, b in zip(times[1], times[2])]
    # Amdahl from CPU accounting: with the driver's serial share f of all CPU, two
    # workers can be at most 1 / (f + (1 - f) / 2) faster than one.
    f = cpu["driver"] / (cpu["driver"] + cpu["workers"])
    res["cpu_s_driver_vs_workers"] = [round(cpu["driver"], 2), round(cpu["workers"], 2)]
    res["speedup_bound_from_cpu"] = round(1 / (f + (1 - f) / 2), 2)
    return res


def bench_end_to_end(docs, tmp: Path, ray_backend: bool) -> dict:
    from opt_ray.data.dedup import DedupConfig, LocalBackend, run_dedup
    src = tmp / "corpus.jsonl"
    if not src.exists():
        with open(src, "w") as f:
            for path, text in docs:
                f.write(json.dumps({"text": text, "path": path}) + "\n")
    cfg = DedupConfig()
    out = tmp / ("e2e-ray" if ray_backend else "e2e-local")
    startup = 0.0
    if ray_backend:
        from actors.dedup import RayBackend
        t = time.perf_counter()
        backend = RayBackend(cfg, 2)
        backend.worker_pids()   # actors up; their start-up is reported, not timed below
        startup = time.perf_counter() - t
    else:
        backend = LocalBackend(cfg)
    try:   # best of two runs: the shared machine's load comes in bursts
        rep = min((run_dedup([str(src)], str(out), cfg, backend, id_field="path",
                             overwrite=True) for _ in range(2)),
                  key=lambda r: r["timings"]["total_s"])
    finally:
        backend.close()
    return {"mb_s": rep["throughput_mb_s"], "seconds": rep["timings"],
            "actor_startup_s": round(startup, 2), **{
        k: rep["counts"][k] for k in ("docs", "candidate_pairs", "exact_duplicates",
                                      "duplicates_removed")}}


def ground_truth(texts: list[str], threshold: float, ngram: int = 5):
    """All pairs (i < j) with exact Jaccard >= threshold, by brute force over a sparse
    doc x shingle matrix: X @ X.T gives every pairwise intersection size."""
    import numpy as np
    import scipy.sparse as sp

    from opt_ray.data.minhash import shingle_set
    vocab: dict[str, int] = {}
    rows, cols, sizes = [], [], []
    for i, t in enumerate(texts):
        s = shingle_set(t, ngram)
        sizes.append(len(s))
        for sh in s:
            rows.append(i)
            cols.append(vocab.setdefault(sh, len(vocab)))
    x = sp.csr_matrix((np.ones(len(rows), dtype=np.int32), (rows, cols)),
                      shape=(len(texts), len(vocab)))
    inter = sp.triu(x @ x.T, k=1).tocoo()
    sizes = np.array(sizes)
    jac = inter.data / (sizes[inter.row] + sizes[inter.col] - inter.data)
    keep = jac >= threshold
    return {(int(i), int(j)): float(s) for i, j, s in
            zip(inter.row[keep], inter.col[keep], jac[keep])}


def bench_accuracy(docs, tmp: Path) -> dict:
    import numpy as np

    from opt_ray.data import minhash
    from opt_ray.data.dedup import (BucketTable, DedupConfig, LocalBackend, band_keys,
                                    run_dedup)
    texts = [t for _, t in docs]
    src = tmp / "subset.jsonl"
    with open(src, "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"text": t, "i": i}) + "\n")
    sig = minhash.signatures(texts)
    res = {"docs": len(texts)}
    for threshold in (0.95, 0.85):
        truth = ground_truth(texts, threshold)
        cfg = DedupConfig(threshold=threshold)
        rep = run_dedup([str(src)], str(tmp / f"acc-{threshold}"), cfg, LocalBackend(cfg),
                        id_field="i", overwrite=True)
        cluster_of = {}
        removed = set()
        for k, c in enumerate(rep["clusters"]):
            for m in c["members"]:
                cluster_of[int(m)] = k
            removed.update(int(m) for m in c["members"][1:])
        def together(p):
            return p[0] in cluster_of and cluster_of[p[0]] == cluster_of.get(p[1])
        near = [p for p, s in truth.items() if s < 1.0]   # not identical shingle sets
        partners = {i for p in truth for i in p}
        r = {"true_pairs": len(truth), "true_pairs_below_1": len(near),
             "bands_rows": [cfg.bands, cfg.rows],
             "pair_recall": round(sum(map(together, truth)) / len(truth), 5) if truth else None,
             "pair_recall_below_1": round(sum(map(together, near)) / len(near), 5) if near else None,
             "removed": len(removed), "false_removals": len(removed - partners),
             "candidate_pairs": rep["counts"]["candidate_pairs"],
             "end_to_end_in_process_mb_s": rep["throughput_mb_s"], "seconds": rep["timings"]}
        # LSH alone, on the pairs that are not identical (identical ones always collide).
        for label, (b, rr) in [("lsh_candidate_recall_below_1", (cfg.bands, cfg.rows)),
                               ("lsh_candidate_recall_below_1_datasketch_optimum", (3, 42))]:
            table = BucketTable()
            table.add(0, band_keys(sig, b, rr).ravel(),
                      np.repeat(np.arange(len(texts)), b))
            cand = {tuple(p) for p in table.candidate_pairs().tolist()}
            r[label] = round(sum(p in cand for p in near) / len(near), 5) if near else None
        res[str(threshold)] = r
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=8.0, help="MB of text for the speed runs")
    ap.add_argument("--subset", type=int, default=5000, help="documents for accuracy")
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--no-ray", action="store_true")
    args = ap.parse_args()

    import pyarrow.parquet  # noqa: F401  - one-time imports (~2 s here) stay out of the timings
    import ray  # noqa: F401
    corpus = real_corpus()
    speed_docs = sample(corpus, args.mb, seed=0)
    texts = [t for _, t in speed_docs]
    out = {"bench": "dedup", "machine": platform.node(), "cpus": os.cpu_count(),
           "corpus_files": len(corpus),
           "corpus_mb": round(sum(len(t.encode()) for _, t in corpus) / 1e6, 1)}
    print("# signatures", file=sys.stderr, flush=True)
    out["signatures_one_core"] = bench_signatures(texts, args.trials)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print("# end-to-end (in-process)", file=sys.stderr, flush=True)
        out["end_to_end_local"] = bench_end_to_end(speed_docs, tmp, ray_backend=False)
        if not args.no_ray:
            from opt_ray.ray_util import init_ray
            init_ray(None, num_cpus=os.cpu_count())
            print("# ray scaling", file=sys.stderr, flush=True)
            out["ray_scaling"] = bench_scaling(texts, args.trials)
            print("# end-to-end (ray, 2 workers)", file=sys.stderr, flush=True)
            out["end_to_end_ray_2_workers"] = bench_end_to_end(speed_docs, tmp, ray_backend=True)
            import ray
            ray.shutdown()
        print("# accuracy", file=sys.stderr, flush=True)
        acc_docs = accuracy_subset(corpus, args.subset)
        out["accuracy"] = bench_accuracy(acc_docs, tmp)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
