"""``ArtifactWriter`` for stages whose workers checksum their own files, and the upload of
an artifact into a bucket.

``ArtifactWriter.commit`` hashes every file of the artifact in the committing process; for
the data stages that is the driver reading the whole corpus once more after the workers
wrote and hashed it. Here files listed in ``known`` (name -> sha256 and bytes, as the
worker that wrote them computed) are taken as given; any other file is hashed as usual.
The manifest and the commit are ``ArtifactWriter``'s; only a file's entry differs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from opt_ray.artifacts import ArtifactWriter
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

    from opt_ray.artifacts import MANIFEST, ArtifactError, json_text, read_manifest
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


def check_artifact_url(url: str, work: str, *, overwrite: bool = False) -> None:
    """A stage's ``--output URL``, before any work: the bucket takes writes, and, unless
    ``overwrite``, the prefix holds no artifact and nothing else than an interrupted run
    of the stage left (its work prefix ``work`` has a plan): a run would replace what is
    there. Raises ``UserError`` naming the URL and the fix."""
    from fsspec.core import url_to_fs

    from opt_ray.artifacts import MANIFEST
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
        ours = other and fs.exists(f"{url_to_fs(work)[1].rstrip('/')}/plan.json")
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
    from opt_ray.artifacts import MANIFEST, json_text
    if output is not None and overwrite and output.child(MANIFEST).exists():
        output.child(MANIFEST).rm()
        output.rm()
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
    round trip per file. ``what`` names the destination in a store error."""
    from opt_ray.run_dir import store_errors

    if names is None:
        names = [p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()]
    files = sorted(n for n in names if n != "done.json")
    with store_errors(what, "an upload", "the bucket exists"):
        if files:
            dest.fs.put([str(local / n) for n in files], [dest.child(n).path for n in files])
        if "done.json" in names:
            dest.fs.put_file(str(local / "done.json"), dest.child("done.json").path)
