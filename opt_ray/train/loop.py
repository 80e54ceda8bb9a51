"""The training loop: build, train, close. Runs on any ``torch.distributed`` gang.

``train(cfg)`` is what every worker of the gang runs. It needs an initialised process
group (Ray Train's ``TorchTrainer`` makes one; so does ``torchrun``; without one a
single-process gloo group is created), and nothing of Ray: the Ray touch points come in
through ``hooks`` (``actors/train.py``).

One optimizer step, the paper's recipe (../shared/OPT_FACTS.md):
  1. the sampler hands this data-parallel rank its slice of the global batch, which is
     the recipe's exactly (``batch_tokens`` / seq_len rows whatever the world size;
     gradient accumulation absorbs the data-parallel width, see ``plan_recipe``);
  2. micro-batches go through ``model(x, targets=y)``, the model's chunked, fused LM-head
     loss (no fp32 logits of the batch), and their gradients are reduce-scattered after
     each one (FSDP2's sync stays on), so only the fp32 gradient *shard* accumulates; the
     loss is a token-level sum divided by the *global* token count, so the update does
     not depend on how the batch was split over ranks or micro-batches;
  3. mixed precision: FSDP2 gathers parameters in the compute dtype (bf16, or fp16 with
     dynamic loss scaling as the paper did) and reduces gradients in fp32 into fp32
     master weights and Adam state;
  4. one all-reduce of the step's statistics (loss sum, gradient-norm pieces, overflow
     count) on the worker's device, one host read; every rank then takes the same
     skip/scale decision, clips, unscales by the scale the backward used and steps AdamW
     (LR from the warmup + linear-decay-to-10% schedule);
  5. the divergence guard looks at (loss, grad norm, loss scale) and may roll back;
  6. metrics.jsonl + Ray metrics; every ``checkpoint_every`` steps a checkpoint.

Devices: every tensor of the step lives on the worker's device (``resolve_device``: the
GPU Ray Train assigned, ``cuda:LOCAL_RANK``, or the CPU), so NCCL can reduce it. The
model is built sharded (``opt_ray.model.parallel.build_sharded``): the whole model never
exists on one rank.

Determinism: data order is the sampler's (a function of seed and samples consumed),
dropout is reseeded from (seed, step, micro-batch, data rank) before every micro-batch,
and every reduction has a fixed order for a fixed world size, so a run that restarts
from a checkpoint replays the same updates bit for bit (``--deterministic`` also turns
on ``torch.use_deterministic_algorithms``).
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist

from opt_ray.artifacts import write_text_atomic
from opt_ray.config import (FP16_NEEDS_GPU, ConfigError, ModelConfig, TrainConfig, flops_per_token,  # noqa: F401
                            is_url, num_params, preset)
from opt_ray.errors import UserError
from opt_ray.logbook import LOGBOOK, METRICS, Logbook, log_resume, versions
from opt_ray.model.parallel import seed_of
from opt_ray.run_dir import MIRRORED, RunMirror, store_errors
from opt_ray.train.chaos import Chaos
from opt_ray.train.checkpoint import Checkpointer, step_name
from opt_ray.train.schedule import LRSchedule



@dataclass
class Hooks:
    """The gang's touch points with the outside (Ray Train); no-ops by default.

    ``report(metrics, checkpoint_dir)`` is called by every rank at each checkpoint (Ray
    Train's ``report`` is a barrier); ``attempt`` counts worker-group starts of this run.
    """
    report: Callable[[dict[str, Any], Path | None], None] = lambda metrics, ckpt: None
    attempt: Callable[[], int] = lambda: 0


# --------------------------------------------------------------------------------------
# Mixed precision
# --------------------------------------------------------------------------------------

class DynamicLossScaler:
    """fp16 dynamic loss scaling (as OPT trained): scale the loss, skip a step whose
    gradients overflow and halve the scale, double it after ``growth_interval`` clean
    steps. Every rank takes the same decision: ``finite`` comes from one all-reduced
    overflow flag (data and tensor groups), see ``Trainer._reduce_step``.

    The gradients of a step are unscaled by the scale its backward used (``scale``
    *before* ``update``), never the updated one. ``min_scale`` (2^-24) lies far below the
    divergence guard's ``loss_scale_floor`` (1e-4), so a scale that keeps collapsing
    reaches the guard's floor and its verdict fires instead of the scaler pinning above it.
    """

    def __init__(self, enabled: bool, init_scale: float = 2.0 ** 15, growth_interval: int = 2000,
                 min_scale: float = 2.0 ** -24):
        self.enabled = enabled
        self.scale = init_scale if enabled else 1.0
        self.growth_interval = growth_interval
        self.min_scale = min_scale
        self._good = 0

    def update(self, finite: bool) -> None:
        if not self.enabled:
            return
        if not finite:
            self.scale = max(self.scale / 2, self.min_scale)
            self._good = 0
        else:
            self._good += 1
            if self._good >= self.growth_interval:
                self.scale *= 2
                self._good = 0

    def state_dict(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "scale": self.scale, "good": self._good}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        if self.enabled and s.get("enabled"):
            self.scale, self._good = float(s["scale"]), int(s["good"])


def resolve_device(want: str = "auto") -> torch.device:
    """The device this worker trains on: ``cpu``; or its GPU (``auto`` when it has one,
    ``cuda`` demands one): Ray Train's ``get_device()`` under a Ray Train gang (the GPU
    Ray assigned this worker), else ``cuda:LOCAL_RANK`` (torchrun), made current."""
    if want == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if want == "cuda":
            raise UserError("--device cuda but this worker sees no CUDA device; run on GPU nodes "
                            "or pass --device cpu")
        return torch.device("cpu")
    device = None
    try:
        import ray.train
        import ray.train.torch

        ray.train.get_context()  # raises outside a Ray Train worker
        device = ray.train.torch.get_device()
    except Exception:  # not under Ray Train: torchrun-style LOCAL_RANK
        device = None
    if device is None or device.type != "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return device


def _resolve_precision(cfg: TrainConfig, device: torch.device) -> str:
    if cfg.precision:
        if cfg.precision == "fp16" and device.type == "cpu":
            raise UserError(FP16_NEEDS_GPU)
        return cfg.precision
    if device.type == "cuda":
        return "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX). Without it (AVX2
    only: many laptops and cloud VMs) oneDNN emulates bf16 and a GEMM runs 10-50x slower
    than in fp32 (measured on a 2-core AVX2 EPYC VM: 1.3 vs 17 GFLOP/s at 512^3), so the
    default precision on such a CPU is fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _compute_dtype(precision: str) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


@dataclass(frozen=True)
class Recipe:
    """How one optimizer step is cut up, and the LR schedule (the paper's, section 2)."""
    global_rows: int        # rows of seq_len tokens per optimizer step (the recipe's batch)
    rows_per_rank: int      # this data-parallel rank's share
    micro: int              # rows per forward/backward
    accum: int              # micro-batches per step per rank
    peak_lr: float
    warmup_steps: int
    decay_steps: int


def plan_recipe(cfg: TrainConfig, seq_len: int, dp_size: int) -> Recipe:
    """The global batch is the recipe's, exactly: ``batch_tokens`` / ``seq_len`` rows per
    step whatever the data-parallel width, which gradient accumulation absorbs
    (micro-batches per rank = rows / (dp x micro_batch), the last one smaller when
    micro_batch does not divide). A batch that is not whole rows, or not divisible over
    the data-parallel ranks, is an error (``UserError``), never rounded."""
    p = preset(cfg.preset)
    batch = cfg.batch_tokens or p.batch_tokens
    what = f"--batch-tokens {batch}" if cfg.batch_tokens else f"the {cfg.preset} batch ({batch} tokens)"
    if batch % seq_len or batch < seq_len:
        raise UserError(f"{what} is not a whole number of rows of the data's {seq_len} tokens; "
                        f"pass --batch-tokens as a multiple of {seq_len} (e.g. "
                        f"{max(1, batch // seq_len) * seq_len})")
    rows = batch // seq_len
    if rows % dp_size:
        raise UserError(f"{what} is {rows} rows of {seq_len} tokens, which do not split over "
                        f"{dp_size} data-parallel ranks (workers / --tp); pass --batch-tokens as a "
                        f"multiple of {dp_size * seq_len} or choose --workers so that workers / "
                        f"--tp divides {rows}")
    per_rank = rows // dp_size
    micro = min(cfg.micro_batch, per_rank)
    tokens_per_step = rows * seq_len
    warmup = cfg.optim.warmup_steps
    if warmup is None:
        # The paper's warmup (375M tokens; 2000 steps for 175b), at most a tenth of a run
        # that is shorter than the paper's so that it still warms up and then decays.
        warmup = min(p.warmup(tokens_per_step), cfg.steps // 10)
    return Recipe(global_rows=rows, rows_per_rank=per_rank, micro=micro,
                  accum=math.ceil(per_rank / micro), peak_lr=cfg.optim.peak_lr or p.peak_lr,
                  warmup_steps=warmup, decay_steps=cfg.optim.decay_steps or cfg.steps)


def check_compiler(device: torch.device) -> None:
    """``--compile`` needs inductor's code generator where the worker runs: a C++ compiler
    for the CPU, Triton for CUDA. Without one the first forward would fail deep inside
    dynamo; this names the fix before the model is built (a UserError: not retried)."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton
        if not has_triton():
            raise UserError("--compile on CUDA needs Triton (shipped with PyTorch's CUDA "
                            "wheels) on every GPU worker; install it or drop --compile")
    elif device.type == "cpu":
        from torch._inductor import config as inductor_config
        from torch._inductor.cpp_builder import get_cpp_compiler
        try:
            get_cpp_compiler()
        except Exception as e:
            raise UserError(f"--compile on the CPU needs a C++ compiler on every worker (tried "
                            f"{inductor_config.cpp.cxx}: {str(e).strip().splitlines()[0]}); install "
                            f"g++ (or set CXX) or drop --compile") from None


def fused_adamw_ok(device: torch.device) -> bool:
    """Whether torch's fused AdamW kernel runs on ``device`` (CUDA; CPU since torch 2.4)."""
    try:
        p = torch.nn.Parameter(torch.zeros(2, device=device))
        p.grad = torch.zeros(2, device=device)
        torch.optim.AdamW([p], fused=True).step()
        return True
    except (RuntimeError, NotImplementedError):
        return False


def _peak_flops(device: torch.device, precision: str) -> float:
    """Peak FLOP/s of one worker's device, for MFU. CPU figures were measured on the
    development machine (DESIGN.md: ~900 GFLOP/s bf16, ~190 fp32)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        half = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "A10": 125e12, "L4": 121e12}
        for k, v in half.items():
            if k in name:
                return v if precision != "fp32" else v / 16
        return 100e12
    return 900e9 if precision == "bf16" else 190e9


# --------------------------------------------------------------------------------------
# The trainer: state + one step; train() drives it
# --------------------------------------------------------------------------------------

def padded_vocab(vocab_size: int) -> int:
    """The model's vocabulary: the tokenizer's rounded up to a multiple of 8 (GPT-2's
    50265 -> OPT's 50272)."""
    return int(math.ceil(int(vocab_size) / 8) * 8)


def model_config(cfg: TrainConfig, seq_len: int, vocab_size: int) -> ModelConfig:
    """The preset's architecture with the data's vocabulary; rows longer than the
    preset's positions are a ``UserError``."""
    p = preset(cfg.preset)
    if seq_len > p.model.max_position_embeddings:
        raise UserError(f"--data has rows of {seq_len} tokens but preset {cfg.preset} has "
                        f"{p.model.max_position_embeddings} positions; re-tokenize with a shorter "
                        f"--seq-len")
    return p.model.replace(vocab_size=padded_vocab(vocab_size), dropout=cfg.dropout)


class Trainer:
    """Builds the model, optimizer, data and checkpointer for this rank."""

    def __init__(self, cfg: TrainConfig, hooks: Hooks | None = None):
        from opt_ray.data.sampler import ResumableSampler
        from opt_ray.data.shards import ShardDataset
        from opt_ray.model.parallel import build_sharded, init_model_parallel, tp_partition_dims

        self.cfg = cfg
        self.hooks = hooks or Hooks()
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.run_dir = cfg.run_dir
        # --output s3://...: this node's staging directory, brought up to the bucket's
        # newest push before anything in it is read (a fresh node resumes from there).
        self.mirror = RunMirror.of(cfg.output)
        if self.mirror is not None:
            self.mirror.pull()
        self.logbook = Logbook(self.run_dir)
        # Drills and operators find a rank's process here (e.g. to SIGKILL it).
        (self.run_dir / "pids").mkdir(parents=True, exist_ok=True)
        (self.run_dir / "pids" / f"rank{self.rank}.pid").write_text(f"{os.getpid()}\n")
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.device = resolve_device(cfg.device)
        if cfg.compile:
            check_compiler(self.device)

        # -- layout: tensor groups of tp consecutive ranks, data groups across them
        if self.world % cfg.tp:
            raise UserError(f"--tp {cfg.tp} must divide the number of workers ({self.world}); "
                            f"choose --workers as a multiple of --tp")
        with _group_timeout(cfg.collective_timeout):
            self.dp_group, self.tp_group = init_model_parallel(cfg.tp)
        self.dp_size = self.world // cfg.tp
        self.dp_rank = self.rank // cfg.tp
        self.tp_rank = self.rank % cfg.tp

        # -- data
        # Rank 0 checks the shards' checksums once per start; the others trust it.
        self.data = ShardDataset(cfg.data, split="train", verify=self.rank == 0)
        self.seq_len = int(self.data.seq_len)

        # -- model: the preset's architecture, the tokenizer's vocabulary
        self.model_cfg: ModelConfig = model_config(cfg, self.seq_len, int(self.data.vocab_size))
        self.precision = _resolve_precision(cfg, self.device)
        self.tp_dims = tp_partition_dims(self.model_cfg) if cfg.tp > 1 else {}
        # Built sharded: on meta, then TP + FSDP2, then only the local shards are allocated
        # and initialised (the same weights for a seed whatever the layout). Parameters are
        # gathered in the compute dtype (FSDP2's mixed precision; no autocast), gradients
        # reduce-scattered in fp32 into fp32 master weights. So the step's precision does
        # not depend on the data-parallel width: a data group of one runs FSDP2 too when
        # the compute dtype is a half one (a gang that shrinks to one rank keeps its
        # residual stream in bf16/fp16, as the plan counts it). In fp32 there is nothing to
        # cast, and FSDP2 on one rank would only add copies (DCP reshards plain and sharded
        # tensors alike on load).
        self.model = build_sharded(self.model_cfg, device=self.device, seed=cfg.seed, tp_size=cfg.tp,
                                   dp_group=self.dp_group, tp_group=self.tp_group,
                                   param_dtype=_compute_dtype(self.precision),
                                   activation_checkpointing=cfg.activation_checkpointing,
                                   fsdp=self.dp_size > 1 or self.precision != "fp32",
                                   compile=cfg.compile)
        self.scaler = DynamicLossScaler(self.precision == "fp16")

        # -- the recipe
        self.recipe = plan_recipe(cfg, self.seq_len, self.dp_size)
        self.global_rows = self.recipe.global_rows
        self.batch_tokens = self.global_rows * self.seq_len
        self.rows_per_rank = self.recipe.rows_per_rank
        self.micro = self.recipe.micro
        self.accum = self.recipe.accum
        self.schedule = LRSchedule(self.recipe.peak_lr, self.recipe.warmup_steps, self.recipe.decay_steps,
                                   min_lr_ratio=cfg.optim.min_lr_ratio)
        # torch's fused AdamW kernel (one pass over each tensor instead of a dozen
        # foreach passes) where this device has it; the update's values are the same.
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.recipe.peak_lr,
                                           betas=cfg.optim.betas, eps=cfg.optim.eps,
                                           weight_decay=cfg.optim.weight_decay,
                                           fused=fused_adamw_ok(self.device))
        self.clip = cfg.optim.grad_clip
        self.clip_changed = False  # restore(): a resumed run asked for another --grad-clip
        self.sampler = ResumableSampler(len(self.data), seed=cfg.seed)
        # The next step's rows are read while this step computes (``_step_rows``): with
        # shards in a bucket each read is a round trip of ranged GETs.
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="opt-ray-rows")
        self._ahead: tuple[tuple[int, ...], Future] | None = None
        self.flops_per_token = flops_per_token(self.model_cfg, self.seq_len)
        self.peak_flops = _peak_flops(self.device, self.precision)

        # -- fault tolerance
        # A URL (s3://...) goes to the checkpointer as a string (fsspec), a path as a Path.
        where = cfg.checkpoint_location
        self.ckpt = Checkpointer(where if is_url(where) else Path(where), keep=cfg.keep,
                                 milestone_every=cfg.milestone_every, dp_group=self.dp_group,
                                 tp_size=cfg.tp, tp_rank=self.tp_rank, on_event=self._event,
                                 async_save=cfg.async_checkpoint)
        self.chaos = Chaos.from_spec(cfg.chaos.spec, self.run_dir, self.rank)
        self.guard = None
        if cfg.guard.enabled:
            from opt_ray.train.guard import DivergenceGuard
            self.guard = DivergenceGuard(cfg.guard)
        self.step = 0
        self.tokens_seen = 0
        self.restored_versions: dict[str, Any] | None = None

    # -- events and metrics (rank 0 writes) ------------------------------------------------
    def _event(self, kind: str, **fields: Any) -> None:
        if self.rank == 0:
            self.logbook.event(kind, **fields)

    def sync(self, names: Iterable[str] = MIRRORED, *, whole: bool = True) -> None:
        """Rank 0 mirrors the run directory (or ``names`` of it) to its URL (``--output
        s3://...``); ``whole=False`` uploads only the metrics lines added since the last
        sync (``run_dir``). A failed upload is logged and retried at the next sync: the
        checkpoint is already committed and nothing local is lost."""
        if self.rank == 0 and self.mirror is not None:
            self.mirror.try_push(names, whole=whole)

    def _train_state(self) -> dict[str, Any]:
        return {
            "sampler": self.sampler.state_dict(), "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(), "clip": self.clip, "tokens_seen": self.tokens_seen,
            "grad_clip": self.cfg.optim.grad_clip,
            "guard": self.guard.state_dict() if self.guard else None,
            "world_size": self.world, "dp_size": self.dp_size, "preset": self.cfg.preset,
            "model": self.model_cfg.to_dict(), "seq_len": self.seq_len, "run_id": self.cfg.run_id,
            "versions": versions(),
        }

    # -- checkpoints -------------------------------------------------------------------
    def save(self) -> Path:
        milestone = bool(self.cfg.milestone_every and self.step % self.cfg.milestone_every == 0)
        path = self.ckpt.save(self.step, self.model, self.optimizer, self._train_state(),
                              chaos=self.chaos, milestone=milestone)
        if self.guard:
            self.guard.record_checkpoint(self.step, self.scaler.scale if self.scaler.enabled else None)
        if self.rank == 0:
            self.chaos.after_save(self.step, path)
        self.sync()
        self.hooks.report({"step": self.step, "tokens_seen": self.tokens_seen}, path)
        return path

    def restore(self, path: Path, *, keep_guard: bool = False) -> None:
        """Load a checkpoint (any world size / TP degree) and restore every piece of state."""
        state = self.ckpt.load(path, self.model, self.optimizer)
        # Loading restores the saved param groups' hyperparameters; this run's flags set
        # them (the LR too, from the schedule, every step), as for a fresh start.
        o = self.cfg.optim
        for group in self.optimizer.param_groups:
            group.update(betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
        self.step = int(state["step"])
        self.restored_versions = state.get("versions")
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.sampler.load_state_dict(state["sampler"])
        self.schedule.load_state_dict(state["schedule"])
        self.scaler.load_state_dict(state["scaler"])
        # The clip in force (the guard may have lowered it) carries over, unless this run
        # asks for another --grad-clip than the one that saved it: a rollback by hand
        # (`opt-ray ctl rollback --grad-clip`) sets the clip from then on.
        self.clip_changed = state.get("grad_clip", self.cfg.optim.grad_clip) != self.cfg.optim.grad_clip
        self.clip = self.cfg.optim.grad_clip if self.clip_changed else float(
            state.get("clip", self.cfg.optim.grad_clip))
        if self.guard and not keep_guard and state.get("guard"):
            self.guard.load_state_dict(state["guard"])
        if state.get("model", {}).get("vocab_size") not in (None, self.model_cfg.vocab_size):
            raise UserError(f"checkpoint {path} was trained with vocabulary "
                            f"{state['model']['vocab_size']}, the data has {self.model_cfg.vocab_size}; "
                            f"resume with the same --data")
        if state.get("world_size") != self.world or state.get("tp_size", 1) != self.cfg.tp:
            self._event("resize", step=self.step, from_world=state.get("world_size"), to_world=self.world,
                        from_tp=state.get("tp_size", 1), to_tp=self.cfg.tp)

    # -- one optimizer step ------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        """One optimizer step: forward/backward of every micro-batch, one all-reduce of the
        step's statistics, one host read, then the same skip/clip/update on every rank."""
        step = self.step + 1
        self.chaos.at_step_start(step)
        if self.guard and self.guard.should_skip(step):
            # The guard's data skip: this step's batch of the diverged trajectory is
            # never trained on; the sampler records the range.
            start, end = self.sampler.skip(self.global_rows)
            self._event("data_skipped", step=step, start=start, end=end)
        batch_pos = self.sampler.consumed
        rows = self.sampler.next_batch(self.global_rows, self.dp_rank, self.dp_size)
        lr = self.schedule.apply(self.optimizer, step)
        loss_factor = self.chaos.loss_factor(step)
        global_tokens = self.global_rows * self.seq_len
        t0 = time.perf_counter()

        # The scale this step's backward uses; its gradients are unscaled by it even when
        # the scaler grows the scale at the end of the step.
        used_scale = self.scaler.scale
        stats = self.forward_backward(rows, step, loss_factor, used_scale)
        # With torch's fused AdamW the update is queued before the host reads anything: the
        # clip/unscale factor and the skip flag come from ``stats`` on the device, so the
        # optimizer's launch overhead overlaps the GPU's backward instead of idling it.
        queued = self._fused_update
        if queued:
            self.apply_update(stats, used_scale)
        # The step's one host synchronisation: every rank reads the same reduced values.
        loss_sum, tp_sq, rep_sq, bad = stats.tolist()
        loss_val = loss_sum / global_tokens * loss_factor
        grad_norm = math.sqrt(tp_sq + rep_sq) / used_scale
        # ``bad`` counts non-finite values of the loss sum and the squared norms: the same
        # flag the fused update skipped on.
        finite = bad == 0
        self.scaler.update(finite)
        if not finite:
            # An overflow (fp16) or a NaN: no update; the guard decides what else to do.
            self._event("step_skipped", step=step, loss=loss_val, grad_norm=grad_norm)
        elif not queued:
            self.apply_update(stats, used_scale)
        self.optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0

        self.step = step
        self.tokens_seen += global_tokens
        tps = global_tokens / dt
        return {"step": step, "loss": loss_val, "lr": lr, "grad_norm": grad_norm,
                "loss_scale": self.scaler.scale if self.scaler.enabled else None,
                "tokens_per_s": tps, "mfu": tps * self.flops_per_token / (self.peak_flops * self.world),
                "tokens": self.tokens_seen, "world_size": self.world, "step_s": dt,
                "batch_pos": batch_pos, "time": time.time()}

    def forward_backward(self, rows: Any, step: int, loss_factor: float = 1.0,
                         scale: float = 1.0) -> torch.Tensor:
        """Forward and backward of this rank's micro-batches of ``rows``, then the step's
        statistics reduced over the gang: a float64 tensor on the worker's device,
        [token-loss sum, squared grad norm of tensor-parallel pieces, of replicated
        pieces, count of non-finite values]. Nothing here leaves the device or waits for
        the host, and every tensor of it lives where the model does."""
        cfg, model = self.cfg, self.model
        global_tokens = self.global_rows * self.seq_len
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        model.train()
        tokens = self._step_rows(rows)
        for m in range(self.accum):
            chunk = tokens[m * self.micro:(m + 1) * self.micro]
            batch = torch.from_numpy(chunk).to(self.device, non_blocking=True)
            inputs, targets = batch[:, :-1], batch[:, 1:]
            # Dropout masks are a function of (seed, step, micro-batch, data rank): a
            # replayed step draws the same ones; tensor ranks share them (replicated
            # activations must be dropped identically).
            torch.manual_seed(seed_of(cfg.seed, step, m, self.dp_rank))
            # Gradients are reduce-scattered after every micro-batch (FSDP2's default sync
            # stays on): only the fp32 shard accumulates, unsharded gradients never persist.
            # The model's chunked, fused LM-head loss (mean over the micro-batch's tokens).
            loss = model(inputs, targets=targets)
            n = targets.numel()
            loss_sum += loss.detach().double() * n
            # FSDP averages gradients over the data-parallel ranks; multiplying by dp_size
            # turns that into a sum, so the result is d(sum of token losses)/global tokens.
            (loss * (n * self.dp_size * loss_factor * scale / global_tokens)).backward()
        return self._reduce_step(loss_sum)

    def _step_rows(self, rows: list[int]) -> np.ndarray:
        """This rank's rows of the step, read in one call: by the read queued during the
        previous step where it asked for these rows (a guard's skip or a restored state
        changes them: read now); then the next step's rows are queued. So a bucket's
        round trips (``--data s3://``) overlap the step's compute instead of adding to it."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            wait([ahead[1]])  # one reader of the dataset at a time (its open-shard cache)
        if ahead is not None and ahead[0] == tuple(rows):
            tokens = ahead[1].result()
        else:
            tokens = self.data.batch(rows)
        following = self.sampler.peek_batch(self.global_rows, self.dp_rank, self.dp_size)
        self._ahead = (tuple(following), self._reader.submit(self.data.batch, following))
        return tokens

    @torch.no_grad()  # also makes DTensor.to_local() a plain attribute read, per parameter
    def _reduce_step(self, loss_sum: torch.Tensor) -> torch.Tensor:
        """[loss sum, tp grad sq, replicated grad sq, non-finite count], reduced: loss and
        squares summed over the data group (FSDP shards are disjoint), tensor-parallel
        squares and the overflow count over the tensor group (those slices are disjoint;
        replicated tensors are counted once), so every rank of the gang decides alike."""
        from torch.distributed.tensor import DTensor

        groups: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        for name, p in self.model.named_parameters():
            if p.grad is not None:
                g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                groups[0 if name in self.tp_dims else 1].append(g.detach())
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        # Per-tensor norms in one fused call, then their squares summed in fp64 by one
        # reduction (a fixed order for a given model): three kernels, not three per tensor
        # (~400 tensors at 1.3b, whose launches the host could not hide on a GPU).
        sq = [torch.stack(torch._foreach_norm(gs)).double().square().sum() if gs else zero
              for gs in groups]
        bad = (~torch.isfinite(sq[0] + sq[1] + loss_sum)).double()
        buf = torch.stack([loss_sum, sq[0], sq[1], bad])
        if self.dp_size > 1:
            dist.all_reduce(buf, group=self.dp_group)
        if self.cfg.tp > 1:
            part = buf[[1, 3]].contiguous()
            dist.all_reduce(part, group=self.tp_group)
            buf[1], buf[3] = part[0], part[1]
        return buf

    def apply_update(self, stats: torch.Tensor, used_scale: float) -> None:
        """Unscale by the scale the backward used, clip to ``self.clip``, AdamW step, from
        the step's reduced ``stats`` (``forward_backward``) without reading them on the host.

        With torch's fused AdamW the factor rides in the kernel (its ``grad_scale``, which
        divides each gradient as it is read, as ``GradScaler`` uses it), and so does the
        skip: its ``found_inf`` (the overflow count, non-zero) leaves parameters, moments
        and step counts as they were. Otherwise the gradients are scaled first, and the
        caller only calls this for a finite step."""
        # The same float64 arithmetic the host would do, on the device.
        grad_norm = (stats[1] + stats[2]).sqrt() / used_scale
        factor = torch.clamp(self.clip / (grad_norm + 1e-6), max=1.0)
        if self.scaler.enabled:
            factor = factor / used_scale
        if self._fused_update:
            self.optimizer.grad_scale = factor.reciprocal().float()
            self.optimizer.found_inf = (stats[3] != 0).float()
            self.optimizer.step()
            # Nothing left behind for a later ``step()`` (a restore's, a test's).
            self.optimizer.grad_scale = self.optimizer.found_inf = None
        else:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            torch._foreach_mul_(grads, factor.float())
            self.optimizer.step()

    @property
    def _fused_update(self) -> bool:
        return bool(self.optimizer.defaults.get("fused"))

    # -- the divergence guard's intervention -------------------------------------------
    def consult_guard(self, rec: dict[str, Any]) -> bool:
        """Ask the guard about this step; on a verdict roll back. True if it rolled back."""
        if self.guard is None:
            return False
        from opt_ray.train.guard import DivergenceError

        verdict = self.guard.observe(rec["step"], rec["loss"], rec["grad_norm"], rec["loss_scale"],
                                     batch=rec["batch_pos"])
        if verdict is None:
            return False
        self.ckpt.wait()  # a save in flight commits before the guard picks a checkpoint
        target = self.guard.pick_checkpoint(self.ckpt.available_steps())
        self._event("divergence", **verdict.to_dict())
        if verdict.give_up or target is None:
            self._event("divergence_give_up", report=verdict.report)
            if self.rank == 0:
                # Persisted first: Ray Train restarts a failed gang, and the restart must
                # stop on this give-up rather than resume from the last checkpoint.
                self.guard.save(self.run_dir / "guard.json")
                self.sync()
            raise DivergenceError(verdict)
        path = self.ckpt.latest_valid(max_step=target)
        if path is None:
            raise DivergenceError(verdict)
        self.restore(path, keep_guard=True)
        self.ckpt.discard(verdict.invalidate_checkpoints)
        self.schedule.lr_factor = verdict.lr_scale
        if verdict.new_clip is not None:
            self.clip = verdict.new_clip
        self._event("rollback", step=rec["step"], to_step=self.step, lr_factor=verdict.lr_scale,
                    clip=self.clip, skip_steps=verdict.skip_steps)
        if self.rank == 0:
            self.guard.save(self.run_dir / "guard.json")
            # metrics.jsonl holds the trajectory that counts; the divergence event keeps
            # what the abandoned one looked like.
            _trim_metrics(self.run_dir / METRICS, self.step)
            self.sync()
        return True

    def close(self) -> None:
        if getattr(self, "_reader", None) is not None:
            self._reader.shutdown(wait=False, cancel_futures=True)
        try:
            from fairscale.nn.model_parallel import initialize as mpu
            mpu.destroy_model_parallel()
        except Exception:  # nothing to tear down
            pass


@contextmanager
def _group_timeout(seconds: float):
    """Make process groups created inside (fairscale's tensor/data groups, which FSDP
    communicates over) time out after ``seconds`` like the world group.

    ``new_group`` without a timeout falls back to torch's 30-minute default, not the
    world group's, and fairscale passes none: a hung peer would then stall the gang for
    half an hour instead of failing it after ``--collective-timeout``."""
    import datetime

    from torch.distributed import distributed_c10d as c10d

    saved = c10d.default_pg_timeout, getattr(c10d, "default_pg_nccl_timeout", None)
    c10d.default_pg_timeout = datetime.timedelta(seconds=seconds)
    if saved[1] is not None:
        c10d.default_pg_nccl_timeout = datetime.timedelta(seconds=seconds)
    try:
        yield
    finally:
        c10d.default_pg_timeout = saved[0]
        if saved[1] is not None:
            c10d.default_pg_nccl_timeout = saved[1]


def _hardware(device: torch.device) -> dict[str, Any]:
    from opt_ray.logbook import hardware

    return {**hardware(), "device": str(device), "torch_threads": torch.get_num_threads()}


def _trim_metrics(path: Path, upto_step: int) -> None:
    """Drop metric lines past ``upto_step``: they belong to a trajectory that is replayed."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= upto_step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a torn last line from a killed writer
    write_text_atomic(path, "".join(l + "\n" for l in keep))


def _keep_tokenizer(cfg: TrainConfig, run_dir: Path) -> None:
    """Copy the shards' tokenizer into the run directory, so `opt-ray export` can ship it
    with the weights and a served export decodes with the file training encoded with."""
    from opt_ray.data.shards import TOKENIZER_FILE, read_shards_tokenizer

    dst = run_dir / TOKENIZER_FILE
    if not dst.exists() and (text := read_shards_tokenizer(cfg.data)) is not None:
        tmp = dst.with_name(dst.name + ".tmp")
        tmp.write_bytes(text)
        os.replace(tmp, dst)


def _write_run_manifest(trainer: Trainer, last: dict[str, Any]) -> None:
    """``RUN_DIR/manifest.json``: what the run is and where its result is. Unlike the
    other stages' artifacts a run directory is resumable, so this is (re)written when a
    run reaches its last step rather than once by an ``ArtifactWriter``."""
    from opt_ray.artifacts import code_version, write_json_atomic

    ckpts = trainer.ckpt.available_steps()
    write_json_atomic(trainer.run_dir / "manifest.json", {
        "kind": "train_run", "code_version": code_version(), "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": trainer.cfg.to_dict(), "model": trainer.model_cfg.to_dict(),
        "params": num_params(trainer.model_cfg),
        "data": {"path": str(trainer.cfg.data), "seq_len": trainer.seq_len,
                 "rows": len(trainer.data), "vocab_size": int(trainer.data.vocab_size)},
        "step": trainer.step, "tokens": trainer.tokens_seen, "final_loss": last.get("loss"),
        "checkpoints": [f"checkpoints/{step_name(s)}" for s in ckpts],
        "final_checkpoint": f"checkpoints/{step_name(ckpts[-1])}" if ckpts else None,
        "metrics": METRICS, "logbook": "logbook.jsonl",
    })


def _ensure_process_group(device: str = "auto") -> bool:
    """Make a 1-process group when run outside a gang; True if we made it. Where this
    rank will train on CUDA (``device`` ``cuda``, or ``auto`` with a GPU present) the group
    has NCCL for CUDA tensors beside gloo for CPU ones, as a GPU gang's does."""
    if dist.is_initialized():
        return False
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    on_cuda = device != "cpu" and torch.cuda.is_available()
    dist.init_process_group("cpu:gloo,cuda:nccl" if on_cuda else "gloo", rank=0, world_size=1)
    return True


def train(cfg: TrainConfig, hooks: Hooks | None = None) -> dict[str, Any]:
    """Run (or resume) training on this rank until ``cfg.steps``; returns the last
    step's metrics. Every rank of the gang calls it."""
    from opt_ray import metrics as rm

    own_pg = _ensure_process_group(cfg.device)
    hooks = hooks or Hooks()
    trainer = None
    try:
        trainer = Trainer(cfg, hooks)
        rank = trainer.rank
        run_dir = trainer.run_dir
        attempt = hooks.attempt()
        trainer.ckpt.clean_partial()
        if rank == 0:
            _keep_tokenizer(cfg, run_dir)
        if cfg.resume_from and attempt == 0:
            # A requested rollback (`opt-ray ctl rollback`): only on the first attempt, so a
            # restart after a later failure resumes from what was trained since.
            latest = trainer.ckpt.rollback_to(cfg.resume_from)
        else:
            latest = trainer.ckpt.latest_valid()
        if latest is not None:
            trainer.restore(latest)
            if rank == 0:
                _trim_metrics(run_dir / METRICS, trainer.step)
            # A rollback after the checkpoint is remembered in guard.json.
            if trainer.guard and (run_dir / "guard.json").exists():
                from opt_ray.train.guard import DivergenceGuard
                newer = DivergenceGuard(trainer.guard.cfg)
                newer.load(run_dir / "guard.json")
                if len(newer.verdicts) > len(trainer.guard.verdicts):
                    trainer.guard = newer
                    trainer.schedule.lr_factor = newer.lr_scale
                    if not trainer.clip_changed:
                        trainer.clip = newer.clip or trainer.clip
            if trainer.guard:
                trainer.guard.raise_if_gave_up()
        elif rank == 0:
            _trim_metrics(run_dir / METRICS, 0)
        start_kind = "restart" if attempt > 0 else ("resume" if latest is not None else "start")
        trainer._event(start_kind, step=trainer.step, attempt=attempt, checkpoint=str(latest) if latest else None,
                       config=cfg.to_dict(), model=trainer.model_cfg.to_dict(),
                       params=num_params(trainer.model_cfg), world_size=trainer.world,
                       dp=trainer.dp_size, tp=cfg.tp, precision=trainer.precision,
                       global_rows=trainer.global_rows, micro_batch=trainer.micro,
                       grad_accum=trainer.accum, seq_len=trainer.seq_len,
                       versions=versions(), hardware=_hardware(trainer.device))
        if latest is not None and rank == 0:
            # A checkpoint written under other library versions is worth a line in the
            # logbook (OPT-175B: an upgrade changed activation-norm dynamics).
            log_resume(trainer.logbook, trainer.restored_versions, step=trainer.step,
                       checkpoint=str(latest))
        if attempt > 0 and rank == 0:
            rm.counter("train_restarts", "training gang restarts").inc(1)

        gauges = {k: rm.gauge(f"train_{k}", f"training {k} (last optimizer step)")
                  for k in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu")}
        last: dict[str, Any] = {}
        metrics_path = run_dir / METRICS
        pushed = time.monotonic()
        while trainer.step < cfg.steps:
            rec = trainer.train_step()
            if trainer.consult_guard(rec):
                continue
            last = rec
            if rank == 0:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                for k, g in gauges.items():
                    if rec[k] is not None and math.isfinite(rec[k]):
                        g.set(rec[k])
            if trainer.step % cfg.checkpoint_every == 0 or trainer.step == cfg.steps:
                trainer.save()
                pushed = time.monotonic()  # save() pushed every file
            elif cfg.mirror_every and time.monotonic() - pushed >= cfg.mirror_every:
                trainer.sync((METRICS, LOGBOOK), whole=False)  # readers elsewhere follow
                pushed = time.monotonic()
        trainer.ckpt.close()  # the last (possibly asynchronous) save is committed first
        trainer._event("finish", step=trainer.step, tokens=trainer.tokens_seen,
                       loss=last.get("loss"))
        if rank == 0:
            _write_run_manifest(trainer, last)
            trainer.sync()
        return last
    finally:
        if trainer is not None:
            trainer.close()
        if own_pg:
            dist.destroy_process_group()


def _check_bucket(url: str) -> None:
    """``--output URL``: the store answers and takes writes; this node's staging directory
    is brought up to the bucket's copy of the run (what the local checks below read)."""
    with store_errors(f"--output {url}", "a test write", "the bucket exists"):
        mirror = RunMirror(url)
        mirror.check_writable()
        mirror.pull()


def preflight(cfg: TrainConfig) -> None:
    """Every error knowable from the config, the data and the run directory, checked on
    the driver before Ray starts (each a ``UserError``: one line naming the input and the
    fix, exit 2): the data is a shards artifact; its rows fit the preset; the batch splits
    over every gang size the elastic range may form; --tp divides the model; --output is
    writable and not another stage's artifact; a run directory being resumed was trained
    on the same tokenizer and vocabulary."""
    from opt_ray.artifacts import MANIFEST
    from opt_ray.data.shards import TOKENIZER_FILE, read_shards_manifest, read_shards_tokenizer
    from opt_ray.model.parallel import ParallelConfigError, check_divisible

    try:
        manifest = read_shards_manifest(cfg.data)
    except UserError as e:
        raise UserError(f"--data {cfg.data}: {e}; pass the output of `opt-ray tokenize`") from e
    seq_len = int(manifest["seq_len"])
    vocab = int(manifest["tokenizer"]["vocab_size"])
    model_cfg = model_config(cfg, seq_len, vocab)
    for world in cfg.world_sizes():
        plan_recipe(cfg, seq_len, world // cfg.tp)
    try:
        check_divisible(model_cfg, cfg.tp)
    except ParallelConfigError as e:
        raise UserError(f"--tp {cfg.tp} with --preset {cfg.preset}: {e}") from e

    if is_url(cfg.output):
        _check_bucket(cfg.output)
    out = cfg.run_dir
    mf = out / MANIFEST
    if mf.is_file():
        try:
            kind = json.loads(mf.read_text()).get("kind")
        except (OSError, json.JSONDecodeError, AttributeError):
            kind = None
        if kind != "train_run":
            raise UserError(f"--output {cfg.output} holds a {kind!r} artifact of another stage, not a "
                            f"training run; choose a new --output directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--output {cfg.output} is not writable ({e.strerror or e}); choose a directory "
                        f"you can write to") from e

    kept = out / TOKENIZER_FILE
    data_tok = read_shards_tokenizer(cfg.data) if kept.is_file() else None
    if data_tok is not None and kept.read_bytes() != data_tok:
        from opt_ray.data.tokenizer import load_tokenizer, tokenizer_hash
        if tokenizer_hash(load_tokenizer(kept)) != manifest["tokenizer"]["hash"]:
            raise UserError(f"--data {cfg.data} was tokenized with another tokenizer than the run "
                            f"in --output {cfg.output} was trained with ({kept}); resume with the shards "
                            f"of that tokenizer, or start a new --output")
    if not is_url(cfg.checkpoint_location):
        from opt_ray.train.checkpoint import committed, read_train_state
        ckpts = committed(cfg.checkpoint_location)
        if ckpts:
            try:
                state = read_train_state(ckpts[-1][1])
            except (OSError, ValueError):
                state = {}
            had = (state.get("model") or {}).get("vocab_size")
            if had is not None and int(had) != model_cfg.vocab_size:
                raise UserError(f"--data {cfg.data} has a vocabulary of {model_cfg.vocab_size} "
                                f"(padded), the checkpoints in {cfg.checkpoint_location} were "
                                f"trained with {had}; resume with the same --data or start a new "
                                f"--output")
