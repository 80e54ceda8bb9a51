"""A checkpoint to evaluate, and the tokenizer it ships with.

Three layouts are accepted, as ``opt-ray export`` / ``opt-ray train`` write them:

- an HF-format directory (``config.json`` + weights), tokenizer beside it
  (``tokenizer.json``, or ``vocab.json`` + ``merges.txt``);
- a training run directory (its newest valid checkpoint), tokenizer at
  ``RUN_DIR/tokenizer.json`` (training copies the shards' tokenizer there);
- one checkpoint of a run, ``RUN_DIR/checkpoints/step_N``.

A training run in object storage (``opt-ray train --output s3://bucket/run``) is given
by its URL, or a checkpoint's (``s3://bucket/run/checkpoints/step_N``): the weights and
the tokenizer are read from the bucket (by each worker, on whichever node it runs), the
logbook from this node's staging copy of the run directory (``run_dir.RunMirror``),
pulled first. An HF export in a bucket (``opt-ray export --output s3://...``) is fetched
to each worker's node (``artifact_io.fetch_prefix``: once per node, checked against its
manifest).

Log-likelihoods are only meaningful with the tokenizer the model was trained with, so a
checkpoint without one is refused before the weights are read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opt_ray.errors import UserError


@dataclass
class EvalCheckpoint:
    """Where a checkpoint's pieces are; nothing is loaded yet."""
    path: Path | str           # as given (a URL stays a str)
    kind: str                  # "hf" or "run"
    weights: Path | str        # the HF dir, or the resolved checkpoints/step_N (or its URL)
    tokenizer: Path | str      # file or directory (or its URL) for ``load_tokenizer``
    run_dir: Path | None       # the training run the checkpoint belongs to, if any (for a
                               # bucket run: this node's staging copy of it)
    step: int | None           # its training step, if known
    run_url: str | None = None  # the bucket run's URL, whose logbook the staging copy mirrors

    def describe(self) -> dict[str, Any]:
        run = self.run_url or (str(self.run_dir) if self.run_dir else None)
        return {"checkpoint": str(self.weights), "kind": self.kind, "step": self.step,
                "run_dir": run}


def locate(path: str | os.PathLike) -> EvalCheckpoint:
    """Find the weights, tokenizer and run directory of ``path``; raises ``UserError``."""
    from opt_ray.run_dir import is_url

    if is_url(path):
        return _locate_url(str(path).rstrip("/"))
    p = Path(path)
    if not p.exists():
        raise UserError(f"checkpoint {p} does not exist; pass an HF-format directory (from "
                        f"`opt-ray export`), a training run directory or one of its "
                        f"checkpoints/step_N directories")
    if (p / "config.json").is_file():
        tok = _tokenizer_in(p)
        run_dir, step = None, None
        kind, weights = "hf", p
    else:
        from opt_ray.train.checkpoint import read_train_state, resolve

        weights = resolve(p)  # CheckpointError (a UserError) names the fix
        run_dir = weights.parent.parent if weights.parent.name == "checkpoints" else None
        step = int(read_train_state(weights).get("step", 0))
        tok = run_dir / "tokenizer.json" if run_dir and (run_dir / "tokenizer.json").is_file() else None
        kind = "run"
    if tok is None:
        where = p if kind == "hf" else (run_dir or p)
        raise UserError(f"checkpoint {p} has no tokenizer (expected tokenizer.json, or vocab.json "
                        f"+ merges.txt, in {where}); scores need the tokenizer the model was trained "
                        f"with: `opt-ray export RUN_DIR --output DIR --tokenizer TOK` ships one, or "
                        f"copy it into {where}")
    return EvalCheckpoint(path=p, kind=kind, weights=weights, tokenizer=tok, run_dir=run_dir, step=step)


def _locate_url(url: str) -> EvalCheckpoint:
    """A bucket run (its newest valid checkpoint) or one of its checkpoints, or an HF
    export in a bucket."""
    from opt_ray.run_dir import RunMirror, store_errors
    from opt_ray.train.checkpoint import Loc, read_train_state, resolve

    with store_errors(f"checkpoint {url}", "a read"):
        hf = Loc(url).child("config.json").isfile()
        tok_url = next((Loc(url).child(n).ref() for n in ("tokenizer.json", "vocab.json")
                        if Loc(url).child(n).isfile()), None) if hf else None
    if hf:
        if tok_url is None:
            raise UserError(f"checkpoint {url} has no tokenizer (expected tokenizer.json, or "
                            f"vocab.json + merges.txt, beside its config.json); export it again "
                            f"with --tokenizer TOK")
        return EvalCheckpoint(path=url, kind="hf", weights=url, tokenizer=tok_url, run_dir=None,
                              step=None)

    with store_errors(f"checkpoint {url}", "a read"):
        weights = str(resolve(url))
        loc = Loc(weights)
        run_url = str(loc.parent().parent()) if loc.parent().name == "checkpoints" else None
        step = int(read_train_state(weights).get("step", 0))
        run_dir = None
        if run_url is not None:
            mirror = RunMirror(run_url)
            mirror.pull()
            run_dir = mirror.local
        # The bucket's copy: eval workers on other nodes read it from there, not this
        # node's. Looked for in the bucket itself: a run copied there (`aws s3 sync`) has
        # no mirror for the staging copy to follow.
        tok = (f"{run_url}/tokenizer.json"
               if run_url and Loc(run_url).child("tokenizer.json").isfile() else None)
    if tok is None:
        raise UserError(f"checkpoint {url} has no tokenizer (expected {run_url or url}/tokenizer.json, "
                        f"which `opt-ray train --output URL` keeps); scores need the tokenizer the "
                        f"model was trained with: `opt-ray export {url} --output DIR --tokenizer "
                        f"TOK` ships one")
    return EvalCheckpoint(path=url, kind="run", weights=weights, tokenizer=tok, run_dir=run_dir,
                          step=step, run_url=run_url)


def _tokenizer_in(d: Path) -> Path | None:
    if (d / "tokenizer.json").is_file():
        return d / "tokenizer.json"
    if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
        return d
    return None


def load_model(ckpt: EvalCheckpoint, *, dtype: Any = None, node_cache: bool = False,
               sharded: bool = False):
    """The project's ``OPT`` (eval mode) with the checkpoint's weights.

    A training checkpoint was verified (hashed) once, by ``locate``; it is not hashed
    again here (each worker hashing it read the optimizer's state too: 13b, ~150 GB per
    worker). ``node_cache`` (the eval workers): the weights are read through this node's
    HF build of the checkpoint (``serve.from_run.built``: once per node, in ``dtype``), so
    the workers of a node read the checkpoint once between them, not once each.
    ``sharded`` (a tensor-parallel worker, ``--tp``): only this rank's part of the model
    (``model.hf.from_hf_sharded``), read from the HF build or export."""
    from opt_ray.model.hf import from_hf, from_hf_sharded
    load = from_hf_sharded if sharded else from_hf
    if ckpt.kind == "run" and (node_cache or sharded):
        import torch

        from opt_ray.serve.from_run import RunCheckpoint, built, run_of
        from opt_ray.storage import Loc
        rc = RunCheckpoint(Loc(ckpt.weights).ref(), run_of(Loc(ckpt.weights).ref()).ref(),
                           int(ckpt.step or 0))
        with built(rc, dtype=dtype or torch.float32) as d:
            return load(d, dtype=dtype).eval()
    if ckpt.kind == "hf":
        from opt_ray.run_dir import is_url
        if is_url(ckpt.weights):     # an export in a bucket: fetched to this node once
            from opt_ray.data.artifact_io import fetched
            with fetched(str(ckpt.weights), "checkpoint") as weights:
                return load(weights, dtype=dtype)
        return load(ckpt.weights, dtype=dtype)
    from opt_ray.train.checkpoint import load_model as load_run_model
    return load_run_model(ckpt.weights, dtype=dtype, verified=True)


def load_tokenizer(ckpt: EvalCheckpoint, model_vocab: int | None = None):
    """The checkpoint's ``tokenizers.Tokenizer``; refuses one with more ids than the model."""
    from opt_ray.data.tokenizer import load_tokenizer as load

    tok = load(ckpt.tokenizer)
    n = tok.get_vocab_size(with_added_tokens=True)
    if model_vocab is not None and n > model_vocab:
        raise UserError(f"the tokenizer {ckpt.tokenizer} has {n} ids but the model's vocabulary is "
                        f"{model_vocab}; it is not the tokenizer this model was trained with")
    return tok
