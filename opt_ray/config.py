"""One dataclass config tree for every stage, validated on construction.

Each stage owns a small dataclass and receives only its own part. Errors are raised in
``__post_init__`` with a message that says how to fix them (``ConfigError``).

Model presets follow the OPT paper's Table 1 (see ../shared/OPT_FACTS.md), plus ``tiny``
for laptops and CI. The size table is checked at import time: heads must divide d_model.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from opt_ray.errors import UserError
from opt_ray.run_dir import is_url, local_run_dir


class ConfigError(UserError, ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------

# Field names match the HF OPTConfig so that HF interchange is a plain mapping.
@dataclass
class ModelConfig:
    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    ffn_dim: int = 3072
    max_position_embeddings: int = 2048
    # Width of the token embedding; != hidden_size only for the released 350m (512),
    # which then has project_in / project_out around the stack.
    word_embed_proj_dim: int | None = None
    # Pre-LN everywhere except the released 350m (post-LN).
    do_layer_norm_before: bool = True
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_function: str = "relu"
    init_std: float = 0.006
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 2

    def __post_init__(self) -> None:
        if self.word_embed_proj_dim is None:
            self.word_embed_proj_dim = self.hidden_size
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "ffn_dim", "max_position_embeddings", "word_embed_proj_dim"):
            v = getattr(self, name)
            _require(isinstance(v, int) and v > 0,
                     f"model.{name} must be a positive integer, got {v!r}")
        _require(self.hidden_size % self.num_attention_heads == 0,
                 f"model.num_attention_heads ({self.num_attention_heads}) must divide "
                 f"model.hidden_size ({self.hidden_size}); pick a head count that divides it "
                 f"(e.g. {_divisor_hint(self.hidden_size, self.num_attention_heads)})")
        for name in ("dropout", "attention_dropout"):
            v = getattr(self, name)
            _require(0.0 <= v < 1.0, f"model.{name} must be in [0, 1), got {v!r}")
        _require(self.activation_function in ("relu", "gelu"),
                 f"model.activation_function must be 'relu' (OPT) or 'gelu', "
                 f"got {self.activation_function!r}")
        _require(self.init_std > 0, f"model.init_std must be > 0, got {self.init_std!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, strict: bool = True) -> "ModelConfig":
        """Build from a dict; unknown keys are an error when ``strict``."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if strict and unknown:
            raise ConfigError(f"unknown model config field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**{k: v for k, v in d.items() if k in known})

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _divisor_hint(d: int, h: int) -> int:
    divisors = [k for k in range(1, d + 1) if d % k == 0]
    return min(divisors, key=lambda k: abs(k - h))


# The paper warmed up over 375M tokens, except 175B: 2000 steps (section 2.2).
PAPER_WARMUP_TOKENS = 375_000_000


@dataclass(frozen=True)
class Preset:
    """A row of the paper's Table 1: architecture plus the recipe's peak LR and batch, and
    the warmup (375M tokens, or ``warmup_steps`` steps where the paper gave steps: 175b)."""
    name: str
    model: ModelConfig
    peak_lr: float
    batch_tokens: int
    warmup_steps: int | None = None

    def warmup(self, tokens_per_step: int) -> int:
        """The paper's warmup in optimizer steps of ``tokens_per_step`` tokens."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return -(-PAPER_WARMUP_TOKENS // tokens_per_step)


def _opt(layers: int, heads: int, d: int, **kw: Any) -> ModelConfig:
    return ModelConfig(hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                       ffn_dim=4 * d, **kw)


_M = 1 << 20
PRESETS: dict[str, Preset] = {
    # tiny: trains on a laptop CPU in minutes; its vocabulary comes from the tokenizer.
    "tiny": Preset("tiny", ModelConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                       ffn_dim=512, max_position_embeddings=512), 1e-3, 16 * 1024),
    "125m": Preset("125m", _opt(12, 12, 768), 6.0e-4, _M // 2),
    # The released 350m is post-LN with a 512-wide embedding and project_in/out.
    "350m": Preset("350m", _opt(24, 16, 1024, word_embed_proj_dim=512, do_layer_norm_before=False),
                   3.0e-4, _M // 2),
    "1.3b": Preset("1.3b", _opt(24, 32, 2048), 2.0e-4, _M),
    "2.7b": Preset("2.7b", _opt(32, 32, 2560), 1.6e-4, _M),
    "6.7b": Preset("6.7b", _opt(32, 32, 4096), 1.2e-4, 2 * _M),
    "13b": Preset("13b", _opt(40, 40, 5120), 1.0e-4, 4 * _M),
    "30b": Preset("30b", _opt(48, 56, 7168), 1.0e-4, 4 * _M),
    "66b": Preset("66b", _opt(64, 72, 9216), 0.8e-4, 2 * _M),
    "175b": Preset("175b", _opt(96, 96, 12288), 1.2e-4, 2 * _M, warmup_steps=2000),
}

# Import-time consistency check of the size table (metaseq kept one; so do we).
for _p in PRESETS.values():
    assert _p.model.hidden_size % _p.model.num_attention_heads == 0, _p.name
    assert _p.model.ffn_dim == 4 * _p.model.hidden_size or _p.name == "tiny", _p.name


def preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def num_params(cfg: ModelConfig) -> int:
    """Parameter count (the LM head is tied, so counted once)."""
    d, f, L = cfg.hidden_size, cfg.ffn_dim, cfg.num_hidden_layers
    e = cfg.word_embed_proj_dim
    b = 1 if cfg.enable_bias else 0
    per_layer = 4 * d * d + 4 * d * b + 2 * d * f + (f + d) * b + 4 * d
    emb = cfg.vocab_size * e + (cfg.max_position_embeddings + 2) * d
    proj = 2 * e * d if e != d else 0
    final_ln = 2 * d if cfg.do_layer_norm_before else 0
    return L * per_layer + emb + proj + final_ln


def flops_per_token(cfg: ModelConfig, seq_len: int, *, training: bool = True) -> float:
    """Model FLOPs per token (PaLM appendix B): 6N + 12*L*d*T for training, a third for
    inference. N excludes the position table, which costs no matmul."""
    n = num_params(cfg) - (cfg.max_position_embeddings + 2) * cfg.hidden_size
    attn = 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len
    total = 6 * n + attn
    return total if training else total / 3


# --------------------------------------------------------------------------------------
# Config fields to CLI flags: one default and one help text per fact
# --------------------------------------------------------------------------------------

def _help(text: str, **meta: Any) -> dict[str, Any]:
    """Field metadata: ``help`` for the derived flag, plus optional ``flag`` (the flag's
    name when it is not ``--field-name``), ``type`` (a parser for the value), ``choices``,
    ``metavar``, ``cli=False`` (no flag) or, on a nested config, ``prefix`` for its flags."""
    return {"help": text, **meta}


def field_help(cls: type, name: str) -> str:
    """The help text of the flag ``add_dataclass_args`` derives from ``cls``'s field
    ``name`` (its default included), for a flag made elsewhere (``opt-ray ctl submit
    train``) that must say what the field says. Not %-escaped."""
    return _help_text(_field(cls, name), typing.get_type_hints(cls)[name])


def field_default(cls: type, name: str) -> Any:
    """The default of ``cls``'s field ``name`` (``dataclasses.MISSING`` when it has none)."""
    return _default(_field(cls, name))


def _field(cls: type, name: str) -> dataclasses.Field:
    return next(f for f in fields(cls) if f.name == name)


def _help_text(f: dataclasses.Field, hint: Any) -> str:
    text, default = f.metadata.get("help", ""), _default(f)
    if _unwrap_optional(hint) is not bool and default not in (None, "", dataclasses.MISSING) \
            and "default" not in text:
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
        text += f" (default: {shown})"
    return text


def _unwrap_optional(tp: Any) -> Any:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", ())) \
            and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else tp
    return tp


def _flag(f: dataclasses.Field, prefix: str) -> str:
    """A field's flag: ``--PREFIXfield-name``, or the metadata's ``flag`` (the whole
    name, without the nested prefix)."""
    return "--" + (f.metadata["flag"] if "flag" in f.metadata
                   else prefix + f.name.replace("_", "-"))


def _nested_prefix(f: dataclasses.Field, prefix: str) -> str:
    """The flag prefix of a nested config field's own fields."""
    return prefix + f.metadata.get("prefix", f.name + "-")


def _default(f: dataclasses.Field) -> Any:
    """A field's default (``dataclasses.MISSING`` when it has none)."""
    if f.default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def add_dataclass_args(parser: argparse.ArgumentParser | Any, cls: type, *, prefix: str = "",
                       dest: str = "", only: tuple[str, ...] | None = None) -> None:
    """Add one flag per field of the config dataclass ``cls`` (nested config dataclasses
    recursively, their flags prefixed by the nested field's ``prefix`` metadata). Defaults
    and help come from the fields, so ``from_args(cls, args)`` rebuilds exactly the
    dataclass's defaults when no flag is given. ``only``: just these top-level fields
    (another command that takes some of ``cls``'s flags, e.g. ``opt-ray ctl submit``)."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        meta = f.metadata
        if meta.get("cli", True) is False or (only is not None and f.name not in only):
            continue
        tp = _unwrap_optional(hints[f.name])
        name = f"{dest}{f.name}"
        if dataclasses.is_dataclass(tp):
            sub = parser
            if meta.get("group"):
                sub = parser.add_argument_group(meta["group"])
            add_dataclass_args(sub, tp, prefix=_nested_prefix(f, prefix), dest=name + "__")
            continue
        flag, default = _flag(f, prefix), _default(f)
        helptext = _help_text(f, hints[f.name]).replace("%", "%%")
        kw: dict[str, Any] = {"dest": name}
        if default is dataclasses.MISSING:
            kw["required"] = True
        else:
            kw["default"] = default
        if tp is bool:
            if default is True:
                kw["action"] = argparse.BooleanOptionalAction
            else:
                kw["action"] = "store_true"
        else:
            if typing.get_origin(tp) is tuple and "type" not in meta:
                kw["nargs"] = len(typing.get_args(tp))
                kw["type"] = typing.get_args(tp)[0]
            else:
                kw["type"] = meta.get("type", tp if tp in (int, float, str) else str)
            if meta.get("choices"):
                kw["choices"] = meta["choices"]
            if not meta.get("choices"):
                kw["metavar"] = meta.get("metavar", f.name.upper())
        parser.add_argument(flag, help=helptext, **kw)


def to_argv(obj: Any, *, skip: tuple[str, ...] = (), prefix: str = "",
            only: tuple[str, ...] | None = None) -> list[str]:
    """The flags ``add_dataclass_args`` derives for the fields of ``obj`` that differ from
    their defaults, so that parsing them rebuilds ``obj`` (``skip``: field names left
    out, e.g. a one-off ``resume_from``; ``only``: just these top-level fields). Printed
    resume commands are built from it."""
    hints = typing.get_type_hints(type(obj))
    out: list[str] = []
    for f in fields(obj):
        meta = f.metadata
        if meta.get("cli", True) is False or f.name in skip or (only is not None and f.name not in only):
            continue
        v = getattr(obj, f.name)
        tp = _unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(tp):
            if dataclasses.is_dataclass(v):
                out += to_argv(v, skip=skip, prefix=_nested_prefix(f, prefix))
            continue
        if v == _default(f):
            continue
        flag = _flag(f, prefix)
        if tp is bool:
            out.append(flag if v else "--no-" + flag[2:])
        elif isinstance(v, tuple) and "type" in meta:  # one value with its own parser (MIN:MAX)
            out += [flag, ":".join(map(str, v))]
        elif isinstance(v, tuple):
            out += [flag, *map(str, v)]
        elif v is not None:
            out += [flag, str(v)]
    return out


def flag_fields(cls: type, *, prefix: str = "", path: str = "") -> dict[str, str]:
    """Each flag ``add_dataclass_args`` derives from ``cls`` (without its ``--``) -> the
    dotted path of its field (``lr`` -> ``optim.peak_lr``): what a message that names a
    flag is about, for callers that name fields (the control plane's specs)."""
    hints = typing.get_type_hints(cls)
    out: dict[str, str] = {}
    for f in fields(cls):
        if f.metadata.get("cli", True) is False:
            continue
        if dataclasses.is_dataclass(_unwrap_optional(hints[f.name])):
            out.update(flag_fields(_unwrap_optional(hints[f.name]), prefix=_nested_prefix(f, prefix),
                                   path=f"{path}{f.name}."))
        else:
            out[_flag(f, prefix)[2:]] = path + f.name
    return out


def from_args(cls: type, args: argparse.Namespace, *, dest: str = "") -> Any:
    """Build ``cls`` from the namespace ``add_dataclass_args(parser, cls)`` filled; fields
    without a flag keep their defaults. Validation is the dataclass's own."""
    hints = typing.get_type_hints(cls)
    kw: dict[str, Any] = {}
    for f in fields(cls):
        if f.metadata.get("cli", True) is False:
            continue
        tp = _unwrap_optional(hints[f.name])
        name = f"{dest}{f.name}"
        if dataclasses.is_dataclass(tp):
            kw[f.name] = from_args(tp, args, dest=name + "__")
        elif hasattr(args, name):
            v = getattr(args, name)
            kw[f.name] = tuple(v) if isinstance(v, list) else v
    return cls(**kw)


def _coerce(cls: type, value: Any) -> Any:
    """A nested config from itself or its dict form (JSON round trips, ``from_dict``)."""
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        _require(not unknown, f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}")
        return cls(**value)
    raise ConfigError(f"expected a {cls.__name__} or a mapping, got {type(value).__name__}")


# --------------------------------------------------------------------------------------
# Training (the gang, the recipe, the divergence guard, fault injection)
# --------------------------------------------------------------------------------------

@dataclass
class OptimConfig:
    """AdamW and the LR schedule, the paper's section 2 (see ../shared/OPT_FACTS.md)."""
    peak_lr: float | None = field(default=None, metadata=_help(
        "peak LR (default: the preset's, Table 1)", flag="lr", metavar="LR"))
    betas: tuple[float, float] = field(default=(0.9, 0.95), metadata=_help(
        "AdamW betas", metavar=("B1", "B2")))
    eps: float = field(default=1e-8, metadata=_help("AdamW epsilon", flag="adam-eps"))
    weight_decay: float = field(default=0.1, metadata=_help("AdamW weight decay"))
    warmup_steps: int | None = field(default=None, metadata=_help(
        "linear warmup steps (default: the paper's, 375M tokens or 2000 steps for 175b, "
        "at most a tenth of --steps so that short runs warm up too)"))
    decay_steps: int | None = field(default=None, metadata=_help(
        "step at which the LR reaches --min-lr-ratio x peak (default: --steps)"))
    min_lr_ratio: float = field(default=0.1, metadata=_help(
        "the LR decays linearly to this fraction of the peak"))
    grad_clip: float = field(default=1.0, metadata=_help(
        "gradient clipping (global L2 norm); OPT lowered it to 0.3 after divergences"))

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        _require(self.peak_lr is None or self.peak_lr > 0,
                 f"--lr (optim.peak_lr) must be > 0, got {self.peak_lr!r}; the paper's peak LRs "
                 f"are 6e-4 (125m) .. 1.2e-4 (175b), or leave it out for the preset's")
        _require(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
                 f"--betas (optim.betas) must be two values in [0, 1), got {self.betas!r}")
        _require(self.eps > 0, f"--adam-eps (optim.eps) must be > 0, got {self.eps!r}")
        _require(self.weight_decay >= 0,
                 f"--weight-decay (optim.weight_decay) must be >= 0, got {self.weight_decay!r}")
        _require(0.0 <= self.min_lr_ratio <= 1.0,
                 f"--min-lr-ratio (optim.min_lr_ratio) must be in [0, 1], got {self.min_lr_ratio!r}")
        _require(self.grad_clip > 0, f"--grad-clip (optim.grad_clip) must be > 0 (use a large "
                 f"value to disable), got {self.grad_clip!r}")
        for name in ("warmup_steps", "decay_steps"):
            v = getattr(self, name)
            _require(v is None or (isinstance(v, int) and v >= 0),
                     f"--{name.replace('_', '-')} (optim.{name}) must be an integer >= 0, got {v!r}")
        _require(self.decay_steps is None or self.decay_steps >= 1,
                 f"--decay-steps must be >= 1, got {self.decay_steps}")
        _require(self.warmup_steps is None or self.decay_steps is None
                 or self.warmup_steps <= self.decay_steps,
                 f"--warmup-steps ({self.warmup_steps}) must not exceed --decay-steps "
                 f"({self.decay_steps}); the decay starts after the warmup")


@dataclass
class GuardConfig:
    """Divergence policy (``opt_ray.train.guard``). The defaults are the paper's interventions.

    Detection: a non-finite loss (or non-finite grad norm outside fp16, where overflow is
    the loss scaler's business), a loss above ``spike_factor`` x the mean of the last
    ``window`` healthy losses (only once ``min_steps`` healthy steps were seen), or an fp16
    loss scale at or below ``loss_scale_floor``.

    Response: roll back to the last checkpoint before the onset whose loss scale was at
    least ``min_checkpoint_loss_scale`` (fp16 runs), multiply the LR by ``lr_factor``
    (compounding over rollbacks), set gradient clipping to ``clip_after_rollback`` (None:
    leave it), skip the batches of the last ``skip_batches`` steps up to the detection.
    After ``max_rollbacks`` rollbacks the next detection gives up with a report.
    """
    enabled: bool = field(default=True, metadata=_help(
        "the divergence guard: roll back on NaN / loss spikes / a collapsed fp16 loss scale "
        "(--no-guard: off)", flag="guard"))
    spike_factor: float = field(default=1.5, metadata=_help(
        "a loss above this x its running mean is a spike"))
    # A loss above onset_factor x running mean is "elevated": not yet a spike, but it marks
    # when the trouble began, and it is kept out of the running mean.
    onset_factor: float = field(default=1.1, metadata=_help(
        "a loss above this x its running mean marks the onset of trouble (rollback target)"))
    window: int = field(default=50, metadata=_help("healthy steps in the running mean"))
    min_steps: int = field(default=20, metadata=_help(
        "healthy steps seen before spikes are judged"))
    # An elevated streak this long that never became a spike is a new normal (e.g. a
    # harder data mix): it joins the baseline and stops counting as the onset of trouble.
    onset_patience: int = field(default=200, metadata=_help(
        "an elevated streak this long without a spike becomes the new baseline"))
    check_nan: bool = field(default=True, metadata=_help("a non-finite loss is a divergence"))
    # Optional: a grad norm above this factor x its running mean also counts as a spike.
    grad_spike_factor: float | None = field(default=None, metadata=_help(
        "a grad norm above this x its running mean is also a spike (default: off)"))
    # fp16 dynamic loss scaling: a scale at/below the floor means the scaler keeps
    # overflowing, i.e. the run is diverging (fairseq's min_loss_scale default). The
    # scaler's own floor (DynamicLossScaler.min_scale) lies below it, so this can fire.
    loss_scale_floor: float | None = field(default=1e-4, metadata=_help(
        "fp16: a loss scale at or below this is a divergence"))
    # OPT rolled back to checkpoints "whose loss scale was >= 1.0".
    min_checkpoint_loss_scale: float = field(default=1.0, metadata=_help(
        "fp16: roll back only to checkpoints whose loss scale was at least this"))
    lr_factor: float = field(default=0.5, metadata=_help(
        "LR multiplier per rollback, compounding"))
    clip_after_rollback: float | None = field(default=0.3, metadata=_help(
        "gradient clipping after a rollback (OPT lowered 1.0 -> 0.3)", flag="guard-clip"))
    skip_batches: int = field(default=1, metadata=_help(
        "batches up to the detection that are skipped after a rollback"))
    max_rollbacks: int = field(default=3, metadata=_help(
        "rollbacks before the run stops with a report"))

    def __post_init__(self) -> None:
        _require(isinstance(self.enabled, bool), f"guard.enabled must be true or false, got {self.enabled!r}")
        _require(self.spike_factor > 1.0,
                 f"guard.spike_factor must be > 1 (a spike is loss > factor x running mean; "
                 f"OPT-scale runs use ~1.5), got {self.spike_factor!r}")
        _require(1.0 <= self.onset_factor <= self.spike_factor,
                 f"guard.onset_factor must be in [1, spike_factor={self.spike_factor}] (it marks "
                 f"the start of the rise before a spike), got {self.onset_factor!r}")
        _require(isinstance(self.window, int) and self.window >= 1,
                 f"guard.window must be a positive number of steps, got {self.window!r}")
        _require(isinstance(self.onset_patience, int) and self.onset_patience >= 1,
                 f"guard.onset_patience must be a positive number of steps, got {self.onset_patience!r}")
        _require(isinstance(self.min_steps, int) and self.min_steps >= 1,
                 f"guard.min_steps must be >= 1 (healthy steps seen before spikes are judged), "
                 f"got {self.min_steps!r}")
        _require(self.grad_spike_factor is None or self.grad_spike_factor > 1.0,
                 f"guard.grad_spike_factor must be > 1 or None (off), got {self.grad_spike_factor!r}")
        _require(self.loss_scale_floor is None or self.loss_scale_floor > 0,
                 f"guard.loss_scale_floor must be > 0 or None (off), got {self.loss_scale_floor!r}")
        _require(self.min_checkpoint_loss_scale >= 0,
                 f"guard.min_checkpoint_loss_scale must be >= 0, got {self.min_checkpoint_loss_scale!r}")
        _require(0.0 < self.lr_factor <= 1.0,
                 f"guard.lr_factor must be in (0, 1] (the LR is multiplied by it after each "
                 f"rollback; 1 keeps it), got {self.lr_factor!r}")
        _require(self.clip_after_rollback is None or self.clip_after_rollback > 0,
                 f"guard.clip_after_rollback must be > 0 or None (leave clipping as is), "
                 f"got {self.clip_after_rollback!r}")
        _require(isinstance(self.skip_batches, int) and self.skip_batches >= 0,
                 f"guard.skip_batches must be an integer >= 0 (0: skip no data), got {self.skip_batches!r}")
        _require(isinstance(self.max_rollbacks, int) and self.max_rollbacks >= 0,
                 f"guard.max_rollbacks must be an integer >= 0, got {self.max_rollbacks!r}")


@dataclass
class ChaosConfig:
    """Fault injection for tests and drills (``opt_ray.train.chaos``)."""
    spec: str = field(default="", metadata=_help(
        "fault injection, e.g. kill:rank=1:step=5,hang:rank=0:step=8,corrupt:step=6,"
        "killsave:rank=0:step=4,nan:step=10,spike:step=12:factor=10", flag="chaos"))

    def __post_init__(self) -> None:
        from opt_ray.train.chaos import parse_chaos

        parse_chaos(self.spec)  # a bad spec fails before any worker starts

    def __str__(self) -> str:
        return self.spec


def parse_workers(text: str) -> int | tuple[int, int]:
    """``--workers``: N, or MIN:MAX for an elastic gang."""
    try:
        if ":" in text:
            lo, hi = text.split(":", 1)
            return int(lo), int(hi)
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--workers takes N or MIN:MAX (e.g. 2 or 1:4), got {text!r}") from None


# Flat names the training config had before it was nested; still accepted by the
# constructor and ``from_dict`` and readable as attributes (callers and saved configs).
_FLAT_OPTIM = {"lr": "peak_lr", "warmup_steps": "warmup_steps", "decay_steps": "decay_steps",
               "grad_clip": "grad_clip", "weight_decay": "weight_decay"}
DEVICES = ("auto", "cuda", "cpu")
PRECISIONS = ("bf16", "fp16", "fp32")


#: --precision fp16 where the step runs on a CPU (checked here for --device cpu, by the
#: trainer where --device auto found no GPU).
FP16_NEEDS_GPU = ("--precision fp16 needs a GPU (CPUs have no fast fp16 matmul, and the "
                  "paper's loss-scaled fp16 is a GPU recipe); use --precision bf16 or fp32 on CPU")

@dataclass
class TrainConfig:
    """Everything ``opt-ray train`` takes; every flag is derived from a field here.

    Nested: ``optim`` (AdamW + LR schedule), ``guard`` (divergence policy), ``chaos`` (fault
    injection). The constructor also takes the flat names of before the nesting
    (``lr``, ``warmup_steps``, ``decay_steps``, ``grad_clip``, ``weight_decay``, ``guard=bool``,
    ``guard_policy={...}``, ``chaos="spec"``), which stay readable as attributes.
    Everything knowable without the data or a cluster is validated here.
    """
    data: str = field(metadata=_help(
        "token shards (from `opt-ray tokenize`): a directory every node reads, or a bucket URL "
        "such as s3://bucket/shards (each rank reads its rows by ranged GETs; nothing is "
        "downloaded whole)"))
    output: str = field(metadata=_help(
        "run directory: checkpoints, metrics, logbook, kept tokenizer; a local directory or an "
        "fsspec URL such as s3://bucket/runs/run1 (standard AWS variables and AWS_ENDPOINT_URL; "
        "staged on each node under $OPT_RAY_STAGING_DIR or ~/.cache/opt-ray/runs); re-running "
        "with the same --output resumes from its newest valid checkpoint"))
    preset: str = field(default="tiny", metadata=_help(
        "model size from the paper's Table 1, or tiny", choices=tuple(PRESETS)))
    steps: int = field(default=100, metadata=_help("optimizer steps in total"))
    workers: int | tuple[int, int] = field(default=1, metadata=_help(
        "N workers, or MIN:MAX for an elastic gang (both multiples of --tp)",
        type=parse_workers, metavar="N|MIN:MAX"))
    tp: int = field(default=1, metadata=_help("tensor-parallel degree (divides the workers)"))
    device: str = field(default="auto", metadata=_help(
        "auto: one GPU per worker when the cluster advertises GPUs, else CPU; cuda; cpu",
        choices=DEVICES))
    precision: str | None = field(default=None, metadata=_help(
        "default: fp16 with dynamic loss scaling on GPU (as the paper); on CPU bf16 where "
        "the CPU has native bf16 (AVX512-BF16/AMX), else fp32",
        choices=PRECISIONS))
    batch_tokens: int | None = field(default=None, metadata=_help(
        "tokens per optimizer step (default: the preset's, Table 1), kept exactly whatever "
        "the number of workers: gradient accumulation absorbs the data-parallel width"))
    micro_batch: int = field(default=8, metadata=_help("rows per forward/backward pass"))
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"prefix": ""})
    dropout: float = field(default=0.1, metadata=_help("dropout (not on embeddings)"))
    seed: int = field(default=0, metadata=_help("seed of init, data order and dropout"))
    checkpoint_every: int = field(default=50, metadata=_help("steps between checkpoints"))
    checkpoint_dir: str | None = field(default=None, metadata=_help(
        "where checkpoints go: a local directory or an fsspec URL such as "
        "s3://bucket/run/checkpoints (default: OUTPUT/checkpoints)"))
    async_checkpoint: bool = field(default=False, metadata=_help(
        "write checkpoints in the background (DCP async save); each is committed before "
        "the next one starts and before the run finishes"))
    mirror_every: float = field(default=30.0, metadata=_help(
        "with a bucket --output: seconds between rank 0's uploads of the new metrics lines "
        "and the logbook between checkpoints, so that the progress bar, `ctl watch` and "
        "`opt-ray logbook --follow URL` move on every node (0: at checkpoints only)",
        metavar="SECONDS"))
    keep: int = field(default=2, metadata=_help(
        "checkpoints kept (>= 2), plus milestones and the targets of rollbacks by hand "
        "(`opt-ray ctl rollback` pins them: step_N/.pinned)"))
    milestone_every: int | None = field(default=None, metadata=_help(
        "also keep every checkpoint whose step is a multiple of this"))
    deterministic: bool = field(default=False, metadata=_help(
        "deterministic kernels: a restarted run ends bit-identical to an uninterrupted one "
        "(same world size)"))
    max_failures: int = field(default=3, metadata=_help(
        "gang restarts allowed before the run fails (-1: unlimited)"))
    collective_timeout: float = field(default=300.0, metadata=_help(
        "seconds before a hung collective fails the gang"))
    chaos: ChaosConfig = field(default_factory=ChaosConfig, metadata={"prefix": ""})
    activation_checkpointing: bool = field(default=False, metadata=_help(
        "recompute each layer's activations in backward (less memory)"))
    compile: bool = field(default=False, metadata=_help(
        "torch.compile each decoder block (one graph reused by every layer; the first step "
        "pays the compile, seconds to minutes); fuses the blocks' norms, activations and "
        "dropout and cuts kernel launches on GPUs. Dropout masks come from the compiler's "
        "generator: a run is reproducible with the same --compile, not across it"))
    guard: GuardConfig = field(default_factory=GuardConfig, metadata={
        "prefix": "guard-", "group": "divergence guard policy (defaults: the OPT-175B team's "
                                     "interventions)"})
    num_threads: int | None = field(default=None, metadata=_help(
        "torch threads per worker (default: Ray's, one per CPU the worker reserves); e.g. "
        "the machine's cores for a single CPU worker", flag="threads", metavar="N"))
    resume_from: int | None = field(default=None, metadata=_help(
        "roll back to the checkpoint of step STEP of --output and continue from there; "
        "newer checkpoints are moved aside to RUN_DIR/abandoned/", metavar="STEP"))
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12], metadata={"cli": False})

    def __post_init__(self) -> None:
        preset(self.preset)  # raises with the list of presets
        self.optim = _coerce(OptimConfig, self.optim)
        self.guard = self._guard_from(self.guard)
        self.chaos = self.chaos if isinstance(self.chaos, ChaosConfig) else (
            ChaosConfig(self.chaos or "") if isinstance(self.chaos, str) else _coerce(ChaosConfig, self.chaos))
        _require(isinstance(self.output, str) and bool(self.output), "--output must name a run directory")
        # Workers run in another directory than the driver: paths must not be relative.
        self.data = self.data.rstrip("/") if is_url(self.data) else os.path.abspath(self.data)
        if is_url(self.output):
            self.output = self.output.rstrip("/")
            _require(self.output.count("/") >= 3, f"--output {self.output!r} must name a prefix "
                     f"inside a bucket, e.g. s3://bucket/runs/run1")
        else:
            self.output = os.path.abspath(self.output)
        if self.checkpoint_dir is not None and not is_url(self.checkpoint_dir):
            self.checkpoint_dir = os.path.abspath(self.checkpoint_dir)
        _require(self.device in DEVICES, f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        _require(self.precision in (None, *PRECISIONS),
                 f"--precision must be bf16, fp16 or fp32, got {self.precision!r}")
        _require(not (self.precision == "fp16" and self.device == "cpu"), FP16_NEEDS_GPU)
        _require(isinstance(self.tp, int) and self.tp >= 1, f"--tp must be >= 1, got {self.tp}")
        if isinstance(self.workers, (list, tuple)):
            lo, hi = int(self.workers[0]), int(self.workers[1])
            self.workers = (lo, hi)
            _require(1 <= lo <= hi, f"--workers MIN:MAX needs 1 <= MIN <= MAX, got {lo}:{hi}")
            _require(lo % self.tp == 0 and hi % self.tp == 0,
                     f"--workers {lo}:{hi}: MIN and MAX must be multiples of --tp {self.tp} (a gang "
                     f"is whole tensor-parallel groups); e.g. --workers "
                     f"{max(self.tp, lo // self.tp * self.tp)}:{max(self.tp, hi // self.tp * self.tp)}")
        else:
            self.workers = int(self.workers)
            _require(self.workers >= 1, f"--workers must be >= 1, got {self.workers}")
            _require(self.workers % self.tp == 0,
                     f"--tp {self.tp} must divide --workers {self.workers} (a gang is whole "
                     f"tensor-parallel groups); use --workers {max(self.tp, self.workers // self.tp * self.tp)} "
                     f"or a --tp that divides {self.workers}")
        _require(self.steps >= 1, f"--steps must be >= 1, got {self.steps}")
        _require(self.batch_tokens is None or self.batch_tokens >= 1,
                 f"--batch-tokens must be >= 1, got {self.batch_tokens}")
        _require(self.micro_batch >= 1, f"--micro-batch must be >= 1, got {self.micro_batch}")
        _require(self.optim.warmup_steps is None or self.optim.warmup_steps <= self.steps,
                 f"--warmup-steps {self.optim.warmup_steps} exceeds --steps {self.steps}: the run "
                 f"would end before the LR reaches its peak; use a warmup <= --steps")
        _require(self.checkpoint_every >= 1, f"--checkpoint-every must be >= 1, got {self.checkpoint_every}")
        _require(self.mirror_every >= 0, f"--mirror-every must be >= 0 seconds (0: at "
                                         f"checkpoints only), got {self.mirror_every}")
        _require(self.keep >= 2, f"--keep must be >= 2 (the previous checkpoint is the fallback "
                                 f"when the newest is corrupt), got {self.keep}")
        _require(self.milestone_every is None or self.milestone_every >= 1,
                 f"--milestone-every must be >= 1, got {self.milestone_every}")
        _require(self.collective_timeout > 0, f"--collective-timeout must be > 0 seconds, "
                                              f"got {self.collective_timeout}")
        _require(self.max_failures >= -1, f"--max-failures must be >= 0 (or -1: unlimited), "
                                          f"got {self.max_failures}")
        _require(0.0 <= self.dropout < 1.0, f"--dropout must be in [0, 1), got {self.dropout}")
        _require(isinstance(self.seed, int) and 0 <= self.seed < 2**63,
                 f"--seed must be an integer in [0, 2^63), got {self.seed!r}")
        _require(self.num_threads is None or self.num_threads >= 1,
                 f"--threads must be >= 1, got {self.num_threads}")
        _require(self.resume_from is None or 0 <= self.resume_from <= self.steps,
                 f"--resume-from must be a checkpoint step in [0, --steps], got {self.resume_from}")

    @staticmethod
    def _guard_from(value: Any) -> GuardConfig:
        if isinstance(value, bool):  # the flat form: guard on/off with the default policy
            return GuardConfig(enabled=value)
        return _coerce(GuardConfig, value)

    # -- flat views (names of before the nesting) ---------------------------------------
    @property
    def lr(self) -> float | None:
        return self.optim.peak_lr

    @property
    def warmup_steps(self) -> int | None:
        return self.optim.warmup_steps

    @property
    def decay_steps(self) -> int | None:
        return self.optim.decay_steps

    @property
    def grad_clip(self) -> float:
        return self.optim.grad_clip

    @property
    def weight_decay(self) -> float:
        return self.optim.weight_decay

    @property
    def guard_policy(self) -> dict[str, Any]:
        """The guard settings that differ from the paper's defaults (``enabled`` aside)."""
        base = GuardConfig()
        return {f.name: getattr(self.guard, f.name) for f in fields(GuardConfig)
                if f.name != "enabled" and getattr(self.guard, f.name) != getattr(base, f.name)}

    def guard_config(self) -> GuardConfig:
        return self.guard

    @property
    def min_workers(self) -> int:
        return self.workers[0] if isinstance(self.workers, tuple) else int(self.workers)

    @property
    def max_workers(self) -> int:
        return self.workers[1] if isinstance(self.workers, tuple) else int(self.workers)

    @property
    def checkpoint_location(self) -> str:
        """Where checkpoints go: ``checkpoint_dir``, else OUTPUT/checkpoints."""
        return self.checkpoint_dir or f"{self.output}/checkpoints"

    @property
    def run_dir(self) -> Path:
        """The run directory as this process reads and writes it: ``--output`` itself, or
        for a URL its staging directory on this node (``opt_ray.run_dir``)."""
        return local_run_dir(self.output)

    def world_sizes(self) -> list[int]:
        """Every gang size the elastic range may form: multiples of --tp in [MIN, MAX]."""
        return [n for n in range(self.min_workers, self.max_workers + 1) if n % self.tp == 0]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, strict: bool = False) -> "TrainConfig":
        """Build from ``to_dict``'s form (or the flat one of before); unknown keys are
        ignored unless ``strict``."""
        known = {f.name for f in fields(cls)} | set(_FLAT_OPTIM) | {"guard_policy"}
        unknown = sorted(set(d) - known)
        _require(not (strict and unknown), f"unknown train config field(s) {unknown}")
        return cls(**{k: v for k, v in d.items() if k in known})


def _train_init_accepting_flat_names(init):
    import functools

    @functools.wraps(init)
    def __init__(self, *args: Any, **kw: Any) -> None:
        flat = {_FLAT_OPTIM[k]: kw.pop(k) for k in list(kw) if k in _FLAT_OPTIM}
        if flat:
            kw["optim"] = dataclasses.replace(_coerce(OptimConfig, kw.get("optim") or OptimConfig()), **flat)
        policy = kw.pop("guard_policy", None)
        if policy:
            known = {f.name for f in fields(GuardConfig)}
            unknown = sorted(set(policy) - known)
            _require(not unknown, f"unknown guard policy field(s) {unknown}; known: {sorted(known)}")
            kw["guard"] = dataclasses.replace(TrainConfig._guard_from(kw.get("guard", True)), **policy)
        init(self, *args, **kw)

    return __init__


TrainConfig.__init__ = _train_init_accepting_flat_names(TrainConfig.__init__)  # type: ignore[method-assign]


def to_dict(obj: Any) -> dict[str, Any]:
    """Any config dataclass as a JSON-ready dict."""
    return dataclasses.asdict(obj)
