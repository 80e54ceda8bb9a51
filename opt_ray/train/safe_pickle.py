"""Reading DCP checkpoints from directories we do not trust, without running their code.

A run directory can come from anywhere (a colleague's bucket, a control-plane job's
output), and its sha256 manifest sits beside the files it describes, so it proves only
that nobody changed them *after* the manifest was written. Two parts of a
``torch.distributed.checkpoint`` (DCP) directory are pickles:

- ``.metadata``: DCP's own index (tensor shapes, chunk offsets, file names), read by
  ``FileSystemReader.read_metadata`` with a plain ``pickle.load``: any callable a crafted
  file names (``os.system``) would run. ``load_dcp_metadata`` reads it with an unpickler
  that resolves only the classes DCP writes there (listed in ``ALLOWED``) and refuses
  everything else before anything is called.
- non-tensor values (the optimizer's ``param_groups``: floats, tuples, strings), which
  DCP's ``DefaultLoadPlanner.load_bytes`` reads with ``torch.load(weights_only=False)``.
  ``SafeLoadPlanner`` reads them with ``weights_only=True`` (torch's own restricted
  unpickler: containers, numbers, strings, tensors). Tensor data is already read with
  ``weights_only=True`` by DCP.

``reader(path)`` gives the DCP ``StorageReader`` for a local directory or an fsspec URL
with the safe ``read_metadata``; every load path in ``opt_ray.train.checkpoint`` goes
through it and ``SafeLoadPlanner``.
"""

from __future__ import annotations

import io
import pickle
from typing import IO, Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from opt_ray.errors import UserError

# (module, name) pairs that DCP's metadata pickle holds (torch 2.x FileSystemWriter):
# plain dataclasses and an enum of DCP, torch.Size, torch's dtype/layout lookups and
# pathlib paths. None of them runs anything when called with data.
_DCP_META = "torch.distributed.checkpoint.metadata"
ALLOWED: frozenset[tuple[str, str]] = frozenset({
    (_DCP_META, "Metadata"), (_DCP_META, "MetadataIndex"), (_DCP_META, "StorageMeta"),
    (_DCP_META, "TensorProperties"), (_DCP_META, "TensorStorageMetadata"),
    (_DCP_META, "ChunkStorageMetadata"), (_DCP_META, "BytesStorageMetadata"),
    (_DCP_META, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
})


class UnsafeCheckpointError(UserError):
    """A checkpoint file that names code a checkpoint never holds (a crafted pickle)."""


class _DCPMetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)  # dtypes pickle as a lookup of torch.<name>
        raise UnsafeCheckpointError(
            f"{self.source} refers to {module}.{name}, which a torch.distributed.checkpoint "
            f"never holds; refusing to load it (the file may carry code). Use a checkpoint "
            f"written by `opt-ray train` from a source you trust")


def load_dcp_metadata(file: IO[bytes], source: str = "checkpoint metadata") -> Metadata:
    """DCP's ``Metadata`` from an open ``.metadata`` file, resolving only DCP's own types."""
    try:
        meta = _DCPMetadataUnpickler(file, source).load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # truncated or garbage: not a checkpoint we can use
        raise UnsafeCheckpointError(f"{source} is not a readable DCP metadata file ({e})") from e
    if not isinstance(meta, Metadata):
        raise UnsafeCheckpointError(f"{source} holds a {type(meta).__name__}, not DCP metadata")
    return meta


class _SafeMetadata:
    """``read_metadata`` of DCP's ``FileSystemReader`` with the restricted unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            meta = load_dcp_metadata(f, source=str(path))
        if getattr(meta, "storage_meta", None) is None:
            meta.storage_meta = StorageMeta()
        meta.storage_meta.load_id = self.load_id
        return meta


class SafeFileSystemReader(_SafeMetadata, FileSystemReader):
    """DCP reader for a local directory."""


def _fsspec_reader_cls():
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    class SafeFsspecReader(_SafeMetadata, FsspecReader):
        """DCP reader for an fsspec URL (``s3://bucket/prefix/...``)."""

    return SafeFsspecReader


def reader(path: str) -> FileSystemReader:
    """The safe DCP ``StorageReader`` for a local directory or an fsspec URL."""
    from opt_ray.run_dir import is_url

    if is_url(path):
        return _fsspec_reader_cls()(str(path))
    return SafeFileSystemReader(str(path))


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, reading non-tensor values with ``weights_only=True``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(
                f"checkpoint value {read_item.dest_index.fqn!r} is not plain data ({e}); refusing "
                f"to load it (the file may carry code)") from e
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def dcp_load(state_dict: dict[str, Any], *, storage_reader: FileSystemReader, **kwargs: Any) -> None:
    """``dcp.load`` with ``SafeLoadPlanner``; a refusal comes out as the one-line
    ``UnsafeCheckpointError`` (DCP wraps every rank's failure in its CheckpointException)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load(state_dict, storage_reader=storage_reader, planner=SafeLoadPlanner(), **kwargs)
    except CheckpointException as e:
        for exc, _ in e.failures.values():
            if isinstance(exc, UserError):
                raise exc from None
        raise
