"""HF interchange: from_hf / to_hf against transformers' own OPT, and bad checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from opt_ray.config import ModelConfig  # noqa: E402
from opt_ray.model import OPT, from_hf, to_hf  # noqa: E402
from opt_ray.model.hf import HFCheckpointError  # noqa: E402

SMALL = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
             num_attention_heads=4, max_position_embeddings=40)


def _hf_model(seed: int = 0, **kw) -> "transformers.OPTForCausalLM":
    """A transformers OPT with every parameter random (LayerNorms and biases too)."""
    torch.manual_seed(seed)
    cfg = transformers.OPTConfig(**{**SMALL, **kw})
    m = transformers.OPTForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.05)
    return m


def _save_bin(m, path: Path) -> None:
    """The older pytorch_model.bin format (lm_head.weight included, sharing storage)."""
    path.mkdir()
    m.config.save_pretrained(path)
    torch.save(m.state_dict(), path / "pytorch_model.bin")


def _ids(vocab: int = 100, B: int = 3, T: int = 11) -> torch.Tensor:
    return torch.randint(3, vocab, (B, T), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("kw", [{}, dict(do_layer_norm_before=False, word_embed_proj_dim=16)],
                         ids=["pre_ln", "post_ln_proj"])
def test_from_hf_matches_transformers(tmp_path, fmt, kw):
    hf = _hf_model(**kw)
    d = tmp_path / "ckpt"
    if fmt == "safetensors":
        hf.save_pretrained(d)
        assert (d / "model.safetensors").exists()
    else:
        _save_bin(hf, d)
    ours = from_hf(d)
    assert ours.config.do_layer_norm_before == kw.get("do_layer_norm_before", True)
    assert ours.lm_head.weight is ours.decoder.embed_tokens.weight
    ids = _ids()
    with torch.no_grad():
        diff = (ours(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4


def test_round_trip_from_hf_to_hf_transformers(tmp_path):
    hf = _hf_model(do_layer_norm_before=False, word_embed_proj_dim=16)
    hf.save_pretrained(tmp_path / "a")
    ours = from_hf(tmp_path / "a")
    out = to_hf(ours, tmp_path / "b")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "opt" and cfg["architectures"] == ["OPTForCausalLM"]
    back = transformers.OPTForCausalLM.from_pretrained(out).eval()
    again = from_hf(out)
    ids = _ids()
    with torch.no_grad():
        ref = hf(ids).logits
        assert (back(ids).logits - ref).abs().max().item() <= 1e-5
        assert (again(ids) - ref).abs().max().item() <= 1e-5
    assert torch.equal(back.lm_head.weight, hf.lm_head.weight)


def test_to_hf_of_a_fresh_model_loads_in_transformers(tmp_path):
    cfg = ModelConfig(**SMALL, dropout=0.0)
    torch.manual_seed(0)
    ours = OPT(cfg).eval()
    to_hf(ours, tmp_path / "x")
    hf = transformers.OPTForCausalLM.from_pretrained(tmp_path / "x").eval()
    ids = _ids()
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-4


def test_from_hf_dtype(tmp_path):
    _hf_model().save_pretrained(tmp_path / "a")
    m = from_hf(tmp_path / "a", dtype=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}


def test_decoder_prefix_without_lm_head(tmp_path):
    """OPTModel-style checkpoints: keys "decoder.*" and no LM head."""
    hf = _hf_model()
    d = tmp_path / "c"
    d.mkdir()
    hf.config.save_pretrained(d)
    from safetensors.torch import save_file
    save_file({k.removeprefix("model."): v.contiguous() for k, v in hf.state_dict().items()
               if k != "lm_head.weight"}, str(d / "model.safetensors"))
    ours = from_hf(d)
    ids = _ids()
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-4


def test_to_hf_refuses_non_empty_dir_and_overwrites_on_request(tmp_path):
    m = OPT(ModelConfig(**SMALL))
    d = tmp_path / "out"
    d.mkdir()
    (d / "stale.bin").write_text("x")
    with pytest.raises(HFCheckpointError, match="not empty"):
        to_hf(m, d)
    to_hf(m, d, overwrite=True)
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


# -- bad checkpoints: one clear error naming the key ------------------------------------

def _sd_ckpt(tmp_path: Path, mutate) -> Path:
    hf = _hf_model()
    d = tmp_path / "bad"
    d.mkdir()
    hf.config.save_pretrained(d)
    sd = {k: v.clone() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    mutate(sd)
    from safetensors.torch import save_file
    save_file(sd, str(d / "model.safetensors"))
    return d


def test_missing_tensor(tmp_path):
    d = _sd_ckpt(tmp_path, lambda sd: sd.pop("model.decoder.layers.1.fc2.bias"))
    with pytest.raises(HFCheckpointError, match=r"missing tensor 'model\.decoder\.layers\.1\.fc2\.bias' "
                                                r"\(expected shape \[32\]\)"):
        from_hf(d)


def test_wrong_shape(tmp_path):
    def mutate(sd):
        sd["model.decoder.layers.0.fc1.weight"] = torch.zeros(60, 32)
    with pytest.raises(HFCheckpointError, match=r"'model\.decoder\.layers\.0\.fc1\.weight' has shape "
                                                r"\[60, 32\], expected \[64, 32\]"):
        from_hf(_sd_ckpt(tmp_path, mutate))


def test_unexpected_tensor(tmp_path):
    def mutate(sd):
        sd["model.decoder.layers.0.extra.weight"] = torch.zeros(3)
    with pytest.raises(HFCheckpointError, match=r"unexpected tensor 'model\.decoder\.layers\.0\.extra\.weight'"):
        from_hf(_sd_ckpt(tmp_path, mutate))


def test_unknown_config_field(tmp_path):
    d = _sd_ckpt(tmp_path, lambda sd: None)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_theta"] = 10000.0
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HFCheckpointError, match=r"unknown config field 'rope_theta'"):
        from_hf(d)


def test_released_style_config_is_accepted(tmp_path):
    """The fields facebook/opt-125m's config.json carries (written by transformers 4.21)."""
    d = _sd_ckpt(tmp_path, lambda sd: None)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update({"_name_or_path": "facebook/opt-125m", "activation_dropout": 0.0, "prefix": "</s>",
                "torch_dtype": "float16", "transformers_version": "4.21.0.dev0", "layerdrop": 0.0})
    (d / "config.json").write_text(json.dumps(cfg))
    assert from_hf(d).config.hidden_size == 32


def test_bad_config_values_and_missing_files(tmp_path):
    d = _sd_ckpt(tmp_path, lambda sd: None)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": 5}))
    with pytest.raises(HFCheckpointError, match="num_attention_heads"):
        from_hf(d)
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "model.safetensors").unlink()
    with pytest.raises(HFCheckpointError, match="no weights found"):
        from_hf(d)
    with pytest.raises(HFCheckpointError, match="config.json"):
        from_hf(tmp_path / "nowhere")


def test_sharded_checkpoint(tmp_path):
    """Large checkpoints come as shards plus model.safetensors.index.json."""
    hf = _hf_model()
    hf.save_pretrained(tmp_path / "s", max_shard_size="20KB")
    assert (tmp_path / "s" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "s").glob("model-*.safetensors"))) > 1
    ours = from_hf(tmp_path / "s")
    ids = _ids()
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-4
