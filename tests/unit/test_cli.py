"""The CLI as a user meets it: --help lists every subcommand of DESIGN.md, bad input is
one readable line and a non-zero exit."""

from __future__ import annotations

import subprocess
import sys

import pytest

from opt_ray.cli import COMMANDS, build_parser, main

DESIGN_COMMANDS = ["demo", "dedup", "tokenizer", "tokenize", "train", "eval", "serve",
                   "generate", "control", "ctl", "logbook", "bench"]


def test_help_lists_design_subcommands():
    out = subprocess.run([sys.executable, "-m", "opt_ray.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for name in DESIGN_COMMANDS:
        assert f"    {name} " in out or f"    {name}\n" in out, f"{name} missing from --help"


@pytest.mark.parametrize("name", COMMANDS)
def test_each_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([name, "--help"])
    assert e.value.code == 0
    assert len(capsys.readouterr().out) > 50


def test_demo_refuses_foreign_output_dir(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("user data")
    rc = main(["demo", "--output", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and str(tmp_path) in err[0]
    assert (tmp_path / "keep.txt").read_text() == "user data"
