"""A node's fetch cache (``artifact_io.cached``) under a size cap
(``OPT_RAY_FETCH_MAX_BYTES``): the least recently used versions go first, never one a
process is using nor one of a source whose fetch or build is under way; each eviction is
one line."""

from __future__ import annotations

import fcntl
import time
from pathlib import Path

import pytest

from opt_ray.data.artifact_io import cached
from opt_ray.run_dir import FETCH_ENV, FETCH_MAX_ENV

KB10 = 10_000


def make(tmp: Path) -> str:
    tmp.mkdir()
    (tmp / "weights.bin").write_bytes(b"w" * KB10)
    return f"made {tmp.name}"


def use(name: str) -> Path:
    """Make (or reuse) source ``name``'s version v1 and stop using it."""
    with cached(name, [name], "v1", make, need=KB10) as d:
        time.sleep(0.01)          # distinct use times, whatever the clock's grain
        return d


def test_size_cap_evicts_least_recently_used_versions_not_in_use(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(FETCH_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(FETCH_MAX_ENV, "25KB")
    a, b = use("a"), use("b")
    assert use("a") == a                   # a hit: a is now used after b
    capsys.readouterr()
    c = use("c")                           # 30 KB with c: b, the least recently used, goes
    err = capsys.readouterr().err
    assert a.is_dir() and c.is_dir() and not b.exists()
    lines = [ln for ln in err.splitlines() if ln.startswith("evicted")]
    assert len(lines) == 1 and str(b) in lines[0] and f"{FETCH_MAX_ENV}=25KB" in lines[0]
    assert [p.name for p in b.parent.iterdir()] == [".lock"]    # nothing half-removed left

    # In use (a replica loading it), a version stays, least recently used or not; so does
    # a source whose lock is held (a fetch or build under way there).
    with cached("a", ["a"], "v1", make) as held:
        assert held == a
        monkeypatch.setenv(FETCH_MAX_ENV, "15KB")
        with open(c.parent / ".lock", "a+") as busy:
            fcntl.flock(busy, fcntl.LOCK_EX)
            capsys.readouterr()
            d = use("d")
            err = capsys.readouterr().err
            assert a.is_dir() and c.is_dir() and d.is_dir()
            assert "evicted" not in err and "the rest is in use" in err
        e = use("e")                       # c's source is free now: c (and d) go, a stays
        assert a.is_dir() and e.is_dir() and not c.exists() and not d.exists()
    use("e")                               # a is no longer in use: it goes
    assert not a.exists() and e.is_dir()


def test_no_cap_keeps_everything_and_a_bad_cap_is_named(tmp_path, monkeypatch):
    from opt_ray.errors import UserError
    from opt_ray.serve.loading import check_checkpoint

    monkeypatch.setenv(FETCH_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(FETCH_MAX_ENV, raising=False)
    made = [use(n) for n in "abcd"]
    assert all(d.is_dir() for d in made)
    monkeypatch.setenv(FETCH_MAX_ENV, "lots")
    # The CLI's pre-Ray check reads it: a bad value is one line there, not a replica error.
    with pytest.raises(UserError, match=f"{FETCH_MAX_ENV} 'lots' is not a size; use e.g. 5GB"):
        check_checkpoint(tmp_path)
