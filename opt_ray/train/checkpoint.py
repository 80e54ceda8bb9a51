"""Sharded training checkpoints: DCP shards, per-rank checksums, commit marker, retention,
resharding, on a local file system or object storage.

Layout of one checkpoint, ``CKPT_ROOT/step_00000100/`` (``CKPT_ROOT`` is
``RUN_DIR/checkpoints`` or any fsspec URL such as ``s3://bucket/prefix``)::

    tp0/ ... tpN/        torch.distributed.checkpoint of {"model", "optim"}, one per
                         tensor-parallel rank, written by that rank's data-parallel group
    rng/rank{r}.json     every rank's RNG states (torch, numpy, python, cuda) as JSON
    train_state.json     step, sampler, LR schedule, loss scaler, clip, guard, layout
    manifest.json        per-file sha256 + bytes; written last: the commit marker

Commit protocol. Every rank writes its own shard files and RNG file, then hashes exactly
the files it wrote (in parallel with every other rank, so no rank hashes the whole state
inside a collective timeout) and sends the small ``{name: sha256, bytes}`` list to rank 0,
which writes ``manifest.json`` last (one atomic rename on a local disk, one PUT on object
storage). So a checkpoint counts only once its manifest exists, and a gang killed while
saving leaves a directory without one, which the next start removes
(``checkpoint_partial_removed``). On load the newest committed checkpoint whose files
match the manifest is used, each rank checking its share of the files; one that fails
is skipped and reported (``checkpoint_corrupt``).

Asynchronous save (``async_save=True``): DCP's ``async_save`` stages the state and writes
it in the background while training continues; the checksum-and-commit step runs at
``wait()``, which ``save`` calls before starting the next checkpoint and the loop calls
before it finishes. Until then the checkpoint is not committed and cannot be resumed from.

No code from a checkpoint runs on load: DCP's pickled ``.metadata`` is read with a
restricted unpickler and its non-tensor values with ``weights_only=True``
(``opt_ray.train.safe_pickle``); RNG and trainer state are JSON.

Resharding. DCP stores global tensor shapes, so a checkpoint loads into any number of
data-parallel ranks. A different tensor-parallel degree is handled by reading every old
TP rank's tensors whole, concatenating each split tensor along its known dimension
(``merge_tp_shards``) and cutting this rank's slice (``split_tp_state``); the optimizer's
moment tensors have their parameter's shape and are resharded the same way.

Storage: a local directory every rank sees (one machine or a shared mount) or object
storage through fsspec (``s3://`` with the standard AWS environment variables and
``AWS_ENDPOINT_URL``; DCP's ``FsspecWriter``/``FsspecReader``).
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist

from opt_ray.errors import UserError
from opt_ray.artifacts import MANIFEST
from opt_ray.storage import Loc, Ref, _loc  # noqa: F401 (importers use checkpoint.Loc)

TRAIN_STATE = "train_state.json"
#: A checkpoint holding this file is never pruned (``pin``).
PIN = ".pinned"
#: A checkpoint directory's name, ``step_NNNNNNNN``.
STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(UserError):
    """No usable checkpoint where one was asked for, or one that does not fit the model."""


def step_name(step: int) -> str:
    return f"step_{step:08d}"


# --------------------------------------------------------------------------------------
# Where checkpoints live: a local directory or an fsspec URL, one small interface
# --------------------------------------------------------------------------------------

def join(ref: Ref, *names: str) -> Ref:
    """``ref / name`` for a local path or a URL."""
    return _loc(ref).child(*names).ref()


# --------------------------------------------------------------------------------------
# Finding and verifying checkpoints (plain files; no process group needed)
# --------------------------------------------------------------------------------------

def committed(root: str | os.PathLike) -> list[tuple[int, Ref]]:
    """Committed checkpoints under ``root`` (name ``step_N`` with a manifest), oldest first."""
    root_loc = _loc(root)
    out = []
    for name in root_loc.names():
        m = STEP_DIR.match(name)
        if m and root_loc.child(name, MANIFEST).isfile():
            out.append((int(m.group(1)), root_loc.child(name).ref()))
    return sorted(out)


def _manifest(ckpt: Loc) -> dict[str, Any]:
    return json.loads(ckpt.child(MANIFEST).read_text())


def _check_file(ckpt: Loc, name: str, info: dict[str, Any]) -> str | None:
    f = ckpt.child(name)
    if not f.isfile():
        return f"{name} is missing"
    if f.size() != info["bytes"] or f.sha256() != info["sha256"]:
        return f"{name} fails its sha256 check"
    return None


#: Files of a checkpoint one process hashes at once (``verify``).
VERIFY_THREADS = min(16, os.cpu_count() or 1)


def verify(ckpt: str | os.PathLike, *, share: tuple[int, int] = (0, 1)) -> str | None:
    """None when every file listed in the manifest is present with its sha256, else the
    reason it is not usable. ``share=(i, n)`` checks only every n-th file from the i-th
    (the ranks of a gang split the work and combine the answers)."""
    ckpt = _loc(ckpt)
    try:
        files = _manifest(ckpt).get("files", {})
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"unreadable {MANIFEST}: {e}"
    i, n = share
    names = sorted(files)[i::n]
    # Files hashed concurrently (hashlib and reads release the GIL): a checkpoint has a
    # file or more per rank, and one process verifying a 175b checkpoint (2 TB with the
    # optimizer's state: export, eval, a resume's pre-check) would hash it serially.
    from concurrent.futures import ThreadPoolExecutor
    pool = ThreadPoolExecutor(max(1, min(VERIFY_THREADS, len(names))))
    try:
        for reason in pool.map(lambda name: _check_file(ckpt, name, files[name]), names):
            if reason:
                return reason
        return None
    finally:
        pool.shutdown(cancel_futures=True)   # a bad file: the rest need not be hashed


def resolve(path: str | os.PathLike) -> Ref:
    """A checkpoint from a run directory (its newest valid checkpoint), a ``checkpoints/``
    directory, or a checkpoint itself; local or a URL. Raises ``CheckpointError``."""
    p = _loc(path)
    if p.child(MANIFEST).isfile() and p.child(TRAIN_STATE).isfile():
        reason = verify(p)
        if reason:
            raise CheckpointError(f"checkpoint {p} is corrupt ({reason}); use an earlier one "
                                  f"from {p.parent()}")
        return p.ref()
    root = p.child("checkpoints") if p.child("checkpoints").isdir() else p
    for _, ckpt in reversed(committed(root)):
        if verify(ckpt) is None:
            return ckpt
    raise CheckpointError(f"no valid checkpoint found at {p}; pass a run directory written by "
                          f"`opt-ray train` or one of its checkpoints/step_N directories")


def pin(root: str | os.PathLike, step: int, reason: str) -> bool:
    """Keep the committed checkpoint of ``step`` under ``root`` (a ``checkpoints``
    directory or prefix) from ``--keep``'s pruning, for good: a rollback asked for by hand
    pins its target before it stops the gang, which would otherwise go on saving and may
    prune that very checkpoint before the rolled-back run starts. False if there is no
    committed checkpoint of that step."""
    loc = _loc(root).child(step_name(step))
    if not loc.child(MANIFEST).exists():
        return False
    loc.child(PIN).write_text(json.dumps({"reason": reason, "time": time.time()}) + "\n")
    return True


def read_train_state(ckpt: str | os.PathLike) -> dict[str, Any]:
    return json.loads(_loc(ckpt).child(TRAIN_STATE).read_text())


# --------------------------------------------------------------------------------------
# RNG states (JSON in the checkpoint: nothing to unpickle)
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


def rng_to_json(state: dict[str, Any]) -> dict[str, Any]:
    """``rng_state()`` as plain JSON (byte tensors base64, integer lists as lists)."""
    def b64(t: torch.Tensor) -> str:
        return base64.b64encode(t.numpy().tobytes()).decode()

    kind, keys, pos, has_gauss, cached = state["numpy"]
    version, internal, gauss_next = state["python"]
    out = {"torch": b64(state["torch"]),
           "numpy": {"kind": kind, "keys": [int(k) for k in keys], "pos": int(pos),
                     "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
           "python": {"version": version, "state": list(internal), "gauss_next": gauss_next}}
    if "cuda" in state:
        out["cuda"] = b64(state["cuda"])
    return out


def rng_from_json(d: dict[str, Any]) -> dict[str, Any]:
    def tensor(s: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()

    n = d["numpy"]
    state = {"torch": tensor(d["torch"]),
             "numpy": (n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                       n["cached_gaussian"]),
             "python": (d["python"]["version"], tuple(d["python"]["state"]), d["python"]["gauss_next"])}
    if "cuda" in d:
        state["cuda"] = tensor(d["cuda"])
    return state


# --------------------------------------------------------------------------------------
# The manager (collective: every rank calls save/load)
# --------------------------------------------------------------------------------------

@dataclass
class _Pending:
    """A save whose shards are (being) written but not yet committed."""
    step: int
    dir: Loc
    t0: float
    milestone: bool
    future: Any = None  # DCP async_save's future, None for a synchronous save


class Checkpointer:
    """``save(step, ...)`` / ``load(ckpt, ...)`` / ``latest_valid()`` / ``wait()`` for one gang.

    ``root`` is a local directory or an fsspec URL (``s3://bucket/prefix``). ``dp_group``
    is the data-parallel group this rank's model is sharded over; ``tp_size``/``tp_rank``
    its tensor-parallel layout. Every rank must call ``save``, ``wait``, ``load``,
    ``latest_valid``, ``rollback_to``, ``discard`` and ``clean_partial`` together (they
    contain collectives).
    """

    def __init__(self, root: str | os.PathLike, *, keep: int = 2, milestone_every: int | None = None,
                 dp_group=None, tp_size: int = 1, tp_rank: int = 0,
                 on_event: Callable[..., Any] | None = None, async_save: bool = False):
        if keep < 2:
            raise UserError(f"--keep must be >= 2 (the previous checkpoint is the fallback when the "
                            f"newest is corrupt), got {keep}")
        self.loc = _loc(root)
        self.root = self.loc.ref()
        self.keep = keep
        self.milestone_every = milestone_every
        self.dp_group = dp_group
        self.tp_size = tp_size
        self.tp_rank = tp_rank
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.dp_rank = dist.get_rank(dp_group) if dp_group is not None and dist.is_initialized() else (
            self.rank // tp_size)
        self.async_save = async_save
        self.on_event = on_event or (lambda kind, **kw: None)
        self._pending: _Pending | None = None

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

    def _gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` on every rank (small objects only)."""
        if not dist.is_initialized():
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def available_steps(self) -> list[int]:
        return [s for s, _ in committed(self.loc)]

    def clean_partial(self) -> None:
        """Remove leftovers of saves that never committed (rank 0 acts; call at start)."""
        if self.rank == 0:
            for name in self.loc.names():
                partial = name.startswith((".tmp-", ".old-")) or (
                    STEP_DIR.match(name) and not self.loc.child(name, MANIFEST).isfile())
                if partial:
                    self.loc.child(name).rm()
                    self.on_event("checkpoint_partial_removed", path=str(self.loc.child(name)))
        self._barrier()

    # -- save -----------------------------------------------------------------------------
    def _writer(self, loc: Loc):
        from torch.distributed.checkpoint import FileSystemWriter

        if loc.local:
            return FileSystemWriter(loc.path)
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter
        return FsspecWriter(str(loc))

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             train_state: dict[str, Any], *, chaos=None, milestone: bool = False) -> Ref:
        """Write the checkpoint of ``step`` and commit it (with ``async_save``: start
        writing it; ``wait()`` commits). Returns its location."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        self.wait()  # one save in flight at most: the previous one commits first
        t0 = time.time()
        d = self.loc.child(step_name(step))
        if self.rank == 0:
            # A re-save of a step (after a rollback): un-commit it before touching its files.
            d.rm_artifact()
            d.child("rng").mkdirs()
        self._barrier()

        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        writer = self._writer(d.child(f"tp{self.tp_rank}"))
        future = None
        if self.async_save:
            future = dcp.async_save(state, storage_writer=writer, process_group=self.dp_group)
        else:
            dcp.save(state, storage_writer=writer, process_group=self.dp_group)
        d.child("rng", f"rank{self.rank}.json").write_text(json.dumps(rng_to_json(rng_state())))
        if self.rank == 0:
            d.child(TRAIN_STATE).write_text(json.dumps(
                {**train_state, "step": step, "tp_size": self.tp_size}, indent=2, sort_keys=True,
                default=str))
        self._pending = _Pending(step, d, t0, milestone, future)
        if not self.async_save:
            self.wait(chaos=chaos)
        return d.ref()

    def _my_files(self, d: Loc) -> list[str]:
        """The files of checkpoint ``d`` that this rank wrote."""
        tp = f"tp{self.tp_rank}"
        mine = d.glob(f"{tp}/__{self.dp_rank}_*.distcp")
        if self.dp_rank == 0:
            mine.append(f"{tp}/.metadata")
        mine.append(f"rng/rank{self.rank}.json")
        if self.rank == 0:
            mine.append(TRAIN_STATE)
        return mine

    def wait(self, *, chaos=None) -> Ref | None:
        """Finish the save in flight: wait for its shards, checksum each rank's own files
        in parallel, and commit (rank 0 writes the manifest). Collective; no-op if none."""
        p, self._pending = self._pending, None
        if p is None:
            return None
        if p.future is not None:
            p.future.result()
        mine = {name: {"sha256": p.dir.child(name).sha256(), "bytes": p.dir.child(name).size()}
                for name in self._my_files(p.dir)}
        self._barrier()
        if chaos is not None:
            chaos.during_save(p.step)  # drills: die with the shards written, not committed
        everyone = self._gather(mine)
        if self.rank == 0:
            files: dict[str, Any] = {}
            for part in everyone:
                files.update(part)
            manifest = {
                "kind": "checkpoint", "step": p.step, "milestone": p.milestone,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": files,
            }
            p.dir.child(MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
            if p.dir.local:
                _fsync_dir(Path(p.dir.path).parent)
            self._retain()
            nbytes = sum(f["bytes"] for f in files.values())
            self.on_event("checkpoint_saved", step=p.step, path=str(p.dir), bytes=nbytes,
                          seconds=round(time.time() - p.t0, 3), milestone=p.milestone)
        self._barrier()
        return p.dir.ref()

    def close(self) -> None:
        """Commit any save in flight (collective)."""
        self.wait()

    def _retain(self) -> None:
        """Keep the newest ``keep`` checkpoints plus milestones and pinned ones (``pin``);
        delete the rest."""
        ckpts = committed(self.loc)
        newest = {s for s, _ in ckpts[-self.keep:]}
        for step, ref in ckpts:
            if step in newest:
                continue
            loc = _loc(ref)
            try:
                milestone = _manifest(loc).get("milestone", False)
            except (OSError, json.JSONDecodeError):
                milestone = False
            if not milestone and not loc.child(PIN).exists():
                loc.rm_artifact()  # un-committed first: a half-deleted dir is not a checkpoint

    def discard(self, steps: list[int]) -> None:
        """Delete checkpoints (the divergence guard's invalidated trajectory); rank 0."""
        if self.rank == 0:
            for s in steps:
                self.loc.child(step_name(s), MANIFEST).rm()
                self.loc.child(step_name(s)).rm()
        self._barrier()

    def _verify_parallel(self, ckpt: Loc) -> str | None:
        """``verify`` with the files split over the ranks; every rank gets the answer."""
        reasons = self._gather(verify(ckpt, share=(self.rank, self.world)))
        return next((r for r in reasons if r is not None), None)

    def rollback_to(self, step: int) -> Ref:
        """Make the checkpoint at ``step`` the newest: every newer one is moved aside to
        ``abandoned/`` beside the checkpoint root (kept, never deleted) so that a later
        restart cannot resume past the rollback. Every rank gets the location."""
        steps = self._broadcast(dict(committed(self.loc)) if self.rank == 0 else None)
        ckpt = steps.get(step)
        reason = self._verify_parallel(_loc(ckpt)) if ckpt is not None else "no such checkpoint"
        if reason is not None:
            valid = [s for s, p in steps.items() if s != step and verify(p) is None] if self.rank == 0 else []
            raise CheckpointError(f"--resume-from {step}: {reason}; valid checkpoints: "
                                  f"{self._broadcast(valid) or 'none'}")
        if self.rank == 0:
            aside = self.loc.parent().child("abandoned")
            newer = [s for s in steps if s > step]
            for s in newer:
                aside.mkdirs()
                _loc(steps[s]).move_to(aside.child(f"{step_name(s)}-{int(time.time())}"))
            self.on_event("rollback", step=step, to_step=step, requested=True,
                          moved_aside=newer, path=str(ckpt))
        self._barrier()
        return ckpt

    # -- find -----------------------------------------------------------------------------
    def latest_valid(self, *, max_step: int | None = None) -> Ref | None:
        """The newest committed checkpoint (at or before ``max_step``) that passes its
        checksums, every rank checking its share of the files; corrupt ones are reported
        and skipped."""
        ckpts = self._broadcast([(s, str(r)) for s, r in committed(self.loc)] if self.rank == 0 else None)
        for step, ref in reversed(ckpts):
            if max_step is not None and step > max_step:
                continue
            loc = Loc(ref)
            reason = self._verify_parallel(loc)
            if reason is None:
                return loc.ref()
            if self.rank == 0:
                self.on_event("checkpoint_corrupt", step=step, path=ref, reason=reason)
        return None

    # -- load -----------------------------------------------------------------------------
    def load(self, ckpt: Ref, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             *, restore_rng: bool = True) -> dict[str, Any]:
        """Load model and optimizer (resharding as needed) and this rank's RNG states;
        returns the train state (step, sampler, schedule, ...)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        from opt_ray.train.safe_pickle import dcp_load, reader

        loc = _loc(ckpt)
        state = read_train_state(loc)
        saved_tp = int(state.get("tp_size", 1))
        if saved_tp == self.tp_size:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            sd = {"model": model_sd, "optim": optim_sd}
            rd = reader(str(loc.child(f"tp{self.tp_rank}")))
            # Read (safely) here first: inside dcp.load a refusal would come back wrapped
            # in DCP's CheckpointException instead of the one-line UnsafeCheckpointError.
            rd.read_metadata()
            dcp_load(sd, storage_reader=rd, process_group=self.dp_group)
            set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        else:
            self._load_resharded_tp(loc, saved_tp, model, optimizer)
        rng_file = loc.child("rng", f"rank{self.rank}.json")
        if restore_rng and rng_file.isfile():
            # Another world size has no saved state for new ranks; they keep their seed
            # (the loop reseeds dropout per step, so this only matters for extra users).
            set_rng_state(rng_from_json(json.loads(rng_file.read_text())))
        self._barrier()
        return state

    def _load_resharded_tp(self, ckpt: Loc, saved_tp: int, model, optimizer) -> None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                             set_model_state_dict, set_optimizer_state_dict)

        from opt_ray.model.parallel import merge_tp_shards, split_tp_state

        shards = [read_full_tensors(ckpt.child(f"tp{j}").ref()) for j in range(saved_tp)]
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
    name (``model.<fqn>``, ``optim.state.<fqn>.<name>``). Local, no process group. The
    metadata is read with the restricted unpickler."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from opt_ray.train.safe_pickle import dcp_load, reader

    rd = reader(str(dcp_dir))
    meta = rd.read_metadata()
    sd = {k: torch.empty(m.size, dtype=m.properties.dtype)
          for k, m in meta.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}
    dcp_load(sd, storage_reader=rd, no_dist=True)
    return sd


def _section(flat: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}


class ModelStateReader:
    """The model weights of a training checkpoint, whole (data-parallel shards gathered,
    tensor-parallel slices merged), read some tensors at a time: never the optimizer's
    state (twice the weights again, in fp32), and never more of the model than the
    tensors asked for. ``shapes`` gives every tensor's full shape and dtype (from the
    checkpoint's metadata, nothing read), so an exporter can plan its files before it
    reads. Keys as in ``OPT(cfg).state_dict()``. Local, no process group."""

    def __init__(self, ckpt: str | os.PathLike):
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        from opt_ray.model.parallel import _tp_dim
        from opt_ray.train.safe_pickle import reader

        self.loc = _loc(ckpt)
        self.tp = int(read_train_state(self.loc).get("tp_size", 1))
        self._parts = [self.loc.child(f"tp{j}").ref() for j in range(self.tp)]
        metas = [reader(str(p)).read_metadata().state_dict_metadata for p in self._parts]
        self._slices: list[dict[str, Any]] = [
            {k[len("model."):]: m for k, m in meta.items()
             if k.startswith("model.") and isinstance(m, TensorStorageMetadata)} for meta in metas]
        self.shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for k, m in self._slices[0].items():
            shape, dim = list(m.size), _tp_dim(k)
            if dim is not None and self.tp > 1:
                shape[dim] = sum(s[k].size[dim] for s in self._slices)
            self.shapes[k] = (tuple(shape), m.properties.dtype)

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """The tensors ``keys``, whole: one partial DCP load per tensor-parallel part,
        each reading only the byte ranges of those tensors."""
        from opt_ray.model.parallel import merge_tp_shards
        from opt_ray.train.safe_pickle import dcp_load, reader

        keys = list(keys)
        unknown = [k for k in keys if k not in self.shapes]
        if unknown:
            raise CheckpointError(f"checkpoint {self.loc} has no tensor {unknown[0]!r}")
        parts = []
        for part, slices in zip(self._parts, self._slices):
            sd = {f"model.{k}": torch.empty(slices[k].size, dtype=slices[k].properties.dtype)
                  for k in keys}
            if sd:
                dcp_load(sd, storage_reader=reader(str(part)), no_dist=True)
            parts.append(_section(sd, "model."))
        return merge_tp_shards(parts) if self.tp > 1 else parts[0]


def load_model_state(ckpt: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The full (unsharded, TP-merged) model state dict of a checkpoint, for export, eval
    and tests. Keys as in ``OPT(cfg).state_dict()``. The optimizer's state is not read."""
    r = ModelStateReader(ckpt)
    return r.read(r.shapes)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_model(ckpt: str | os.PathLike, *, dtype: torch.dtype | None = None,
               verified: bool = False):
    """An ``OPT`` (plain, unsharded) with the weights of a training checkpoint; ``ckpt``
    may be a run directory (its newest valid checkpoint) or a checkpoint. For export/eval.
    ``verified``: ``ckpt`` is a checkpoint the caller has ``resolve``d (hashed) already;
    hashing it again reads the optimizer's state too (three times the weights in fp32)."""
    from opt_ray.config import ModelConfig
    from opt_ray.model.opt import OPT

    path = _loc(ckpt).ref() if verified else resolve(ckpt)
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
