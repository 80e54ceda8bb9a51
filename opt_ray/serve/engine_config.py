"""The serving engine's settings: one field, default and help text each.

Torch-free on purpose, like ``frontend_config``: ``opt-ray serve`` derives its engine
flags from ``EngineConfig`` when it builds its parser, and ``--help`` must stay fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from opt_ray.config import DEVICES
from opt_ray.errors import UserError

# float16 is what OPT's released weights are stored in.
DTYPES = ("float32", "bfloat16", "float16")

#: What ``--checkpoint`` takes, wherever a checkpoint is served from (``opt-ray serve``,
#: ``generate``, ``ctl serve deploy``): ``engine.resolve_checkpoint``.
CHECKPOINT_HELP = (
    "an HF-format checkpoint dir (config.json + weights + tokenizer, as `opt-ray export` "
    "writes), or a training run dir (`opt-ray train --output`) or one of its "
    "checkpoints/step_N: with no export inside it (hf/ or export/), each node that loads it "
    "builds the HF dir itself from the run's newest committed checkpoint (or the one named), "
    "in the engine's dtype, into its fetch dir ($OPT_RAY_FETCH_DIR) once per checkpoint; any "
    "of these may be a bucket prefix (s3://...: fetched to each node once)")


@dataclass
class EngineConfig:
    """Capacity and scheduling knobs of one engine (one Serve replica)."""
    max_num_seqs: int = field(default=8, metadata={
        "help": "sequences decoded together per replica (its KV slots)"})
    max_model_len: int | None = field(default=None, metadata={
        "help": "tokens per KV slot, prompt plus output (default: the model's context)"})
    kv_cache_bytes: int | None = field(default=None, metadata={
        "help": "KV cache budget per replica in bytes; caps the slot count (default: exactly "
                "--max-num-seqs slots)"})
    max_waiting: int = field(default=64, metadata={
        "help": "bounded queue per replica; beyond it a request gets HTTP 429 / RESOURCE_EXHAUSTED"})
    max_prefill_tokens: int = field(default=512, metadata={
        "help": "prompt tokens computed per step, in the same forward as the decoding rows; "
                "a longer prompt is prefilled in chunks over several steps"})
    prefix_caching: bool = field(default=True, metadata={
        "help": "reuse the KV of an earlier sequence whose tokens begin the new prompt (a free "
                "KV slot still holding the longest common prefix is taken, and only the rest "
                "of the prompt is computed; default: on)"})
    prepack_weights: bool = field(default=True, metadata={
        "help": "on CPU in fp32, hold a second copy of the linear weights in oneDNN's blocked "
                "layout for decode steps (their GEMMs ran 1.5-2x faster on a 2-core AVX2 CPU); "
                "costs the model's size again in memory; with --dtype bfloat16 on a CPU without "
                "native bf16, also a bf16 copy for steps of one row (half the bytes to stream; "
                "1.6x at one request) (default: on)"})
    dtype: str = field(default="auto", metadata={
        "help": "weights and KV cache dtype: auto = bfloat16 on a GPU, float32 on a CPU (OPT's "
                "released weights are float16)",
        "choices": ["auto", *DTYPES]})
    device: str = field(default="auto", metadata={
        "help": "where a replica runs: auto = on a GPU where there are any (under Ray: the "
                "cluster's, one per replica, which Ray reserves and gives it alone; never "
                "taken from the driver's machine), cuda (demand one), cpu",
        "choices": list(DEVICES)})
    tensor_parallel_size: int = field(default=1, metadata={
        "help": "processes (GPUs) per replica, on one node: the model is split across them as "
                "training's tensor parallelism splits it, each holding 1/N of the split weights "
                "and of the KV cache, for a model larger than one GPU (66b in bf16: 2 on 80 GB "
                "GPUs; 175b: 8); must divide the model's heads, ffn_dim and vocabulary; "
                "--kv-cache-bytes is then per process (default: 1)"})
    threads: int | None = field(default=None, metadata={
        "help": "torch threads per replica on CPU (default: OMP_NUM_THREADS, which Ray sets to "
                "the CPUs a replica reserves, else the CPUs this process may run on)"})

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads must be >= 1 (or unset for the reserved CPUs), got {self.threads!r}")
        for name in ("max_num_seqs", "max_waiting", "max_prefill_tokens", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise UserError(f"--max-model-len must be >= 2, got {self.max_model_len!r}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes < 1:
            raise UserError(f"--kv-cache-bytes must be >= 1, got {self.kv_cache_bytes!r}")
        if self.dtype not in ("auto", *DTYPES):
            raise UserError(f"--dtype must be one of {['auto', *DTYPES]}, got {self.dtype!r}")
        if self.device not in DEVICES:
            raise UserError(f"--device must be one of {list(DEVICES)}, got {self.device!r}")
