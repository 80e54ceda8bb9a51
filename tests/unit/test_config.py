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


# --- the training config: one tree, flags derived from it ------------------------------

def _train_args(*flags):
    from opt_ray.cli import build_parser
    return build_parser().parse_args(["train", "--data", "d", "--output", "o", *flags])


def _without_run_id(d):
    return {k: v for k, v in d.items() if k != "run_id"}


def test_train_flags_are_derived_from_the_config_fields():
    from opt_ray.commands.train import config_from_args
    from opt_ray.config import GuardConfig, TrainConfig

    # No flags: exactly the dataclass's defaults (one default per fact).
    assert _without_run_id(config_from_args(_train_args()).to_dict()) == \
        _without_run_id(TrainConfig(data="d", output="o").to_dict())
    cfg = config_from_args(_train_args(
        "--lr", "3e-4", "--warmup-steps", "5", "--grad-clip", "0.5", "--betas", "0.8", "0.9",
        "--guard-clip", "0.2", "--guard-lr-factor", "0.25", "--workers", "2:4", "--tp", "2",
        "--chaos", "nan:step=3", "--threads", "2", "--device", "cpu", "--checkpoint-dir",
        "s3://bucket/run/ckpt", "--resume-from", "4"))
    assert (cfg.optim.peak_lr, cfg.optim.warmup_steps, cfg.optim.grad_clip) == (3e-4, 5, 0.5)
    assert cfg.optim.betas == (0.8, 0.9)
    assert (cfg.guard.clip_after_rollback, cfg.guard.lr_factor, cfg.guard.enabled) == (0.2, 0.25, True)
    assert cfg.workers == (2, 4) and cfg.tp == 2 and cfg.chaos.spec == "nan:step=3"
    assert cfg.num_threads == 2 and cfg.device == "cpu" and cfg.resume_from == 4
    assert cfg.checkpoint_dir == "s3://bucket/run/ckpt"  # a URL is kept as is
    assert config_from_args(_train_args("--no-guard")).guard == GuardConfig(enabled=False)
    # The flat names of before the nesting still build and read the same config.
    flat = TrainConfig(data="d", output="o", lr=3e-4, warmup_steps=5, grad_clip=0.5, guard=True,
                       guard_policy={"clip_after_rollback": 0.2, "lr_factor": 0.25},
                       chaos="nan:step=3")
    assert (flat.lr, flat.warmup_steps, flat.grad_clip) == (3e-4, 5, 0.5)
    assert flat.guard_policy == {"clip_after_rollback": 0.2, "lr_factor": 0.25}
    assert flat.guard == cfg.guard and flat.chaos == cfg.chaos
    # JSON round trip (the gang's workers get the config as a dict).
    import json
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_printed_resume_command_trains_the_same_run():
    """A run started without the CLI (a library call) prints its resume command from the
    config: parsed by the real `opt-ray train` parser it must give the same settings
    (never the preset's batch instead of the run's, say)."""
    import shlex

    from actors.train import resume_command
    from opt_ray.commands.train import config_from_args
    cfg = config_from_args(_train_args(
        "--lr", "3e-4", "--betas", "0.8", "0.9", "--batch-tokens", "4096", "--micro-batch", "2",
        "--workers", "2:4", "--tp", "2", "--no-guard", "--deterministic", "--threads", "2",
        "--checkpoint-dir", "s3://bucket/run/ckpt", "--resume-from", "4", "--chaos", "nan:step=3"))
    argv = shlex.split(resume_command(cfg, argv=["python"]))
    assert argv[:2] == ["opt-ray", "train"]
    again = config_from_args(_train_args(*argv[2:]))
    want = _without_run_id(cfg.to_dict())
    want.update(resume_from=None, chaos={"spec": ""})  # a resume neither rolls back nor injects
    assert _without_run_id(again.to_dict()) == want


@pytest.mark.parametrize("kw,needle", [
    (dict(tp=3, workers=2), "--tp 3 must divide --workers 2"),
    (dict(tp=2, workers=(1, 4)), "multiples of --tp 2"),
    (dict(lr=-1.0), "--lr"),
    (dict(warmup_steps=50, steps=10), "--warmup-steps 50 exceeds --steps 10"),
    (dict(warmup_steps=5, decay_steps=2), "--warmup-steps (5) must not exceed --decay-steps"),
    (dict(device="tpu"), "--device"),
    (dict(precision="fp16", device="cpu"), "fp16 needs a GPU"),
    (dict(output="s3://bucket"), "prefix inside a bucket"),
    (dict(guard_policy={"lr_factor": 2.0}), "lr_factor"),
])
def test_train_config_errors_name_the_flag(kw, needle):
    from opt_ray.config import TrainConfig

    with pytest.raises(ConfigError) as e:
        TrainConfig(**{"data": "d", "output": "o", **kw})
    assert needle in str(e.value) and "\n" not in str(e.value)
