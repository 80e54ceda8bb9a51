"""Model presets against the paper's Table 1, and config validation."""

from __future__ import annotations

import pytest

from opt_ray.config import (PRESETS, ConfigError, ModelConfig, OptimConfig, flops_per_token,
                            num_params, preset)
from opt_ray.errors import UserError

# OPT paper, Table 1 (copied from OPT_FACTS.md): layers, heads, d_model, peak LR, batch.
M = 1 << 20
TABLE_1 = {
    "125m": (12, 12, 768, 6.0e-4, M // 2),
    "350m": (24, 16, 1024, 3.0e-4, M // 2),
    "1.3b": (24, 32, 2048, 2.0e-4, M),
    "2.7b": (32, 32, 2560, 1.6e-4, M),
    "6.7b": (32, 32, 4096, 1.2e-4, 2 * M),
    "13b": (40, 40, 5120, 1.0e-4, 4 * M),
    "30b": (48, 56, 7168, 1.0e-4, 4 * M),
    "66b": (64, 72, 9216, 0.8e-4, 2 * M),
    "175b": (96, 96, 12288, 1.2e-4, 2 * M),
}
# Nominal sizes the names stand for.
NOMINAL = {"125m": 125e6, "350m": 350e6, "1.3b": 1.3e9, "2.7b": 2.7e9, "6.7b": 6.7e9,
           "13b": 13e9, "30b": 30e9, "66b": 66e9, "175b": 175e9}


@pytest.mark.parametrize("name", list(TABLE_1))
def test_presets_match_table_1(name):
    layers, heads, d, lr, batch = TABLE_1[name]
    p = preset(name)
    m = p.model
    assert (m.num_hidden_layers, m.num_attention_heads, m.hidden_size) == (layers, heads, d)
    assert m.ffn_dim == 4 * d
    assert m.vocab_size == 50272 and m.max_position_embeddings == 2048
    assert (m.pad_token_id, m.bos_token_id, m.eos_token_id) == (1, 2, 2)
    assert m.activation_function == "relu" and m.enable_bias
    assert m.init_std == 0.006 and m.dropout == 0.1
    assert p.peak_lr == lr
    # "0.5M tokens" etc.: the preset may use the power-of-two reading of M.
    assert abs(p.batch_tokens - batch) / batch < 0.05
    # Pre-LN, no projection, except the released 350m.
    if name == "350m":
        assert not m.do_layer_norm_before and m.word_embed_proj_dim == 512
    else:
        assert m.do_layer_norm_before and m.word_embed_proj_dim == d


def test_every_preset_is_listed():
    assert set(PRESETS) == set(TABLE_1) | {"tiny"}


@pytest.mark.parametrize("name", list(TABLE_1))
def test_param_counts_near_nominal(name):
    n = num_params(preset(name).model)
    tol = 0.05 if name == "125m" else 0.10
    assert abs(n - NOMINAL[name]) / NOMINAL[name] < tol, n


def test_num_params_equals_the_built_model():
    import torch

    from opt_ray.model import OPT
    for cfg in (preset("tiny").model, preset("350m").model.replace(num_hidden_layers=2)):
        with torch.device("meta"):
            m = OPT(cfg)
        assert num_params(cfg) == sum(p.numel() for p in m.parameters())


def test_flops_per_token():
    cfg = preset("125m").model
    f = flops_per_token(cfg, 2048)
    assert 6 * 85e6 < f < 6 * 125e6 + 12 * 12 * 768 * 2048 + 1
    assert flops_per_token(cfg, 2048, training=False) == pytest.approx(f / 3)


def test_heads_not_dividing_d_model_rejected_at_construction():
    with pytest.raises(ConfigError, match="num_attention_heads") as e:
        ModelConfig(hidden_size=768, num_attention_heads=10)
    assert isinstance(e.value, UserError)
    assert "768" in str(e.value)


@pytest.mark.parametrize("bad", [dict(hidden_size=0), dict(dropout=1.5),
                                 dict(activation_function="swish"), dict(num_hidden_layers=-1)])
def test_bad_model_fields_rejected(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        ModelConfig(**bad)


def test_unknown_preset_and_field():
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("7b")
    with pytest.raises(ConfigError, match="unknown model config field"):
        ModelConfig.from_dict({"hidden_size": 64, "num_attention_heads": 4, "n_embd": 64})


def test_optim_defaults_follow_the_paper():
    o = OptimConfig()
    assert o.betas == (0.9, 0.95) and o.eps == 1e-8 and o.weight_decay == 0.1
    assert o.min_lr_ratio == 0.1 and o.grad_clip == 1.0
    with pytest.raises(ConfigError, match="betas"):
        OptimConfig(betas=(0.9, 1.0))


def test_model_info_command(capsys):
    import json

    from opt_ray.cli import main
    assert main(["model", "info", "--preset", "125m", "--json", "--gpus", "4"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"] == num_params(preset("125m").model)
    assert info["train"]["state_bytes"] == 16 * info["params"]
    assert info["train"]["state_bytes_per_gpu"] == 4 * info["params"]
    # k and v, 12 layers, 768 wide, 2 bytes
    assert info["infer"]["kv_cache_bytes_per_token"] == 2 * 12 * 768 * 2
    assert main(["model", "info"]) == 0
    table = capsys.readouterr().out
    assert all(name in table for name in PRESETS)
    assert main(["model", "info", "--preset", "7b"]) == 2
    assert "unknown preset" in capsys.readouterr().err
