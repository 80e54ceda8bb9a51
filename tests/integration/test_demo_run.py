"""`opt-ray demo` end to end, as `make demo` runs it, shortened to 12 training steps: the
2-worker gang loses worker rank 1 at step 5 and restarts from its checkpoint, the
chronicle is printed (the loss when the worker was lost, the checkpoint the gang
restarted from and where it continued), the export is served on Ray Serve and
completions come back over HTTP. Its own embedded Ray (a private temp dir, chosen ports) is shut down with it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.timeout(900)
def test_demo_trains_through_a_worker_loss_and_serves(tmp_path):
    out = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, "-m", "opt_ray.cli", "demo", "--output", str(out),
                        "--steps", "12", "--kill-step", "5"],
                       capture_output=True, text=True, timeout=840, env=env)
    text = r.stdout + r.stderr
    assert r.returncode == 0, text[-4000:]
    events = [json.loads(l) for l in (out / "run" / "logbook.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert "chaos" in kinds and "restart" in kinds and kinds[-1] == "finish", kinds
    restart = next(e for e in events if e["event"] == "restart")
    assert restart["step"] < 5  # resumed from a checkpoint before the kill
    i_kill = next(i for i, e in enumerate(events) if e["event"] == "chaos" and e["kind"] == "kill")
    i_lost = next(i for i, e in enumerate(events) if e["event"] == "worker_lost")
    assert i_kill < i_lost < events.index(restart), kinds
    # The chronicle (as `opt-ray logbook` renders it): the loss when the worker was lost,
    # the checkpoint the gang restarted from and where it continued, the finish; the plot.
    from opt_ray.logbook import plot_loss, render_markdown
    chron = render_markdown(out / "run").split("## Chronicle", 1)[1]
    lost_line = next(l for l in chron.splitlines() if "Worker failure: rank 1 failed" in l)
    assert "*(loss " in lost_line
    restart_line = next(l for l in chron.splitlines() if "Gang restarted" in l)
    assert (f"from the checkpoint of step {restart['step']}" in restart_line
            and f"continues at step {restart['step'] + 1}" in restart_line), restart_line
    assert "Run completed at step 12" in chron
    assert plot_loss(out / "run", tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = [json.loads(l) for l in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(m["step"] for m in metrics) == 12
    # The chronicle, the completions over HTTP and the next commands are printed.
    assert "Gang restarted" in r.stdout and "Drill: injected `kill`" in r.stdout
    completions = [l for l in r.stdout.splitlines() if "POST /v1/completions" in l]
    assert len(completions) == 3 and all("->" in l for l in completions), r.stdout[-3000:]
    assert "Ray dashboard: http://127.0.0.1:" in r.stdout and "opt-ray ctl" in r.stdout
    for name in ("dedup", "tokenizer", "shards", "run", "hf"):
        assert (out / name).is_dir(), name
    assert list((out / "hf").glob("*.safetensors"))
