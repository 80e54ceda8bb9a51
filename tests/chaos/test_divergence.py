"""Chaos drills for the divergence guard and the logbook (issue 6), end to end.

The guard drills run the real training loop (``opt_ray.train.loop.train``) in this
process on a one-process gloo group: a tiny OPT on tiny shards, the real checkpointer,
sampler, guard and logbook, with faults injected by ``--chaos`` specs. The CLI drills
(exit status) go through ``opt-ray train`` and a local Ray gang; they are
marked slow.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from opt_ray.logbook import Logbook, render_markdown

ROOT = Path(__file__).resolve().parents[2]
WORDS = ("the cat sat on a mat and the dog ran to the park while birds sang over green hills "
         "near a quiet river under the old stone bridge").split()
SEQ = 32
ROWS = 8           # global batch rows per optimizer step


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """A small learnable corpus (short sentences over a 30-word vocabulary) as shards."""
    from opt_ray.data.shards import write_shards
    from opt_ray.data.tokenizer import train_tokenizer

    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))) for _ in range(600)]
    tok = train_tokenizer(texts, 300)
    return write_shards(({"text": t} for t in texts), tok, tmp_path_factory.mktemp("div") / "shards",
                        seq_len=SEQ, valid_fraction=0.05)


def run_inprocess(shards: Path, out: Path, **kw):
    """Train in this process; returns the last metrics (or raises what the loop raises)."""
    from opt_ray.train.loop import TrainConfig, train

    base = dict(data=str(shards), output=str(out), preset="tiny", steps=30, batch_tokens=ROWS * SEQ,
                micro_batch=ROWS, checkpoint_every=5, keep=3, lr=2e-3, warmup_steps=2,
                max_failures=0, collective_timeout=60, guard=True, num_threads=1)
    base.update(kw)
    return train(TrainConfig(**base))


def events(run_dir: Path) -> list[dict]:
    return list(Logbook(run_dir).events())


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]


def final_trajectory(rows: list[dict]) -> dict[int, dict]:
    """step -> the row of the run that counts (the last time each step was run)."""
    return {r["step"]: r for r in rows}


def kinds(evs: list[dict]) -> list[str]:
    return [e["event"] for e in evs]


def first(evs: list[dict], kind: str, /, **match) -> int:
    """Index of the first event of ``kind`` whose fields match."""
    for i, e in enumerate(evs):
        if e["event"] == kind and all(e.get(k) == v for k, v in match.items()):
            return i
    raise AssertionError(f"no {kind} event with {match} in {kinds(evs)}")


# --------------------------------------------------------------------------------------
# Injected NaN: rollback to a healthy checkpoint, LR cut, the run finishes, in order
# --------------------------------------------------------------------------------------

def test_injected_nan_rolls_back_cuts_lr_and_finishes(shards, tmp_path):
    from opt_ray.train.schedule import LRSchedule

    run = tmp_path / "nan"
    last = run_inprocess(shards, run, steps=20, chaos="nan:step=13")
    assert last["step"] == 20 and math.isfinite(last["loss"])

    ev = events(run)
    i_chaos = first(ev, "chaos", kind="nan", step=13)
    i_div = first(ev, "divergence", reason="nan", step=13)
    i_rb = first(ev, "rollback")
    i_skip = first(ev, "data_skipped", step=13)
    i_fin = first(ev, "finish")
    assert i_chaos < i_div < i_rb < i_skip < i_fin, kinds(ev)

    # Rolled back to the newest checkpoint before the NaN (saved at 5 and 10).
    rb = ev[i_rb]
    assert rb["to_step"] == 10 and rb["lr_factor"] == pytest.approx(0.5) and rb["clip"] == pytest.approx(0.3)
    assert ev[i_div]["rollback_to"] == 10
    saved_before = [e["step"] for e in ev[:i_div] if e["event"] == "checkpoint_saved"]
    assert 10 in saved_before

    # The LR after the rollback is half the schedule's; before it, the schedule's.
    rows = final_trajectory(metrics(run))
    sched = LRSchedule(2e-3, 2, 20)
    assert rows[10]["lr"] == pytest.approx(sched.lr(10))
    for s in range(11, 21):
        assert rows[s]["lr"] == pytest.approx(0.5 * sched.lr(s)), s
    assert all(math.isfinite(r["loss"]) for r in rows.values())
    assert sorted(rows) == list(range(1, 21))

    # The chronicle tells the same story in the same order.
    chron = render_markdown(run).split("## Chronicle", 1)[1]
    order = ["Drill: injected `nan` at step 13", "Non-finite loss or gradient at step 13",
             "Rolled back from step 13 to the checkpoint of step 10", "LR now x0.5",
             "Skipped the batch of step 13", "Run completed at step 20"]
    pos = [chron.find(s) for s in order]
    assert -1 not in pos, [s for s, p in zip(order, pos) if p == -1]
    assert pos == sorted(pos)


# --------------------------------------------------------------------------------------
# Injected loss spike with data skipping: skipped batches recorded and never seen again
# --------------------------------------------------------------------------------------

def test_injected_spike_skips_the_batch_for_the_rest_of_the_epoch(shards, tmp_path):
    from opt_ray.data.sampler import ResumableSampler
    from opt_ray.data.shards import ShardDataset

    run = tmp_path / "spike"
    # The guard judges spikes after 20 healthy steps (GuardConfig.min_steps).
    last = run_inprocess(shards, run, steps=30, chaos="spike:step=24:factor=10")
    assert last["step"] == 30

    ev = events(run)
    i_div = first(ev, "divergence", reason="spike", step=24)
    div = ev[i_div]
    assert div["loss"] > 1.5 * div["running_mean"]
    i_rb = first(ev, "rollback")
    assert ev[i_rb]["to_step"] == 20 and 24 in ev[i_rb]["skip_steps"]
    skip = ev[first(ev, "data_skipped", step=24)]
    start, end = skip["start"], skip["end"]
    assert end - start == ROWS

    # The skip is part of the sampler state the run ended with (and the guard's).
    from opt_ray.train.checkpoint import committed, read_train_state
    state = read_train_state(committed(run / "checkpoints")[-1][1])
    assert any(lo <= start and end <= hi for lo, hi in state["sampler"]["skipped"])
    assert 24 in state["guard"]["skip_steps"]

    # Rows of the skipped positions are never trained on again in that epoch: every batch
    # of the final trajectory covers other stream positions, hence other rows.
    n = len(ShardDataset(str(shards), split="train", verify=False))
    sampler = ResumableSampler(n, seed=0)
    skipped_rows = set(sampler.rows_at(start, end).tolist())
    epoch = start // n
    rows = final_trajectory(metrics(run))
    assert sorted(rows) == list(range(1, 31))
    for step, r in rows.items():
        bp = r["batch_pos"]
        if bp // n != epoch:
            continue
        lo, hi = bp, min(bp + ROWS, (epoch + 1) * n)
        assert hi <= start or lo >= end, f"step {step} trained on skipped positions"
        assert not skipped_rows & set(sampler.rows_at(lo, hi).tolist()), f"step {step} saw a skipped row"
    # ... and the step after the rollback that replaced step 24 took the next batch.
    assert rows[24]["batch_pos"] == end


# --------------------------------------------------------------------------------------
# Retries exhausted: the run stops with an error and a report naming the cause
# --------------------------------------------------------------------------------------

def test_retries_exhausted_stop_with_a_report(shards, tmp_path):
    from opt_ray.train.guard import DivergenceError

    run = tmp_path / "giveup"
    # A NaN at each of 4 consecutive steps: 3 rollbacks (GuardConfig.max_rollbacks), then
    # the guard gives up.
    with pytest.raises(DivergenceError) as e:
        run_inprocess(shards, run, steps=20, chaos="nan:step=7,nan:step=8,nan:step=9,nan:step=10")
    report = str(e.value)
    assert "non-finite loss" in report and "limit of 3 rollback(s)" in report
    assert "tried 3 rollback(s)" in report and "rolled back to step 5" in report

    ev = events(run)
    assert [e["attempt"] for e in ev if e["event"] == "divergence"] == [1, 2, 3, 4]
    assert kinds(ev).count("rollback") == 3
    gave_up = ev[first(ev, "divergence_give_up")]
    assert "limit of 3 rollback(s)" in gave_up["report"]
    assert "finish" not in kinds(ev) or ev[first(ev, "finish")].get("status") == "failed"


# Ray Train restarts a gang whose worker raised DivergenceError like after any failure;
# the give-up is persisted first, so the restart stops on it and the CLI exits non-zero.
@pytest.mark.slow
def test_retries_exhausted_exit_non_zero_through_the_cli(shards, tmp_path):
    run = tmp_path / "giveup-cli"
    proc = subprocess.run(
        [sys.executable, "-m", "opt_ray.cli", "train", "--preset", "tiny", "--data", str(shards),
         "--output", str(run), "--steps", "20", "--batch-tokens", str(ROWS * SEQ), "--micro-batch",
         str(ROWS), "--checkpoint-every", "5", "--lr", "2e-3", "--warmup-steps", "2",
         "--max-failures", "1", "--collective-timeout", "60", "--num-cpus", "2", "--no-progress",
         "--chaos", "nan:step=7,nan:step=8,nan:step=9,nan:step=10"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**os.environ, "RAY_DEDUP_LOGS": "0", "PYTHONPATH": str(ROOT)})
    assert proc.returncode != 0, f"a run whose guard gave up exited 0:\n{proc.stdout[-2000:]}"
    err = proc.stderr
    assert "divergence guard gave up" in err and "non-finite loss" in err, err[-3000:]
    assert "tried 3 rollback(s)" in err and "limit of 3 rollback(s)" in err, err[-3000:]
    # No restarted gang trained past the give-up.
    assert max(r["step"] for r in metrics(run)) < 10
    md = render_markdown(run)
    assert "**Outcome**: failed." in md and "## Report" in md and "tried 3 rollback(s)" in md


# (A killed worker's chronicle: the loss, the restart and the resumed step are checked on
# the demo's run, tests/integration/test_demo_run.py, which kills one the same way.)

# --------------------------------------------------------------------------------------
# Resuming under other library versions than the checkpoint recorded is logged
# --------------------------------------------------------------------------------------

def test_resume_under_other_versions_logs_the_difference(shards, tmp_path):
    from opt_ray.artifacts import sha256_file, write_json_atomic
    from opt_ray.train.checkpoint import MANIFEST, TRAIN_STATE, committed

    run = tmp_path / "versions"
    run_inprocess(shards, run, steps=5, checkpoint_every=5)
    # Pretend the checkpoint was written under an older torch (re-sealing its manifest,
    # as a checkpoint written by that torch would be).
    _, ckpt = committed(run / "checkpoints")[-1]
    state = json.loads((ckpt / TRAIN_STATE).read_text())
    assert "versions" in state, "checkpoints must record the library versions they were written with"
    state["versions"] = {**state["versions"], "torch": "1.13.1"}
    write_json_atomic(ckpt / TRAIN_STATE, state)
    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["files"][TRAIN_STATE] = {"sha256": sha256_file(ckpt / TRAIN_STATE),
                                      "bytes": (ckpt / TRAIN_STATE).stat().st_size}
    write_json_atomic(ckpt / MANIFEST, manifest)

    run_inprocess(shards, run, steps=7, checkpoint_every=5)
    ev = events(run)
    mism = [e for e in ev if e["event"] == "version_mismatch"]
    assert mism, f"resuming under torch {state['versions']['torch']} -> current was not logged: {kinds(ev)}"
    assert mism[0]["diff"]["torch"]["recorded"] == "1.13.1"
    assert first(ev, "resume") <= first(ev, "version_mismatch")
    assert "torch 1.13.1 ->" in render_markdown(run)
