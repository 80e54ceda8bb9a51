"""`opt-ray train` refuses every configuration and input error it can know before Ray
starts: one line naming the input and the fix, exit 2, within seconds (no gang, no Ray)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

WORDS = "the quick brown fox jumps over lazy dog and runs far away from home".split()


def _shards(out: Path, seed: int, vocab: int) -> Path:
    from opt_ray.data.shards import write_shards
    from opt_ray.data.tokenizer import train_tokenizer

    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30))) for _ in range(300)]
    tok = train_tokenizer(texts, vocab)
    return write_shards(({"text": t} for t in texts), tok, out, seq_len=32, valid_fraction=0.05)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("preflight")
    return _shards(root / "a", 0, 300), _shards(root / "b", 1, 400)


def _train(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "opt_ray.cli", "train", "--no-progress", *argv],
                       cwd=cwd, capture_output=True, text=True, timeout=120)
    r.seconds = time.time() - t0  # type: ignore[attr-defined]
    return r


def test_errors_known_before_ray_exit_2_with_one_line(data, tmp_path, capsys, monkeypatch):
    """Three cases as a user runs them (a subprocess each, the costly part: the
    interpreter start); the rest through the same ``main`` in this process."""
    from opt_ray.cli import main

    monkeypatch.chdir(tmp_path)
    a, b = data
    run = tmp_path / "run"
    run.mkdir()
    (run / "tokenizer.json").write_bytes((b / "tokenizer.json").read_bytes())  # kept by a run on b
    dedup = tmp_path / "dedup"
    dedup.mkdir()
    (dedup / "manifest.json").write_text(json.dumps({"kind": "dedup"}))
    blocked = tmp_path / "file"
    blocked.write_text("")
    base = ["--data", str(a), "--batch-tokens", "256", "--micro-batch", "2"]
    cases = [
        (["--tp", "3", "--workers", "2", "--output", "o"], "--tp 3 must divide --workers 2"),
        (["--tp", "2", "--workers", "1:4", "--output", "o"], "multiples of --tp 2"),
        (["--lr", "-1", "--output", "o"], "--lr"),
        (["--warmup-steps", "50", "--steps", "10", "--output", "o"], "--warmup-steps 50 exceeds --steps 10"),
        (["--output", str(run)], "another tokenizer"),
        (["--output", str(dedup)], "'dedup' artifact"),
        (["--output", str(blocked / "run")], "not writable"),
        (["--workers", "1:3", "--output", "o"], "do not split over 3 data-parallel ranks"),
        (["--batch-tokens", "100", "--output", "o"], "not a whole number of rows"),
    ]
    for i, (extra, needle) in enumerate(cases):
        args = base + extra if "--batch-tokens" not in extra else \
            ["--data", str(a), "--micro-batch", "2"] + extra
        if i in (0, 4, 5):
            r = _train(*args, cwd=tmp_path)
            code, err = r.returncode, r.stderr.strip()
            assert "Traceback" not in r.stderr
            assert r.seconds < 60, (extra, r.seconds)
        else:
            t0 = time.time()
            code = main(["train", "--no-progress", *args])
            err = capsys.readouterr().err.strip()
            assert time.time() - t0 < 10, extra
        assert code == 2, (extra, err[-2000:])
        assert len(err.splitlines()) == 1 and needle in err, (extra, err)
    assert not (dedup / "checkpoints").exists() and not (tmp_path / "o").exists()


def test_checkpoint_vocabulary_must_match_the_data(data, tmp_path):
    """A run directory whose checkpoints were trained on another vocabulary is refused."""
    a, b = data
    ck = tmp_path / "run" / "checkpoints" / "step_00000002"
    ck.mkdir(parents=True)
    (ck / "train_state.json").write_text(json.dumps({"step": 2, "model": {"vocab_size": 512}}))
    (ck / "manifest.json").write_text(json.dumps({"step": 2, "files": {}}))
    r = _train("--data", str(a), "--output", str(tmp_path / "run"), "--batch-tokens", "256",
               cwd=tmp_path)
    assert r.returncode == 2 and "vocabulary" in r.stderr and len(r.stderr.strip().splitlines()) == 1, \
        r.stderr[-2000:]
