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


def load_hf_model(path: Path, dtype=None):
    """The model of an HF dir, its weights in ``dtype`` as they are read (a replica that
    serves bf16 never holds the fp32 model: 52 GB of host memory at 13b, per replica)."""
    from opt_ray.model.hf import from_hf
    return from_hf(path, dtype=dtype)


def load_tokenizer_dir(path: Path):
    from opt_ray.data.tokenizer import load_tokenizer
    return load_tokenizer(path)


def _check_safetensors(f: Path) -> None:
    """A safetensors file is an 8-byte header length, a JSON header giving every tensor's
    byte range, then the data: the file must be long enough for all of it."""
    with f.open("rb") as fh:
        _check_safetensors_head(str(f), f.stat().st_size, fh)


def _check_safetensors_head(f: str, size: int, fh) -> None:
    """``_check_safetensors`` of a file ``f`` of ``size`` bytes open as ``fh`` (a local
    file, or a bucket object read by range: only its header is read)."""
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


def _check_torch_zip(f: Path) -> None:
    """torch.save's zip format keeps its directory at the end: a cut-off file has none."""
    with f.open("rb") as fh:
        magic = fh.read(4)
    if magic[:2] != b"PK":
        return                         # the legacy format: left to the loader
    try:
        with zipfile.ZipFile(f) as z:
            z.infolist()
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(f"{f}: cut off or damaged ({e}); copy or download the checkpoint again") from e


def check_checkpoint(path: Path | str) -> None:
    """Raise ``UserError`` naming the file when an HF-format dir cannot be served: its
    config.json is not an OPT config, its tokenizer is missing, or a weight file is cut
    off. Reads headers only (milliseconds, whatever the model size). A bucket export
    (a URL) is checked where it is: its small files are fetched to this node, the weights'
    headers read by range, and its manifest, if any, matched (``fetch_prefix``)."""
    from opt_ray.run_dir import is_url
    if is_url(path):
        return _check_url(str(path).rstrip("/"))
    from opt_ray.model.hf import config_from_hf
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path / 'config.json'}: not readable JSON ({e})") from e
    config_from_hf(cfg, source=str(path / "config.json"))
    load_tokenizer_dir(path)
    weights = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
    if not weights:
        raise UserError(f"{path}: no weights (model.safetensors or pytorch_model.bin); export the "
                        f"checkpoint again")
    _check_index(str(path), path, {f.name for f in weights})
    for f in weights:
        if f.suffix == ".safetensors":
            _check_safetensors(f)
        else:
            _check_torch_zip(f)


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


def _check_url(url: str) -> None:
    from opt_ray.data.artifact_io import fetch_prefix
    from opt_ray.model.hf import config_from_hf
    from opt_ray.run_dir import store_errors
    from opt_ray.serve.engine import SMALL_FILES
    from opt_ray.storage import Loc

    small = fetch_prefix(url, "--checkpoint", names=SMALL_FILES)
    try:
        cfg = json.loads((small / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{url}/config.json: not readable JSON ({e})") from e
    config_from_hf(cfg, source=f"{url}/config.json")
    try:
        load_tokenizer_dir(small)
    except UserError as e:
        raise UserError(f"--checkpoint {url}: no usable tokenizer ({e})") from e
    loc = Loc(url)
    with store_errors(f"--checkpoint {url}", "a read", "the bucket exists"):
        names = loc.names()
        weights = sorted(n for n in names if n.endswith(".safetensors")) + \
            sorted(n for n in names if n.endswith(".bin"))
        _check_index(url, small, set(weights))
        for n in weights:
            if n.endswith(".safetensors"):
                f = loc.child(n)
                with f.fs.open(f.path, "rb", block_size=1 << 20) as fh:
                    _check_safetensors_head(f"{url}/{n}", f.size(), fh)
    if not weights:
        raise UserError(f"{url}: no weights (model.safetensors or pytorch_model.bin); export the "
                        f"checkpoint again")
