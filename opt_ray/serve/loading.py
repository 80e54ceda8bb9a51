"""Loading a served checkpoint: the model from an HF-format dir, the tokenizer beside it,
and ``check_checkpoint``, the cheap integrity check the CLI runs before Ray starts.

Thin on purpose: the project's loaders (``opt_ray.model.hf.from_hf``,
``opt_ray.data.tokenizer.load_tokenizer``) own formats and validation.

Why a separate check: a replica loads its weights inside Ray Serve, where a cut-off file
becomes a replica that fails to start, is retried, and prints Ray tracebacks. Reading
only the files' headers and sizes here finds a truncated download or copy in
milliseconds, before anything is deployed.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

from opt_ray.errors import UserError


def load_hf_model(path: Path, dtype=None, *, sharded: bool = False):
    """The model of an HF dir, its weights in ``dtype`` as they are read (a replica that
    serves bf16 never holds the fp32 model: 52 GB of host memory at 13b, per replica);
    ``sharded``: this tensor-parallel rank's part of it only."""
    from opt_ray.model.hf import from_hf, from_hf_sharded
    return (from_hf_sharded if sharded else from_hf)(path, dtype=dtype)


def load_tokenizer_dir(path: Path):
    from opt_ray.data.tokenizer import load_tokenizer
    return load_tokenizer(path)


def _check_safetensors(f: str, size: int, fh) -> None:
    """A safetensors file is an 8-byte header length, a JSON header giving every tensor's
    byte range, then the data: the file (``f``, ``size`` bytes, open as ``fh``: a local
    file, or a bucket object read by range) must be long enough for all of it. Reads the
    header only."""
    head = fh.read(8)
    if len(head) < 8:
        raise UserError(f"{f}: cut off ({size} bytes; not even a safetensors header); "
                        f"copy or download the checkpoint again")
    (n,) = struct.unpack("<Q", head)
    if 8 + n > size:
        raise UserError(f"{f}: cut off ({size} bytes, but its header alone needs {8 + n}); "
                        f"copy or download the checkpoint again")
    try:
        header = json.loads(fh.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
                  default=0)
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise UserError(f"{f}: not a safetensors file (unreadable header: {e})") from e
    if 8 + n + end > size:
        raise UserError(f"{f}: cut off: holds {size} bytes of the {8 + n + end} its header "
                        f"describes; copy or download the checkpoint again")


def _check_torch_zip(f: str, size: int, fh) -> None:
    """torch.save's zip format keeps its directory at the end: a cut-off file has none."""
    if fh.read(4)[:2] != b"PK":
        return                         # the legacy format: left to the loader
    try:
        fh.seek(0)
        with zipfile.ZipFile(fh) as z:
            z.infolist()
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(f"{f}: cut off or damaged ({e}); copy or download the checkpoint again") from e


def check_checkpoint(path: Path | str):
    """The checkpoint's ``ModelConfig``; raises ``UserError`` naming the file when a resolved checkpoint
    (``engine.resolve_checkpoint``) cannot be served. An HF-format dir: its config.json
    is not an OPT config, its tokenizer is missing, a weight file its shard index lists
    is not there, or a weight file is cut off. Reads headers only (milliseconds, whatever
    the model size). A bucket export (a URL) is checked where it is: its small files are
    fetched to this node (and its manifest, if any, matched: ``fetch_prefix``), the
    objects' sizes come from one listing and the weights' headers are read by range. A
    training checkpoint: ``from_run.check``, which builds no weights."""
    from opt_ray.run_dir import fetch_max_bytes, is_url
    from opt_ray.serve import from_run
    from opt_ray.storage import Loc
    fetch_max_bytes()     # the fetch cache's limit, which every node that loads it reads
    if not Loc(path).child("config.json").isfile():
        run = from_run.find(path)
        if run is not None:
            return from_run.check(run)
    if not is_url(path):
        path = Path(path)
        sizes = {f.name: f.stat().st_size for f in path.iterdir() if f.is_file()}
        return _check_dir(str(path), path, sizes, lambda n: (path / n).open("rb"))
    from fsspec.core import url_to_fs

    from opt_ray.data.artifact_io import fetch_prefix
    from opt_ray.run_dir import store_errors
    from opt_ray.serve.engine import SMALL_FILES

    url = str(path).rstrip("/")
    small = fetch_prefix(url, "--checkpoint", names=SMALL_FILES)
    with store_errors(f"--checkpoint {url}", "a read", "the bucket exists"):
        fs, root = url_to_fs(url)
        sizes = {e["name"].rsplit("/", 1)[-1]: int(e["size"])
                 for e in fs.ls(root, detail=True) if e.get("type") == "file"}
        return _check_dir(url, small, sizes,
                          lambda n: fs.open(f"{root.rstrip('/')}/{n}", "rb", block_size=1 << 20))


def _check_dir(where: str, small: Path, sizes: dict[str, int], open_file):
    """``check_checkpoint`` of the checkpoint ``where``, whose config, tokenizer and shard
    index are in the local directory ``small`` and whose files are ``sizes`` (name ->
    bytes), each opened by ``open_file(name)``."""
    from opt_ray.model.hf import config_from_hf
    try:
        cfg = json.loads((small / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{where}/config.json: not readable JSON ({e})") from e
    model = config_from_hf(cfg, source=f"{where}/config.json")
    try:
        load_tokenizer_dir(small)
    except UserError as e:
        if str(small) == where:
            raise
        # The message names this node's copy of a bucket checkpoint: name the bucket's.
        raise UserError(f"--checkpoint {where}: no usable tokenizer ({e})") from e
    weights = sorted(n for n in sizes if n.endswith(".safetensors")) + \
        sorted(n for n in sizes if n.endswith(".bin"))
    if not weights:
        raise UserError(f"{where}: no weights (model.safetensors or pytorch_model.bin); export "
                        f"the checkpoint again")
    _check_index(where, small, set(weights))
    for n in weights:
        check = _check_safetensors if n.endswith(".safetensors") else _check_torch_zip
        with open_file(n) as fh:
            check(f"{where}/{n}", sizes[n], fh)
    return model


#: HF's shard indexes: a sharded checkpoint lists its weight files in one of these.
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _check_index(where: str, small: Path, present: set[str]) -> None:
    """Every weight file a shard index (in ``small``, the checkpoint's small files) lists
    is among ``present``: a copy or upload still under way has only some."""
    for name in INDEXES:
        if not (small / name).is_file():
            continue
        try:
            files = set(json.loads((small / name).read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise UserError(f"{where}/{name}: not a readable shard index ({e})") from e
        missing = sorted(files - present)
        if missing:
            raise UserError(f"{where}: {missing[0]} is listed in {name} but missing "
                            f"({len(missing)} of {len(files)} weight files); copy or upload the "
                            f"checkpoint again")
