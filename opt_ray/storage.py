"""Where an artifact's files live: a directory on the local disk or a prefix in object
storage (fsspec: ``s3://bucket/prefix``, the standard AWS variables, ``AWS_ENDPOINT_URL``),
behind one small interface (``Loc``) that the checkpointer, the data stages and the
control plane share. Imports no torch."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Union

from opt_ray.artifacts import MANIFEST, write_text_atomic
from opt_ray.run_dir import is_url

Ref = Union[Path, str]


class Loc:
    """A file or directory on the local disk or in object storage (fsspec)."""

    def __init__(self, ref: str | os.PathLike):
        s = str(ref)
        if is_url(s):
            import fsspec
            self.proto = s.split("://", 1)[0]
            self.fs, path = fsspec.core.url_to_fs(s)
            self.path = path.rstrip("/")
        else:
            from fsspec.implementations.local import LocalFileSystem
            self.proto = None
            self.fs = LocalFileSystem()
            self.path = os.path.abspath(s.removeprefix("file://"))

    @property
    def local(self) -> bool:
        return self.proto is None

    def ref(self) -> Ref:
        return Path(self.path) if self.local else f"{self.proto}://{self.path}"

    def __str__(self) -> str:
        return str(self.ref())

    def child(self, *names: str) -> "Loc":
        loc = Loc.__new__(Loc)
        loc.fs, loc.proto = self.fs, self.proto
        loc.path = "/".join([self.path, *names])
        return loc

    def __truediv__(self, name: str) -> "Loc":
        return self.child(name)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def parent(self) -> "Loc":
        loc = Loc.__new__(Loc)
        loc.fs, loc.proto = self.fs, self.proto
        loc.path = self.path.rstrip("/").rsplit("/", 1)[0]
        return loc

    def _fresh(self) -> None:
        if not self.local:  # object-store listings are cached by fsspec; writes happen elsewhere
            self.fs.invalidate_cache()

    def exists(self) -> bool:
        if self.local:
            return os.path.exists(self.path)
        self._fresh()
        return self.fs.exists(self.path)

    def isfile(self) -> bool:
        if self.local:
            return os.path.isfile(self.path)
        self._fresh()
        return self.fs.isfile(self.path)

    def isdir(self) -> bool:
        if self.local:
            return os.path.isdir(self.path)
        self._fresh()
        return self.fs.isdir(self.path)

    def names(self) -> list[str]:
        """Names of the entries directly under this directory ([] if there is none)."""
        if self.local:
            return os.listdir(self.path) if os.path.isdir(self.path) else []
        self._fresh()
        try:
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.path, detail=False)]
        except FileNotFoundError:
            return []

    def files(self) -> list[str]:
        """Paths (relative to this directory) of every file below it."""
        self._fresh()
        base = self.path.rstrip("/") + "/"
        return sorted(p[len(base):] for p in self.fs.find(self.path) if p.startswith(base))

    def glob(self, pattern: str) -> list[str]:
        """Relative paths below this directory matching ``pattern``."""
        self._fresh()
        base = self.path.rstrip("/") + "/"
        return sorted(p[len(base):] for p in self.fs.glob(base + pattern))

    def read_bytes(self) -> bytes:
        with self.fs.open(self.path, "rb") as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def write_text(self, text: str) -> None:
        """Atomically: a rename on a local disk, one PUT on object storage."""
        if self.local:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            write_text_atomic(self.path, text)
        else:
            self.fs.pipe_file(self.path, text.encode("utf-8"))

    def size(self) -> int:
        return os.path.getsize(self.path) if self.local else int(self.fs.size(self.path))

    def sha256(self, bufsize: int = 8 << 20) -> str:
        h = hashlib.sha256()
        with self.fs.open(self.path, "rb") as f:
            while chunk := f.read(bufsize):
                h.update(chunk)
        return h.hexdigest()

    def mkdirs(self) -> None:
        if self.local:
            os.makedirs(self.path, exist_ok=True)

    def rm(self) -> None:
        """Remove this file or directory tree; nothing if it is not there."""
        if self.local:
            import shutil
            if os.path.isdir(self.path):
                shutil.rmtree(self.path, ignore_errors=True)
            elif os.path.exists(self.path):
                os.remove(self.path)
            return
        self._fresh()
        try:
            self.fs.rm(self.path, recursive=True)
        except FileNotFoundError:
            pass

    def rm_artifact(self) -> None:
        """Remove an artifact (a directory or prefix committed by its manifest): the
        manifest first, so that no reader takes what is left for a whole one while the
        rest goes."""
        self.child(MANIFEST).rm()
        self.rm()

    def move_to(self, dest: "Loc") -> None:
        if self.local:
            os.makedirs(os.path.dirname(dest.path), exist_ok=True)
            os.replace(self.path, dest.path)
        else:  # object storage: copy + delete (no rename); the manifest moves last
            self._fresh()
            files = self.files()
            for rel in sorted(files, key=lambda r: r == MANIFEST):
                self.fs.copy(self.child(rel).path, dest.child(rel).path)
            self.rm_artifact()


def _loc(ref: str | os.PathLike | Loc) -> Loc:
    return ref if isinstance(ref, Loc) else Loc(ref)
