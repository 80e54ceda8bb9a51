"""The atomic artifact writer: a crashed stage leaves nothing that looks complete, and a
tampered file is caught by its manifest checksum."""

from __future__ import annotations

import json

import pytest

from opt_ray.artifacts import ArtifactError, ArtifactWriter, read_manifest
from opt_ray.logbook import Logbook


def test_commit_writes_manifest_with_checksums(tmp_path):
    out = tmp_path / "art"
    with ArtifactWriter(out, kind="demo") as w:
        (w.path / "a.txt").write_text("hello")
        (w.path / "sub").mkdir()
        (w.path / "sub" / "b.bin").write_bytes(b"\x00\x01")
        w.manifest["counts"] = {"docs": 2}
    m = read_manifest(out, kind="demo", verify=True)
    assert set(m["files"]) == {"a.txt", "sub/b.bin"}
    assert m["counts"] == {"docs": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # no temporary left behind


def test_crash_leaves_no_artifact(tmp_path):
    out = tmp_path / "art"
    with pytest.raises(RuntimeError):
        with ArtifactWriter(out, kind="demo") as w:
            (w.path / "a.txt").write_text("half")
            raise RuntimeError("stage crashed")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ArtifactError, match="no manifest.json"):
        read_manifest(out)


def test_existing_output_refused_unless_overwrite(tmp_path):
    out = tmp_path / "art"
    with ArtifactWriter(out, kind="demo") as w:
        (w.path / "v").write_text("1")
    with pytest.raises(ArtifactError, match="--overwrite"):
        with ArtifactWriter(out, kind="demo"):
            pass
    with ArtifactWriter(out, kind="demo", overwrite=True) as w:
        (w.path / "v").write_text("2")
    assert (out / "v").read_text() == "2"
    assert read_manifest(out, verify=True)["kind"] == "demo"


def test_tampered_file_fails_verification(tmp_path):
    out = tmp_path / "art"
    with ArtifactWriter(out, kind="demo") as w:
        (w.path / "shard-0.arrow").write_bytes(b"abc" * 100)
    (out / "shard-0.arrow").write_bytes(b"abd" * 100)
    with pytest.raises(ArtifactError, match="shard-0.arrow"):
        read_manifest(out, verify=True)
    with pytest.raises(ArtifactError, match="expected 'shards'"):
        read_manifest(out, kind="shards")


def test_logbook_appends_and_skips_torn_line(tmp_path):
    lb = Logbook(tmp_path)
    lb.event("start", step=0)
    lb.event("finish", step=3)
    with open(lb.path, "a") as f:
        f.write('{"event": "torn')  # a writer killed mid-line
    events = list(lb.events())
    assert [e["event"] for e in events] == ["start", "finish"]
    assert json.loads(lb.path.read_text().splitlines()[1])["step"] == 3
