"""The training gang end to end on a local Ray: a tiny OPT on tiny shards, CPU, gloo.

Shards are made here with the real tokenizer trainer and shard writer. Runs are kept to a
handful of steps (2 cores shared by the suite); every Ray test is marked slow.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

WORDS = ("the cat sat on a mat and the dog ran to the park while birds sang over green hills "
         "near a quiet river under the old stone bridge").split()


def make_shards(out: Path, *, docs: int = 400, seq_len: int = 32, seed: int = 0) -> Path:
    """A small, learnable corpus (short sentences over a 30-word vocabulary) as shards."""
    from opt_ray.data.shards import write_shards
    from opt_ray.data.tokenizer import train_tokenizer

    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))) for _ in range(docs)]
    tok = train_tokenizer(texts, 300)
    return write_shards(({"text": t} for t in texts), tok, out, seq_len=seq_len, valid_fraction=0.05)


def tiny_cfg(data: Path, out: Path, **kw):
    from opt_ray.train.loop import TrainConfig

    base = dict(data=str(data), output=str(out), preset="tiny", steps=6, batch_tokens=8 * 32,
                micro_batch=2, checkpoint_every=2, keep=2, deterministic=True, lr=2e-3,
                warmup_steps=1, max_failures=3, collective_timeout=30, guard=False)
    base.update(kw)
    return TrainConfig(**base)


def final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    from opt_ray.train.checkpoint import load_model_state, resolve
    return load_model_state(resolve(run_dir))


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def events(run_dir: Path) -> list[dict]:
    from opt_ray.logbook import Logbook
    return list(Logbook(run_dir).events())


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("train") / "shards")


# --------------------------------------------------------------------------------------
# Without Ray: the loop in a one-process gloo group (fast enough for every run)
# --------------------------------------------------------------------------------------

def _straight_and_resumed(shards: Path, straight: Path, resumed: Path, **kw) -> None:
    """Train ``straight`` through its 6 steps, then ``resumed``: a copy of it without the
    step-6 checkpoint, trained again, so it resumes from step 4."""
    import shutil

    from opt_ray.train.loop import train

    train(tiny_cfg(shards, straight, **kw))
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000006")
    train(tiny_cfg(shards, resumed, **kw))


def test_resume_in_process_is_bit_identical(shards, tmp_path):
    """A run resumed from its step-4 checkpoint ends with the same bits as the run that
    went straight through (sampler, RNG, optimizer and schedule all restored)."""
    _straight_and_resumed(shards, tmp_path / "a", tmp_path / "b")
    a, b = final_params(tmp_path / "a"), final_params(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["step"] for m in metrics(tmp_path / "b")] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in metrics(tmp_path / "b")] == [m["loss"] for m in metrics(tmp_path / "a")]
    kinds = [e["event"] for e in events(tmp_path / "b")]
    assert kinds.count("resume") == 1 and kinds[-1] == "finish"
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["kind"] == "train_run" and manifest["step"] == 6
    assert manifest["final_checkpoint"] == "checkpoints/step_00000006"


def test_compiled_run_resumes_bit_identical_and_trains_like_eager(shards, tmp_path):
    """``--compile``: a compiled run resumed from its step-4 checkpoint ends with the same
    bits as the compiled run that went straight through (the compiler's dropout masks
    replay from the restored RNG); activation checkpointing recomputes the compiled blocks
    to the same bits; and the losses track the eager run's, whose dropout masks differ."""
    from opt_ray.train.loop import train

    train(tiny_cfg(shards, tmp_path / "eager"))
    _straight_and_resumed(shards, tmp_path / "a", tmp_path / "b", compile=True)
    train(tiny_cfg(shards, tmp_path / "ac", compile=True, activation_checkpointing=True))
    a = final_params(tmp_path / "a")
    for other in ("b", "ac"):
        o = final_params(tmp_path / other)
        assert a.keys() == o.keys() and all(torch.equal(a[k], o[k]) for k in a), other
        assert [m["loss"] for m in metrics(tmp_path / other)] == [m["loss"] for m in metrics(tmp_path / "a")]
    compiled = [m["loss"] for m in metrics(tmp_path / "a")]
    eager = [m["loss"] for m in metrics(tmp_path / "eager")]
    assert len(compiled) == len(eager) == 6 and compiled != eager
    assert all(abs(c - e) < 0.01 * e for c, e in zip(compiled, eager)), (compiled, eager)
    assert compiled[-1] < compiled[0] - 0.5


def test_retention_keeps_last_k_and_milestones(shards, tmp_path):
    from opt_ray.train.loop import train

    train(tiny_cfg(shards, tmp_path / "run", steps=7, checkpoint_every=1, keep=2, milestone_every=3))
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["step_00000003", "step_00000006", "step_00000007"]


def test_guard_hook_rolls_back_cuts_lr_and_skips_data(shards, tmp_path):
    """The loop's divergence-guard hook: an injected NaN at step 5 rolls back to the
    step-4 checkpoint, halves the LR, tightens clipping and skips step 5's batch."""
    from opt_ray.train.loop import train

    out = tmp_path / "run"
    train(tiny_cfg(shards, out, steps=6, guard=True, chaos="nan:step=5"))
    ev = events(out)
    kinds = [e["event"] for e in ev]
    assert kinds.index("divergence") < kinds.index("rollback") < kinds.index("data_skipped")
    rollback = next(e for e in ev if e["event"] == "rollback")
    assert rollback["to_step"] == 4 and rollback["lr_factor"] == 0.5 and rollback["clip"] == 0.3
    ms = metrics(out)
    assert [m["step"] for m in ms] == [1, 2, 3, 4, 5, 6]
    rows = 8
    assert ms[4]["batch_pos"] == 5 * rows          # step 5 trained on the next batch
    assert all(m["loss"] == m["loss"] for m in ms)  # no NaN kept in the trajectory


@pytest.mark.slow
def test_tiny_loss_falls(shards, tmp_path):
    """The recipe learns: the tiny preset's loss on the small corpus falls well below its
    initial value (the curve for bench/RESULTS.md comes from bench/train_gang.py)."""
    from opt_ray.train.loop import train

    train(tiny_cfg(shards, tmp_path / "run", steps=30, checkpoint_every=30, warmup_steps=3))
    losses = [m["loss"] for m in metrics(tmp_path / "run")]
    assert len(losses) == 30
    assert losses[-1] < 0.6 * losses[0], losses
    rec = metrics(tmp_path / "run")[-1]
    for key in ("step", "loss", "lr", "grad_norm", "loss_scale", "tokens_per_s", "mfu"):
        assert key in rec
    # Warmup then linear decay to 10% of peak at the last step.
    lrs = [m["lr"] for m in metrics(tmp_path / "run")]
    assert lrs[2] == pytest.approx(2e-3) and lrs[-1] == pytest.approx(2e-4)


# --------------------------------------------------------------------------------------
# On Ray Train
# --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_resume_on_fewer_workers_and_other_tp(ray_local, shards, tmp_path):
    """2 workers with tensor parallelism 2 for 4 steps, then resumed on 1 worker without
    it: training continues from step 5 with the next samples of the stream. (The one
    worker runs the gang's loop in this process, as a 1-worker gang's worker does: the
    resharding is the loop's; a second Ray Train gang would add only its ~20 s start.)"""
    from actors.train import run_gang
    from opt_ray.data.sampler import ResumableSampler
    from opt_ray.data.shards import ShardDataset
    from opt_ray.train.checkpoint import read_train_state, resolve
    from opt_ray.train.loop import train

    out = tmp_path / "run"
    run_gang(tiny_cfg(shards, out, workers=2, tp=2, steps=4), progress=False)
    train(tiny_cfg(shards, out, workers=1, tp=1, steps=6))
    ms = metrics(out)
    assert [m["step"] for m in ms] == [1, 2, 3, 4, 5, 6]
    assert [m["world_size"] for m in ms] == [2, 2, 2, 2, 1, 1]
    rows = 8  # batch_tokens 256 / seq_len 32
    # Exactly once: step s took stream positions [(s-1)*rows, s*rows), across the resize.
    assert [m["batch_pos"] for m in ms] == [rows * i for i in range(6)]
    state = read_train_state(resolve(out))
    assert state["sampler"]["consumed"] == 6 * rows and state["tp_size"] == 1
    n = len(ShardDataset(shards, verify=False))
    seen = ResumableSampler(n, seed=0).rows_at(0, 6 * rows)
    assert len(set(seen.tolist())) == min(6 * rows, n)
    resize = [e for e in events(out) if e["event"] == "resize"]
    assert resize and resize[0]["from_tp"] == 2 and resize[0]["to_world"] == 1
    # The resharded model kept learning rather than starting over.
    assert ms[4]["loss"] < ms[0]["loss"] - 0.3


def test_export_and_eval(shards, tmp_path, capsys):
    """`opt-ray export` writes an HF checkpoint that evaluates exactly like the training
    checkpoint it came from (`opt-ray eval` on both)."""
    from opt_ray.cli import main
    from opt_ray.train.loop import train

    train(tiny_cfg(shards, tmp_path / "run", steps=2))
    assert main(["export", str(tmp_path / "run"), "--output", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()
    # The export carries the tokenizer the shards were made with, so it is servable.
    from opt_ray.data.shards import ShardDataset
    from opt_ray.data.tokenizer import load_tokenizer, tokenizer_hash
    expected = ShardDataset(shards, verify=False).manifest["tokenizer"]["hash"]
    assert tokenizer_hash(load_tokenizer(tmp_path / "hf")) == expected
    capsys.readouterr()
    results = []
    for model in (tmp_path / "run", tmp_path / "hf"):
        assert main(["eval", str(model), "--data", str(shards), "--max-rows", "16"]) == 0
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert results[0]["loss"] == pytest.approx(results[1]["loss"], rel=1e-6)
    assert results[0]["rows"] == 16 and results[0]["loss"] < 6.0

    # Past --max-shard-size the weights go into several files and an index, written one
    # file's tensors at a time; transformers and eval load them as the single file.
    from transformers import OPTForCausalLM

    from opt_ray.config import ModelConfig
    from opt_ray.model.hf import write_hf
    from opt_ray.train.checkpoint import ModelStateReader, read_train_state, resolve
    limit = 200_000
    assert main(["export", str(tmp_path / "run"), "--output", str(tmp_path / "hf-sharded"),
                 "--max-shard-size", "200KB"]) == 0
    index = json.loads((tmp_path / "hf-sharded" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (tmp_path / "hf-sharded" / "model.safetensors").exists()
    ids = torch.tensor([[2, 5, 9, 11, 4, 7]])
    with torch.no_grad():
        want = OPTForCausalLM.from_pretrained(tmp_path / "hf").eval()(ids).logits
        got = OPTForCausalLM.from_pretrained(tmp_path / "hf-sharded").eval()(ids).logits
    assert torch.equal(want, got)
    assert main(["eval", str(tmp_path / "hf-sharded"), "--data", str(shards), "--max-rows", "16"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"] == results[1]["loss"]
    # Each weight file's tensors are read when that file is written, and only they.
    ckpt = resolve(tmp_path / "run")
    reader, reads = ModelStateReader(ckpt), []

    def read(keys):
        got = reader.read(keys)
        reads.append(sum(t.numel() * t.element_size() for t in got.values()))
        return got

    write_hf(ModelConfig.from_dict(read_train_state(ckpt)["model"]), read, tmp_path / "hf-spy",
             dtype=torch.float32, max_shard_bytes=limit)
    biggest = max(4 * torch.Size(shape).numel() for shape, _ in reader.shapes.values())
    assert len(reads) == len(files) and max(reads) <= max(limit, biggest)
    assert sum(reads) == index["metadata"]["total_size"]
    assert main(["export", str(tmp_path / "run"), "--output", str(tmp_path / "x"),
                 "--max-shard-size", "lots"]) == 2
    assert "--max-shard-size 'lots' is not a size" in capsys.readouterr().err


def test_resume_from_rolls_back_to_a_chosen_checkpoint(shards, tmp_path):
    """`--resume-from 2` (what `opt-ray ctl rollback` submits): newer checkpoints are moved
    aside, training replays from step 2 and ends bit-identical to the straight run."""
    import shutil

    from opt_ray.train.checkpoint import CheckpointError
    from opt_ray.train.loop import train

    train(tiny_cfg(shards, tmp_path / "a", keep=3))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    with pytest.raises(CheckpointError, match="--resume-from 3"):
        train(tiny_cfg(shards, tmp_path / "b", keep=3, resume_from=3))
    train(tiny_cfg(shards, tmp_path / "b", keep=3, resume_from=2))
    a, b = final_params(tmp_path / "a"), final_params(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [m["step"] for m in metrics(tmp_path / "b")] == [1, 2, 3, 4, 5, 6]
    aside = sorted(p.name.split("-")[0] for p in (tmp_path / "b" / "abandoned").iterdir())
    assert aside == ["step_00000004", "step_00000006"]
    rollback = [e for e in events(tmp_path / "b") if e["event"] == "rollback"]
    assert rollback[-1]["to_step"] == 2 and rollback[-1]["moved_aside"] == [4, 6]


def test_guard_policy_from_the_command_line(shards, tmp_path, monkeypatch):
    """`--guard-*` flags reach the guard: a NaN at step 5 with --guard-lr-factor 0.25 and
    --guard-clip 0.5 rolls back with exactly those; a bad value is one line, exit 2.
    Paths are taken relative to where the command runs, then made absolute for workers."""
    from opt_ray.cli import build_parser, main
    from opt_ray.commands.train import config_from_args
    from opt_ray.train.loop import train

    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(
        ["train", "--data", str(shards), "--output", "run", "--guard-lr-factor", "0.25",
         "--guard-clip", "0.5"])
    cfg = config_from_args(args)
    assert cfg.output == str(tmp_path / "run")
    train(tiny_cfg(shards, tmp_path / "run", guard=True, chaos="nan:step=5",
                   guard_policy=cfg.guard_policy))
    rollback = next(e for e in events(tmp_path / "run") if e["event"] == "rollback")
    assert rollback["to_step"] == 4 and rollback["lr_factor"] == 0.25 and rollback["clip"] == 0.5
    assert main(["train", "--data", str(shards), "--output", "bad", "--guard-lr-factor", "2"]) == 2


# --------------------------------------------------------------------------------------
# The gang's Ray wiring: devices from the cluster, elastic sizes in whole TP groups
# --------------------------------------------------------------------------------------

_GPU_PROBE = r"""
import json, sys
import ray, torch
sys.path.insert(0, sys.argv[1])
from actors.train import gang_configs
from opt_ray.config import TrainConfig
from opt_ray.ray_util import local_ray_kwargs

ray.init(**local_ray_kwargs(), num_cpus=1, num_gpus=2, include_dashboard=False)
out = {"driver_cuda": torch.cuda.is_available(), "resources": ray.cluster_resources()}
for device in ("auto", "cpu"):
    cfg = TrainConfig(data=".", output="run", workers=2, device=device)
    scaling, torch_cfg, dev = gang_configs(cfg, ray.cluster_resources())
    out[device] = {"use_gpu": scaling.use_gpu, "per_worker": scaling._resources_per_worker_not_none,
                   "backend": torch_cfg.backend, "device": dev}
ray.shutdown()
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_device_auto_follows_the_cluster_not_the_driver(ray_local, tmp_path):
    """A Ray cluster that advertises 2 GPUs (on this CPU machine) and a driver without
    CUDA: `--device auto` asks Ray for one GPU per worker and NCCL; `--device cpu` does
    not (real Ray, in a process of its own). `--device cuda` on a cluster without GPUs
    (the session's) is one clear error."""
    import subprocess
    import sys

    from actors.train import gang_configs
    from opt_ray.config import TrainConfig
    from opt_ray.errors import UserError

    assert "GPU" not in ray_local.cluster_resources()
    with pytest.raises(UserError) as e:
        gang_configs(TrainConfig(data=".", output="run", workers=2, device="cuda"),
                     ray_local.cluster_resources())
    assert "--device cuda" in str(e.value) and "no GPUs" in str(e.value)

    root = str(Path(__file__).resolve().parents[2])
    r = subprocess.run([sys.executable, "-c", _GPU_PROBE, root], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    line = next((l for l in r.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert line, r.stdout[-2000:] + r.stderr[-3000:]
    out = json.loads(line[len("RESULT "):])
    assert out["driver_cuda"] is False and out["resources"]["GPU"] == 2
    assert out["auto"] == {"use_gpu": True, "per_worker": {"GPU": 1}, "backend": "nccl", "device": "cuda"}
    assert out["cpu"]["use_gpu"] is False and out["cpu"]["backend"] == "gloo"
    assert out["cpu"]["per_worker"] == {"CPU": 1}


def test_elastic_gang_sizes_are_whole_tp_groups():
    """Ray Train's elastic policy picks any size its resources allow (3 workers' worth of
    CPUs -> a gang of 3, which --tp 2 cannot use); the gang's policy rounds down to whole
    tensor-parallel groups, and below MIN it waits rather than starting a smaller gang."""
    from ray.train import ScalingConfig
    from ray.train.v2._internal.execution.scaling_policy import ElasticScalingPolicy

    from actors.train import tp_elastic_policy

    sc = ScalingConfig(num_workers=(2, 6), use_gpu=False, resources_per_worker={"CPU": 1})
    nodes = {"a": {"CPU": 2.0}, "b": {"CPU": 1.0}}
    assert ElasticScalingPolicy(sc)._count_possible_workers(nodes) == 3
    policy = tp_elastic_policy(sc, 2)
    assert policy._count_possible_workers(nodes) == 2
    assert policy._count_possible_workers({"a": {"CPU": 5.0}}) == 4
    assert policy._count_possible_workers({"a": {"CPU": 9.0}}) == 6   # capped at MAX
    assert tp_elastic_policy(sc, 4)._count_possible_workers(nodes) == 0  # < MIN: wait
