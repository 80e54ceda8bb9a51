"""``EvalConfig``: everything `opt-ray eval --tasks` takes, one field per flag (the flags,
defaults and help are derived from it with ``opt_ray.config.add_dataclass_args``), checked
on construction."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from opt_ray.config import DEVICES, ConfigError, _help

DTYPES = ("auto", "float32", "bfloat16", "float16")


def _tasks(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def _limit(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--limit must be a number, got {text!r}") from None


@dataclass
class EvalConfig:
    """An lm-eval run over a checkpoint (``opt_ray.commands.eval.evaluate_tasks``)."""
    tasks: tuple[str, ...] | None = field(default=None, metadata=_help(
        "comma-separated lm-eval task, group or tag names (globs allowed), e.g. "
        "hellaswag,piqa,arc_easy", type=_tasks, metavar="T1,T2"))
    num_fewshot: int | None = field(default=None, metadata=_help(
        "few-shot examples per prompt (default: each task's own, else 0)"))
    include_path: str | None = field(default=None, metadata=_help(
        "directory of extra lm-eval YAML tasks (e.g. dataset_path: json with local files)",
        metavar="DIR"))
    limit: float | None = field(default=None, metadata=_help(
        "evaluate at most N documents per task (a number < 1 is a fraction)", type=_limit, metavar="N"))
    batch_size: int = field(default=8, metadata=_help("sequences per forward pass"))
    workers: int = field(default=1, metadata=_help(
        "Ray actors scoring requests in parallel (one GPU each on GPUs); each --tp of them "
        "hold one copy of the model"))
    tp: int = field(default=1, metadata=_help(
        "tensor-parallel degree: each copy of the model is split across this many actors on "
        "one node (a multiple of it is --workers), for a model larger than one GPU (66b in "
        "bf16: --tp 2 on 80 GB GPUs; 175b: --tp 8); must divide the model's heads, ffn_dim "
        "and vocabulary; with --data, one copy on --tp actors (--workers 1)"))
    seed: int | None = field(default=None, metadata=_help(
        "seed for lm-eval's sampling of documents and few-shot examples, and for sampled "
        "generation (default: lm-eval's seeds)"))
    bos: str = field(default="auto", metadata=_help(
        "prepend bos to every input: auto = as the tokenizer does (OPT's prepends </s>; lm-eval's "
        "hf backend does the same), true, false", flag="add-bos-token", choices=("auto", "true", "false")))
    device: str = field(default="auto", metadata=_help(
        "where the model scores: auto = on GPUs where there are any (with --workers > 1, or "
        "when this driver runs on a Ray cluster (RAY_ADDRESS, --address): the cluster's, one "
        "per worker, never this machine's alone; else this machine's CUDA), cuda (demand "
        "them), cpu", choices=DEVICES))
    dtype: str = field(default="auto", metadata=_help(
        "weights' dtype for scoring: auto = bfloat16 on GPUs, float32 on CPUs (log-softmax "
        "is fp32 either way)", choices=DTYPES))
    output: str | None = field(default=None, metadata=_help(
        "write lm-eval's results JSON here", metavar="FILE"))
    log_samples: bool = field(default=False, metadata=_help(
        "include every document's requests and scores in --output"))
    logbook: bool = field(default=True, metadata=_help(
        "record the scores in the run's logbook when the checkpoint belongs to a training run"))

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str):
            self.tasks = _tasks(self.tasks)
        self.tasks = tuple(self.tasks or ())
        checks = [
            (self.num_fewshot is None or self.num_fewshot >= 0,
             f"--num-fewshot must be >= 0, got {self.num_fewshot}"),
            (self.limit is None or self.limit > 0, f"--limit must be > 0, got {self.limit}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.workers >= 1, f"--workers must be >= 1, got {self.workers}"),
            (self.tp >= 1, f"--tp must be >= 1, got {self.tp}"),
            (self.bos in ("auto", "true", "false"),
             f"--add-bos-token must be auto, true or false, got {self.bos!r}"),
            (self.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}"),
            (self.device in DEVICES, f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        if self.workers % self.tp:
            raise ConfigError(f"--workers {self.workers} is not a multiple of --tp {self.tp} (each "
                              f"copy of the model is --tp actors); use --workers "
                              f"{max(self.tp, self.workers // self.tp * self.tp)}")
        if self.limit is not None and self.limit >= 1:
            if self.limit != int(self.limit):
                raise ConfigError(f"--limit {self.limit}: a count must be whole (a fraction is < 1)")
            self.limit = int(self.limit)

    @property
    def add_bos_token(self) -> bool | None:
        return {"auto": None, "true": True, "false": False}[self.bos]

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict
        return asdict(self)
