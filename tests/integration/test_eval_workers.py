"""`opt-ray eval --workers 2`: requests split across two Ray actors give the same
per-request scores, metrics and generations as one process. Scores agree to float
rounding, not bit for bit: a request batched with other neighbours is padded to another
length, and the matmuls then sum in another order (~1e-6)."""

from __future__ import annotations

import pytest

pytest.importorskip("lm_eval")

from tests.eval_helpers import TEXTS, build_hf_checkpoint, mc_rows, write_mc_task, write_rolling_task  # noqa: E402


@pytest.mark.slow
def test_two_workers_equal_one(ray_local, tmp_path):
    from lm_eval.api.instance import Instance

    from opt_ray.commands.eval import evaluate_tasks
    from opt_ray.eval.lm import OptLM

    ckpt = build_hf_checkpoint(tmp_path / "ckpt", max_positions=32)
    write_mc_task(tmp_path / "tasks", "mc_workers", mc_rows(8))
    write_rolling_task(tmp_path / "tasks", "rolling_workers", [" ".join(TEXTS[i:] + TEXTS[:i]) for i in range(3)])
    names = ["mc_workers", "rolling_workers"]
    runs = [evaluate_tasks(ckpt, tasks=names, include_path=str(tmp_path / "tasks"), workers=w,
                           batch_size=2, log_samples=True) for w in (1, 2)]
    for task in names:
        one, two = ([[x[0] for x in s["resps"]] for s in sorted(r["samples"][task], key=lambda s: s["doc_id"])]
                    for r in runs)
        assert len(one) == len(two) > 0
        for a, b in zip(one, two):   # per document, per request, in order
            flat_a = [v for x in a for v in (x if isinstance(x, (list, tuple)) else [x])]
            flat_b = [v for x in b for v in (x if isinstance(x, (list, tuple)) else [x])]
            assert flat_b == pytest.approx(flat_a, abs=1e-5, rel=0)
        metrics = {k: v for k, v in runs[0]["results"][task].items() if isinstance(v, float)}
        assert metrics and {k: runs[1]["results"][task][k] for k in metrics} == pytest.approx(metrics, rel=1e-6)

    reqs = [Instance(request_type="generate_until", doc={}, idx=0,
                     arguments=(p, {"until": ["."], "max_gen_toks": 6}))
            for p in ("The quick brown", "Paris is", "Ray runs actors")]
    local = OptLM.from_checkpoint(ckpt, batch_size=2).generate_until(reqs, disable_tqdm=True)
    pooled = OptLM.from_checkpoint(ckpt, batch_size=2, workers=2).generate_until(reqs, disable_tqdm=True)
    assert pooled == local


_GPU_EVAL = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import ray, torch
from opt_ray.ray_util import local_ray_kwargs
from opt_ray.errors import UserError
from opt_ray.commands.eval import evaluate_tasks
from opt_ray.eval.devices import place

ckpt, tasks = sys.argv[2], sys.argv[3]
ray.init(**local_ray_kwargs(), num_cpus=2, num_gpus=2, include_dashboard=False)
out = {"driver_cuda": torch.cuda.is_available(), "gpus": ray.cluster_resources().get("GPU")}
out["auto"] = place("auto", "auto", 2).__dict__
out["cpu"] = place("cpu", "auto", 2).__dict__
try:
    place("auto", "auto", 4, tp=2)
except UserError as e:
    out["tp2x2"] = str(e)
for key, workers, tp in (("2", 2, 1), ("3", 3, 1), ("tp", 2, 2)):
    try:
        evaluate_tasks(ckpt, tasks=["mc_gpu"], include_path=tasks, workers=workers, tp=tp, batch_size=2)
        out[key] = "ran"
    except UserError as e:
        out[key] = str(e)
out["groups_left"] = [g["state"] for g in ray.util.placement_group_table().values()]
# Perplexity on shards from a driver on the cluster (as `ray job submit` runs it): one
# Ray task with a GPU, not this driver's CPU.
import contextlib, io, os
from opt_ray.cli import main
os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
err = io.StringIO()
with contextlib.redirect_stderr(err):
    out["data_rc"] = main(["eval", ckpt, "--data", tasks])
out["data_err"] = err.getvalue().strip().splitlines()
ray.shutdown()
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_workers_take_the_clusters_gpus_not_the_drivers(ray_local, tmp_path):
    """`opt-ray eval` ran every worker on the CPU, also on GPU clusters (no device flag;
    the actors asked Ray for no GPUs). A Ray cluster that advertises 2 GPUs (on this CPU
    machine) and a driver without CUDA: `--device auto` asks Ray for one GPU per worker
    (here the actors then find no CUDA: one line naming the GPU Ray gave them), more
    workers than GPUs is refused before any actor starts, and `--device cpu` takes none.
    On the session's cluster (no GPUs), `--device cuda` is one clear error."""
    import json
    import re
    import subprocess
    import sys
    from pathlib import Path

    from opt_ray.errors import UserError
    from opt_ray.eval.devices import Placement, place

    assert place("auto", "auto", 2) == Placement("cpu", "float32", True)
    with pytest.raises(UserError, match="advertises no GPUs"):
        place("cuda", "auto", 2)
    assert place("auto", "bfloat16", 1) == Placement("cpu", "bfloat16", False)

    ckpt = build_hf_checkpoint(tmp_path / "ckpt", max_positions=32)
    write_mc_task(tmp_path / "tasks", "mc_gpu", mc_rows(4))
    root = str(Path(__file__).resolve().parents[2])
    r = subprocess.run([sys.executable, "-c", _GPU_EVAL, root, str(ckpt), str(tmp_path / "tasks")],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, r.stdout[-2000:] + r.stderr[-3000:]
    out = json.loads(line[len("RESULT "):])
    assert out["driver_cuda"] is False and out["gpus"] == 2
    assert out["auto"] == {"device": "cuda", "dtype": "bfloat16", "actors": True}
    assert out["cpu"] == {"device": "cpu", "dtype": "float32", "actors": True}
    assert "--workers 4" in out["tp2x2"] and "advertises 2" in out["tp2x2"], out["tp2x2"]
    assert "Ray gave it GPU [" in out["2"] and "torch sees no CUDA device" in out["2"], out["2"]
    assert "\n" not in out["2"]
    assert "--workers 3" in out["3"] and "advertises 2" in out["3"], out["3"]
    # --tp 2: the two ranks of one copy take a GPU each from one placement group (freed).
    assert "Ray gave it GPU [" in out["tp"] and "\n" not in out["tp"], out["tp"]
    assert out["groups_left"] and set(out["groups_left"]) == {"REMOVED"}, out["groups_left"]
    # Ray forwards other processes' logs to the driver's stderr, each line prefixed with
    # "(pid=...)"; the GCS's line about the failed actors of the step above can land late,
    # here. What the CLI itself writes is one line.
    own = [ln for ln in out["data_err"] if not re.match(r"(\x1b\[[0-9;]*m)?\((pid=|\w+ pid=)", ln)]
    assert out["data_rc"] == 2 and len(own) == 1, out["data_err"]
    assert "Ray gave it GPU [" in own[0] and "no CUDA" in own[0]


@pytest.mark.slow
def test_workers_on_a_run_read_it_once_per_node_and_hash_it_once(ray_local, tmp_path, monkeypatch):
    """`opt-ray eval RUN --workers N`: each worker re-hashed the whole checkpoint (the
    optimizer's state too: 13b, ~150 GB each) and read its weights from the run itself.
    Now the driver hashes it once (`locate`), and the workers of a node read the node's
    build of it (once per node). Scores equal one process's."""
    import os
    from pathlib import Path

    import opt_ray.train.checkpoint as ck
    from opt_ray.commands.eval import evaluate_tasks
    from opt_ray.train.loop import train
    from tests.integration.test_train_gang import make_shards, tiny_cfg

    shards = make_shards(tmp_path / "shards", docs=160)
    run = tmp_path / "evalrun"
    train(tiny_cfg(shards, run, steps=2, checkpoint_every=2))
    write_mc_task(tmp_path / "tasks", "mc_run", mc_rows(6))
    hashed = []
    real_verify = ck.verify
    monkeypatch.setattr(ck, "verify", lambda p, *a, **kw: hashed.append(str(p)) or real_verify(p, *a, **kw))
    kw = dict(tasks=["mc_run"], include_path=str(tmp_path / "tasks"), batch_size=2, log_samples=True)
    one = evaluate_tasks(str(run), workers=1, **kw)
    assert len(hashed) == 1                      # locate's; loading did not hash it again
    two = evaluate_tasks(str(run), workers=2, **kw)
    assert len(hashed) == 2                      # the driver's, once; the workers' none
    # Split two ways (--tp 2): each rank reads its half from the same node build.
    split = evaluate_tasks(str(run), workers=2, tp=2, **kw)
    assert len(hashed) == 3
    for a, b, c in zip(*(sorted(r["samples"]["mc_run"], key=lambda s: s["doc_id"])
                         for r in (one, two, split))):
        assert [x[0][0] for x in b["resps"]] == pytest.approx([x[0][0] for x in a["resps"]], abs=1e-5)
        assert [x[0][0] for x in c["resps"]] == pytest.approx([x[0][0] for x in a["resps"]], abs=1e-4)
    builds = [v for d in Path(os.environ["OPT_RAY_FETCH_DIR"]).glob(f"{run.name}-*")
              for v in d.iterdir() if not v.name.startswith(".")]
    assert len(builds) == 1 and any(builds[0].glob("*.safetensors")), builds   # one per node
