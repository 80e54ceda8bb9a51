"""`opt-ray eval` on bad input: one line naming the input and the fix, exit 2, before
the model is loaded. Also the shards mode: its loss equals transformers' on the same
rows, and shards of another tokenizer are refused."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.eval_helpers import (TEXTS, build_hf_checkpoint, mc_rows, train_opt_tokenizer, write_mc_task,
                                write_text_shards)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_hf_checkpoint(tmp_path_factory.mktemp("errors") / "ckpt")


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    """Local tasks shared by the tests that need lm-eval's whole registry, so that the
    process scans the ~15,000 built-in task files once (the registry is kept)."""
    d = tmp_path_factory.mktemp("tasks")
    write_mc_task(d, "capital_cities", mc_rows(4))
    return d


def _fails(capsys, argv) -> str:
    from opt_ray.cli import main

    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err   # one line, no traceback
    return err


@pytest.mark.parametrize("bad_line, why", [
    ('{"question": "a", "choices": ["x", "y"], "label": 0', "not valid JSON"),
    ('{"question": "a", "label": 0}', "lacks field(s) ['choices']"),
    ('["a", "b"]', "not an object"),
])
def test_malformed_row_names_file_and_row(ckpt, tmp_path, capsys, bad_line, why):
    pytest.importorskip("lm_eval")
    yaml = write_mc_task(tmp_path / "tasks", "broken", mc_rows(4))
    data = tmp_path / "tasks" / "broken.jsonl"
    lines = data.read_text().splitlines()
    lines.insert(2, bad_line)
    data.write_text("\n".join(lines) + "\n")
    err = _fails(capsys, ["eval", str(ckpt), "--tasks", "broken", "--include-path", str(yaml.parent)])
    assert f"{data} line 3" in err and why in err


def test_unknown_task_lists_close_matches(ckpt, tasks_dir, capsys):
    pytest.importorskip("lm_eval")
    err = _fails(capsys, ["eval", str(ckpt), "--tasks", "capital_citys,hellaswg",
                          "--include-path", str(tasks_dir)])
    assert "unknown task 'capital_citys' (close matches: capital_cities" in err
    assert "'hellaswg' (close matches: hellaswag" in err


def test_checkpoint_without_tokenizer_is_one_clear_error(ckpt, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(ckpt, bare, ignore=shutil.ignore_patterns("tokenizer*", "vocab.json", "merges.txt"))
    err = _fails(capsys, ["eval", str(bare), "--tasks", "anything"])
    assert "has no tokenizer" in err and str(bare) in err
    err = _fails(capsys, ["eval", str(bare), "--data", str(tmp_path)])
    assert "has no tokenizer" in err


def test_missing_lm_eval_names_the_extra(ckpt, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)   # `import lm_eval` raises ImportError
    err = _fails(capsys, ["eval", str(ckpt), "--tasks", "hellaswag"])
    assert "pip install 'opt-ray[eval]'" in err


def test_dataset_download_without_network_is_one_line(ckpt, tasks_dir, capsys, monkeypatch):
    """A built-in task whose data is on the Hub, with the network off."""
    pytest.importorskip("lm_eval")
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(ckpt.parent / "hf-cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", ckpt.parent / "hf-cache")
    err = _fails(capsys, ["eval", str(ckpt), "--tasks", "arc_easy", "--limit", "2",
                          "--include-path", str(tasks_dir)])
    assert "task arc_easy" in err and "network" in err and "--include-path" in err


def test_shards_mode_loss_equals_transformers_and_refuses_other_tokenizer(ckpt, tmp_path, capsys):
    import numpy as np
    import torch
    from transformers import OPTForCausalLM

    from opt_ray.cli import main
    from opt_ray.data.shards import ShardDataset
    from opt_ray.data.tokenizer import load_tokenizer

    same = write_text_shards(load_tokenizer(ckpt), tmp_path / "same")
    capsys.readouterr()
    assert main(["eval", str(ckpt), "--data", str(same), "--max-rows", "6"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = torch.from_numpy(ShardDataset(same, split="valid").batch(range(6)).astype(np.int64))
    hf = OPTForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(rows[:, :-1], labels=rows[:, :-1].clone()).loss  # HF shifts labels itself
        ref = torch.nn.functional.cross_entropy(hf(rows[:, :-1]).logits.reshape(-1, hf.config.vocab_size),
                                                rows[:, 1:].reshape(-1))
    assert got["rows"] == 6 and got["loss"] == pytest.approx(float(ref), abs=1e-4)

    other = write_text_shards(train_opt_tokenizer(TEXTS[::-1] + ["other words entirely"], 380), tmp_path / "other")
    err = _fails(capsys, ["eval", str(ckpt), "--data", str(other)])
    assert str(other) in err and "tokenizer" in err
