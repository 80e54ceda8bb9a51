"""The logbook: events written and read in order, the Markdown chronicle, the loss plot,
version differences, and `opt-ray logbook` as a user runs it."""

from __future__ import annotations

import json
import math
import struct
import zlib

import pytest

from opt_ray.cli import main
from opt_ray.logbook import (EVENTS, RECORDS, Logbook, LogbookSchemaError, log_resume, log_start,
                             log_verdict, plot_loss, read_metrics, render_markdown, segments,
                             validate_event, version_diff, versions)
from opt_ray.train.guard import DivergenceGuard, GuardConfig


def write_metrics(run_dir, rows):
    with open(run_dir / "metrics.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")  # Python writes NaN as NaN, as the trainer does


def nan_run(run_dir):
    """A synthetic run: NaN at step 23 -> guard -> rollback to 20 -> finish at 30."""
    lb = Logbook(run_dir)
    log_start(lb, {"preset": "tiny", "steps": 30, "precision": "bf16"}, world_size=1)
    g = DivergenceGuard(GuardConfig(window=10, min_steps=5))
    ckpts, step, lr = [], 1, 1e-3
    while step <= 30:
        loss = 8.0 - 0.1 * step
        if step == 23 and not g.verdicts:
            loss = math.nan
        write_metrics(run_dir, [{"step": step, "loss": loss, "lr": lr * g.lr_scale, "grad_norm": 1.0}])
        v = g.observe(step, loss, 1.0)
        if v is not None:
            g.pick_checkpoint(ckpts)
            log_verdict(lb, v, clip=1.0)
            step = v.rollback_to + 1
            continue
        if step % 10 == 0:
            ckpts.append(step)
            g.record_checkpoint(step)
            lb.event("checkpoint_saved", step=step)
        step += 1
    lb.event("finish", step=30, loss=loss)
    return lb


def test_event_kind_may_be_a_field_and_nan_stays_json(tmp_path):
    lb = Logbook(tmp_path)
    lb.event("chaos", kind="nan", step=3, rank=0)      # kind= is a field, not the event kind
    lb.event("divergence", step=3, reason="nan", loss=math.nan)
    lines = (tmp_path / "logbook.jsonl").read_text().splitlines()
    recs = [json.loads(l, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) for l in lines]
    assert recs[0]["event"] == "chaos" and recs[0]["kind"] == "nan"
    assert recs[1]["loss"] == "nan"


def test_log_verdict_writes_the_intervention_in_order(tmp_path):
    lb = nan_run(tmp_path)
    kinds = [e["event"] for e in lb.events()]
    i = kinds.index("divergence")
    assert kinds[i:i + 2] == ["divergence", "rollback"]
    ev = list(lb.events())
    assert ev[i + 1]["step"] == 23 and ev[i + 1]["to_step"] == 20
    assert ev[i + 1]["lr_factor"] == 0.5 and ev[i + 1]["clip"] == 0.3 and ev[i + 1]["skip_steps"] == [23]
    for e in ev:
        assert validate_event(e) == [], e


def test_validate_event_names_missing_fields():
    assert "needs field(s) to_step" in validate_event({"event": "rollback", "step": 3})[0]
    assert "unknown logbook event kind 'bogus'" in validate_event({"event": "bogus"})[0]
    assert set(EVENTS) >= {"start", "checkpoint_saved", "worker_lost", "restart", "resize",
                           "divergence", "rollback", "data_skipped", "finish", "version_mismatch",
                           "interrupted", "eval", "job_submitted", "stage_state"}


def test_chronicle_lists_events_in_order_with_loss(tmp_path):
    nan_run(tmp_path)
    md = render_markdown(tmp_path)
    chron = md.split("## Chronicle", 1)[1]
    order = ["Run started", "Checkpoints saved at steps 10, 20", "Non-finite loss",
             "Rolled back from step 23 to the checkpoint of step 20; LR now x0.5 of the schedule, "
             "gradient clipping 0.3, the batches of step(s) 23 will be skipped",
             "Checkpoint saved at step 30", "Run completed at step 30"]
    pos = [chron.find(s) for s in order]
    assert -1 not in pos, [s for s, p in zip(order, pos) if p == -1]
    assert pos == sorted(pos)
    assert "loss non-finite" in chron
    # The loss of the step the rollback was about (its first run, not the replay).
    rollback_line = next(l for l in chron.splitlines() if "Rolled back" in l)
    assert rollback_line.endswith("*(loss nan)*")
    assert "## Summary" in md and "torch" in md and "Run completed" in md
    assert '"preset": "tiny"' in md   # the full config is there


def test_chronicle_of_an_empty_run_says_so(tmp_path):
    assert "No events recorded yet" in render_markdown(tmp_path)


def test_segments_split_at_rollbacks():
    rows = [{"step": s} for s in (1, 2, 3, 2, 3, 4, 1)]
    assert [[r["step"] for r in seg] for seg in segments(rows)] == [[1, 2, 3], [2, 3, 4], [1]]


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    length, ctype = struct.unpack(">I4s", data[8:16])
    assert ctype == b"IHDR"
    ihdr = data[16:16 + length]
    assert struct.unpack(">I", data[16 + length:20 + length])[0] == zlib.crc32(b"IHDR" + ihdr)
    return struct.unpack(">II", ihdr[:8])


def test_plot_writes_a_valid_png(tmp_path):
    nan_run(tmp_path)
    out = plot_loss(tmp_path, tmp_path / "plots" / "loss.png")
    w, h = _png_size(out)
    assert w > 300 and h > 200


def test_plot_without_metrics_is_a_user_error(tmp_path):
    from opt_ray.errors import UserError
    with pytest.raises(UserError, match="metrics.jsonl"):
        plot_loss(tmp_path, tmp_path / "x.png")


def test_read_metrics_skips_torn_lines(tmp_path):
    write_metrics(tmp_path, [{"step": 1, "loss": 2.0}, {"step": 2, "loss": math.nan}])
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2] and math.isnan(rows[1]["loss"])


def test_version_diff_and_resume(tmp_path):
    rec = {"torch": "2.12.0", "ray": "2.60.0", "fairscale": "0.4.13", "apex": "0.1"}
    cur = {"torch": "2.13.0", "ray": "2.60.0", "fairscale": "0.4.13"}
    assert version_diff(rec, cur) == {"apex": {"recorded": "0.1", "current": None},
                                      "torch": {"recorded": "2.12.0", "current": "2.13.0"}}
    assert version_diff(cur, dict(cur)) == {}

    lb = Logbook(tmp_path)
    assert log_resume(lb, versions(), step=10) == {}          # same versions: nothing logged
    assert log_resume(lb, None) == {}
    diff = log_resume(lb, {**versions(), "torch": "1.0.0"}, step=10, checkpoint="ckpt-10")
    assert diff["torch"]["recorded"] == "1.0.0"
    ev = list(lb.events())
    assert [e["event"] for e in ev] == ["version_mismatch"] and ev[0]["step"] == 10
    assert "torch 1.0.0 ->" in render_markdown(tmp_path)
    # A checkpoint that recorded fewer libraries is compared on those only.
    assert log_resume(lb, {"torch": versions()["torch"]}) == {}
    assert log_resume(lb, {"torch": versions()["torch"], "apex": "0.1"}) == {
        "apex": {"recorded": "0.1", "current": None}}


def test_versions_names_the_numerics_relevant_libraries():
    v = versions()
    for name in ("torch", "ray", "python", "opt_ray", "fairscale"):
        assert name in v
    assert v["opt_ray"]


def test_cli_prints_chronicle_plot_and_json(tmp_path, capsys):
    nan_run(tmp_path)
    png = tmp_path / "loss.png"
    assert main(["logbook", str(tmp_path), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "## Chronicle" in out and "Rolled back" in out and "![loss curve](" in out
    _png_size(png)
    assert main(["logbook", str(tmp_path), "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert json.loads(lines[0])["event"] == "start" and json.loads(lines[-1])["event"] == "finish"
    md = tmp_path / "out" / "LOGBOOK.md"
    md.parent.mkdir()
    assert main(["logbook", str(tmp_path), "--plot", str(png), "--output", str(md)]) == 0
    assert "![loss curve](../loss.png)" in md.read_text()
    # --follow on a finished run prints the chronicle and returns.
    assert main(["logbook", str(tmp_path), "--follow"]) == 0


def test_cli_rejects_a_dir_without_logbook(tmp_path, capsys):
    assert main(["logbook", str(tmp_path)]) == 2
    assert "no logbook.jsonl" in capsys.readouterr().err


def test_loss_at_the_time_uses_metric_timestamps(tmp_path):
    import time
    lb = Logbook(tmp_path)
    write_metrics(tmp_path, [{"step": 5, "loss": 3.25, "time": time.time() - 1}])
    lb.event("worker_lost", ranks=[1], errors={})
    write_metrics(tmp_path, [{"step": 6, "loss": 9.5, "time": time.time() + 1}])
    line = next(l for l in render_markdown(tmp_path).splitlines() if "Rank(s) 1 lost" in l)
    assert line.endswith("*(loss 3.25)*")


def test_chronicle_reads_the_training_loops_event_names(tmp_path):
    """The loop, checkpointer and gang write some events under their own names/fields
    (divergence, rollback with the intervention, data_skipped with stream positions,
    worker_lost with ranks/errors, restart with the resumed step)."""
    lb = Logbook(tmp_path)
    lb.event("start", step=0, attempt=0, checkpoint=None, config={"preset": "tiny", "max_failures": 3}, world_size=2,
             precision="bf16", versions={"torch": "2.13.0"}, hardware={"cpus": 2})
    lb.event("checkpoint_saved", step=10, path="/r/checkpoints/step-10", bytes=5, milestone=False)
    lb.event("chaos", kind="nan", step=13, rank=0)
    lb.event("divergence", reason="nan", step=13, onset_step=13, loss=None, running_mean=6.2,
             attempt=1, max_rollbacks=3, rollback_to=10, lr_scale=0.5, new_clip=0.3,
             skip_steps=[13], give_up=False, report="")
    lb.event("rollback", step=13, to_step=10, lr_factor=0.5, clip=0.3, skip_steps=[13])
    lb.event("data_skipped", step=13, start=96, end=104)
    lb.event("worker_lost", ranks=[1], errors={"1": "ActorDiedError('SIGKILL')"})
    lb.event("restart", step=10, attempt=1, checkpoint="/r/checkpoints/step-10",
             config={"preset": "tiny"}, world_size=2)
    lb.event("checkpoint_corrupt", step=20, path="/r/checkpoints/step-20", reason="sha256 mismatch")
    lb.event("finish", step=30, tokens=100, loss=4.5)
    chron = render_markdown(tmp_path).split("## Chronicle", 1)[1]
    order = ["Run started", "Checkpoint saved at step 10", "Drill: injected `nan` at step 13",
             "Non-finite loss or gradient at step 13: loss non-finite",
             "Rolled back from step 13 to the checkpoint of step 10; LR now x0.5 of the schedule, "
             "gradient clipping 0.3, the batches of step(s) 13 will be skipped",
             "Skipped the batch of step 13 (samples 96..104",
             "Worker failure: rank 1 failed (ActorDiedError: SIGKILL)",
             "Gang restarted (attempt 1) from the checkpoint of step 10 on 2 worker(s); training "
             "continues at step 11. Failure budget: 1 of 3 used.",
             "Checkpoint of step 20 failed its checks (sha256 mismatch)",
             "Run completed at step 30, final loss 4.5"]
    pos = [chron.find(s) for s in order]
    assert -1 not in pos, [s for s, p in zip(order, pos) if p == -1]
    assert pos == sorted(pos)
    assert "divergence 1" in render_markdown(tmp_path)  # counted in the summary


def test_a_run_the_guard_stopped_says_why(tmp_path):
    lb = Logbook(tmp_path)
    lb.event("start", config={"preset": "tiny"})
    lb.event("divergence_give_up", report="training stopped: loss spike at step 9; tried 3 rollback(s)")
    md = render_markdown(tmp_path)
    assert "**Outcome**: failed. The divergence guard gave up" in md
    assert "## Report" in md and "tried 3 rollback(s)" in md


def test_worker_failure_names_the_cause_before_the_symptoms(tmp_path):
    lb = Logbook(tmp_path)
    lb.event("worker_lost", ranks=[0, 1], errors={
        "0": "RuntimeError('[/x/gloo/pair.cc:553] Connection closed by peer [127.0.0.1]:5829. This is ...')",
        "1": 'WorkerHealthCheckFailedError("A worker health check failed.\\nWorker info: Worker(\\n  actor=Ac'})
    line = next(l for l in render_markdown(tmp_path).splitlines() if "Worker failure" in l)
    assert ("rank 1 failed (WorkerHealthCheckFailedError: A worker health check failed); "
            "rank 0 lost its peer (RuntimeError: Connection closed by peer [127.0.0.1]:5829)") in line


def test_a_drill_fired_on_every_rank_is_one_entry(tmp_path):
    lb = Logbook(tmp_path)
    lb.event("chaos", kind="nan", step=34, rank=1)
    lb.event("chaos", kind="nan", step=34, rank=0)
    lb.event("chaos", kind="kill", step=40, rank=1)
    chron = render_markdown(tmp_path).split("## Chronicle", 1)[1]
    assert "Drill: injected `nan` at step 34 on ranks 0, 1." in chron
    assert chron.count("Drill:") == 2


def test_follow_prints_new_events_until_finish(tmp_path):
    import io
    import threading
    import time

    from opt_ray.logbook import follow

    lb = Logbook(tmp_path)
    lb.event("start", config={})                      # already shown: skipped

    def writer():
        for kind, f in [("checkpoint_saved", {"step": 5}), ("restart", {"step": 5}),
                        ("finish", {"step": 9})]:
            time.sleep(0.05)
            lb.event(kind, **f)
        lb.event("checkpoint_saved", step=99)          # after finish: not printed

    t = threading.Thread(target=writer)
    t.start()
    out = io.StringIO()
    follow(tmp_path, skip=1, poll_s=0.02, out=out)
    t.join()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert "Checkpoint saved at step 5" in lines[0] and "Gang restarted" in lines[1]
    assert "Run completed at step 9" in lines[2]


# --------------------------------------------------------------------------------------
# The typed schema: writer strict, reader tolerant, every writer in the code base matches
# --------------------------------------------------------------------------------------

def test_writer_refuses_unknown_kinds_fields_and_missing_required(tmp_path):
    lb = Logbook(tmp_path)
    with pytest.raises(LogbookSchemaError, match="unknown logbook event kind 'divergence_detected'"):
        lb.event("divergence_detected", step=3, reason="nan")
    with pytest.raises(LogbookSchemaError, match="'rollback' has no field.*from_step"):
        lb.event("rollback", from_step=3, to_step=1)
    with pytest.raises(LogbookSchemaError, match="needs field.*reason"):
        lb.event("interrupted", step=3, resume="opt-ray train ...")
    assert not lb.path.exists()  # nothing half-written


def test_reader_renders_old_logbooks_with_unknown_kinds(tmp_path):
    """A logbook from older code (other kinds, other field names) still renders."""
    (tmp_path / "logbook.jsonl").write_text("\n".join(json.dumps(e) for e in [
        {"time": 1.0, "event": "start", "config": {"preset": "tiny"}},
        {"time": 2.0, "event": "lr_change", "step": 5, "old": 1e-3, "new": 5e-4},
        {"time": 3.0, "event": "rollback", "from_step": 9, "to_step": 5},
        {"time": 4.0, "event": "finish", "status": "completed", "step": 9},
    ]) + "\n")
    chron = render_markdown(tmp_path).split("## Chronicle", 1)[1]
    assert 'lr_change: {"step": 5, "old": 0.001, "new": 0.0005}' in chron
    assert "to the checkpoint of step 5" in chron and "Run completed at step 9" in chron


def _writer_calls():
    """(file, line, kind, keyword names, has **kwargs) of every literal-kind logbook write
    in the code base: ``.event("k", ...)``, ``._event("k", ...)`` / ``._event(job, "k", ...)``
    (loop, control service) and the checkpointer's ``on_event("k", ...)``."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    files = sorted((root / "opt_ray").rglob("*.py")) + sorted((root / "actors").rglob("*.py"))
    out = []
    for f in files:
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("event", "_event", "on_event")):
                continue
            kind = next((a.value for a in node.args[:2]
                         if isinstance(a, ast.Constant) and isinstance(a.value, str)), None)
            if kind is None:
                continue
            out.append((f.relative_to(root), node.lineno, kind,
                        [k.arg for k in node.keywords if k.arg is not None],
                        any(k.arg is None for k in node.keywords)))
    return out


def test_every_writer_in_the_code_matches_its_record_type():
    import dataclasses

    calls = _writer_calls()
    files = {str(c[0]) for c in calls}
    # The writers the schema was taken from are all seen (a rename of the helpers
    # would otherwise make this test pass vacuously).
    assert {"opt_ray/train/loop.py", "opt_ray/train/checkpoint.py", "opt_ray/train/chaos.py",
            "actors/train.py", "opt_ray/control/service.py", "opt_ray/logbook.py"} <= files, files
    bad = []
    for path, line, kind, kws, _ in calls:
        if kind not in RECORDS:
            bad.append(f"{path}:{line}: unknown kind {kind!r}")
            continue
        names = {f.name for f in dataclasses.fields(RECORDS[kind])}
        extra = sorted(set(kws) - names)
        if extra:
            bad.append(f"{path}:{line}: {kind} has no field(s) {extra}")
    assert not bad, "\n".join(bad)


def test_divergence_record_holds_every_verdict_field():
    import dataclasses

    from opt_ray.train.guard import Verdict
    verdict_fields = {f.name for f in dataclasses.fields(Verdict)} | {"message"}
    assert verdict_fields <= {f.name for f in dataclasses.fields(RECORDS["divergence"])}


def test_every_kind_has_a_sentence_and_the_readme_table_is_the_schema():
    from pathlib import Path

    from opt_ray.logbook import _DESCRIBE, schema_markdown
    assert set(_DESCRIBE) == set(RECORDS)
    readme = (Path(__file__).resolve().parents[2] / "logbook" / "README.md").read_text()
    table = readme.split("<!-- schema:begin -->\n", 1)[1].split("<!-- schema:end -->", 1)[0]
    assert table == schema_markdown(), "logbook/README.md's table is stale: regenerate it"


def test_eval_results_make_an_accuracy_curve_and_interrupted_says_how_to_resume(tmp_path):
    lb = Logbook(tmp_path)
    lb.event("start", config={"preset": "tiny"})
    for step, acc in ((10, 0.25), (20, 0.5)):
        lb.event("eval", checkpoint=f"/r/checkpoints/step_{step:08d}", step=step, tasks=["copa"],
                 num_fewshot=0, limit=None,
                 results={"copa": {"alias": "copa", "acc,none": acc, "acc_stderr,none": 0.1}})
    lb.event("interrupted", step=20, reason="the driver was killed",
             resume="opt-ray train --preset tiny --data D --output R")
    md = render_markdown(tmp_path)
    assert "- **Accuracy**: step 10: copa acc 0.25; step 20: copa acc 0.5" in md
    assert "Evaluated the checkpoint of step 20 on copa (0-shot); copa acc 0.5." in md
    assert ("**Outcome**: interrupted. Run interrupted (the driver was killed); the last committed "
            "checkpoint is step 20. Resume with `opt-ray train --preset tiny --data D --output R`.") in md
