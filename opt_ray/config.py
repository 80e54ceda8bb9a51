"""One dataclass config tree for every stage, validated on construction.

Each stage owns a small dataclass and receives only its own part. Errors are raised in
``__post_init__`` with a message that says how to fix them (``ConfigError``).

Model presets follow the OPT paper's Table 1 (see ../shared/OPT_FACTS.md), plus ``tiny``
for laptops and CI. The size table is checked at import time: heads must divide d_model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from opt_ray.errors import UserError


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


@dataclass(frozen=True)
class Preset:
    """A row of the paper's Table 1: architecture plus the recipe's peak LR and batch."""
    name: str
    model: ModelConfig
    peak_lr: float
    batch_tokens: int


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
    "175b": Preset("175b", _opt(96, 96, 12288), 1.2e-4, 2 * _M),
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
# Training recipe (paper section 2); the training gang issue owns the fields it needs.
# --------------------------------------------------------------------------------------

@dataclass
class OptimConfig:
    peak_lr: float | None = None          # None: the preset's Table 1 value
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int | None = None       # None: 375M tokens worth (2000 steps for 175b)
    decay_steps: int | None = None        # None: 300B tokens worth
    min_lr_ratio: float = 0.1             # decay to 10% of peak
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        _require(self.peak_lr is None or self.peak_lr > 0,
                 f"optim.peak_lr must be > 0, got {self.peak_lr!r}")
        _require(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
                 f"optim.betas must be two values in [0, 1), got {self.betas!r}")
        _require(self.eps > 0, f"optim.eps must be > 0, got {self.eps!r}")
        _require(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay!r}")
        _require(0.0 <= self.min_lr_ratio <= 1.0,
                 f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        _require(self.grad_clip > 0, f"optim.grad_clip must be > 0 (use a large value to "
                 f"disable), got {self.grad_clip!r}")
        for name in ("warmup_steps", "decay_steps"):
            v = getattr(self, name)
            _require(v is None or v >= 0, f"optim.{name} must be >= 0, got {v!r}")


def to_dict(obj: Any) -> dict[str, Any]:
    """Any config dataclass as a JSON-ready dict."""
    return dataclasses.asdict(obj)
