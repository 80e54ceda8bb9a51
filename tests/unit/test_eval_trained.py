"""`opt-ray eval --tasks` on a model trained in the test: a tiny OPT reads stretches of
the NATO alphabet, and lm-eval's multiple-choice task "which word comes next" must then
be answered well above chance (0.25) and above the same model untrained. The scores
also land in the run's logbook as an `eval` event."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from tests.eval_helpers import write_mc_task  # noqa: E402

# The NATO alphabet as a cycle: every word is followed by the same next word.
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
         "juliett", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo",
         "sierra", "tango", "uniform", "victor", "whiskey", "xray", "yankee", "zulu"]


def chain(start: int, n: int) -> list[str]:
    return [WORDS[(start + i) % len(WORDS)] for i in range(n)]

STEPS = 60


def corpus(docs: int = 600, seed: int = 1) -> list[str]:
    """Stretches of the cycle from random starting words."""
    rng = random.Random(seed)
    return [" ".join(chain(rng.randrange(len(WORDS)), rng.randint(6, 20))) for _ in range(docs)]


def task_rows(seed: int = 2) -> list[dict]:
    """Three words of the cycle; which word comes next (the right one and 3 others)."""
    rng = random.Random(seed)
    rows = []
    for start in range(len(WORDS)):
        words = chain(start, 4)
        others = rng.sample([w for w in WORDS if w != words[3]], 3)
        label = rng.randrange(4)
        choices = others[:label] + [words[3]] + others[label:]
        # No leading space: lm-eval joins question and choice with target_delimiter " ".
        rows.append({"question": " ".join(words[:3]), "choices": choices,
                     "label": label})
    return rows


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run trained on the corpus (library loop, one process), the task over it,
    and the same architecture untrained as an HF export with the run's tokenizer."""
    import torch

    from opt_ray.config import ModelConfig
    from opt_ray.data.shards import write_shards
    from opt_ray.data.tokenizer import load_tokenizer, save_tokenizer_files, train_tokenizer
    from opt_ray.model.hf import to_hf
    from opt_ray.model.opt import OPT
    from opt_ray.train.checkpoint import read_train_state, resolve
    from opt_ray.train.loop import TrainConfig, train

    root = tmp_path_factory.mktemp("trained")
    texts = corpus()
    tok = train_tokenizer(texts, 600)  # whole words: the next word is one token
    shards = write_shards(({"text": t} for t in texts), tok, root / "shards", seq_len=32,
                          valid_fraction=0.02)
    run = root / "run"
    train(TrainConfig(data=str(shards), output=str(run), preset="tiny", steps=STEPS,
                      batch_tokens=16 * 32, micro_batch=16, checkpoint_every=STEPS, lr=3e-3,
                      warmup_steps=5, dropout=0.0, guard=False, precision="fp32",
                      # One thread: on a loaded 2-core machine two OpenMP threads spin-wait.
                      num_threads=1))
    write_mc_task(root / "tasks", "next_word", task_rows())

    cfg = ModelConfig.from_dict(read_train_state(resolve(run))["model"])
    torch.manual_seed(0)
    untrained = root / "untrained"
    to_hf(OPT(cfg), untrained)
    save_tokenizer_files(load_tokenizer(run / "tokenizer.json"), untrained)
    return {"run": run, "tasks": root / "tasks", "untrained": untrained}


def _acc(out: Path) -> float:
    return json.loads(out.read_text())["results"]["next_word"]["acc,none"]


def test_trained_model_answers_what_it_was_taught(trained, tmp_path, capsys):
    from opt_ray.cli import main
    from opt_ray.logbook import Logbook

    args = ["--tasks", "next_word", "--include-path", str(trained["tasks"])]
    assert main(["eval", str(trained["run"]), *args, "--output", str(tmp_path / "a.json")]) == 0
    assert "next_word" in capsys.readouterr().out   # lm-eval's table
    assert main(["eval", str(trained["untrained"]), *args, "--output", str(tmp_path / "b.json")]) == 0
    acc, acc0 = _acc(tmp_path / "a.json"), _acc(tmp_path / "b.json")
    assert acc >= 0.75, acc              # chance is 0.25
    assert acc > acc0 + 0.25, (acc, acc0)

    ev = [e for e in Logbook(trained["run"]).events() if e["event"] == "eval"]
    assert len(ev) == 1                  # the HF export is not a run: no logbook
    assert ev[0]["step"] == STEPS and ev[0]["tasks"] == ["next_word"]
    assert ev[0]["results"]["next_word"]["acc,none"] == pytest.approx(acc)
    assert ev[0]["checkpoint"].endswith(f"step_{STEPS:08d}")
