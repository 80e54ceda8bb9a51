"""Serving a training run without exporting it first.

``--checkpoint RUN`` (a run directory or bucket prefix that ``opt-ray train --output``
wrote, or one of its ``checkpoints/step_N``) with no export inside it: each process that
loads it builds the HF directory it reads (``config.json``, safetensors, the run's
``tokenizer.json``: what ``opt-ray export`` writes, by the same ``write_hf``) on its own
node, streaming the weights from the checkpoint a group of tensors at a time
(``ModelStateReader``: tensor-parallel slices merged, the optimizer's state never read).
At 175b an export is a 350 GB copy per export kept somewhere; this is one per node, in the
engine's dtype (a bf16 replica writes and reads half the bytes), made when it is needed.

The build goes into the node's fetch cache (``artifact_io.cached``): the replicas of a
node that start together build once, a build cut short is never taken (and is cleared
by the next), a restart reads the copy already there, and a newer checkpoint's build
replaces the older one. Its key: the run's path or URL and the part (the weights in a
dtype; or only the config and tokenizer, for a front end and the CLI's check, which never
build weights); its version: the step, and the sha256 of the checkpoint's manifest (a
checkpoint re-saved after a rollback gets a new one) and of the tokenizer.

Which checkpoint: the newest committed one (its manifest exists: the commit protocol
writes it last), or the one named. Its files are checked against the manifest's sizes,
not hashed: hashing reads the optimizer's state too (three times the weights in fp32),
on every node that serves it (``opt-ray export`` and ``eval`` hash). The driver resolves
the run once and hands every replica that checkpoint's path, so all of them serve one
step while training goes on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from opt_ray.data.shards import TOKENIZER_FILE as TOKENIZER   # the run's, as `opt-ray train` keeps it
from opt_ray.errors import UserError
from opt_ray.storage import Loc, Ref


@dataclass(frozen=True)
class RunCheckpoint:
    """One committed checkpoint of a training run, as resolved; nothing read yet."""
    ckpt: Ref        # the checkpoint directory (``RUN/checkpoints/step_N``) or its URL
    run: Ref         # the run it belongs to: its tokenizer, the cache's key
    step: int


def run_of(ckpt: Ref) -> Loc:
    """The run directory a checkpoint belongs to (``RUN/checkpoints/step_N`` -> ``RUN``)."""
    parent = Loc(ckpt).parent()
    return parent.parent() if parent.name == "checkpoints" else parent


def find(path: str | Path, what: str = "--checkpoint") -> RunCheckpoint | None:
    """The checkpoint to serve when ``path`` is a training run (its newest committed
    checkpoint), its ``checkpoints/`` directory or one committed checkpoint; None when it
    is none of these. Raises ``UserError`` for a run with no committed checkpoint yet and
    for a checkpoint directory that is not committed or not there."""
    from opt_ray.artifacts import MANIFEST
    from opt_ray.train.checkpoint import STEP_DIR, TRAIN_STATE, committed

    loc = Loc(path)
    with _reading(f"{what} {path}", loc):
        if loc.child(TRAIN_STATE).isfile() or (STEP_DIR.match(loc.name) and
                                               loc.parent().name == "checkpoints" and
                                               loc.parent().isdir()):
            if loc.child(MANIFEST).isfile() and loc.child(TRAIN_STATE).isfile():
                m = STEP_DIR.match(loc.name)
                step = int(m.group(1)) if m else int(_train_state(loc, what).get("step", 0))
                return RunCheckpoint(loc.ref(), run_of(loc.ref()).ref(), step)
            steps = [s for s, _ in committed(loc.parent())]
            state = "not there" if not loc.exists() else "not committed (no manifest.json: " \
                "a save under way or cut short)"
            fix = (f"committed checkpoints of the run: {', '.join(map(str, steps))}; pass "
                   f"one of them, or the run directory {run_of(loc.ref())} for its newest"
                   if steps else "the run has no committed checkpoint yet; serve it once it "
                   "has saved one (--checkpoint-every)")
            raise UserError(f"{what} {path}: this checkpoint is {state}; {fix}")
        root = loc.child("checkpoints")
        if not root.isdir():
            root = loc if loc.name == "checkpoints" and loc.isdir() else None
        if root is None and not loc.child("logbook.jsonl").isfile():   # not a run's
            return None
        found = committed(root) if root is not None else []
    if not found:
        raise UserError(f"{what} {path}: a training run with no committed checkpoint yet; "
                        f"serve it once it has saved one (--checkpoint-every), or pass an "
                        f"export or another run")
    step, ckpt = found[-1]
    return RunCheckpoint(Loc(ckpt).ref(), run_of(ckpt).ref(), step)


def _reading(what: str, loc: Loc):
    """Store errors as one line naming ``what`` (a bucket's); a local disk's are left as
    they are."""
    if loc.local:
        return contextlib.nullcontext()
    from opt_ray.run_dir import store_errors
    return store_errors(what, "a read", "the bucket exists")


def _train_state(ckpt: Loc, what: str) -> dict:
    try:
        return json.loads(ckpt.child("train_state.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{what} {ckpt}: train_state.json is not readable ({e}); serve another "
                        f"checkpoint of the run") from e


def _model_config(rc: RunCheckpoint):
    from opt_ray.config import ConfigError, ModelConfig

    state = _train_state(Loc(rc.ckpt), "--checkpoint")
    try:
        return ModelConfig.from_dict(state["model"])
    except (KeyError, TypeError, ConfigError) as e:
        raise UserError(f"--checkpoint {rc.ckpt}: train_state.json holds no usable model config "
                        f"({type(e).__name__}: {e}); is this an opt-ray training checkpoint?") from e


def check(rc: RunCheckpoint):
    """The checkpoint's ``ModelConfig``, after the CLI's check before Ray starts, reading no weights: every file of the
    checkpoint there at its manifest's size, the model config and the tokenizer usable
    (the small part of the build: config.json and tokenizer.json, nothing more), and the
    checkpoint holding every tensor of that model at its shape (DCP's metadata).
    Raises ``UserError`` naming the file and the fix."""
    from opt_ray.model.hf import expected_shapes
    from opt_ray.serve.loading import load_tokenizer_dir
    from opt_ray.train.checkpoint import ModelStateReader

    _check_files(rc)
    cfg = _model_config(rc)
    with built(rc, weights=False) as small:
        try:
            load_tokenizer_dir(small)
        except UserError as e:
            raise UserError(f"--checkpoint {rc.ckpt}: the run's {TOKENIZER} is not usable ({e}); "
                            f"export the checkpoint with --tokenizer TOK and serve the export") from e
    with _reading(f"--checkpoint {rc.ckpt}", Loc(rc.ckpt)):
        shapes = ModelStateReader(rc.ckpt).shapes
    want = expected_shapes(cfg)
    want.pop("lm_head.weight")        # tied to the embedding; not saved apart
    for k, shape in want.items():
        got = shapes.get(k, (None,))[0]
        if got != shape:
            raise UserError(f"--checkpoint {rc.ckpt}: " + (
                f"no tensor {k!r}" if got is None else f"tensor {k!r} has shape {list(got)}")
                + f" where its train_state.json's model needs {list(shape)}; it is not a whole "
                  f"checkpoint of this model: serve another")
    return cfg


def _check_files(rc: RunCheckpoint) -> None:
    """Every file the checkpoint's manifest lists is there at its size: one listing (a
    bucket) or a stat each, no hashing (see the module docstring)."""
    from opt_ray.artifacts import MANIFEST

    loc = Loc(rc.ckpt)
    with _reading(f"--checkpoint {rc.ckpt}", loc):
        files = json.loads(loc.child(MANIFEST).read_text()).get("files", {})
        if loc.local:
            sizes = {n: Path(loc.path, n).stat().st_size for n in files if Path(loc.path, n).is_file()}
        else:
            loc.fs.invalidate_cache()
            base = loc.path.rstrip("/") + "/"
            sizes = {p[len(base):]: int(i["size"]) for p, i in
                     loc.fs.find(loc.path, detail=True).items() if p.startswith(base)}
    for name, info in sorted(files.items()):
        if sizes.get(name) != int(info["bytes"]):
            state = "missing" if name not in sizes else f"{sizes[name]} bytes, not {info['bytes']}"
            raise UserError(f"--checkpoint {rc.ckpt}: its file {name} is {state} as its "
                            f"{MANIFEST} lists; the checkpoint was damaged after it was "
                            f"committed: serve an earlier one (RUN/checkpoints/step_N)")


@contextlib.contextmanager
def built(rc: RunCheckpoint, *, weights: bool = True, dtype=None,
          progress: bool = False) -> Iterator[Path]:
    """This node's HF directory of the checkpoint ``rc`` (``weights=False``: only its
    config.json and tokenizer.json), built into the fetch cache unless it is there, held
    in use while the ``with`` block runs. ``dtype``: the weights' (default float32)."""
    import torch

    from opt_ray.artifacts import MANIFEST
    from opt_ray.data.artifact_io import cached

    dtype = dtype or torch.float32
    ckpt, run = Loc(rc.ckpt), Loc(rc.run)
    with _reading(f"--checkpoint {rc.ckpt}", ckpt):
        if not ckpt.child(MANIFEST).isfile():
            raise UserError(f"--checkpoint {rc.ckpt}: no longer a committed checkpoint (the "
                            f"run's --keep pruned it, or it is being saved again); serve the "
                            f"run {rc.run} for its newest")
        manifest = ckpt.child(MANIFEST).read_bytes()
        if not run.child(TOKENIZER).isfile():
            raise UserError(f"--checkpoint {rc.ckpt}: the run has no {TOKENIZER} (expected "
                            f"{run.child(TOKENIZER)}, which `opt-ray train` keeps); export the "
                            f"checkpoint with --tokenizer TOK and serve the export")
        tok = run.child(TOKENIZER).read_bytes()
    cfg = _model_config(rc)
    name = str(dtype).removeprefix("torch.")
    version = hashlib.sha256(json.dumps([rc.step, hashlib.sha256(manifest).hexdigest(),
                                         hashlib.sha256(tok).hexdigest()]).encode()).hexdigest()[:16]
    key = [str(rc.run), "weights", name] if weights else [str(rc.run), "config+tokenizer"]

    def make(tmp: Path) -> str:
        if weights:
            return _build(rc, cfg, tok, tmp, dtype, progress=progress)
        from opt_ray.model.hf import CONFIG_NAME, config_to_hf
        tmp.mkdir()
        (tmp / CONFIG_NAME).write_text(json.dumps(config_to_hf(cfg, dtype=dtype), indent=2) + "\n")
        (tmp / TOKENIZER).write_bytes(tok)
        return f"wrote the config and tokenizer of --checkpoint {rc.run} step {rc.step}"

    need = 0
    if weights:
        from opt_ray.config import num_params
        need = num_params(cfg) * torch.empty((), dtype=dtype).element_size()
    with cached(run.name, key, version, make, need=need) as d:
        yield d


def _build(rc: RunCheckpoint, cfg, tok: bytes, tmp: Path, dtype, *, progress: bool) -> str:
    """The HF directory of ``rc`` into ``tmp``, one weight file's tensors in memory at a
    time (``write_hf``); returns the line that reports it."""
    import sys
    import time

    import torch

    from opt_ray.config import num_params
    from opt_ray.model.hf import write_hf
    from opt_ray.train.checkpoint import ModelStateReader

    t0, files, bar = time.monotonic(), [], None
    _check_files(rc)
    if progress:
        from tqdm import tqdm
        total = num_params(cfg) * torch.empty((), dtype=dtype).element_size()
        # A replica's log is a file: a line every 30 s there, not every second.
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"build {Loc(rc.run).name}",
                   mininterval=1.0 if sys.stderr.isatty() else 30.0)

    def on_file(name: str, path: Path) -> None:
        files.append(path.stat().st_size)
        if bar is not None:
            bar.update(files[-1])

    try:
        with _reading(f"--checkpoint {rc.ckpt}", Loc(rc.ckpt)):
            write_hf(cfg, ModelStateReader(rc.ckpt).read, tmp, dtype=dtype, on_file=on_file,
                     extra=lambda d: (d / TOKENIZER).write_bytes(tok))
    finally:
        if bar is not None:
            bar.close()
    n = f"{len(files)} weight file" + ("s" if len(files) != 1 else "")
    return (f"built --checkpoint {rc.run} step {rc.step} ({str(dtype).removeprefix('torch.')}, "
            f"{n}, {sum(files) / 1e6:.1f} MB in {time.monotonic() - t0:.1f} s) from {rc.ckpt}")
