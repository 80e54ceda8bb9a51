"""Typed job specs -> validated ``opt-ray`` command lines.

The control plane never imports a stage: it turns a spec into the same command line a
user would pass to ``ray job submit -- opt-ray ...``. Before anything is submitted every
spec is checked here: paths must be absolute and, after resolving symlinks, inside one
of the server's allowed roots; sizes and worker counts must be within ``Bounds``. A
violation raises ``SpecError`` naming the field (``spec.train.min_workers``) and the
fix; the service answers it with INVALID_ARGUMENT.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from opt_ray.config import GuardConfig, OptimConfig, flag_fields, to_argv
from opt_ray.errors import UserError
from opt_ray.run_dir import is_url, local_run_dir, staging_root, store_errors
from opt_ray.v1 import control_pb2 as pb


# Progress bars are for terminals: in a Ray job log (the dashboard, WatchJob) every
# carriage-return update becomes text. The stages that draw one take this flag.
NO_PROGRESS = ("--no-progress",)


class SpecError(UserError):
    """A spec field is invalid; the message names the field and the fix."""


@dataclass(frozen=True)
class Bounds:
    """Limits on what one control call may ask of the cluster."""
    max_workers: int = 1024
    max_steps: int = 10_000_000
    min_seq_len: int = 8
    max_seq_len: int = 65_536
    min_vocab_size: int = 260  # 256 byte symbols plus a few specials
    max_vocab_size: int = 1_000_000
    # A stage's command line runs as one `sh -c` argument, which Linux caps at 128 KiB
    # (MAX_ARG_STRLEN): specs are bounded well below it.
    max_inputs: int = 1000
    max_command_bytes: int = 100_000
    max_path_bytes: int = 4096     # PATH_MAX
    max_segment_bytes: int = 255   # NAME_MAX: one directory or file name
    max_stages: int = 16
    max_replicas: int = 256
    max_tasks: int = 256
    max_fewshot: int = 128
    max_batch_tokens: int = 1 << 32   # 175b's batch is 2M tokens
    max_micro_batch: int = 65_536


@dataclass
class Stage:
    """One Ray job to run: ``opt-ray <argv...>``."""
    kind: str
    argv: list[str]
    outputs: list[Path | str] = field(default_factory=list)   # paths; a bucket run's URL
    run_dir: Path | str | None = None   # a training run's --output: a path or a bucket URL


# lm-eval task, group and tag names (globs allowed, as `lm-eval --tasks` takes them).
_TASK_NAME = re.compile(r"[A-Za-z0-9_.\-*?\[\]]{1,128}")


# TrainSpec fields handed to TrainConfig as they are (their zero value: train's default).
_TRAIN_PASSTHROUGH = ("precision", "device", "activation_checkpointing", "compile")
# TrainSpec's optional fields (set or not, by presence) and its nested config messages,
# whose fields are the config's by the same names: `opt-ray train`'s flags as they are
# (`opt-ray ctl submit train` derives its flags for them from TrainConfig's fields).
TRAIN_OPTIONAL = ("seed", "dropout", "keep", "milestone_every", "async_checkpoint", "mirror_every",
                   "deterministic", "max_failures", "collective_timeout")
TRAIN_NESTED = {"optim": OptimConfig, "guard": GuardConfig}


def _config_field(message: str) -> str:
    """The TrainSpec field a TrainConfig error is about: the first flag it names
    (``--lr ...`` -> ``optim.peak_lr``; ``--workers`` -> ``min_workers``), else the nested
    field it names (``guard.spike_factor ...``), else ``preset``."""
    from opt_ray.config import TrainConfig
    m = re.search(r"--([a-z][a-z-]*)", message)
    path = flag_fields(TrainConfig).get(m.group(1)) if m else None
    if path is None:
        m = re.search(r"\b((?:%s)\.[a-z_]+)" % "|".join(TRAIN_NESTED), message)
        path = m.group(1) if m else "preset"
    return "min_workers" if path == "workers" else path


def spec_overrides(msg, cls: type) -> dict:
    """The fields of ``msg`` (an OptimSpec or GuardSpec, named as ``cls``'s fields) that
    the caller set, as ``cls``'s keyword arguments; unset fields keep the config's
    defaults. A ``cls`` field the message lacks is a KeyError: the two must not drift."""
    out = {}
    for f in dataclasses.fields(cls):
        desc = msg.DESCRIPTOR.fields_by_name[f.name]
        value = getattr(msg, f.name)
        if desc.label == desc.LABEL_REPEATED:
            if len(value):
                out[f.name] = tuple(value)
        elif msg.HasField(f.name):
            out[f.name] = value
    return out


def _is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _produced(loc: Path | str, produced) -> bool:
    """Whether an earlier pipeline stage writes ``loc`` or a directory (or bucket
    prefix) above it: ``produced`` holds paths and a training run's URL."""
    if isinstance(loc, str):
        return any(isinstance(o, str) and (loc == o or loc.startswith(o + "/")) for o in produced)
    return any(isinstance(o, Path) and _is_within(loc, o) for o in produced)


class SpecValidator:
    """Validates specs against allowed roots and bounds, and builds their command lines."""

    def __init__(self, allowed_roots: list[str | os.PathLike], bounds: Bounds = Bounds()):
        if not allowed_roots:
            raise UserError("the control server needs at least one --allowed-root directory")
        # Bucket prefixes (s3://bucket/prefix) may hold training runs (TrainSpec.output,
        # read back by EvalSpec.checkpoint and ExportSpec.run_dir) and token shards
        # (TokenizeSpec.output, read by TrainSpec.data and EvalSpec.data); every other path
        # a spec names lies inside a directory root.
        self.url_roots = [str(r).rstrip("/") for r in allowed_roots if is_url(r)]
        self.roots = [Path(os.path.realpath(r)) for r in allowed_roots if not is_url(r)]
        if not self.roots:
            raise UserError("the control server needs at least one --allowed-root directory "
                            "(a bucket prefix holds training runs and token shards "
                            "only; other data and artifacts are read from directories)")
        self.bounds = bounds

    # ------------------------------------------------------------------ fields

    def _plain(self, name: str, value: str) -> None:
        """No NUL, no control character, not longer than a path may be."""
        if "\x00" in value:
            raise SpecError(f"{name} contains a NUL byte; give a plain absolute path")
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise SpecError(f"{name}={value!r} contains a control character; give a plain "
                            f"absolute path")
        if len(value.encode()) > self.bounds.max_path_bytes:
            raise SpecError(f"{name} is {len(value.encode())} bytes long (max "
                            f"{self.bounds.max_path_bytes}); use a shorter path")

    def run_location(self, name: str, value: str) -> tuple[str, Path]:
        """A training run's ``--output`` as the command line takes it, and the directory
        the server reads the run's files from: a path inside an allowed root (both the
        same), or a bucket URL under an allowed URL root (``--allowed-root
        s3://bucket/prefix``), read from the server's staging copy (``run_dir.RunMirror``)."""
        if not is_url(value):
            p = self.path(name, value)
            return str(p), p
        self._plain(name, value)
        url = value.rstrip("/")
        if any(seg in (".", "..") for seg in url.split("://", 1)[1].split("/")):
            raise SpecError(f"{name}={value!r} has a '.' or '..' segment; give the run's URL "
                            f"plainly")
        if not any(url.startswith(r + "/") for r in self.url_roots):
            allowed = ", ".join(self.url_roots) or "none: start the server with --allowed-root s3://bucket/prefix"
            raise SpecError(f"{name}={value!r} is not under an allowed bucket prefix "
                            f"({allowed}); use a URL under one of them")
        return url, local_run_dir(url)

    def new_output(self, name: str, value: str) -> Path | str:
        """A stage's new artifact (dedup's, the tokenizer's, tokenize's, an HF export): a
        path inside an allowed root, or a bucket prefix under an allowed URL root (the
        stage puts its files there, the manifest last: a cluster needs no shared disk),
        that does not exist yet."""
        if not is_url(value):
            return self.path(name, value, must_not_exist=True)
        out, _ = self.run_location(name, value)
        if self._url_exists(name, value, out):
            raise SpecError(f"{name}={value!r} already exists; choose a new bucket prefix")
        return out

    def run_or_path(self, name: str, value: str, produced=()) -> Path | str:
        """What a stage reads (a corpus, token shards, a training run, one of its
        checkpoints, or an HF directory): an existing path inside an allowed root, or a URL
        under an allowed bucket prefix that exists there or that an earlier stage of the
        pipeline writes."""
        if not is_url(value):
            return self.path(name, value, must_exist=True, produced=produced)
        url, _ = self.run_location(name, value)
        if _produced(url, produced):
            return url
        if not self._url_exists(name, value, url):
            raise SpecError(f"{name}={value!r} does not exist; run the stage that writes it "
                            f"first, or submit both as one pipeline")
        return url

    @staticmethod
    def _url_exists(name: str, value: str, url: str) -> bool:
        from opt_ray.storage import Loc
        with store_errors(f"{name}={value!r}", "the control server's read",
                          "the control server's environment", error=SpecError):
            return Loc(url).exists()

    def path(self, name: str, value: str, *, must_exist: bool = False,
             produced: list[Path] = (), must_not_exist: bool = False) -> Path:
        """An absolute path inside an allowed root. ``produced`` lists outputs of
        earlier pipeline stages, which count as existing."""
        if not value:
            raise SpecError(f"{name} is required: give an absolute path inside "
                            f"{self._roots_text()}")
        if is_url(value):
            raise SpecError(f"{name}={value!r}: this field is a local path (the stages' inputs "
                            f"and artifacts, a training run and a served checkpoint may be "
                            f"bucket URLs); give an absolute path inside {self._roots_text()}")
        self._plain(name, value)
        seg = next((x for x in value.split("/") if len(x.encode()) > self.bounds.max_segment_bytes),
                   None)
        if seg is not None:
            raise SpecError(f"{name} has a path segment of {len(seg.encode())} bytes "
                            f"({seg[:24]!r}...; max {self.bounds.max_segment_bytes}); no "
                            f"filesystem takes longer names")
        p = Path(value)
        if not p.is_absolute():
            raise SpecError(f"{name}={value!r} must be an absolute path (the server does not "
                            f"share your working directory); opt-ray ctl makes paths absolute")
        try:
            # Symlinks resolved first: the root check is on where the path really leads.
            real = Path(os.path.realpath(p))
            exists = real.exists()
        except (OSError, ValueError) as e:
            raise SpecError(f"{name}={value!r} cannot be resolved "
                            f"({getattr(e, 'strerror', None) or e}); give a valid path") from e
        self.check_inside(name, value, real)
        if must_exist and not exists and not _produced(real, produced):
            raise SpecError(f"{name}={value!r} does not exist; run the stage that writes it "
                            f"first, or submit both as one pipeline")
        if must_not_exist and exists:
            raise SpecError(f"{name}={value!r} already exists; choose a new output directory "
                            f"(artifacts are immutable)")
        return real

    def check_inside(self, name: str, value: str, real: Path) -> None:
        """Refuse a resolved path outside every allowed root."""
        if not any(_is_within(real, r) for r in self.roots):
            shown = value if str(real) == value else f"{value} (-> {real})"
            raise SpecError(f"{name}={shown!r} is outside the allowed roots "
                            f"{self._roots_text()}; use a path inside one of them or start "
                            f"the server with --allowed-root covering it")

    def readable_file(self, name: str, path: Path) -> Path | None:
        """``path`` with symlinks resolved, if it exists; ``SpecError`` when it leads
        outside the allowed roots (a symlinked logbook.jsonl must not expose /etc) and
        outside the server's staging copies of bucket runs."""
        try:
            real = Path(os.path.realpath(path))
        except (OSError, ValueError) as e:
            raise SpecError(f"{name}={str(path)!r} cannot be resolved: {e}") from e
        if not real.exists():
            return None
        if self.url_roots and _is_within(real, Path(os.path.realpath(staging_root()))):
            return real
        self.check_inside(name, str(path), real)
        return real

    def _roots_text(self) -> str:
        return "[" + ", ".join(str(r) for r in self.roots) + "]"

    def _int(self, name: str, value: int, lo: int, hi: int, *, zero_ok: bool = False) -> int:
        if zero_ok and value == 0:
            return 0
        if not lo <= value <= hi:
            raise SpecError(f"{name}={value} is out of bounds; use {lo}..{hi}"
                            + (" (or 0 for the default)" if zero_ok else ""))
        return value

    def workers(self, prefix: str, lo: int, hi: int) -> tuple[int, int]:
        lo = self._int(f"{prefix}min_workers", lo, 1, self.bounds.max_workers)
        hi = hi or lo
        self._int(f"{prefix}max_workers", hi, 1, self.bounds.max_workers)
        if hi < lo:
            raise SpecError(f"{prefix}max_workers={hi} is below min_workers={lo}; "
                            f"give a range MIN:MAX with MIN <= MAX")
        return lo, hi

    # ------------------------------------------------------------------ stages

    def dedup(self, s: pb.DedupSpec, name: str = "spec.dedup", produced=()) -> Stage:
        if not s.inputs:
            raise SpecError(f"{name}.inputs is empty; give at least one corpus file or directory")
        if len(s.inputs) > self.bounds.max_inputs:
            raise SpecError(f"{name}.inputs has {len(s.inputs)} entries, more than the limit of "
                            f"{self.bounds.max_inputs}; pass the directory that holds the files "
                            f"instead (dedup reads every corpus file under a directory)")
        inputs = [self.run_or_path(f"{name}.inputs[{i}]", v, produced)
                  for i, v in enumerate(s.inputs)]
        out = self.new_output(f"{name}.output", s.output)
        argv = ["dedup", *map(str, inputs), "--output", str(out), *NO_PROGRESS]
        if self._int(f"{name}.workers", s.workers, 1, self.bounds.max_workers, zero_ok=True):
            argv += ["--workers", str(s.workers)]
        if s.threshold:
            if not 0.0 < s.threshold <= 1.0:
                raise SpecError(f"{name}.threshold={s.threshold} must be in (0, 1] "
                                f"(a Jaccard similarity; OPT used 0.95)")
            argv += ["--threshold", repr(s.threshold)]
        return Stage("dedup", argv, [out])

    def tokenizer(self, s: pb.TokenizerSpec, name: str = "spec.tokenizer", produced=()) -> Stage:
        corpus = self.run_or_path(f"{name}.corpus", s.corpus, produced)
        self._int(f"{name}.vocab_size", s.vocab_size, self.bounds.min_vocab_size,
                  self.bounds.max_vocab_size)
        out = self.new_output(f"{name}.output", s.output)
        return Stage("tokenizer", ["tokenizer", "train", str(corpus), "--vocab-size",
                                   str(s.vocab_size), "--output", str(out)], [out])

    def tokenize(self, s: pb.TokenizeSpec, name: str = "spec.tokenize", produced=()) -> Stage:
        inp = self.run_or_path(f"{name}.input", s.input, produced)
        tok = self.run_or_path(f"{name}.tokenizer", s.tokenizer, produced)
        self._int(f"{name}.seq_len", s.seq_len, self.bounds.min_seq_len, self.bounds.max_seq_len)
        out = self.new_output(f"{name}.output", s.output)
        argv = ["tokenize", str(inp), "--tokenizer", str(tok), "--seq-len", str(s.seq_len),
                "--output", str(out), *NO_PROGRESS]
        if self._int(f"{name}.workers", s.workers, 1, self.bounds.max_workers, zero_ok=True):
            argv += ["--workers", str(s.workers)]
        return Stage("tokenize", argv, [out])

    def train(self, s: pb.TrainSpec, name: str = "spec.train", produced=()) -> Stage:
        """The run's settings are validated by the same ``TrainConfig`` that ``opt-ray
        train`` builds (one set of rules); here only what the control plane adds: paths
        inside the roots and the cluster-protecting bounds."""
        from opt_ray.config import ConfigError, TrainConfig  # config only: no torch, no Ray
        # Token shards in a directory root, or under a bucket prefix root (read by ranged
        # GETs on every rank).
        data = self.run_or_path(f"{name}.data", s.data, produced)
        # An existing run directory is allowed: training resumes from its checkpoints.
        # A bucket URL under an allowed URL root is one too (``--output s3://...``).
        out, local = self.run_location(f"{name}.output", s.output)
        lo, hi = self.workers(f"{name}.", s.min_workers, s.max_workers)
        self._int(f"{name}.steps", s.steps, 1, self.bounds.max_steps)
        self._int(f"{name}.checkpoint_every", s.checkpoint_every, 1, self.bounds.max_steps,
                  zero_ok=True)
        given = {"preset": s.preset, "data": str(data), "output": str(out), "steps": s.steps,
                 "workers": (lo, hi) if hi != lo else lo}
        if s.checkpoint_every:
            given["checkpoint_every"] = s.checkpoint_every
        if s.resume_from:
            given["resume_from"] = s.resume_from
        if s.batch_tokens:
            given["batch_tokens"] = self._int(f"{name}.batch_tokens", s.batch_tokens, 1,
                                              self.bounds.max_batch_tokens)
        if s.micro_batch:
            given["micro_batch"] = self._int(f"{name}.micro_batch", s.micro_batch, 1,
                                             self.bounds.max_micro_batch)
        if s.tp:
            given["tp"] = self._int(f"{name}.tp", s.tp, 1, self.bounds.max_workers)
        # The rest are TrainConfig's own rules (choices, fp16 needs a GPU, ...).
        given.update({k: getattr(s, k) for k in _TRAIN_PASSTHROUGH if getattr(s, k)})
        given.update({k: getattr(s, k) for k in TRAIN_OPTIONAL if s.HasField(k)})
        given.update({k: spec_overrides(getattr(s, k), cls) for k, cls in TRAIN_NESTED.items()})
        try:
            cfg = TrainConfig(**given)
        except ConfigError as e:
            raise SpecError(f"{name}.{_config_field(str(e))}: {e}") from e
        if s.resume_from < 0:
            raise SpecError(f"{name}.resume_from={s.resume_from} must be a checkpoint step in "
                            f"0..steps ({s.steps}); 0 resumes from the latest checkpoint")
        # The command line says exactly what the spec set; the rest are train's defaults.
        argv = ["train", "--preset", cfg.preset, "--data", cfg.data, "--output", cfg.output,
                "--workers", f"{lo}:{hi}" if hi != lo else str(lo), "--steps", str(cfg.steps),
                *NO_PROGRESS]
        if s.checkpoint_every:
            argv += ["--checkpoint-every", str(cfg.checkpoint_every)]
        if cfg.resume_from:
            argv += ["--resume-from", str(cfg.resume_from)]
        if s.batch_tokens:
            argv += ["--batch-tokens", str(cfg.batch_tokens)]
        if s.micro_batch:
            argv += ["--micro-batch", str(cfg.micro_batch)]
        argv += to_argv(cfg, only=("tp", *_TRAIN_PASSTHROUGH, *TRAIN_OPTIONAL, *TRAIN_NESTED))
        return Stage("train", argv, [out if is_url(out) else local], run_dir=out)

    def eval(self, s: pb.EvalSpec, name: str = "spec.eval", produced=()) -> Stage:
        """lm-eval tasks (``tasks``) or perplexity on token shards (``data``): one of them."""
        ckpt = self.run_or_path(f"{name}.checkpoint", s.checkpoint, produced)
        if bool(s.tasks) == bool(s.data):
            raise SpecError(f"{name}: set either tasks (lm-eval task names) or data (token "
                            f"shards for perplexity), not both or neither")
        argv = ["eval", str(ckpt)]
        if s.tasks:
            if len(s.tasks) > self.bounds.max_tasks:
                raise SpecError(f"{name}.tasks has {len(s.tasks)} entries (max "
                                f"{self.bounds.max_tasks}); use an lm-eval group name")
            for i, t in enumerate(s.tasks):
                if not _TASK_NAME.fullmatch(t):
                    raise SpecError(f"{name}.tasks[{i}]={t!r} is not a task name (letters, "
                                    f"digits, '_', '-', '.', glob characters; at most 128)")
            argv += ["--tasks", ",".join(s.tasks)]
            if s.has_num_fewshot:
                argv += ["--num-fewshot", str(self._int(f"{name}.num_fewshot", s.num_fewshot, 0,
                                                        self.bounds.max_fewshot))]
            if s.limit < 0 or (s.limit >= 1 and s.limit != int(s.limit)):
                raise SpecError(f"{name}.limit={s.limit} must be 0 (all documents), a fraction "
                                f"in (0, 1) or a whole number of documents")
            if s.limit:
                argv += ["--limit", str(int(s.limit)) if s.limit >= 1 else repr(s.limit)]
            if s.include_path:
                inc = self.path(f"{name}.include_path", s.include_path, must_exist=True,
                                produced=produced)
                argv += ["--include-path", str(inc)]
            if s.output:
                argv += ["--output", str(self.path(f"{name}.output", s.output,
                                                   must_not_exist=True))]
            if self._int(f"{name}.workers", s.workers, 1, self.bounds.max_workers, zero_ok=True):
                argv += ["--workers", str(s.workers)]
        else:
            task_only = {"num_fewshot": s.has_num_fewshot, "limit": s.limit,
                         "include_path": s.include_path, "output": s.output, "workers": s.workers}
            for fld, given in task_only.items():
                if given:
                    raise SpecError(f"{name}.{fld} applies to lm-eval tasks only; with data "
                                    f"(perplexity), use split and max_rows")
            data = self.run_or_path(f"{name}.data", s.data, produced)
            argv += ["--data", str(data)]
            if s.split:
                if not s.split.replace("_", "").isalnum() or len(s.split) > 64:
                    raise SpecError(f"{name}.split={s.split!r} must be a split name like 'valid'")
                argv += ["--split", s.split]
        if self._int(f"{name}.tp", s.tp, 1, self.bounds.max_workers, zero_ok=True):
            if (s.workers or 1) % s.tp and s.tasks:
                raise SpecError(f"{name}.workers={s.workers or 1} is not a multiple of "
                                f"{name}.tp={s.tp} (each copy of the model is tp actors); use "
                                f"workers={max(s.tp, (s.workers or 1) // s.tp * s.tp)}")
            argv += ["--tp", str(s.tp)]
        if s.max_rows < 0:
            raise SpecError(f"{name}.max_rows={s.max_rows} must be >= 0 (0: all rows)")
        if s.max_rows:
            if s.tasks:
                raise SpecError(f"{name}.max_rows applies to data (perplexity) only; with "
                                f"tasks, use limit")
            argv += ["--max-rows", str(s.max_rows)]
        return Stage("eval", argv, [Path(argv[argv.index("--output") + 1])]
                     if "--output" in argv else [])

    def export(self, s: pb.ExportSpec, name: str = "spec.export", produced=()) -> Stage:
        run = self.run_or_path(f"{name}.run_dir", s.run_dir, produced)
        out = self.new_output(f"{name}.output", s.output)
        if s.step < 0:
            raise SpecError(f"{name}.step={s.step} must be >= 0 (0: the newest checkpoint)")
        if not s.step:
            return Stage("export", ["export", str(run), "--output", str(out)], [out])
        # A step is a checkpoint directory of the run (layout of opt_ray.train.checkpoint).
        ckpt = f"checkpoints/step_{s.step:08d}"
        src = f"{run}/{ckpt}" if isinstance(run, str) else run / ckpt
        there = _produced(run, produced) or (
            self._url_exists(f"{name}.step", str(s.step), src) if isinstance(src, str)
            else src.is_dir())
        if not there:
            raise SpecError(f"{name}.step={s.step}: {src} does not exist; 'opt-ray ctl "
                            f"logbook' lists the run's checkpoints")
        return Stage("export", ["export", str(src), "--output", str(out)], [out])

    def serve(self, s: pb.ServeSpec, name: str = "spec") -> Stage:
        if not s.name or not s.name.replace("-", "").replace("_", "").replace(".", "").isalnum() \
                or len(s.name) > 64:
            raise SpecError(f"{name}.name={s.name!r} must be 1-64 letters, digits, '-', '_' or '.'")
        ckpt = self.run_or_path(f"{name}.checkpoint", s.checkpoint)
        argv = ["serve", "--checkpoint", str(ckpt), "--model-name", s.name]
        if self._int(f"{name}.replicas", s.replicas, 1, self.bounds.max_replicas, zero_ok=True):
            argv += ["--replicas", str(s.replicas)]
        if self._int(f"{name}.max_replicas", s.max_replicas, max(1, s.replicas),
                     self.bounds.max_replicas, zero_ok=True):
            argv += ["--max-replicas", str(s.max_replicas)]
        for fld, flag in (("http_port", "--http-port"), ("grpc_port", "--grpc-port")):
            if self._int(f"{name}.{fld}", getattr(s, fld), 1024, 65535, zero_ok=True):
                argv += [flag, str(getattr(s, fld))]
        if self._int(f"{name}.max_num_seqs", s.max_num_seqs, 1, 4096, zero_ok=True):
            argv += ["--max-num-seqs", str(s.max_num_seqs)]
        if self._int(f"{name}.tensor_parallel_size", s.tensor_parallel_size, 1, 64, zero_ok=True):
            argv += ["--tensor-parallel-size", str(s.tensor_parallel_size)]
        return Stage("serve", argv)

    # ------------------------------------------------------------------ whole jobs

    def fits(self, name: str, stage: Stage) -> Stage:
        """Refuse a stage whose command line would not fit a Ray job's entrypoint."""
        n = len(shlex.join(["opt-ray", *stage.argv]).encode())
        if n > self.bounds.max_command_bytes:
            raise SpecError(f"{name}: the stage's command line would be {n} bytes, more than "
                            f"the limit of {self.bounds.max_command_bytes}; pass directories "
                            f"instead of many files, or shorter paths")
        return stage

    def stage(self, st: pb.StageSpec, name: str, produced: list[Path]) -> Stage:
        which = st.WhichOneof("stage")
        if which is None:
            raise SpecError(f"{name} sets no stage; set one of dedup, tokenizer, tokenize, "
                            f"train, eval, export")
        return getattr(self, which)(getattr(st, which), f"{name}.{which}", produced)

    def job(self, spec: pb.JobSpec) -> tuple[str, list[Stage]]:
        """(kind, stages) for a submitted spec; a single stage unless a pipeline."""
        kind = spec.WhichOneof("kind")
        if kind is None:
            raise SpecError("spec sets no job kind; set one of dedup, tokenizer, tokenize, "
                            "train, eval, export, pipeline")
        if len(spec.name) > 128:
            raise SpecError("spec.name is longer than 128 characters")
        if kind == "serve":
            raise SpecError("spec.serve: serving applications are managed with DeployServe / "
                            "UpdateServe / RemoveServe ('opt-ray ctl serve deploy')")
        if kind != "pipeline":
            return kind, [self.fits(f"spec.{kind}", getattr(self, kind)(getattr(spec, kind)))]
        stages_spec = spec.pipeline.stages
        if not stages_spec:
            raise SpecError("spec.pipeline.stages is empty; give at least one stage")
        if len(stages_spec) > self.bounds.max_stages:
            raise SpecError(f"spec.pipeline.stages has {len(stages_spec)} stages "
                            f"(max {self.bounds.max_stages})")
        produced: list[Path] = []
        stages = []
        for i, st in enumerate(stages_spec):
            stage = self.fits(f"spec.pipeline.stages[{i}]",
                              self.stage(st, f"spec.pipeline.stages[{i}]", produced))
            for o in stage.outputs:
                if o in produced:
                    raise SpecError(f"spec.pipeline.stages[{i}] writes {o}, which an earlier "
                                    f"stage already writes; give each stage its own output")
            produced += stage.outputs
            stages.append(stage)
        return kind, stages
