"""Sharded training checkpoints: DCP shards, atomic commit, checksums, retention, resharding.

Layout of one checkpoint, ``RUN_DIR/checkpoints/step_00000100/``::

    tp0/ ... tpN/        torch.distributed.checkpoint of {"model", "optim"}, one per
                         tensor-parallel rank, written by that rank's data-parallel group
    rng/rank{r}.pt       every rank's RNG states (torch, numpy, python, cuda)
    train_state.json     step, sampler, LR schedule, loss scaler, clip, guard, layout
    manifest.json        per-file sha256 + bytes; written last

All ranks write into ``.tmp-step_00000100/``; once every shard is on disk global rank 0
writes the manifest and renames the directory into place (``os.replace``, atomic). So a
checkpoint counts only once its name has no ``.tmp-`` prefix, and a gang killed while
saving leaves nothing that could be mistaken for a checkpoint (the leftover is removed at
the next start). On load, the newest committed checkpoint whose files match the manifest
is used; one that fails is skipped and reported (``checkpoint_corrupt``).

Resharding. DCP stores global tensor shapes, so a checkpoint loads into any number of
data-parallel ranks. A different tensor-parallel degree is handled by reading every old
TP rank's tensors whole, concatenating each split tensor along its known dimension
(``merge_tp_shards``) and cutting this rank's slice (``split_tp_state``); the optimizer's
moment tensors have their parameter's shape and are resharded the same way.

Requires a file system every rank sees (one machine, or a shared mount on a cluster).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from opt_ray.artifacts import sha256_file, write_json_atomic
from opt_ray.errors import UserError

MANIFEST = "manifest.json"
TRAIN_STATE = "train_state.json"
_STEP_RE = re.compile(r"^step_(\d{8})$")


class CheckpointError(UserError):
    """No usable checkpoint where one was asked for, or one that does not fit the model."""


def step_name(step: int) -> str:
    return f"step_{step:08d}"


# --------------------------------------------------------------------------------------
# Finding and verifying checkpoints (plain files; no process group needed)
# --------------------------------------------------------------------------------------

def committed(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Committed checkpoints under ``root`` (name ``step_N`` with a manifest), oldest first."""
    root = Path(root)
    out = []
    if root.is_dir():
        for p in root.iterdir():
            m = _STEP_RE.match(p.name)
            if m and (p / MANIFEST).is_file():
                out.append((int(m.group(1)), p))
    return sorted(out)


def verify(ckpt: str | os.PathLike) -> str | None:
    """None when every file listed in the manifest is present with its sha256 (and no
    unlisted shard file exists), else the reason it is not usable."""
    ckpt = Path(ckpt)
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"unreadable {MANIFEST}: {e}"
    files = manifest.get("files", {})
    for name, info in files.items():
        p = ckpt / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != info["bytes"] or sha256_file(p) != info["sha256"]:
            return f"{name} fails its sha256 check"
    return None


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint directory from a run directory (its newest valid checkpoint), a
    ``checkpoints/`` directory, or a checkpoint itself. Raises ``CheckpointError``."""
    p = Path(path)
    if (p / MANIFEST).is_file() and (p / TRAIN_STATE).is_file():
        reason = verify(p)
        if reason:
            raise CheckpointError(f"checkpoint {p} is corrupt ({reason}); use an earlier one "
                                  f"from {p.parent}")
        return p
    root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    for _, ckpt in reversed(committed(root)):
        if verify(ckpt) is None:
            return ckpt
    raise CheckpointError(f"no valid checkpoint found at {p}; pass a run directory written by "
                          f"`opt-ray train` or one of its checkpoints/step_N directories")


def read_train_state(ckpt: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(ckpt) / TRAIN_STATE).read_text())


# --------------------------------------------------------------------------------------
# RNG states
# --------------------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --------------------------------------------------------------------------------------
# The manager (collective: every rank calls save/load)
# --------------------------------------------------------------------------------------

class Checkpointer:
    """``save(step, ...)`` / ``load(ckpt, ...)`` / ``latest_valid()`` for one gang.

    ``dp_group`` is the data-parallel group this rank's model is sharded over;
    ``tp_size``/``tp_rank`` its tensor-parallel layout. Every rank must call ``save``,
    ``load`` and ``latest_valid`` together (they contain barriers).
    """

    def __init__(self, root: str | os.PathLike, *, keep: int = 2, milestone_every: int | None = None,
                 dp_group=None, tp_size: int = 1, tp_rank: int = 0,
                 on_event: Callable[..., Any] | None = None):
        if keep < 2:
            raise UserError(f"--keep must be >= 2 (the previous checkpoint is the fallback when the "
                            f"newest is corrupt), got {keep}")
        self.root = Path(root)
        self.keep = keep
        self.milestone_every = milestone_every
        self.dp_group = dp_group
        self.tp_size = tp_size
        self.tp_rank = tp_rank
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.on_event = on_event or (lambda kind, **kw: None)

    # -- helpers --------------------------------------------------------------------------
    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def _broadcast(self, obj: Any) -> Any:
        if not dist.is_initialized():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def available_steps(self) -> list[int]:
        return [s for s, _ in committed(self.root)]

    def clean_partial(self) -> None:
        """Remove leftovers of saves that never committed (rank 0 only; call at start)."""
        if self.rank == 0 and self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith(".tmp-") or p.name.startswith(".old-"):
                    shutil.rmtree(p, ignore_errors=True)
                    self.on_event("checkpoint_partial_removed", path=str(p))
        self._barrier()

    # -- save -----------------------------------------------------------------------------
    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             train_state: dict[str, Any], *, chaos=None, milestone: bool = False) -> Path:
        """Write and commit the checkpoint of ``step``; returns its directory."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        t0 = time.time()
        final = self.root / step_name(step)
        tmp = self.root / f".tmp-{step_name(step)}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)
        self._barrier()

        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp / f"tp{self.tp_rank}",
                 process_group=self.dp_group)
        torch.save(rng_state(), tmp / "rng" / f"rank{self.rank}.pt")
        if self.rank == 0:
            write_json_atomic(tmp / TRAIN_STATE, {**train_state, "step": step,
                                                   "tp_size": self.tp_size})
        self._barrier()
        if chaos is not None:
            chaos.during_save(step)  # drills: die with the shards written, not committed

        if self.rank == 0:
            files = sorted(p for p in tmp.rglob("*") if p.is_file())
            manifest = {
                "kind": "checkpoint", "step": step, "milestone": milestone,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "files": {str(p.relative_to(tmp)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                          for p in files},
            }
            write_json_atomic(tmp / MANIFEST, manifest)
            if final.exists():  # a re-save of a step after a fallback or rollback
                old = self.root / f".old-{step_name(step)}"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            _fsync_dir(self.root)
            self._retain()
            nbytes = sum(f["bytes"] for f in manifest["files"].values())
            self.on_event("checkpoint_saved", step=step, path=str(final), bytes=nbytes,
                          seconds=round(time.time() - t0, 3), milestone=milestone)
        self._barrier()
        return final

    def _retain(self) -> None:
        """Keep the newest ``keep`` checkpoints plus milestones; delete the rest."""
        ckpts = committed(self.root)
        newest = {s for s, _ in ckpts[-self.keep:]}
        for step, path in ckpts:
            if step in newest:
                continue
            try:
                milestone = json.loads((path / MANIFEST).read_text()).get("milestone", False)
            except (OSError, json.JSONDecodeError):
                milestone = False
            if not milestone:
                shutil.rmtree(path, ignore_errors=True)

    def discard(self, steps: list[int]) -> None:
        """Delete checkpoints (the divergence guard's invalidated trajectory); rank 0."""
        if self.rank == 0:
            for s in steps:
                shutil.rmtree(self.root / step_name(s), ignore_errors=True)
        self._barrier()

    def rollback_to(self, step: int) -> Path:
        """Make the checkpoint at ``step`` the newest: every newer one is moved aside to
        ``RUN_DIR/abandoned/`` (kept, never deleted) so that a later restart cannot
        resume past the rollback. Rank 0 acts; every rank gets the path."""
        choice: str | None = None
        error: str | None = None
        if self.rank == 0:
            steps = dict(committed(self.root))
            ckpt = steps.get(step)
            reason = verify(ckpt) if ckpt is not None else "no such checkpoint"
            if reason is not None:
                error = (f"--resume-from {step}: {reason}; valid checkpoints: "
                         f"{[s for s, p in steps.items() if verify(p) is None] or 'none'}")
            else:
                aside = self.root.parent / "abandoned"
                newer = [s for s in steps if s > step]
                for s in newer:
                    aside.mkdir(exist_ok=True)
                    os.replace(steps[s], aside / f"{step_name(s)}-{int(time.time())}")
                self.on_event("rollback", step=step, to_step=step, requested=True,
                              moved_aside=newer, path=str(ckpt))
                choice = str(ckpt)
        choice, error = self._broadcast((choice, error))
        if error:
            raise CheckpointError(error)
        return Path(choice)

    # -- find -----------------------------------------------------------------------------
    def latest_valid(self, *, max_step: int | None = None) -> Path | None:
        """The newest committed checkpoint (at or before ``max_step``) that passes its
        checksums; corrupt ones are reported and skipped. Rank 0 decides for everyone."""
        choice = None
        if self.rank == 0:
            for step, path in reversed(committed(self.root)):
                if max_step is not None and step > max_step:
                    continue
                reason = verify(path)
                if reason is None:
                    choice = str(path)
                    break
                self.on_event("checkpoint_corrupt", step=step, path=str(path), reason=reason)
        choice = self._broadcast(choice)
        return Path(choice) if choice else None

    # -- load -----------------------------------------------------------------------------
    def load(self, ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             *, restore_rng: bool = True) -> dict[str, Any]:
        """Load model and optimizer (resharding as needed) and this rank's RNG states;
        returns the train state (step, sampler, schedule, ...)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        state = read_train_state(ckpt)
        saved_tp = int(state.get("tp_size", 1))
        if saved_tp == self.tp_size:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            sd = {"model": model_sd, "optim": optim_sd}
            dcp.load(sd, checkpoint_id=ckpt / f"tp{self.tp_rank}", process_group=self.dp_group)
            set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        else:
            self._load_resharded_tp(ckpt, saved_tp, model, optimizer)
        rng_file = ckpt / "rng" / f"rank{self.rank}.pt"
        if restore_rng and rng_file.is_file():
            # Another world size has no saved state for new ranks; they keep their seed
            # (the loop reseeds dropout per step, so this only matters for extra users).
            set_rng_state(torch.load(rng_file, weights_only=False))
        self._barrier()
        return state

    def _load_resharded_tp(self, ckpt: Path, saved_tp: int, model, optimizer) -> None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                             set_model_state_dict, set_optimizer_state_dict)

        from opt_ray.model.parallel import merge_tp_shards, split_tp_state

        shards = [read_full_tensors(ckpt / f"tp{j}") for j in range(saved_tp)]
        model_full = merge_tp_shards([_section(s, "model.") for s in shards])
        model_local = split_tp_state(model_full, self.tp_size, self.tp_rank)
        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
        set_model_state_dict(model, model_local, options=opts)

        # Optimizer state: optim.state.<fqn>.<name>; the moments have the parameter's shape.
        per_name: dict[str, list[dict[str, torch.Tensor]]] = {}
        for j, s in enumerate(shards):
            for key, t in _section(s, "optim.state.").items():
                fqn, _, name = key.rpartition(".")
                per_name.setdefault(name, [{} for _ in shards])[j][fqn] = t
        state: dict[str, dict[str, torch.Tensor]] = {}
        for name, per_shard in per_name.items():
            if all(t.dim() == 0 for t in per_shard[0].values()):
                local = per_shard[0]  # Adam's step counters: scalars, equal on every rank
            else:
                local = split_tp_state(merge_tp_shards(per_shard), self.tp_size, self.tp_rank)
            for fqn, t in local.items():
                state.setdefault(fqn, {})[name] = t
        groups = get_optimizer_state_dict(model, optimizer)["param_groups"]
        set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups},
                                 options=opts)


def read_full_tensors(dcp_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP checkpoint, whole (shards gathered), keyed by its flattened
    name (``model.<fqn>``, ``optim.state.<fqn>.<name>``). Local, no process group."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(dcp_dir))
    meta = reader.read_metadata()
    sd = {k: torch.empty(m.size, dtype=m.properties.dtype)
          for k, m in meta.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}
    dcp.load(sd, storage_reader=reader, no_dist=True)
    return sd


def _section(flat: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}


def load_model_state(ckpt: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The full (unsharded, TP-merged) model state dict of a checkpoint, for export, eval
    and tests. Keys as in ``OPT(cfg).state_dict()``."""
    from opt_ray.model.parallel import merge_tp_shards

    ckpt = Path(ckpt)
    tp = int(read_train_state(ckpt).get("tp_size", 1))
    shards = [_section(read_full_tensors(ckpt / f"tp{j}"), "model.") for j in range(tp)]
    return merge_tp_shards(shards) if tp > 1 else shards[0]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_model(ckpt: str | os.PathLike, *, dtype: torch.dtype | None = None):
    """An ``OPT`` (plain, unsharded) with the weights of a training checkpoint; ``ckpt``
    may be a run directory (its newest valid checkpoint) or a checkpoint. For export/eval."""
    from opt_ray.config import ModelConfig
    from opt_ray.model.opt import OPT

    path = resolve(ckpt)
    cfg = ModelConfig.from_dict(read_train_state(path)["model"])
    sd = load_model_state(path)
    with torch.device("meta"):
        model = OPT(cfg)
    model.load_state_dict(sd, strict=False, assign=True)
    model.lm_head.weight = model.decoder.embed_tokens.weight  # re-tie after assign
    missing = [k for k, v in model.state_dict().items() if v.is_meta]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing[:3]}...; it is not a full "
                              f"opt-ray training checkpoint")
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
