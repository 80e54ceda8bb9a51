"""`opt-ray demo` as a user meets it before it starts work: its help states its measured
duration and what it shows, and bad options fail in one line before anything runs.
The whole demo (shortened to 12 steps) runs end to end in tests/integration/test_demo_run.py."""

from __future__ import annotations

import subprocess
import sys

from opt_ray.cli import main


def test_help_states_what_it_shows_and_its_measured_duration():
    r = subprocess.run([sys.executable, "-m", "opt_ray.cli", "demo", "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "2-worker gang that loses a worker mid-run and recovers" in text
    assert "Ray Serve with completions over HTTP" in text
    assert "minutes on a quiet 2-core machine (measured 2026-12-03" in text


def test_bad_options_fail_before_any_work(tmp_path, capsys):
    assert main(["demo", "--output", str(tmp_path / "d"), "--steps", "10",
                 "--kill-step", "10"]) == 2
    assert "--kill-step 10 must lie inside the run" in capsys.readouterr().err
    assert not (tmp_path / "d").exists(), "nothing written"
    (tmp_path / "mine").mkdir()
    assert main(["demo", "--output", str(tmp_path / "mine")]) == 2
    assert "was not written by 'opt-ray demo'" in capsys.readouterr().err
