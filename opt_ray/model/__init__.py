"""The OPT model, HF checkpoint interchange, and parallelism applied from outside.

``OPT(cfg)`` builds the model; ``from_hf(path)`` / ``to_hf(model, path)`` read and write
HF-format checkpoint directories; ``opt_ray.model.parallel`` holds FSDP2 and tensor
parallelism (imported on demand: it pulls in fairscale and torch.distributed).
"""

from opt_ray.model.opt import OPT, KVCache

__all__ = ["OPT", "KVCache", "from_hf", "to_hf"]


def from_hf(path, *, dtype=None):
    """Load an HF-format OPT checkpoint directory (see ``opt_ray.model.hf.from_hf``)."""
    from opt_ray.model.hf import from_hf as _from_hf
    return _from_hf(path, dtype=dtype)


def to_hf(model, path):
    """Write an HF-format OPT checkpoint directory (see ``opt_ray.model.hf.to_hf``)."""
    from opt_ray.model.hf import to_hf as _to_hf
    return _to_hf(model, path)
