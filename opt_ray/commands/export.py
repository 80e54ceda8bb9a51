"""`opt-ray export`: export a training checkpoint to HF format (safetensors) for serving."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a training checkpoint to HF format (safetensors) for serving",
                       description="Export a training checkpoint (a run directory: its newest valid "
                                   "checkpoint, or a checkpoints/step_N directory) to an HF-format "
                                   "directory that `opt-ray serve` and transformers load. Tensor- and "
                                   "data-parallel shards are merged.")
    p.add_argument("checkpoint", metavar="RUN_DIR|CKPT",
                   help="run directory or checkpoint directory (local, or an s3://... URL with "
                        "the standard AWS environment variables)")
    p.add_argument("--output", required=True,
                   help="HF checkpoint to write: a directory, or a bucket prefix (s3://bucket/"
                        "exports/NAME; each weight file uploaded as it is written, a manifest "
                        "last) that `opt-ray serve --checkpoint` and `eval` read from any node")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="weight dtype to write (default fp32, the master weights)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer to ship with the weights (file or dir for `opt-ray tokenizer "
                        "load`); default: the one the run was trained with (RUN_DIR/tokenizer.json)")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="split the weights into files of at most SIZE (e.g. 5GB, 500MB; "
                        "default 5GB, as HF's save_pretrained) with an index; the export holds "
                        "one file's tensors in memory at a time")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from opt_ray.config import ModelConfig
    from opt_ray.model.hf import write_hf
    from opt_ray.run_dir import is_url
    from opt_ray.sizes import parse_size
    from opt_ray.train.checkpoint import ModelStateReader, read_train_state, resolve

    max_shard = parse_size(args.max_shard_size, "--max-shard-size")
    to_bucket = is_url(args.output)
    if to_bucket:   # before the weights are read: the bucket takes writes, the prefix is new
        from opt_ray.data.readers import check_output_dir
        check_output_dir(args.output, overwrite=args.overwrite)
    ckpt = resolve(args.checkpoint)
    tok = _find_tokenizer(args.tokenizer, ckpt)  # before writing: a bad --tokenizer loses nothing
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    state = read_train_state(ckpt)
    cfg, step = ModelConfig.from_dict(state["model"]), state["step"]
    weights = ModelStateReader(ckpt)    # one weight file's tensors in memory at a time
    progress = _Progress(cfg, dtype) if sys.stderr.isatty() else None
    if to_bucket:
        out = _to_bucket(cfg, weights.read, tok, args.output, dtype=dtype, max_shard=max_shard,
                         source={"checkpoint": str(ckpt), "step": step},
                         overwrite=args.overwrite, progress=progress)
    else:
        from opt_ray.data.tokenizer import save_tokenizer_files
        # The tokenizer goes in before the directory is renamed into place.
        out = write_hf(cfg, weights.read, args.output, dtype=dtype, overwrite=args.overwrite,
                       max_shard_bytes=max_shard, on_file=progress,
                       extra=None if tok is None else lambda d: save_tokenizer_files(tok, d))
    if progress is not None:
        progress.close()
    print(f"exported {ckpt} (step {step}){' with its tokenizer' if tok else ''} to {out}")
    if tok is None:
        print("no tokenizer was found for this run: pass --tokenizer so that `opt-ray serve` "
              "can load the export", file=sys.stderr)
    return 0


class _Progress:
    """A bar over the weight files' bytes, advanced as each file is written."""

    def __init__(self, cfg, dtype):
        import torch
        from tqdm import tqdm

        from opt_ray.config import num_params
        total = num_params(cfg) * torch.empty((), dtype=dtype).element_size()
        self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="export", mininterval=1.0)

    def __call__(self, name: str, path: Path) -> None:
        self.bar.update(path.stat().st_size)

    def close(self) -> None:
        self.bar.close()


def _to_bucket(cfg, read, tok, url: str, *, dtype, max_shard: int, source: dict,
               overwrite: bool, progress=None) -> str:
    """The HF checkpoint into the bucket prefix ``url`` as an artifact of kind ``hf``:
    each weight file is uploaded as soon as it is written, then removed from this node
    (the staging disk holds one at a time), its sha256 recorded; the config and the
    tokenizer follow, and the manifest goes last (``upload_artifact``, which checks every
    file's size in one listing and records its ETag): a reader
    (``artifact_io.fetch_prefix``) never takes a partial upload for the export."""
    import tempfile

    from fsspec.core import url_to_fs

    from opt_ray.artifacts import sha256_file
    from opt_ray.data.artifact_io import PrehashedArtifactWriter, clear_prefix, upload_artifact
    from opt_ray.data.tokenizer import save_tokenizer_files
    from opt_ray.model.hf import write_hf
    from opt_ray.run_dir import staging_root, store_errors

    url = url.rstrip("/")
    clear_prefix(url, overwrite=overwrite)
    fs, root = url_to_fs(url)
    staging_root().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=staging_root(), prefix=".export-") as d:
        with PrehashedArtifactWriter(Path(d) / "hf", kind="hf") as w:
            def upload(name: str, path: Path) -> None:
                info = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
                with store_errors(f"--output {url}", "an upload", "the bucket exists"):
                    fs.put_file(str(path), f"{root.rstrip('/')}/{name}")
                w.elsewhere[name] = info
                if progress is not None:
                    progress(name, path)
                path.unlink()

            write_hf(cfg, read, w.path, dtype=dtype, overwrite=True, max_shard_bytes=max_shard,
                     on_file=upload)
            if tok is not None:
                save_tokenizer_files(tok, w.path)
            w.manifest["source"] = source
        upload_artifact(w.out, url, kind="hf")
    return url


def _find_tokenizer(explicit: str | None, ckpt):
    from opt_ray.data.tokenizer import load_tokenizer

    if explicit:
        return load_tokenizer(explicit)
    from opt_ray.storage import Loc

    run_tok = Loc(ckpt).parent().parent().child("tokenizer.json")  # RUN_DIR/checkpoints/step_N
    if not run_tok.isfile():
        return None
    # A bucket run (`--output s3://bucket/run`) mirrors it beside the checkpoints.
    return load_tokenizer(run_tok.ref())
