"""``ArtifactWriter`` for stages whose workers checksum their own files.

``ArtifactWriter.commit`` hashes every file of the artifact in the committing process; for
the data stages that is the driver reading the whole corpus once more after the workers
wrote and hashed it. Here files listed in ``known`` (name -> sha256 and bytes, as the
worker that wrote them computed) are taken as given; any other file is hashed as usual.
The manifest is otherwise the one ``ArtifactWriter`` writes.
"""

from __future__ import annotations

import os
import shutil
import uuid
from typing import Any

from opt_ray.artifacts import MANIFEST, ArtifactWriter, sha256_file, write_json_atomic


class PrehashedArtifactWriter(ArtifactWriter):
    """An ``ArtifactWriter`` that trusts the checksums in ``known`` for the files named."""

    def __init__(self, out: str | os.PathLike, *, kind: str, overwrite: bool = False):
        super().__init__(out, kind=kind, overwrite=overwrite)
        self.known: dict[str, dict[str, Any]] = {}

    def commit(self) -> None:
        import socket
        import time

        from opt_ray.artifacts import code_version
        files = sorted(p for p in self.path.rglob("*") if p.is_file() and p.name != MANIFEST)
        listed = {}
        for p in files:
            name = str(p.relative_to(self.path))
            info = self.known.get(name)
            size = p.stat().st_size
            if info is None or info.get("bytes") != size:
                info = {"sha256": sha256_file(p), "bytes": size}
            listed[name] = {"sha256": info["sha256"], "bytes": size}
        manifest = {
            "kind": self.kind,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.time() - self._t0, 3),
            "host": socket.gethostname(),
            "code_version": code_version(),
            **self.manifest,
            "files": listed,
        }
        write_json_atomic(self.path / MANIFEST, manifest)
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(self.out, old)
            os.replace(self.path, self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.path, self.out)
