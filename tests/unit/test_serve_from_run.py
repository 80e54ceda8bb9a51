"""`opt-ray serve|generate --checkpoint RUN` straight from a training run (no export):
a run trained here with the real trainer, served from its checkpoint, against the
reference of `opt-ray export` of the same checkpoint. Each load builds the HF directory
on this node (the fetch cache) once per checkpoint and dtype; the front end and the
CLI's check write no weights; bad input is one line, exit 2, before Ray."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

from opt_ray.cli import main
from opt_ray.run_dir import FETCH_ENV
from tests.unit.test_serve_cli import _one_line_error

PROMPT = "the cat sat on"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """A 2-step tiny run (checkpoint at step 2) and `opt-ray export` of it."""
    from opt_ray.train.loop import train
    from tests.integration.test_train_gang import make_shards, tiny_cfg

    root = tmp_path_factory.mktemp("from-run")
    shards = make_shards(root / "shards", docs=160)
    train(tiny_cfg(shards, root / "run", steps=2, checkpoint_every=2))
    assert main(["export", str(root / "run"), "--output", str(root / "hf")]) == 0
    return {"root": root, "shards": shards, "run": root / "run", "hf": root / "hf"}


def generate(ckpt: Path | str, capsys, *extra: str) -> tuple[str, str]:
    """(the completion's text, stderr) of `opt-ray generate`, greedy."""
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(ckpt), PROMPT, "--max-tokens", "8",
                 "--json", *extra]) == 0
    out, err = capsys.readouterr()
    return json.loads(out.strip().splitlines()[-1])["choices"][0]["text"], err


def greedy(ckpt: Path | str, dtype: str = "float32"):
    """Token ids and their logprobs (top 2) of 8 greedy tokens, from the engine."""
    from opt_ray.serve.engine import EngineConfig, engine_from_checkpoint
    from opt_ray.serve.sampling import SamplingParams

    engine = engine_from_checkpoint(ckpt, EngineConfig(dtype=dtype))
    out = engine.generate(engine.tokenizer.encode(PROMPT).ids,
                          SamplingParams(max_tokens=8, temperature=0.0, logprobs=2,
                                         ignore_eos=True))[0]
    return out.token_ids, [(lp.token_id, lp.logprob, lp.top) for lp in out.logprobs]


def files(root: Path) -> dict[str, int]:
    """Every weight file under a fetch directory -> its mtime."""
    return {str(p): p.stat().st_mtime_ns for p in sorted(root.rglob("*.safetensors"))}


def test_generate_from_a_run_equals_its_export_and_builds_once(run, tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file

    node = tmp_path / "node"
    monkeypatch.setenv(FETCH_ENV, str(node))
    want, _ = generate(run["hf"], capsys)
    got, err = generate(run["run"], capsys)
    assert got == want
    assert f"built --checkpoint {run['run']} step 2 (float32, 1 weight file" in err
    assert greedy(run["run"]) == greedy(run["hf"])
    (built,) = node.rglob("model.safetensors")
    ref = load_file(str(run["hf"] / "model.safetensors"))
    mine = load_file(str(built))
    assert mine.keys() == ref.keys() and all(torch.equal(mine[k], ref[k]) for k in ref)
    assert (built.parent / "tokenizer.json").read_bytes() == (run["run"] / "tokenizer.json").read_bytes()

    # A second load on the node builds nothing: the same files, untouched.
    before = files(node)
    got, err = generate(run["run"], capsys)
    assert got == want and "built" not in err and files(node) == before

    # In the engine's dtype: a bf16 replica gets a bf16 build of its own (half the bytes),
    # serving as the fp32 export read in bf16; the fp32 build stays.
    want16, _ = generate(run["hf"], capsys, "--dtype", "bfloat16")
    got16, err = generate(run["run"], capsys, "--dtype", "bfloat16")
    assert got16 == want16 and "step 2 (bfloat16" in err
    assert greedy(run["run"], "bfloat16") == greedy(run["hf"], "bfloat16")
    (half,) = [p for p in node.rglob("model.safetensors") if p != built]
    assert json.loads((half.parent / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert half.stat().st_size < 0.55 * built.stat().st_size
    assert set(before) <= set(files(node))


def test_front_end_and_cli_check_write_no_weights(run, tmp_path, monkeypatch):
    from opt_ray.serve.engine import resolve_checkpoint
    from opt_ray.serve.frontend import Frontend
    from opt_ray.serve.loading import check_checkpoint, load_tokenizer_dir

    node = tmp_path / "head"
    monkeypatch.setenv(FETCH_ENV, str(node))
    ref = resolve_checkpoint(run["run"])
    assert ref == run["run"] / "checkpoints" / "step_00000002"
    check_checkpoint(ref)
    fe = Frontend.for_checkpoint(None, run["run"], model_name=None)
    ctx = json.loads((run["hf"] / "config.json").read_text())["max_position_embeddings"]
    assert fe.model_name == "run" and fe.max_model_len == ctx
    assert fe.tokenizer.encode(PROMPT).ids == load_tokenizer_dir(run["hf"]).encode(PROMPT).ids
    assert not list(node.rglob("*.safetensors")) and list(node.rglob("config.json"))


def test_a_newer_checkpoint_is_built_anew_and_a_named_one_is_served(run, tmp_path, monkeypatch, capsys):
    """The run trains on: the next load builds its new newest checkpoint (the older build
    goes, and a build cut short by a kill is cleared); a checkpoint named by its
    directory is served as it is."""
    from opt_ray.train.checkpoint import load_model_state, resolve
    from opt_ray.train.loop import train
    from tests.integration.test_train_gang import tiny_cfg

    node = tmp_path / "node"
    monkeypatch.setenv(FETCH_ENV, str(node))
    mine = tmp_path / "run"
    shutil.copytree(run["run"], mine)
    want2, _ = generate(run["hf"], capsys)
    assert generate(mine, capsys)[0] == want2
    (first,) = node.rglob("model.safetensors")
    killed = first.parent.with_name(".0123456789abcdef.tmp-dead0000")   # a killed build's
    (killed / "model.safetensors").parent.mkdir(parents=True)
    (killed / "model.safetensors").write_bytes(b"half")

    train(tiny_cfg(run["shards"], mine, steps=4, checkpoint_every=2))
    _, err = generate(mine, capsys)
    assert f"built --checkpoint {mine} step 4 " in err
    (built,) = node.rglob("model.safetensors")       # the step-2 build and the killed one: gone
    assert built != first and not killed.exists()
    from safetensors.torch import load_file
    ref = load_model_state(resolve(mine))             # step 4, read by the training side
    got = load_file(str(built))
    assert all(torch.equal(got[k], ref[k]) for k in got) and len(got) == len(ref) - 1  # lm_head tied

    _, err = generate(mine / "checkpoints" / "step_00000002", capsys)
    assert "step 2 " in err
    assert greedy(mine / "checkpoints" / "step_00000002") == greedy(run["hf"])


def test_replicas_of_a_node_build_once(run, tmp_path, monkeypatch, capsys):
    """Three loads at once on one node (the replicas of a node starting together): one
    builds, the others wait for its build and read it."""
    from opt_ray.serve.engine import load_model_and_tokenizer

    monkeypatch.setenv(FETCH_ENV, str(tmp_path / "node"))
    capsys.readouterr()
    go = threading.Barrier(3)
    models = [None] * 3

    def load(i: int) -> None:
        go.wait()
        models[i] = load_model_and_tokenizer(run["run"])[0].state_dict()

    threads = [threading.Thread(target=load, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert capsys.readouterr().err.count("built --checkpoint") == 1
    assert all(m is not None and all(torch.equal(m[k], models[0][k]) for k in m) for m in models)
    assert len(list((tmp_path / "node").rglob("model.safetensors"))) == 1


def test_bad_runs_are_one_line_before_ray(run, tmp_path, monkeypatch, capsys, no_ray):
    monkeypatch.setenv(FETCH_ENV, str(tmp_path / "node"))

    def refused(ckpt: Path, *needles: str, command: str = "serve") -> None:
        rc = main([command, "--checkpoint", str(ckpt), "--grpc-port", "0"] if command == "serve"
                  else [command, "--checkpoint", str(ckpt), PROMPT])
        _one_line_error(rc, capsys.readouterr().err, str(ckpt), *needles)

    # A run that has not committed a checkpoint yet (a save cut short: no manifest).
    young = tmp_path / "young"
    shutil.copytree(run["run"], young)
    (young / "checkpoints" / "step_00000002" / "manifest.json").unlink()
    refused(young, "no committed checkpoint yet")
    refused(young, "no committed checkpoint yet", command="generate")
    refused(young / "checkpoints" / "step_00000002", "not committed", "no committed checkpoint yet")
    # A step the run does not have.
    refused(run["run"] / "checkpoints" / "step_00000009", "is not there", "of the run: 2;",
            command="generate")
    # Neither an export nor a run.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("hello")
    refused(other, "neither an HF-format checkpoint", "nor a training run")
    tok = tmp_path / "tok"                 # a tokenizer artifact is not a run either
    tok.mkdir()
    shutil.copy(run["run"] / "tokenizer.json", tok / "tokenizer.json")
    (tok / "manifest.json").write_text('{"kind": "tokenizer", "files": {}}')
    refused(tok, "neither an HF-format checkpoint", "nor a training run")
    # A committed checkpoint damaged since, and a run without its tokenizer.
    damaged = tmp_path / "damaged"
    shutil.copytree(run["run"], damaged)
    shard = damaged / "checkpoints" / "step_00000002" / "tp0" / "__0_0.distcp"
    with shard.open("r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    refused(damaged, "tp0/__0_0.distcp is", "damaged after it was committed")
    notok = tmp_path / "notok"
    shutil.copytree(run["run"], notok)
    (notok / "tokenizer.json").unlink()
    refused(notok, "no tokenizer.json", "--tokenizer")
    assert not list((tmp_path / "node").rglob("*.safetensors"))


def test_a_size_capped_node_evicts_the_build_used_least_recently(run, tmp_path, monkeypatch, capsys):
    """OPT_RAY_FETCH_MAX_BYTES with room for one build: serving the run in bf16 after fp32
    evicts the fp32 build (not in use: its replica has loaded it) to make room."""
    from opt_ray.run_dir import FETCH_MAX_ENV

    node = tmp_path / "node"
    monkeypatch.setenv(FETCH_ENV, str(node))
    monkeypatch.setenv(FETCH_MAX_ENV, "4MB")
    generate(run["run"], capsys)
    (fp32,) = node.rglob("model.safetensors")
    assert 3e6 < fp32.stat().st_size < 4e6
    want16, _ = generate(run["hf"], capsys, "--dtype", "bfloat16")
    got16, err = generate(run["run"], capsys, "--dtype", "bfloat16")
    assert got16 == want16
    evicted = [ln for ln in err.splitlines() if ln.startswith("evicted")]
    assert len(evicted) == 1 and str(fp32.parent) in evicted[0], err
    (bf16,) = node.rglob("model.safetensors")
    assert bf16 != fp32 and not fp32.parent.exists()
