"""An eval's start on a training run: what `opt-ray eval RUN --workers N` does before its
first score (the driver locates and verifies the checkpoint, each worker loads the model),
this tree against an earlier revision (a git worktree), the run in a local directory and
in a bucket (SeaweedFS on 127.0.0.1, as the tests start it).

Before 9d8759f each worker hashed the whole checkpoint again (the optimizer's state too)
and read the weights from the run; now the driver's hash is the only one and the workers
of a node read the node's build of the checkpoint (built once).

Run: ``python -m bench.eval_load [--preset 125m] [--workers 2] [--trials 3] [--against REV]``
(prints JSON; record it in bench/RESULTS.md with the machine and its load average).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import ray
from opt_ray.ray_util import local_ray_kwargs
from opt_ray.eval.lm import OptLM
run, workers = sys.argv[2], int(sys.argv[3])
ray.init(**local_ray_kwargs(), num_cpus=workers, include_dashboard=False, log_to_driver=False)
t0 = time.perf_counter()
lm = OptLM.from_checkpoint(run, workers=workers, dtype="float32")
dt = time.perf_counter() - t0
ray.shutdown()
print("RESULT " + json.dumps({"seconds": dt, "params": lm.info["model_num_parameters"]}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="125m")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--against", default="55d9ff1", help="the revision to compare with")
    args = ap.parse_args()

    import fsspec

    from bench.dedup import _RefTree
    from bench.export import make_checkpoint
    from tests.s3_helpers import S3Server

    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        ckpt = make_checkpoint(args.preset, tmp, workers=2)
        run = str(Path(ckpt).parent.parent)
        size = sum(p.stat().st_size for p in Path(ckpt).rglob("*") if p.is_file())
        ref = _RefTree(args.against, tmp / "ref-tree")
        server = S3Server(tmp / "s3")
        env = {**os.environ, **server.env(), "OPT_RAY_STAGING_DIR": str(tmp / "staging")}
        env.pop("RAY_ADDRESS", None)
        try:
            url = server.url("runs", "run")
            fs = fsspec.filesystem("s3", key=server.key, secret=server.secret,
                                   endpoint_url=server.env()["AWS_ENDPOINT_URL"])
            for f in Path(run).rglob("*"):
                if f.is_file():
                    fs.put_file(str(f), f"{url}/{f.relative_to(run).as_posix()}")
            # As `opt-ray train --output s3://...` leaves it: the run's mirror mark (the
            # revision compared with reads the tokenizer through it).
            os.environ.update(server.env())
            from opt_ray.run_dir import RunMirror
            RunMirror(url, Path(run)).push()
            trees = {f"this tree ({ref.rev})": root, f"{args.against}": ref.path}
            runs: dict = {}
            n = 0
            for t in range(args.trials):
                for side, src in (("local", run), ("bucket", url)):
                    for name in (list(trees) if t % 2 == 0 else list(trees)[::-1]):
                        n += 1
                        e = {**env, "OPT_RAY_FETCH_DIR": str(tmp / f"node-{n}")}   # a fresh node
                        p = subprocess.run([sys.executable, "-c", _CHILD, str(trees[name]), src,
                                            str(args.workers)], capture_output=True, text=True,
                                           env=e, cwd=tmp, timeout=900)
                        line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
                        if line is None:
                            raise RuntimeError(f"{name} {side}: {p.stderr[-3000:]}")
                        runs.setdefault(side, {}).setdefault(name, []).append(
                            json.loads(line[len("RESULT "):])["seconds"])
                        print(side, name, runs[side][name][-1], file=sys.stderr, flush=True)
        finally:
            server.stop()
            ref.close()
    out = {"bench": "eval_load", "machine": platform.node(), "cpus": os.cpu_count(),
           "preset": args.preset, "workers": args.workers, "checkpoint_mb": round(size / 1e6, 1),
           "load_1m_end": round(os.getloadavg()[0], 2)}
    for side, by in runs.items():
        out[side] = {k: {"seconds": [round(x, 2) for x in v], "median": round(sorted(v)[len(v) // 2], 2)}
                     for k, v in by.items()}
        new, old = (out[side][k]["median"] for k in trees)
        out[side]["speed_vs_ref"] = round(old / new, 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
