"""bench/step_trace.py's reduction of a profiler trace: GPU busy time is the union of the
device intervals, idle gaps are charged to the innermost host op that launched the
kernel ending them. A hand-made trace with known answers."""

from __future__ import annotations

import pytest

from bench.step_trace import idle_report


def _x(cat, name, ts, dur, corr=None):
    e = {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}
    if corr is not None:
        e["args"] = {"correlation": corr}
    return e


def test_busy_is_the_union_and_gaps_go_to_the_launching_op():
    events = [
        _x("cpu_op", "outer", 0, 400),
        _x("cpu_op", "aten::mm", 2, 6),                 # launches k1
        _x("cuda_runtime", "cudaLaunchKernel", 4, 2, corr=1),
        _x("cpu_op", "aten::linear", 100, 200),          # launches k2 through aten::addmm
        _x("cpu_op", "aten::addmm", 140, 20),
        _x("cuda_runtime", "cudaLaunchKernel", 150, 2, corr=2),
        _x("cuda_runtime", "cudaLaunchKernel", 390, 2, corr=3),  # in "outer" only
        _x("kernel", "k1", 10, 50, corr=1),              # busy 10-60
        _x("kernel", "k2", 200, 100, corr=2),            # gap 60-200 (140 us), busy 200-300
        _x("gpu_memcpy", "k3", 250, 100, corr=3),        # overlaps k2: only 300-350 is new
        _x("kernel", "k4", 352, 2),                      # gap 2 us: idle, below min_gap_us
    ]
    r = idle_report(events, steps=2, min_gap_us=5)
    # busy: 50 + 100 + 50 + 2 = 202 us over 2 steps; idle: 140 + 2 = 142 us
    assert r["gpu_busy_ms_per_step"] == pytest.approx(0.101)
    assert r["gpu_idle_ms_per_step"] == pytest.approx(0.071)
    assert r["device_events_per_step"] == 2.0
    assert r["idle_by_launching_op"] == [{"op": "aten::addmm", "ms_per_step": 0.07, "gaps": 1}]


def test_a_trace_without_gpu_events_is_refused():
    with pytest.raises(ValueError, match="no GPU events"):
        idle_report([_x("cpu_op", "aten::mm", 0, 5)], steps=1)


def test_run_all_reads_an_indented_last_object_and_skips_the_trace_tool():
    """``make bench`` reads each benchmark's last JSON object; bench/train_step.py prints it
    indented (the old reader took the lone "{" line and failed)."""
    import json

    from bench import run_all

    noise = 'progress {"not": "this"}\n{"first": 1}\n'
    obj = {"bench": "train_step", "trainer": {"step_s": [1.0, 2.0]}}
    assert run_all.last_json(noise + json.dumps(obj, indent=2) + "\n") == obj
    assert run_all.last_json(noise + json.dumps(obj)) == obj
    assert run_all.last_json("no json here\n") is None
    names = run_all.available()
    assert "train_step" in names and "step_trace" not in names
