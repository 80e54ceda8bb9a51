"""Immutable artifact directories with a ``manifest.json``, written atomically.

Every stage writes its output through ``ArtifactWriter``: files go into a hidden temporary
sibling directory, the manifest (inputs, config, counts, per-file sha256, code version) is
written last, and the directory is renamed into place. A crashed run therefore never
leaves something that looks complete: a directory counts only once its manifest exists,
and ``read_manifest`` verifies checksums on request.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Iterable

from opt_ray.errors import UserError

MANIFEST = "manifest.json"


class ArtifactError(UserError):
    """An artifact is missing, incomplete or fails its checksum."""


def code_version() -> str:
    from opt_ray import __version__
    return __version__


def sha256_file(path: str | os.PathLike, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write text to a temporary file in the same directory, fsync, then rename: a reader
    sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def json_text(obj: Any) -> str:
    """How artifacts write JSON: indented, keys sorted."""
    return json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (``write_text_atomic``), as ``json_text``."""
    write_text_atomic(path, json_text(obj))


class ArtifactWriter:
    """Context manager: ``with ArtifactWriter(out, kind="dedup") as w: ...write into w.path``.

    On success the manifest is written and the temporary directory renamed to ``out``; on
    an exception the temporary directory is removed and ``out`` is left untouched.
    An existing ``out`` is an error unless ``overwrite`` (then it is replaced whole).
    """

    def __init__(self, out: str | os.PathLike, *, kind: str, overwrite: bool = False):
        self.out = Path(out).absolute()
        self.kind = kind
        self.overwrite = overwrite
        self.manifest: dict[str, Any] = {}
        self.path = self.out.with_name(f".{self.out.name}.tmp-{uuid.uuid4().hex[:8]}")

    def __enter__(self) -> "ArtifactWriter":
        if self.out.exists() and not self.overwrite:
            raise ArtifactError(f"output directory {self.out} already exists; choose another "
                                f"--output or pass --overwrite")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.path.mkdir()
        self._t0 = time.time()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        self.commit()

    def _file_info(self, name: str, path: Path) -> dict[str, Any]:
        """A file's manifest entry: its sha256 and size (subclasses may know the hash)."""
        return {"sha256": sha256_file(path), "bytes": path.stat().st_size}

    def _elsewhere(self) -> dict[str, dict[str, Any]]:
        """Manifest entries of the artifact's files that are not in ``path`` (none here)."""
        return {}

    def commit(self) -> None:
        files = {str(p.relative_to(self.path)): p
                 for p in sorted(self.path.rglob("*")) if p.is_file() and p.name != MANIFEST}
        manifest = {
            "kind": self.kind,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.time() - self._t0, 3),
            "host": socket.gethostname(),
            "code_version": code_version(),
            **self.manifest,
            "files": dict(sorted({**{name: self._file_info(name, p) for name, p in files.items()},
                                  **self._elsewhere()}.items())),
        }
        write_json_atomic(self.path / MANIFEST, manifest)
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(self.out, old)
            os.replace(self.path, self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.path, self.out)


def read_manifest(path: str | os.PathLike, *, kind: str | None = None,
                  verify: Iterable[str] | bool = False) -> dict[str, Any]:
    """Read an artifact's manifest. ``verify=True`` checks every file's sha256, or pass
    the names to check. Raises ``ArtifactError`` naming the directory and the fix."""
    d = Path(path)
    mf = d / MANIFEST
    if not mf.is_file():
        raise ArtifactError(f"{d} is not a complete artifact (no {MANIFEST}); it may be from "
                            f"a crashed run: re-run the stage that writes it")
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{mf} is not valid JSON ({e}); re-run the stage that writes it") from e
    if kind is not None and manifest.get("kind") != kind:
        raise ArtifactError(f"{d} holds a {manifest.get('kind')!r} artifact, expected {kind!r}")
    if verify:
        names = manifest.get("files", {}) if verify is True else verify
        for name in names:
            info = manifest["files"].get(name)
            if info is None:
                raise ArtifactError(f"{d}: {name} is not listed in {MANIFEST}")
            p = d / name
            if not p.is_file():
                raise ArtifactError(f"{d}: {name} listed in {MANIFEST} is missing")
            if sha256_file(p) != info["sha256"]:
                raise ArtifactError(f"{d}: {name} fails its sha256 check against {MANIFEST}; "
                                    f"the file was modified or corrupted: regenerate it")
    return manifest
