"""``ArtifactWriter`` for stages whose workers checksum their own files, and the upload of
an artifact into a bucket.

``ArtifactWriter.commit`` hashes every file of the artifact in the committing process; for
the data stages that is the driver reading the whole corpus once more after the workers
wrote and hashed it. Here files listed in ``known`` (name -> sha256 and bytes, as the
worker that wrote them computed) are taken as given; any other file is hashed as usual.
The manifest and the commit are ``ArtifactWriter``'s; only a file's entry differs.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from opt_ray.artifacts import MANIFEST, ArtifactWriter
from opt_ray.storage import Loc


class PrehashedArtifactWriter(ArtifactWriter):
    """An ``ArtifactWriter`` that trusts the checksums in ``known`` for the files named."""

    def __init__(self, out: str | os.PathLike, *, kind: str, overwrite: bool = False):
        super().__init__(out, kind=kind, overwrite=overwrite)
        self.known: dict[str, dict[str, Any]] = {}
        # Files of the artifact stored elsewhere (tokenize's shards already in the bucket):
        # listed in the manifest with these entries, though not in the directory.
        self.elsewhere: dict[str, dict[str, Any]] = {}

    def _elsewhere(self) -> dict[str, dict[str, Any]]:
        return dict(self.elsewhere)

    def _file_info(self, name: str, path: Path) -> dict[str, Any]:
        info = self.known.get(name)
        size = path.stat().st_size
        if info is None or info.get("bytes") != size:
            return super()._file_info(name, path)
        return {"sha256": info["sha256"], "bytes": size}


def upload_artifact(local: str | os.PathLike, url: str, *, kind: str, progress: bool = False,
                    threads: int = 8) -> None:
    """The finished artifact in ``local`` into the bucket prefix ``url`` so that no reader
    ever takes a partial upload for the artifact: a manifest already there is removed
    first; every file the manifest lists that is in ``local`` goes up (``threads`` at a
    time; the others, put there by the stage's tasks, are there already); every listed
    file is checked by size in one listing and its ETag (the store's hash of what
    arrived) recorded in its manifest entry, which readers compare; the manifest goes up
    last. Raises ``UserError`` (store errors, as ``run_dir.store_errors`` words them) or
    ``ArtifactError`` (a file that arrived short)."""
    from concurrent.futures import ThreadPoolExecutor

    from fsspec.core import url_to_fs

    from opt_ray.artifacts import ArtifactError, json_text, read_manifest
    from opt_ray.run_dir import store_errors

    local = Path(local)
    manifest = read_manifest(local, kind=kind)
    listed = manifest["files"]
    here = {name: info for name, info in listed.items() if (local / name).is_file()}
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=sum(int(f["bytes"]) for f in here.values()), unit="B", unit_scale=True,
                   desc="upload", mininterval=1.0)
    try:
        with store_errors(f"--output {url}", "the upload", "the bucket exists"):
            fs, root = url_to_fs(url)
            root = root.rstrip("/")

            def put(name: str) -> None:
                fs.put_file(str(local / name), f"{root}/{name}")
                if bar is not None:
                    bar.update(int(here[name]["bytes"]))

            if fs.exists(f"{root}/{MANIFEST}"):
                fs.rm_file(f"{root}/{MANIFEST}")
            with ThreadPoolExecutor(max(1, threads)) as pool:
                list(pool.map(put, sorted(here)))
            fs.invalidate_cache()
            there = {p[len(root) + 1:]: i for p, i in fs.find(root, detail=True).items()}
            for name, info in listed.items():
                size = int(there[name]["size"]) if name in there else 0
                if size != int(info["bytes"]):
                    raise ArtifactError(f"--output {url}: {name} arrived with {size} of "
                                        f"{info['bytes']} bytes; run the command again")
                if there[name].get("ETag"):
                    info["etag"] = there[name]["ETag"]
            fs.pipe_file(f"{root}/{MANIFEST}", json_text(manifest).encode())
    finally:
        if bar is not None:
            bar.close()


def publish_dir(local: str | os.PathLike, url: str, *, kind: str, overwrite: bool = False,
                progress: bool = False) -> None:
    """A finished artifact written on this node (a tokenizer, an HF export) into the bucket
    prefix ``url``, manifest last (``upload_artifact``). A prefix that holds an artifact
    or other objects is refused (UserError) unless ``overwrite``, which removes its
    manifest first (no reader takes it from then on), then the rest."""
    clear_prefix(url, overwrite=overwrite)
    upload_artifact(local, url, kind=kind, progress=progress)


def clear_prefix(url: str, *, overwrite: bool) -> None:
    """Make the bucket prefix ``url`` ready for a new artifact written from this node:
    with ``overwrite``, its manifest goes first (no reader takes it from then on), then
    the rest; without, one that holds anything is refused (``check_artifact_url``)."""
    from opt_ray.run_dir import store_errors

    out = Loc(url)
    if overwrite:
        with store_errors(f"--output {url}", "a removal", "the bucket exists"):
            out.rm_artifact()
    check_artifact_url(url, overwrite=overwrite)


def fetch_prefix(url: str, what: str, *, names: Sequence[str] | None = None,
                 progress: bool = False) -> Path:
    """``fetched`` for files read at once (a tokenizer, a check's small files): the
    directory is returned, no longer held as in use (see ``cached``)."""
    with fetched(url, what, names=names, progress=progress) as d:
        return d


@contextlib.contextmanager
def fetched(url: str, what: str, *, names: Sequence[str] | None = None,
            progress: bool = False) -> Iterator[Path]:
    """A local copy of the objects under the bucket prefix ``url`` (those of ``names``
    only, when given), for code that reads files (the tokenizer, the served weights),
    held as in use while the ``with`` block runs.

    Kept in this node's fetch cache (``cached``) under a name made of the URL and every
    fetched object's size and ETag: another call on the node (a second replica, a
    restart) reuses it without a download, and objects replaced in the bucket (a new
    export to the same URL) are fetched anew. A prefix with a manifest (what
    ``upload_artifact`` writes) must hold every file it lists with the listed size and
    ETag: an upload that has not finished is refused, naming the file. ``what`` names the
    input in errors. The download: ``_download``."""
    from opt_ray.errors import UserError

    url = url.rstrip("/")
    # Named files at the top of the prefix need its top level only (a tokenizer beside a
    # run's thousands of checkpoint objects).
    fs, root, listing, manifest = _list_artifact(
        url, what, deep=names is None or any("/" in n for n in names))
    want = sorted(listing) if names is None else sorted(n for n in names if n in listing)
    if manifest is not None and names is None:   # the artifact's files, not strays
        want = [n for n in want if n in manifest["files"] or n == MANIFEST]
    if not want:
        raise UserError(f"{what} {url}: none of {', '.join(names or [])} is there; check the "
                        f"URL")
    version = _digest([url, [(n, int(listing[n].get("size", 0)), listing[n].get("ETag", ""))
                             for n in want]], 16)
    sizes = {n: int(listing[n].get("size", 0)) for n in want}
    # One directory per URL and part asked for (the small files a front end reads are
    # another copy than the whole export), holding the newest version fetched.
    with cached(url.rsplit("/", 1)[-1], [url, None if names is None else sorted(names)], version,
                lambda tmp: _download(fs, root, sizes, tmp, f"{what} {url}", progress=progress),
                need=sum(sizes.values())) as d:
        yield d


def _list_artifact(url: str, what: str, *, deep: bool = True):
    """(fs, root, {name: listing entry}, manifest or None) of a bucket prefix: one listing
    (hidden names, the stages' own work prefixes and probes, left out; only the top level
    unless ``deep``, or the manifest lists deeper files), and the whole artifact checked
    against its manifest when it has one."""
    from fsspec.core import url_to_fs

    from opt_ray.artifacts import ArtifactError
    from opt_ray.errors import UserError
    from opt_ray.run_dir import store_errors

    with store_errors(f"{what} {url}", "a read", "the bucket exists"):
        fs, root = url_to_fs(url)
        root = root.rstrip("/")
        fs.invalidate_cache()

        def list_files(deep: bool) -> dict[str, dict[str, Any]]:
            found = (fs.find(root, detail=True) if deep else
                     {e["name"]: e for e in fs.ls(root, detail=True) if e.get("type") == "file"})
            return {p[len(root) + 1:]: i for p, i in found.items()
                    if p.startswith(root + "/") and not any(
                        seg.startswith(".") for seg in p[len(root) + 1:].split("/"))}

        listing = list_files(deep)
        manifest = None
        if MANIFEST in listing:
            manifest = json.loads(fs.cat_file(f"{root}/{MANIFEST}"))
            if not isinstance(manifest.get("files"), dict):
                manifest = None      # not an artifact's (a run directory's own manifest)
            elif not deep and any("/" in n for n in manifest["files"]):
                listing = list_files(True)
    if not listing:
        raise UserError(f"{what} {url}: no objects under this prefix; check the URL (it "
                        f"names a prefix, e.g. s3://bucket/exports/opt-125m)")
    if manifest is not None:
        # The whole artifact is checked, whatever part is fetched: its listing has it all.
        files = manifest["files"]
        missing = [n for n in files if n not in listing]
        if missing:
            raise ArtifactError(f"{what} {url}: {missing[0]} is listed in its {MANIFEST} but "
                                f"missing ({len(missing)} file(s)); upload the artifact again")
        for name, info in files.items():
            got = listing[name]
            if int(got.get("size", -1)) != int(info["bytes"]) or (
                    info.get("etag") and got.get("ETag") and info["etag"] != got["ETag"]):
                raise ArtifactError(f"{what} {url}: {name} is not the file its {MANIFEST} lists "
                                    f"(an upload under way or a replaced file); upload the "
                                    f"artifact again")
    return fs, root, listing, manifest


def _download(fs, root: str, sizes: dict[str, int], tmp: Path, what: str, *,
              progress: bool) -> str:
    """The objects ``sizes`` names under ``root`` into the new directory ``tmp`` (a
    ``cached`` version being made); returns the line that reports it."""
    import sys
    import time

    from opt_ray.artifacts import ArtifactError
    from opt_ray.run_dir import store_errors

    total, bar, t0 = sum(sizes.values()), None, time.monotonic()
    try:
        for n in sizes:
            (tmp / n).parent.mkdir(parents=True, exist_ok=True)
        if progress:
            from tqdm import tqdm
            # A replica's log is a file: a line every 30 s there, not every second.
            bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"fetch {tmp.parent.name}",
                       mininterval=1.0 if sys.stderr.isatty() else 30.0)
        with store_errors(what, "a download", "the bucket exists"):
            # Large files first: they run concurrently, so the longest start first.
            order = sorted(sizes, key=lambda n: -sizes[n])
            fs.get([f"{root}/{n}" for n in order], [str(tmp / n) for n in order])
        for n, want in sizes.items():
            size = (tmp / n).stat().st_size
            if size != want:
                raise ArtifactError(f"{what}: {n} arrived with {size} of {want} bytes; run "
                                    f"the command again")
            if bar is not None:
                bar.update(size)
    finally:
        if bar is not None:
            bar.close()
    return (f"fetched {what} ({len(sizes)} files, {total / 1e6:.1f} MB in "
            f"{time.monotonic() - t0:.1f} s)")


# ---------------------------------------------------------------- this node's fetch cache

@contextlib.contextmanager
def cached(name: str, key: Any, version: str, make: Callable[[Path], str], *,
           need: int = 0) -> Iterator[Path]:
    """This node's copy of ``version`` of the source ``key``, in its fetch cache
    (``run_dir.fetch_root``), made by ``make`` unless it is there; yields its directory.
    Both kinds of copy go through here: a bucket prefix fetched (``fetched``) and an HF
    directory built from a training checkpoint (``opt_ray.serve.from_run``).

    Layout: one directory per source (``key``: a URL or a run and the part of it asked
    for, JSON), named ``NAME-HASH`` (``name`` to read), holding a ``.lock`` file and its
    versions, one directory each, named ``version``. A new version replaces the older
    ones of its source (a re-export, a newer checkpoint: a node does not keep every one,
    350 GB each at 175b).

    - One make per node: the processes that want one source at once (the replicas of a
      node of 8 GPUs start together) wait on the source's ``.lock``; the first makes the
      version, the others take it.
    - ``make(tmp)`` writes the version into the new directory ``tmp`` (a hidden name)
      and returns a line that says what it did ("fetched ...", "built ..."), printed with
      the destination once ``tmp`` is renamed into place: a process killed mid-way
      leaves nothing that is taken for a version, and the next make clears it.
    - In use: the caller holds a shared ``flock`` on the version's directory while its
      ``with`` block runs (taken under the source's lock, so before any remover can look).
      Pruning and the size cap (``evict``) remove only versions they can lock
      exclusively, and each source only while they hold its ``.lock``: never one being
      loaded, nor one being made.
    - Each use marks the version used (its directory's mtime), for the size cap's
      least-recently-used order; ``need`` (bytes a make will write) is made room for
      first."""
    import fcntl
    import shutil
    import sys
    import uuid

    from opt_ray.run_dir import fetch_root

    src = fetch_root() / f"{name[:40] or 'fetched'}-{_digest(key, 12)}"
    dest = src / version
    src.mkdir(parents=True, exist_ok=True)
    use = None
    try:
        with open(src / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not dest.is_dir():
                for stale in src.glob(".*.tmp-*"):    # a killed make's, nobody's now
                    shutil.rmtree(stale, ignore_errors=True)
                evict(need=need)
                tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
                try:
                    line = make(tmp)
                    try:
                        os.rename(tmp, dest)
                    except OSError:
                        if not dest.is_dir():   # not a copy by a process the lock missed
                            raise
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
                print(f"{line} to {dest}", file=sys.stderr, flush=True)
                for old in src.iterdir():
                    if old.name != dest.name and not old.name.startswith(".") and old.is_dir():
                        _remove_unused(old)
            os.utime(dest)
            use = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
            fcntl.flock(use, fcntl.LOCK_SH)
        evict(keep=dest)
        yield dest
    finally:
        if use is not None:
            os.close(use)


def evict(*, need: int = 0, keep: Path | None = None) -> list[Path]:
    """Hold this node's fetch cache to ``run_dir.fetch_max_bytes`` (nothing when unset)
    with ``need`` bytes more to come: remove the least recently used versions, skipping
    ``keep``, any version in use and any source whose ``.lock`` another process holds (a
    fetch or build under way there). One line per version removed. Returns them."""
    import fcntl
    import sys
    import time

    from opt_ray.run_dir import FETCH_MAX_ENV, fetch_max_bytes, fetch_root

    limit = fetch_max_bytes()
    if limit is None or not fetch_root().is_dir():
        return []
    versions = []
    for src in fetch_root().iterdir():
        if src.name.startswith(".") or not src.is_dir():
            continue
        for v in src.iterdir():
            try:
                if not v.name.startswith(".") and v.is_dir():
                    versions.append((v.stat().st_mtime, _tree_bytes(v), v))
            except OSError:         # removed meanwhile by another process
                continue
    total = sum(size for _, size, _ in versions)
    if total + need <= limit:
        return []
    gone: list[Path] = []
    for used, size, v in sorted(versions, key=lambda e: e[0]):
        if total + need <= limit:
            break
        if v == keep:
            continue
        with open(v.parent / ".lock", "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            if not _remove_unused(v):
                continue
        total -= size
        gone.append(v)
        print(f"evicted {v} ({size / 1e6:.1f} MB, last used {_ago(time.time() - used)} ago) from "
              f"this node's fetch cache: {FETCH_MAX_ENV}={os.environ[FETCH_MAX_ENV].strip()}",
              file=sys.stderr, flush=True)
    if total + need > limit:
        print(f"this node's fetch cache holds {total / 1e6:.1f} MB"
              + (f" with {need / 1e6:.1f} MB to come" if need else "")
              + f", over {FETCH_MAX_ENV}={os.environ[FETCH_MAX_ENV].strip()}: the rest is in use "
              f"(or being fetched or built)", file=sys.stderr, flush=True)
    return gone


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _remove_unused(version: Path) -> bool:
    """Remove a version directory unless a process holds it (its shared lock); the caller
    holds its source's ``.lock``. Renamed to a hidden name first, so a removal cut short
    never leaves a version that looks whole (the next make clears it)."""
    import fcntl
    import shutil
    import uuid

    try:
        fd = os.open(version, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        gone = version.with_name(f".{version.name}.tmp-gone-{uuid.uuid4().hex[:8]}")
        os.rename(version, gone)
    finally:
        os.close(fd)
    shutil.rmtree(gone, ignore_errors=True)
    return True


def _tree_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def _digest(obj: Any, n: int) -> str:
    import hashlib
    return hashlib.sha256(json.dumps(obj).encode()).hexdigest()[:n]


def check_artifact_url(url: str, work: str | None = None, *, overwrite: bool = False) -> None:
    """A stage's ``--output URL``, before any work: the bucket takes writes, and, unless
    ``overwrite``, the prefix holds no artifact and nothing else than an interrupted run
    of the stage left (its work prefix ``work``, if it has one, has a plan): a run would
    replace what is there. Raises ``UserError`` naming the URL and the fix."""
    from fsspec.core import url_to_fs

    from opt_ray.errors import UserError
    from opt_ray.run_dir import probe_write, store_errors

    with store_errors(f"--output {url}", "a test write", "the bucket exists"):
        fs, root = url_to_fs(url)
        root = root.rstrip("/")
        there = fs.exists(f"{root}/{MANIFEST}")
        # Objects, not "directories" (a store with real ones keeps them once emptied).
        other = not there and not overwrite and any(
            p.rstrip("/") != root and "/.write-test-" not in p
            for p in (fs.find(root) if fs.exists(root) else []))
        ours = other and work is not None and fs.exists(f"{url_to_fs(work)[1].rstrip('/')}/plan.json")
        probe_write(fs, root)
    if there and not overwrite:
        raise UserError(f"--output {url} already holds an artifact ({MANIFEST}); choose another "
                        f"--output or pass --overwrite")
    if other and not ours:
        raise UserError(f"--output {url} already holds objects that are not an artifact of "
                        f"this stage; choose another --output or pass --overwrite (which "
                        f"removes them)")


# ---------------------------------------------------------------- a stage's work dir

def bucket_work_url(url: str, stage: str) -> str:
    """The work prefix of a stage's bucket ``--output``: beside it, as a local output's
    work dir is (``s3://b/shards``, "tokenize" -> ``s3://b/.shards.tokenize-work``)."""
    parent, _, name = url.rstrip("/").rpartition("/")
    return f"{parent}/.{name}.{stage}-work"


def prepare_work(work: Loc, fingerprint: dict[str, Any], output: Loc | None = None, *,
                 overwrite: bool = False) -> bool:
    """Reuse the work dir (or bucket work prefix) ``work`` when its ``plan.json`` is
    ``fingerprint`` (the same inputs and parameters: an interrupted run of this one), and
    return True; otherwise start it afresh and return False. Starting afresh also removes
    a bucket ``output``'s objects: an unfinished other run's, which has no manifest. With
    ``overwrite``, a whole artifact at ``output`` is replaced: its manifest goes first (no
    reader takes it from then on), then the rest."""
    from opt_ray.artifacts import json_text
    if output is not None and overwrite and output.child(MANIFEST).exists():
        output.rm_artifact()
        work.rm()
    try:
        if json.loads(work.child("plan.json").read_text()) == fingerprint:
            return True
    except (OSError, ValueError):
        pass
    work.rm()
    if output is not None:
        output.rm()
    work.mkdirs()
    work.child("plan.json").write_text(json_text(fingerprint))
    return False


def read_done(dirs: Sequence[Loc]) -> list[dict[str, Any] | None]:
    """Each task directory's ``done.json`` (None where there is none yet), in order: in a
    bucket one concurrent read of them all, not a round trip each (a resumed stage of
    thousands of splits asks for every one)."""
    if not dirs:
        return []
    paths = [d.child("done.json").path for d in dirs]
    if dirs[0].local:
        raw: dict[str, bytes] = {}
        for p in paths:
            try:
                with open(p, "rb") as f:
                    raw[p] = f.read()
            except OSError:
                continue
    else:
        fs = dirs[0].fs
        fs.invalidate_cache()
        raw = fs.cat(paths, on_error="omit")
    out: list[dict[str, Any] | None] = []
    for p in paths:
        try:
            out.append(json.loads(raw[p]) if p in raw else None)
        except ValueError:     # a torn marker of a local run: the task runs again
            out.append(None)
    return out


def put_files(local: Path, dest: Loc, what: str, names: Sequence[str] | None = None) -> None:
    """Files of ``local`` (``names``, default all; relative paths) to the same names under
    the bucket prefix ``dest``: concurrently, then ``done.json`` last (a task counts as
    done only then). A PUT is whole or absent; sizes and ETags are checked once, by the
    upload of the artifact's manifest (``upload_artifact``: one listing), not here, a
    round trip per file. ``what`` names the destination in a store error, which is a
    ``StoreUnavailable`` (the bucket took a test write before the work began: a failure
    now is the store's, and the task is run again)."""
    from opt_ray.run_dir import StoreUnavailable, store_errors

    if names is None:
        names = [p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()]
    files = sorted(n for n in names if n != "done.json")
    with store_errors(what, "an upload", "the bucket exists", error=StoreUnavailable):
        if files:
            dest.fs.put([str(local / n) for n in files], [dest.child(n).path for n in files])
        if "done.json" in names:
            dest.fs.put_file(str(local / "done.json"), dest.child("done.json").path)
