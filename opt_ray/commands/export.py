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
                        "exports/NAME; written on this node, then uploaded with a manifest "
                        "last) that `opt-ray serve --checkpoint` and `eval` read from any node")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="weight dtype to write (default fp32, the master weights)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer to ship with the weights (file or dir for `opt-ray tokenizer "
                        "load`); default: the one the run was trained with (RUN_DIR/tokenizer.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from opt_ray.model.hf import to_hf
    from opt_ray.train.checkpoint import load_model, read_train_state, resolve

    from opt_ray.run_dir import is_url

    to_bucket = is_url(args.output)
    if to_bucket:   # before the weights are read: the bucket takes writes, the prefix is new
        from opt_ray.data.readers import check_output_dir
        check_output_dir(args.output, overwrite=args.overwrite)
    ckpt = resolve(args.checkpoint)
    tok = _find_tokenizer(args.tokenizer, ckpt)  # before writing: a bad --tokenizer loses nothing
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    model = load_model(ckpt, dtype=dtype)
    step = read_train_state(ckpt)["step"]
    if to_bucket:
        out = _to_bucket(model, tok, args.output, source={"checkpoint": str(ckpt), "step": step},
                         overwrite=args.overwrite)
        print(f"exported {ckpt} (step {step}){' with its tokenizer' if tok else ''} to {out}")
        if tok is None:
            print("no tokenizer was found for this run: pass --tokenizer so that `opt-ray "
                  "serve` can load the export", file=sys.stderr)
        return 0
    out = to_hf(model, args.output, overwrite=args.overwrite)
    if tok is not None:
        # The weights are already committed atomically; the tokenizer goes in through a
        # temporary name so a reader never sees half a file.
        from opt_ray.data.tokenizer import save_tokenizer_files
        save_tokenizer_files(tok, out)
        print(f"exported {ckpt} (step {step}) with its tokenizer to {out}")
    else:
        print(f"exported {ckpt} (step {step}) to {out}; no tokenizer was found for this run: "
              f"pass --tokenizer so that `opt-ray serve` can load the export", file=sys.stderr)
    return 0


def _to_bucket(model, tok, url: str, *, source: dict, overwrite: bool) -> str:
    """The HF checkpoint written in this node's staging directory as an artifact of kind
    ``hf`` (a manifest with every file's sha256), then uploaded, manifest last: a reader
    (``artifact_io.fetch_prefix``) never takes a partial upload for the export."""
    import tempfile

    from opt_ray.artifacts import ArtifactWriter
    from opt_ray.data.artifact_io import publish_dir
    from opt_ray.data.tokenizer import save_tokenizer_files
    from opt_ray.model.hf import to_hf
    from opt_ray.run_dir import staging_root

    staging_root().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=staging_root(), prefix=".export-") as d:
        with ArtifactWriter(Path(d) / "hf", kind="hf") as w:
            to_hf(model, w.path, overwrite=True)
            if tok is not None:
                save_tokenizer_files(tok, w.path)
            w.manifest["source"] = source
        publish_dir(w.out, url, kind="hf", overwrite=overwrite, progress=sys.stderr.isatty())
    return url.rstrip("/")


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
