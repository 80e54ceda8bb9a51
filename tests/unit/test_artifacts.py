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


def test_prehashed_writer_takes_the_workers_hashes_and_hashes_the_rest(tmp_path):
    """The data stages' writer trusts a worker's sha256 for a file of the size it reported
    (the driver does not read the corpus again); a file of another size, or one nobody
    hashed, is hashed at commit like any artifact's."""
    import hashlib

    from opt_ray.data.artifact_io import PrehashedArtifactWriter

    out = tmp_path / "a"
    with PrehashedArtifactWriter(out, kind="dedup") as w:
        for name, data in (("kept", b"abc"), ("resized", b"abcd"), ("unlisted", b"xyz")):
            (w.path / name).write_bytes(data)
        w.known = {"kept": {"sha256": "f" * 64, "bytes": 3}, "resized": {"sha256": "e" * 64, "bytes": 3}}
    files = json.loads((out / "manifest.json").read_text())["files"]
    assert files["kept"] == {"sha256": "f" * 64, "bytes": 3}
    assert files["resized"] == {"sha256": hashlib.sha256(b"abcd").hexdigest(), "bytes": 4}
    assert files["unlisted"] == {"sha256": hashlib.sha256(b"xyz").hexdigest(), "bytes": 3}
