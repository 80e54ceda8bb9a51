"""`opt-ray serve` / `generate` as a user runs them: a cut-off weight file or a port in use
is one line naming it and exit 2, before Ray starts (no Ray Serve traceback);
`--dtype float16` generates. One run is a real subprocess; the others call the CLI's
``main`` in-process (the same code path, without paying the interpreter start each time)
with a tripwire on ``init_ray``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from opt_ray.cli import main
from tests.conftest import free_port
from tests.serve_helpers import build_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("cli") / "ckpt")


def _one_line_error(rc: int, err: str, *needles: str) -> str:
    assert rc == 2, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("opt-ray ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def cut(ckpt, tmp_path):
    d = tmp_path / "cut"
    shutil.copytree(ckpt, d)
    f = d / "model.safetensors"
    with f.open("r+b") as fh:
        fh.truncate(f.stat().st_size - 1000)
    return d


def test_cut_off_safetensors_serve(cut, no_ray, capsys):
    rc = main(["serve", "--checkpoint", str(cut), "--http-port", str(free_port()), "--grpc-port", "0"])
    _one_line_error(rc, capsys.readouterr().err, str(cut / "model.safetensors"), "cut off")


def test_serve_no_ray_answers_and_stops_on_sigterm(ckpt):
    """`opt-ray serve --no-ray` as a user runs it: a completion over HTTP, then SIGTERM."""
    import httpx
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "opt_ray.cli", "serve", "--no-ray", "--checkpoint", str(ckpt),
                          "--model-name", "m", "--http-port", str(port), "--grpc-port", "0"],
                         cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = p.stdout.readline()
        assert f"http://127.0.0.1:{port}/v1" in line, (line, p.stderr.read() if p.poll() is not None else "")
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                       json={"model": "m", "prompt": "The quick", "max_tokens": 4, "temperature": 0,
                             "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=60) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_cut_off_safetensors_generate(cut, capsys):
    rc = main(["generate", "--checkpoint", str(cut), "hello"])
    _one_line_error(rc, capsys.readouterr().err, str(cut / "model.safetensors"), "cut off")


def test_port_in_use_is_one_line_before_ray(ckpt, no_ray, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc = main(["serve", "--checkpoint", str(ckpt), "--http-port", str(port), "--grpc-port", "0"])
        _one_line_error(rc, capsys.readouterr().err, "--http-port", f"127.0.0.1:{port}", "in use")
        rc = main(["serve", "--checkpoint", str(ckpt), "--http-port", str(free_port()), "--grpc-port", str(port)])
        _one_line_error(rc, capsys.readouterr().err, "--grpc-port", "in use")
    rc = main(["serve", "--checkpoint", str(ckpt), "--max-body-bytes", "0"])
    _one_line_error(rc, capsys.readouterr().err, "--max-body-bytes")


def test_generate_float16(ckpt, capsys):
    assert main(["generate", "--checkpoint", str(ckpt), "--dtype", "float16", "--max-tokens", "4",
                 "--json", "The quick"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["usage"]["completion_tokens"] >= 1


def test_cut_off_torch_bin_and_missing_tokenizer_are_named(ckpt, tmp_path):
    import torch
    from safetensors.torch import load_file

    from opt_ray.errors import UserError
    from opt_ray.serve.loading import check_checkpoint
    d = tmp_path / "bin"
    shutil.copytree(ckpt, d)
    (d / "model.safetensors").unlink()
    torch.save(load_file(str(ckpt / "model.safetensors")), d / "pytorch_model.bin")
    check_checkpoint(d)                                  # whole: passes
    f = d / "pytorch_model.bin"
    with f.open("r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    with pytest.raises(UserError, match="pytorch_model.bin: cut off"):
        check_checkpoint(d)
    (ckpt_copy := tmp_path / "notok").mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(ckpt / name, ckpt_copy / name)
    with pytest.raises(UserError, match="tokenizer"):
        check_checkpoint(ckpt_copy)


def test_sharded_checkpoint_with_a_missing_weight_file_is_named(ckpt, tmp_path):
    """A sharded HF checkpoint (transformers' save_pretrained past max_shard_size) is
    checked and served like one file; one whose index lists a file that is not there (a
    copy still under way) is one error naming it, before anything is deployed."""
    from transformers import OPTForCausalLM

    from opt_ray.errors import UserError
    from opt_ray.serve.engine import EngineConfig, engine_from_checkpoint
    from opt_ray.serve.loading import check_checkpoint
    from opt_ray.serve.sampling import SamplingParams
    d = tmp_path / "sharded"
    OPTForCausalLM.from_pretrained(ckpt).save_pretrained(d, max_shard_size="100KB")
    for name in ("tokenizer.json",):
        shutil.copy(ckpt / name, d / name)
    parts = sorted(d.glob("model-*.safetensors"))
    assert len(parts) >= 2 and (d / "model.safetensors.index.json").is_file()
    check_checkpoint(d)
    params = SamplingParams(max_tokens=6, temperature=0.0)
    want = engine_from_checkpoint(ckpt, EngineConfig()).generate([2, 5, 7], params)[0].token_ids
    assert engine_from_checkpoint(d, EngineConfig()).generate([2, 5, 7], params)[0].token_ids == want
    parts[-1].unlink()
    with pytest.raises(UserError, match=f"{parts[-1].name} is listed in "
                                        f"model.safetensors.index.json but missing"):
        check_checkpoint(d)


def test_tensor_parallel_size_is_checked_before_ray(ckpt, no_ray, capsys):
    """A split the model's 4 heads do not allow, or one asked of the Ray-free server: one
    line each, before Ray starts."""
    port = str(free_port())
    rc = main(["serve", "--checkpoint", str(ckpt), "--tensor-parallel-size", "3", "--http-port", port])
    _one_line_error(rc, capsys.readouterr().err, "tensor-parallel size 3 must divide "
                    "model.num_attention_heads (4)")
    rc = main(["serve", "--checkpoint", str(ckpt), "--tensor-parallel-size", "2", "--no-ray",
               "--http-port", port])
    _one_line_error(rc, capsys.readouterr().err, "--tensor-parallel-size")
    rc = main(["serve", "--checkpoint", str(ckpt), "--tensor-parallel-size", "0", "--http-port", port])
    _one_line_error(rc, capsys.readouterr().err, "--tensor-parallel-size must be >= 1")
