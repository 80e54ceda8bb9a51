"""``ArtifactWriter`` for stages whose workers checksum their own files.

``ArtifactWriter.commit`` hashes every file of the artifact in the committing process; for
the data stages that is the driver reading the whole corpus once more after the workers
wrote and hashed it. Here files listed in ``known`` (name -> sha256 and bytes, as the
worker that wrote them computed) are taken as given; any other file is hashed as usual.
The manifest and the commit are ``ArtifactWriter``'s; only a file's entry differs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from opt_ray.artifacts import ArtifactWriter


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
