"""The dedup stage on a local Ray: same result as in-process; the CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "unit"))
from test_dedup_lib import check_output, planted_corpus, write_jsonl  # noqa: E402

from opt_ray.cli import main
from opt_ray.data.dedup import DedupConfig, run_dedup
from opt_ray.data.readers import iter_records


def strip_timings(report: dict) -> dict:
    r = dict(report)
    for k in ("timings", "throughput_mb_s", "params", "inputs", "resumed", "task_cpu_s"):
        r.pop(k)
    return r


@pytest.mark.slow
def test_ray_executor_matches_local(ray_local, tmp_path):
    from actors.dedup import RayExecutor
    recs = planted_corpus(seed=1)
    for k in range(3):
        write_jsonl(tmp_path / f"in{k}.jsonl", recs[k::3])
    inputs = [str(tmp_path / f"in{k}.jsonl") for k in range(3)]
    cfg = DedupConfig(batch_docs=20, num_buckets=3)
    ray_report = run_dedup(inputs, str(tmp_path / "ray"), cfg, RayExecutor(2), id_field="doc")
    local = run_dedup(inputs, str(tmp_path / "local"), cfg, id_field="doc")
    assert strip_timings(ray_report) == strip_timings(local)
    check_output(recs, ray_report, cfg.threshold)
    assert ray_report["counts"]["duplicates_removed"] > 0


def _rchar() -> int:
    return int(next(ln for ln in open("/proc/self/io") if ln.startswith("rchar")).split()[1])


@pytest.mark.slow
def test_large_jsonl_files_are_planned_by_tasks_not_the_driver(ray_local, tmp_path):
    # Planning used to read every large plain jsonl file whole on the driver (to number
    # its lines) and kept compressed files whole (one task each, whatever their size).
    import random

    import zstandard

    from actors.dedup import RayExecutor
    from opt_ray.data.readers import plan_splits, resolve_inputs
    rng = random.Random(3)
    recs = [{"text": " ".join(f"{rng.getrandbits(32):x}" for _ in range(200))} for _ in range(6000)]
    write_jsonl(tmp_path / "plain.jsonl", recs)
    raw = (tmp_path / "plain.jsonl").read_bytes()
    (tmp_path / "packed.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    files = resolve_inputs([str(tmp_path / "plain.jsonl"), str(tmp_path / "packed.jsonl.zst")])
    step = len(raw) // 8 + 1
    before = _rchar()
    local = plan_splits(files, step)                        # in this process: reads them
    local_read = _rchar() - before
    planned = plan_splits(files, step, RayExecutor(2))     # (warm: Ray's first-call imports)
    before = _rchar()
    assert plan_splits(files, step, RayExecutor(2)) == planned == local
    driver_read = _rchar() - before
    assert local_read > len(raw) and driver_read < len(raw) // 16, (local_read, driver_read)
    assert [f.name for f in planned] == ["plain"] * 8 + ["packed"] * 8
    assert {f.line_range for f in planned[8:]} != {None}


@pytest.mark.slow
def test_ray_executor_reruns_io_failures_only(ray_local, tmp_path):
    """A task whose I/O failed (a dropped connection, the store giving up) runs again and
    the stage goes on; bad input stops the stage at once with its own error; a bug fails
    it without reruns (a rerun would only repeat it)."""
    from actors.dedup import RayExecutor
    from opt_ray.errors import UserError

    # Defined here so that Ray ships it by value (this module is not importable there).
    def _fails_once(marker_dir: str, kind: str, x: int) -> int:
        """A task whose first run fails with ``kind``'s exception; counts its runs."""
        from opt_ray.errors import UserError
        from opt_ray.run_dir import StoreUnavailable
    
        m = Path(marker_dir) / f"{kind}-{x}"
        runs = int(m.read_text()) if m.exists() else 0
        m.write_text(str(runs + 1))
        if runs == 0:
            if kind == "reset":
                raise ConnectionResetError("connection reset by peer")
            if kind == "store":
                raise StoreUnavailable("--output s3://b/out: the object store refused an upload (503 SlowDown)")
            if kind == "bad":
                raise UserError("input x.jsonl: bad input")
            if kind == "bug":
                raise KeyError("a bug")
        return 2 * x

    d = str(tmp_path)
    assert sorted(RayExecutor(2).map(_fails_once, [(d, "reset", 1), (d, "store", 2), (d, "ok", 3)])) == [2, 4, 6]
    assert [(tmp_path / n).read_text() for n in ("reset-1", "store-2", "ok-3")] == ["2", "2", "1"]
    with pytest.raises(UserError, match="bad input"):
        list(RayExecutor(2).map(_fails_once, [(d, "bad", 4)]))
    with pytest.raises(Exception) as ei:
        list(RayExecutor(2).map(_fails_once, [(d, "bug", 5)]))
    assert "KeyError" in str(ei.value)
    assert [(tmp_path / n).read_text() for n in ("bad-4", "bug-5")] == ["1", "1"]


@pytest.mark.slow
def test_cli_end_to_end(ray_local, tmp_path, capsys):
    recs = planted_corpus(seed=2)
    write_jsonl(tmp_path / "in.jsonl", recs)
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "fine words here ok"}\nnot json\n')
    out = tmp_path / "out"
    rc = main(["dedup", str(tmp_path / "in.jsonl"), str(tmp_path / "bad.jsonl"), "--output",
               str(out), "--threshold", "0.9", "--workers", "2", "--no-progress"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    report = json.loads((out / "dedup_report.json").read_text())
    assert summary["kept"] == report["counts"]["docs_kept"] == len(list(iter_records([str(out)])))
    assert report["input_errors"]["files"][str(tmp_path / "bad.jsonl")]["examples"] == [
        {"line": 2, "kind": "malformed_json", "detail": "Expecting value"}]
    assert report["params"]["threshold"] == 0.9 and report["params"]["bands"] == 12
    # The output is a valid input: a second pass finds nothing more to remove.
    rc = main(["dedup", str(out), "--output", str(tmp_path / "again"), "--threshold", "0.9",
               "--no-progress"])
    assert rc == 0
    again = json.loads((tmp_path / "again" / "dedup_report.json").read_text())
    assert again["counts"]["duplicates_removed"] == 0


def test_cli_missing_input_exits_2_with_one_line(tmp_path, capsys):
    rc = main(["dedup", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert "nope.jsonl" in err and "does not exist" in err
    assert not (tmp_path / "o").exists()


def test_cli_bad_bands_exits_2(tmp_path, capsys):
    write_jsonl(tmp_path / "in.jsonl", [{"text": "a b c"}])
    rc = main(["dedup", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o"),
               "--bands", "3"])
    assert rc == 2 and "--rows" in capsys.readouterr().err


@pytest.mark.slow
def test_metrics_reach_the_ray_metrics_endpoint(ray_local, tmp_path):
    import time
    import urllib.request

    from actors.dedup import RayExecutor
    write_jsonl(tmp_path / "in.jsonl", planted_corpus(seed=3))
    cfg = DedupConfig(batch_docs=30)
    run_dedup([str(tmp_path / "in.jsonl")], str(tmp_path / "out"), cfg, RayExecutor(2))
    port = ray_local._private.worker.global_worker.node.metrics_export_port
    want = {"ray_opt_ray_dedup_docs_total", "ray_opt_ray_dedup_candidate_pairs_total",
            "ray_opt_ray_dedup_duplicates_total"}
    seen: set[str] = set()
    for _ in range(30):      # exported every second (conftest), scraped here
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        seen = {ln.split("{")[0] for ln in text.decode().splitlines()
                if ln.startswith("ray_opt_ray_dedup")}
        if want <= seen:
            break
        time.sleep(1)
    assert want <= seen, seen
