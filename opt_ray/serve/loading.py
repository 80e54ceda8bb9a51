"""Loading a served checkpoint: the model from an HF-format dir, the tokenizer beside it.

Thin on purpose: the project's loaders (``opt_ray.model.hf.from_hf``,
``opt_ray.data.tokenizer.load_tokenizer``) own formats and validation.
"""

from __future__ import annotations

from pathlib import Path


def load_hf_model(path: Path):
    from opt_ray.model.hf import from_hf
    return from_hf(path)


def load_tokenizer_dir(path: Path):
    from opt_ray.data.tokenizer import load_tokenizer
    return load_tokenizer(path)
