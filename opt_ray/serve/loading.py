"""Loading a served checkpoint: the model from an HF-format dir, the tokenizer beside it.

Delegates to the project's loaders (``opt_ray.model.hf.from_hf``,
``opt_ray.data.tokenizer.load_tokenizer``). While ``opt_ray.model.hf`` is not in the
tree, a minimal reader of config.json + model.safetensors / pytorch_model.bin stands in.
"""

from __future__ import annotations

import json
from pathlib import Path

from opt_ray.errors import UserError


def load_hf_model(path: Path):
    try:
        from opt_ray.model.hf import from_hf
    except ImportError:
        return _read_hf_dir(path)
    return from_hf(path)


def load_tokenizer_dir(path: Path):
    try:
        from opt_ray.data.tokenizer import load_tokenizer
    except ImportError:
        from tokenizers import Tokenizer
        if not (path / "tokenizer.json").is_file():
            raise UserError(f"{path}: no tokenizer.json next to the checkpoint") from None
        return Tokenizer.from_file(str(path / "tokenizer.json"))
    return load_tokenizer(path)


def _read_hf_dir(path: Path):
    import torch

    from opt_ray.config import ModelConfig
    from opt_ray.model.opt import OPT

    raw = json.loads((path / "config.json").read_text())
    cfg = ModelConfig.from_dict(raw, strict=False)
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file
        state = load_file(str(path / "model.safetensors"))
    elif (path / "pytorch_model.bin").is_file():
        state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise UserError(f"{path}: no model.safetensors or pytorch_model.bin")
    # Some exports omit the tied head or prefix keys without "model.".
    state = {k if k.startswith(("model.", "lm_head")) else "model." + k: v for k, v in state.items()}
    state.setdefault("lm_head.weight", state["model.decoder.embed_tokens.weight"])
    model = OPT(cfg)
    model.load_state_dict(state, strict=True)
    return model
