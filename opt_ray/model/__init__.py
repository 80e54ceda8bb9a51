"""The OPT model, HF checkpoint interchange, and parallelism applied from outside.

``OPT(cfg)`` builds the model; ``from_hf(path)`` / ``to_hf(model, path)`` read and write
HF-format checkpoint directories; ``opt_ray.model.parallel`` holds FSDP2 and tensor
parallelism (import it explicitly: it pulls in fairscale and torch.distributed).
"""

from opt_ray.model.hf import from_hf, to_hf
from opt_ray.model.opt import OPT, KVCache

__all__ = ["OPT", "KVCache", "from_hf", "to_hf"]
