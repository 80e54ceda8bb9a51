"""The training plan on paper: what one GPU holds, and how long a step takes.

``plan(cfg, Setup(...))`` counts the bytes one rank holds under this project's training
setup and the step time at a stated MFU; ``opt-ray model info --preset P --gpus N --tp T``
prints it and ``python -m opt_ray.model.plan --markdown`` writes ``deploy/SCALING.md``.
The arithmetic is plain Python: no tensor is built.

The setup being counted (``opt_ray.model.parallel``, ``opt_ray.model.opt``):

- Megatron tensor parallelism of degree ``tp``: q/k/v_proj and fc1 split on their output
  features (weights and biases), out_proj and fc2 on their input features (their biases,
  added after the all-reduce, stay whole), the token embedding split by vocabulary rows
  (the tied LM head shares that shard). LayerNorms, positions and the 350m's
  project_in/out are replicated on every tensor rank (``_TP_RULES`` in parallel.py).
- FSDP2 over the data-parallel group (``dp = gpus / tp``), one unit per decoder layer plus
  the root (embeddings, final norm, projections). FSDP2 cuts every parameter along dim 0
  into ``dp`` chunks of ``ceil(rows / dp)`` rows and pads the last ones, so every rank
  allocates the padded chunk.
- Mixed precision: fp32 master weights, fp32 gradients (reduce-scattered after every
  micro-batch, so they stay sharded), AdamW's m and v in fp32: 16 bytes per sharded
  parameter. Parameters are all-gathered for compute in bf16/fp16 (``param_dtype``),
  gradients reduced in fp32 (``reduce_dtype``).
- Attention through ``F.scaled_dot_product_attention`` with ``is_causal``: the flash /
  memory-efficient kernels keep q, k, v, the output and a fp32 log-sum-exp per row, never
  the T x T score matrix.
- The loss is the chunked fused LM-head loss (``opt.lm_head_loss``): logits and their
  softmax exist ``_LOSS_CHUNK_ELEMENTS["cuda"]`` at a time; so does their gradient, except in a
  half dtype where holding it whole is smaller than summing the head's gradient in fp32
  (``opt._whole_logit_grad``). With tp > 1 the same loss runs on the
  rank's vocabulary shard (V / tp; ``opt.vocab_parallel_lm_head_loss``).

Memory per rank is the sum of each component at its own peak. Not every peak coincides
(the loss's forward scratch is gone before the layers' backward starts), so the sum
bounds the real peak from above by at most the smaller of those two terms; the test
(tests/unit/test_plan.py) measures the activation terms on a real forward/backward.
On top comes a stated reserve: ``reserve_gib`` for the CUDA context, NCCL communicators
and cuBLAS workspaces, which live outside PyTorch's allocator, and ``fragmentation``
(a fraction of the counted bytes) for the caching allocator's block rounding and
fragmentation.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
from dataclasses import dataclass, field

from opt_ray.config import ModelConfig, Preset, flops_per_token, num_params, preset
from opt_ray.errors import UserError
from opt_ray.model.opt import _loss_chunk_rows, _whole_logit_grad

GIB = 1 << 30
# The paper's 147 TFLOP/s per A100 is 47% of its 312 TFLOP/s dense bf16/fp16 peak.
A100_PEAK_TFLOPS = 312.0
PAPER_MFU = 0.47
# Tokens the paper's schedule decays over (OPT_FACTS.md, training recipe).
RECIPE_TOKENS = 300e9
# Bytes per element of the compute (all-gathered) dtype.
_COMPUTE_BYTES = {"bf16": 2, "fp16": 2}


class PlanError(UserError, ValueError):
    """A setup that cannot be planned (sizes that do not divide, values out of range)."""


@dataclass
class Setup:
    """Where and how a model is trained. Every field is a flag of ``opt-ray model info``."""
    gpus: int = 8                      # ranks in the training gang (one GPU each)
    tp: int = 1                        # tensor-parallel degree; data-parallel = gpus / tp
    seq_len: int = 2048
    micro_batch: int = 1               # sequences per forward/backward on one rank
    activation_checkpointing: bool = False
    precision: str = "bf16"            # compute dtype of the gathered params (bf16 | fp16)
    gpu_memory_gib: float = 80.0       # an "80GB" A100 has 80 GiB (81920 MiB)
    peak_tflops: float = A100_PEAK_TFLOPS  # dense bf16/fp16 peak of one GPU
    mfu: float = PAPER_MFU             # model FLOPs utilisation the step time assumes
    batch_tokens: int | None = None    # tokens per optimizer step; None: the preset's (Table 1)
    reserve_gib: float = 2.0           # CUDA context + NCCL + cuBLAS workspace, outside the allocator
    fragmentation: float = 0.10        # allocator rounding/fragmentation, fraction of counted bytes
    # Bytes of one dropout-mask element: CUDA's fused dropout saves a bool mask; the CPU
    # kernel saves its noise tensor in the compute dtype (used by the CPU test).
    dropout_mask_bytes: int = 1

    def __post_init__(self) -> None:
        for name in ("gpus", "tp", "seq_len", "micro_batch"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise PlanError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if self.gpus % self.tp:
            raise PlanError(f"--tp {self.tp} must divide --gpus {self.gpus} (data-parallel "
                            f"degree = gpus / tp); pick a tp that divides {self.gpus}")
        if self.precision not in _COMPUTE_BYTES:
            raise PlanError(f"--precision must be one of {sorted(_COMPUTE_BYTES)}, got {self.precision!r}")
        if not 0 < self.mfu <= 1:
            raise PlanError(f"--mfu must be in (0, 1], got {self.mfu!r} (the paper's was {PAPER_MFU})")
        for name in ("gpu_memory_gib", "peak_tflops"):
            if not getattr(self, name) > 0:
                raise PlanError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.reserve_gib < 0 or not 0 <= self.fragmentation < 1:
            raise PlanError(f"reserve_gib must be >= 0 and fragmentation in [0, 1), got "
                            f"{self.reserve_gib!r}, {self.fragmentation!r}")

    @property
    def dp(self) -> int:
        return self.gpus // self.tp

    @property
    def compute_bytes(self) -> int:
        return _COMPUTE_BYTES[self.precision]


@dataclass(frozen=True)
class ParamSpec:
    """One parameter tensor: its name in ``OPT.named_parameters()``, full shape, the
    dimension tensor parallelism splits (None: replicated) and its FSDP unit."""
    name: str
    shape: tuple[int, ...]
    tp_dim: int | None
    unit: str  # "root" or "layers.N"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def local_shape(self, tp: int) -> tuple[int, ...]:
        """The shape on one tensor rank (split dims divide exactly, see ``check_tp``)."""
        if self.tp_dim is None or tp == 1:
            return self.shape
        s = list(self.shape)
        s[self.tp_dim] //= tp
        return tuple(s)

    def shard_numel(self, tp: int, dp: int) -> int:
        """Elements FSDP2 allocates per rank for this tensor: ``ceil(rows / dp)`` rows of
        the tensor-parallel local shape (FSDP2 pads dim 0 to a multiple of dp)."""
        s = self.local_shape(tp)
        return -(-s[0] // dp) * math.prod(s[1:])


def param_specs(cfg: ModelConfig) -> list[ParamSpec]:
    """Every parameter of ``OPT(cfg)`` (the tied LM head counted once, as the token
    embedding), with its tensor-parallel split as ``opt_ray.model.parallel`` applies it."""
    d, f, e = cfg.hidden_size, cfg.ffn_dim, cfg.word_embed_proj_dim
    dec = "model.decoder."
    out = [ParamSpec(dec + "embed_tokens.weight", (cfg.vocab_size, e), 0, "root"),
           ParamSpec(dec + "embed_positions.weight", (cfg.max_position_embeddings + 2, d), None, "root")]
    if e != d:
        out += [ParamSpec(dec + "project_out.weight", (e, d), None, "root"),
                ParamSpec(dec + "project_in.weight", (d, e), None, "root")]
    ln = ("weight", "bias") if cfg.layer_norm_elementwise_affine else ()
    if cfg.do_layer_norm_before:
        out += [ParamSpec(dec + f"final_layer_norm.{w}", (d,), None, "root") for w in ln]
    for i in range(cfg.num_hidden_layers):
        p, unit = f"{dec}layers.{i}.", f"layers.{i}"

        def linear(name: str, n_in: int, n_out: int, column: bool) -> list[ParamSpec]:
            ws = [ParamSpec(p + name + ".weight", (n_out, n_in), 0 if column else 1, unit)]
            if cfg.enable_bias:
                # Row-parallel biases are added after the all-reduce: whole on every rank.
                ws.append(ParamSpec(p + name + ".bias", (n_out,), 0 if column else None, unit))
            return ws

        for proj in ("q_proj", "k_proj", "v_proj"):
            out += linear("self_attn." + proj, d, d, column=True)
        out += linear("self_attn.out_proj", d, d, column=False)
        out += [ParamSpec(p + f"self_attn_layer_norm.{w}", (d,), None, unit) for w in ln]
        out += linear("fc1", d, f, column=True)
        out += linear("fc2", f, d, column=False)
        out += [ParamSpec(p + f"final_layer_norm.{w}", (d,), None, unit) for w in ln]
    return out


def check_tp(cfg: ModelConfig, tp: int) -> None:
    """The divisibility ``parallel.apply_tensor_parallel`` needs, as a ``PlanError``."""
    for what, n in (("num_attention_heads", cfg.num_attention_heads), ("ffn_dim", cfg.ffn_dim),
                    ("vocab_size", cfg.vocab_size)):
        if n % tp:
            raise PlanError(f"--tp {tp} must divide model.{what} ({n}); choose a tp that divides it")


@dataclass(frozen=True)
class Activations:
    """Activation bytes of one rank for one micro-batch, by component."""
    saved: int            # kept from forward to backward: every layer's, plus the root's
    layer_working: int    # one layer in backward: its recompute (checkpointing) + gradients
    loss_forward: int     # the fused LM-head loss at its forward peak, plus its input
    loss_saved: int       # what the loss keeps for backward (grad of h and of the head)

    loss_backward: int    # the loss's backward: its saved gradients, scaled in place, and
                          # the head's cast to the compute dtype

    @property
    def loss_peak(self) -> int:
        return max(self.loss_forward, self.loss_backward)

    @property
    def total(self) -> int:
        return self.saved + self.layer_working + self.loss_peak


def layer_activation_bytes(cfg: ModelConfig, tokens: int, tp: int, c: int, mask_bytes: int) -> int:
    """Bytes one decoder layer saves for backward, for ``tokens`` = micro_batch x seq_len
    tokens, compute dtype of ``c`` bytes, counted from the tensors autograd keeps in
    ``OPTDecoderLayer.forward`` (measured in tests/unit/test_plan.py):

    - replicated on every tensor rank (no sequence parallelism): the layer input and the
      attention LayerNorm's output (the q/k/v input), the FFN LayerNorm's input and output
      (pre-LN; for post-LN the same four tensors in another order): 4 x tokens x d x c;
      two dropout masks: 2 x tokens x d x mask_bytes; two LayerNorms' fp32 mean and
      rstd: 16 x tokens;
    - split by tensor parallelism: q, k, v (3 x tokens x d x c), the attention output
      (tokens x d x c), SDPA's fp32 log-sum-exp (4 x tokens x heads), the ReLU output
      (tokens x ffn x c), each / tp. No T x T matrix: SDPA's causal flash kernel.
    - without tensor parallelism, ``_qkv`` runs one GEMM over ``torch.cat`` of the three
      weights, and autograd keeps that concatenation: 3 x d x d x c per layer.

    This is Korthikanti et al. 2022's s*b*h*(10 + 24/t) with the flash kernel's savings
    (16/t instead of 24/t, no 5*a*s/h term) and this code's extra q/k/v concatenation.
    """
    d, f, a = cfg.hidden_size, cfg.ffn_dim, cfg.num_attention_heads
    n = tokens
    dropout = cfg.dropout > 0
    replicated = 4 * n * d * c + (2 * n * d * mask_bytes if dropout else 0) + 16 * n
    split = (3 * n * d * c + n * d * c + 4 * n * a + n * f * c) // tp
    qkv_cat = 3 * d * d * c if tp == 1 else 0
    return replicated + split + qkv_cat


def activation_bytes(cfg: ModelConfig, setup: Setup) -> Activations:
    """Activation bytes of one rank for one micro-batch (``micro_batch`` x ``seq_len``).

    - saved: without checkpointing every layer's ``layer_activation_bytes``; with
      per-layer checkpointing only each layer's input (tokens x d x c, replicated), which
      ``torch.utils.checkpoint`` keeps to recompute from. Plus the root: the stack's output
      (final LayerNorm or project_out input, tokens x d x c, + 8 x tokens LayerNorm stats),
      the 350m's project_in input (tokens x e x c) and the int64 position ids.
    - layer_working: the layer in backward: with checkpointing its recomputed activations
      (``layer_activation_bytes``); and its gradients in flight: the residual gradient in
      and out (2 x tokens x d x c) plus the largest intermediate gradients (the ReLU
      input's, tokens x ffn x c, and q/k/v's, 3 x tokens x d x c, each / tp).
    - loss_peak: the fused loss (``opt.lm_head_loss``) on the rank's vocabulary shard
      ``V/tp``: one chunk of ``_LOSS_CHUNK_ELEMENTS["cuda"]`` logits' fp32 softmax and the chunk's
      gradient in the compute dtype (or the logits themselves, while the softmax is made:
      the same size; in fp32 without TP the softmax is written over the logits, in
      chunks of twice the rows: ``opt._loss_chunk_rows``), with, in a half compute dtype
      over several chunks, the chunk's
      head-gradient product and its fp32 copy (V/tp x e x (c + 4): counted though recent
      torch on CUDA adds the product into the fp32 sum by one GEMM, without either, so the
      plan errs high there by that much, ~0.5 GB at 175b with tp 8); the gradients kept for
      backward: the head's input's (tokens x e x c) and the head's (V/tp x e x c, or x 4
      summed in fp32 over several chunks in a half dtype); and its
      input h (tokens x e x c). Or, when larger, the loss's backward: those gradients,
      scaled in place, and the head's cast to the compute dtype (V/tp x e x c).
    """
    c, tp = setup.compute_bytes, setup.tp
    d, e, V = cfg.hidden_size, cfg.word_embed_proj_dim, cfg.vocab_size
    n = setup.micro_batch * setup.seq_len
    layer = layer_activation_bytes(cfg, n, tp, c, setup.dropout_mask_bytes)
    L = cfg.num_hidden_layers
    root = n * d * c + (8 * n if cfg.do_layer_norm_before else 0) + (n * e * c if e != d else 0) + 8 * n
    saved = L * (n * d * c if setup.activation_checkpointing else layer) + root
    grads = 2 * n * d * c + max(n * cfg.ffn_dim * c, 3 * n * d * c) // tp
    working = grads + (layer if setup.activation_checkpointing else 0)
    v_local = V // tp
    half = c != 4
    # fp32 without TP: the softmax is written over the logits (one tensor, twice the rows).
    in_place = not half and tp == 1
    rows = _loss_chunk_rows(v_local, in_place, "cuda")
    # Per chunk, the larger of two moments: the softmax (the logits, c; in a half dtype
    # their fp32 copy, 4; the fp32 probabilities, 4) and the gradient (the probabilities,
    # 4, and in a half dtype their cast, c, with the head-gradient product and its fp32
    # copy, V/tp x e x (c + 4)); measured in the test.
    # The head's gradient sums over the chunks in fp32 only in a half dtype with more than
    # one chunk (``acc`` in the loss); else it is written in the compute dtype in place.
    r = min(rows, n) * v_local
    if _whole_logit_grad(n, rows, e, c):
        # The whole (tokens, V/tp) gradient of the logits is held, then multiplied once.
        loss_saved = n * e * c + v_local * e * c
        chunk = r * (c + 8)
        loss_forward = n * v_local * c + max(chunk, loss_saved) + n * e * c
        loss_backward = loss_saved
    else:
        acc32 = half and n > rows
        chunk = max(r * (c + 8 if half else 4 if in_place else 8),
                    r * (4 + (c if half else 0)) + (v_local * e * (c + 4) if acc32 else 0))
        loss_saved = n * e * c + v_local * e * (4 if acc32 else c)
        loss_forward = chunk + loss_saved + n * e * c
        loss_backward = loss_saved + (v_local * e * c if acc32 else 0)
    return Activations(saved=saved, layer_working=working, loss_forward=loss_forward,
                       loss_saved=loss_saved, loss_backward=loss_backward)


@dataclass
class Plan:
    """What one rank holds and how long a step takes. Bytes are per GPU."""
    preset: str
    setup: Setup
    params: int                    # whole model (num_params)
    params_per_rank: int           # FSDP2 shard of the TP-local parameters, padded
    memory: dict[str, int]         # component -> bytes, in display order
    counted_bytes: int             # sum of the counted components
    reserve_bytes: int             # fragmentation + context reserve
    total_bytes: int
    capacity_bytes: int
    fits: bool
    tokens_per_step: int
    sequences_per_rank: float      # per data-parallel rank per step
    accumulation: int              # micro-batches per step on one rank (rounded up)
    flops_per_token: float
    step_time_s: float
    time_to_recipe_days: float     # RECIPE_TOKENS at this step time
    suggestions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["dp"] = self.setup.dp
        return d

    def verdict(self) -> str:
        """One line: fits or not, and the fixes when not."""
        s = self.setup
        used = f"{_gib(self.total_bytes)} of {_gib(self.capacity_bytes)} per GPU"
        if self.fits:
            return f"FITS: {used}"
        fix = "; ".join(self.suggestions) if self.suggestions else "no setup tried fits"
        return (f"does NOT fit: {self.preset} on {s.gpus} GPUs (tp {s.tp}, micro-batch "
                f"{s.micro_batch}, checkpointing {'on' if s.activation_checkpointing else 'off'}) "
                f"needs {used}. Fix: {fix}")


def plan(cfg: ModelConfig, setup: Setup, *, name: str = "custom", batch_tokens: int | None = None,
         suggest: bool = True) -> Plan:
    """The plan for model ``cfg`` under ``setup`` (see the module docstring for the setup
    and each formula's source). ``batch_tokens``: tokens per step when ``setup`` does not
    say (a preset's Table 1 batch)."""
    check_tp(cfg, setup.tp)
    if setup.seq_len > cfg.max_position_embeddings:
        raise PlanError(f"--seq-len {setup.seq_len} exceeds the model's "
                        f"{cfg.max_position_embeddings} positions; use at most that")
    tp, dp, c = setup.tp, setup.dp, setup.compute_bytes
    specs = param_specs(cfg)
    shard = sum(p.shard_numel(tp, dp) for p in specs)
    root_local = sum(math.prod(p.local_shape(tp)) for p in specs if p.unit == "root")
    block_local = sum(math.prod(p.local_shape(tp)) for p in specs if p.unit == "layers.0")
    act = activation_bytes(cfg, setup)
    memory = {
        # fp32 master weights, fp32 sharded gradients, AdamW m and v: the persistent state.
        "params_fp32": 4 * shard,
        "grads_fp32": 4 * shard,
        "adam_fp32": 8 * shard,
        # Root unit: not resharded after forward, so gathered for the whole step.
        # Blocks: the one computing plus the one being prefetched.
        "gathered_params": c * (root_local + 2 * block_local),
        # The root's unsharded gradient accumulates over the whole backward (the tied head
        # at its start, the embedding at its end); one block's unsharded gradient in the
        # compute dtype plus its fp32 copy for the fp32 reduce-scatter.
        "unsharded_grads": c * root_local + (c + 4) * block_local,
        "activations": act.saved,
        "layer_backward": act.layer_working,
        "loss": act.loss_peak,
    }
    # The optimizer step runs after the activations are gone; foreach AdamW's one fp32
    # temporary (sqrt of v) must still fit beside the state.
    opt_step = 16 * shard + 4 * shard
    counted = max(sum(memory.values()), opt_step)
    reserve = int(setup.fragmentation * counted) + int(setup.reserve_gib * GIB)
    total = counted + reserve
    capacity = int(setup.gpu_memory_gib * GIB)
    tokens = setup.batch_tokens or batch_tokens or setup.micro_batch * setup.seq_len * dp
    fpt = flops_per_token(cfg, setup.seq_len)
    step = fpt * tokens / (setup.gpus * setup.peak_tflops * 1e12 * setup.mfu)
    seqs = tokens / setup.seq_len / dp
    p = Plan(preset=name, setup=setup, params=num_params(cfg), params_per_rank=shard,
             memory=memory, counted_bytes=counted, reserve_bytes=reserve, total_bytes=total,
             capacity_bytes=capacity, fits=total <= capacity, tokens_per_step=tokens,
             sequences_per_rank=seqs, accumulation=max(1, math.ceil(seqs / setup.micro_batch)),
             flops_per_token=fpt, step_time_s=step,
             time_to_recipe_days=RECIPE_TOKENS / tokens * step / 86400)
    if suggest and not p.fits:
        p.suggestions = _suggest(cfg, setup, name, tokens)
    return p


def plan_preset(name: str, **setup: object) -> Plan:
    """``plan`` for a preset with its Table 1 batch; keyword arguments are ``Setup`` fields."""
    pr: Preset = preset(name)
    return plan(pr.model, Setup(**setup), name=name, batch_tokens=pr.batch_tokens)


def _suggest(cfg: ModelConfig, setup: Setup, name: str, tokens: int) -> list[str]:
    """Changes that make the plan fit, cheapest first: activation checkpointing, a smaller
    micro-batch, a larger tensor-parallel degree (one that divides the GPUs and the
    model), more GPUs. Each names the flags and the memory it would need."""
    def try_(**changes: object) -> Plan | None:
        try:
            s = dataclasses.replace(setup, **changes)
            p = plan(cfg, s, name=name, batch_tokens=tokens, suggest=False)
        except PlanError:
            return None
        return p if p.fits else None

    def say(p: Plan, flags: str) -> str:
        return f"{flags} ({_gib(p.total_bytes)})"

    out: list[str] = []
    ckpt = "" if setup.activation_checkpointing else " --activation-checkpointing"
    if ckpt and (p := try_(activation_checkpointing=True)):
        out.append(say(p, ckpt.strip()))

    def smaller_micro_batch(with_ckpt: bool) -> str | None:
        mb = setup.micro_batch // 2
        while mb >= 1:
            if p := try_(micro_batch=mb, activation_checkpointing=setup.activation_checkpointing or with_ckpt):
                return say(p, f"--micro-batch {mb}" + (ckpt if with_ckpt else ""))
            mb //= 2
        return None

    # The largest smaller micro-batch that fits as set; failing that, with checkpointing.
    if fix := smaller_micro_batch(False) or (ckpt and not out and smaller_micro_batch(True)):
        out.append(fix)
    tps = [t for t in range(setup.tp + 1, setup.gpus + 1) if setup.gpus % t == 0]
    for t in tps:
        if p := try_(tp=t):
            out.append(say(p, f"--tp {t}"))
            break
        if p := try_(tp=t, activation_checkpointing=True):
            out.append(say(p, f"--tp {t} --activation-checkpointing"))
            break
    if not out:
        # More GPUs: the smallest multiple of the TP degree (at least 8 per node's worth
        # of tensor parallelism) that fits with checkpointing and micro-batch 1.
        tp = max(setup.tp, min(8, _largest_tp(cfg, 8)))
        g = setup.gpus
        for _ in range(4096):
            g = (g // tp + 1) * tp
            if p := try_(gpus=g, tp=tp, micro_batch=1, activation_checkpointing=True):
                out.append(say(p, f"at least --gpus {g} --tp {tp} --micro-batch 1 "
                                  f"--activation-checkpointing"))
                break
    return out


def _largest_tp(cfg: ModelConfig, limit: int) -> int:
    return max(t for t in range(1, limit + 1)
               if not (cfg.num_attention_heads % t or cfg.ffn_dim % t or cfg.vocab_size % t))


def parse_memory(text: str) -> float:
    """GPU memory in GiB from '80GB', '80GiB', '80' or '141 GB'. GPU vendors' "80GB" is
    80 GiB (an A100 80GB reports 81920 MiB), so GB and GiB are read alike."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(gib|gb|g)?\s*", text, re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise PlanError(f"--gpu-memory must look like 80GB or 141GiB, got {text!r}")
    return float(m.group(1))


def _gib(b: float) -> str:
    return f"{b / GIB:.1f} GiB"


def _duration(s: float) -> str:
    if s >= 86400:
        return f"{s / 86400:.1f} days"
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    return f"{s:.2f} s" if s < 60 else f"{s / 60:.1f} min"


# Component labels for text and markdown, in display order.
LABELS = {
    "params_fp32": "params (fp32, sharded)",
    "grads_fp32": "grads (fp32, sharded)",
    "adam_fp32": "Adam m+v (fp32, sharded)",
    "gathered_params": "gathered params (root + 2 blocks)",
    "unsharded_grads": "unsharded grads (root + 1 block)",
    "activations": "activations kept",
    "layer_backward": "layer in backward",
    "loss": "fused loss",
}


def format_plan(p: Plan) -> str:
    """The plan as text lines for ``opt-ray model info``."""
    s = p.setup
    lines = [f"plan: {p.preset} on {s.gpus} GPUs of {s.gpu_memory_gib:g} GiB: tp {s.tp} x dp {s.dp}, "
             f"seq {s.seq_len}, micro-batch {s.micro_batch}, {s.precision}, activation checkpointing "
             f"{'on' if s.activation_checkpointing else 'off'}",
             f"  parameters per rank: {p.params_per_rank:,} (of {p.params:,})"]
    w = max(len(v) for v in LABELS.values())
    for k, b in p.memory.items():
        lines.append(f"  {LABELS[k]:<{w}}  {_gib(b):>11}")
    lines.append(f"  {'reserve':<{w}}  {_gib(p.reserve_bytes):>11}  ({s.fragmentation:.0%} fragmentation "
                 f"+ {s.reserve_gib:g} GiB CUDA context/NCCL)")
    lines.append(f"  {'total':<{w}}  {_gib(p.total_bytes):>11}  of {_gib(p.capacity_bytes)}")
    lines.append(f"  {p.verdict()}")
    lines.append(f"  step: {p.tokens_per_step:,} tokens ({p.sequences_per_rank:.2f} sequences per data rank, "
                 f"{p.accumulation} micro-batches), {p.flops_per_token / 1e9:.1f} GFLOP/token")
    lines.append(f"  at MFU {s.mfu:.0%} of {s.peak_tflops:g} TFLOP/s: {_duration(p.step_time_s)} per step, "
                 f"{p.time_to_recipe_days:.1f} days to {RECIPE_TOKENS / 1e9:.0f}B tokens")
    return "\n".join(lines)


# The setups deploy/SCALING.md lists: (preset, gpus, tp, micro_batch, checkpointing).
SCALING_ROWS: list[tuple[str, int, int, int, bool]] = [
    ("125m", 8, 1, 8, False),
    ("350m", 8, 1, 8, False),
    ("1.3b", 8, 1, 4, False),
    ("1.3b", 16, 1, 8, True),
    ("2.7b", 16, 1, 2, False),
    ("6.7b", 32, 2, 2, False),
    ("13b", 64, 4, 1, False),
    ("13b", 64, 4, 4, True),
    ("30b", 128, 8, 1, False),
    ("66b", 256, 8, 1, False),
    ("66b", 512, 8, 4, True),
    ("175b", 992, 8, 1, False),
    ("175b", 992, 8, 8, True),
    ("175b", 8, 8, 1, True),
    ("175b", 992, 4, 8, False),
]


def scaling_markdown() -> str:
    """deploy/SCALING.md: the plan for every preset at the setups of ``SCALING_ROWS``."""
    s0 = Setup()
    head = ["preset", "GPUs", "tp x dp", "micro-batch", "ckpt", *[LABELS[k] for k in LABELS],
            "reserve", "total", "fits", "step", f"{RECIPE_TOKENS / 1e9:.0f}B tokens"]
    rows = []
    for name, gpus, tp, mb, ck in SCALING_ROWS:
        p = plan_preset(name, gpus=gpus, tp=tp, micro_batch=mb, activation_checkpointing=ck)
        rows.append([name, str(gpus), f"{tp} x {p.setup.dp}", str(mb), "on" if ck else "off",
                     *[f"{p.memory[k] / GIB:.1f}" for k in LABELS],
                     f"{p.reserve_bytes / GIB:.1f}", f"**{p.total_bytes / GIB:.1f}**",
                     "yes" if p.fits else "**NO**", _duration(p.step_time_s),
                     f"{p.time_to_recipe_days:.1f} days"])
    out = [
        "# Scaling: what one GPU holds, and how long a step takes",
        "",
        "Generated by `python -m opt_ray.model.plan --markdown > deploy/SCALING.md` from",
        "`opt_ray/model/plan.py` (tests/unit/test_plan.py fails when this file is stale).",
        "Any other setup: `opt-ray model info --preset P --gpus N --tp T [--micro-batch B]",
        "[--activation-checkpointing] [--gpu-memory 80GB] [--mfu 0.47]`.",
        "",
        f"Setup counted: FSDP2 over the data-parallel group + Megatron tensor parallelism of degree tp;",
        f"fp32 master weights, fp32 gradients reduce-scattered every micro-batch, fp32 AdamW m and v",
        f"(16 bytes per sharded parameter); parameters gathered in {s0.precision} one block at a time",
        f"(+ one prefetched); SDPA's causal flash kernel; the chunked fused LM-head loss.",
        f"Sequence length {s0.seq_len}; memory in GiB per GPU of {s0.gpu_memory_gib:g} GiB (A100 80GB);",
        f"reserve = {s0.fragmentation:.0%} of the counted bytes for allocator fragmentation + "
        f"{s0.reserve_gib:g} GiB for the CUDA context, NCCL and cuBLAS workspaces.",
        f"Step time: train FLOPs per token (6N + 12 L d T, `config.flops_per_token`) x the preset's",
        f"Table 1 batch / (GPUs x {s0.peak_tflops:g} TFLOP/s x MFU {s0.mfu:.2f}); the paper reports",
        "147 TFLOP/s per A100 on 992 GPUs, 47% of the 312 TFLOP/s bf16/fp16 peak.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
        *["| " + " | ".join(r) + " |" for r in rows],
        "",
        "Rows that do not fit, and the fix the planner names:",
        "",
    ]
    for name, gpus, tp, mb, ck in SCALING_ROWS:
        p = plan_preset(name, gpus=gpus, tp=tp, micro_batch=mb, activation_checkpointing=ck)
        if not p.fits:
            out.append(f"- {p.verdict()}")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m opt_ray.model.plan",
                                 description="Print deploy/SCALING.md (the plan for every preset).")
    ap.add_argument("--markdown", action="store_true", help="print the markdown table (default)")
    ap.parse_args(argv)
    sys.stdout.write(scaling_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
