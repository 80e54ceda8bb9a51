"""HF-format OPT checkpoints in and out: ``from_hf(path)`` and ``to_hf(model, path)``.

A checkpoint directory holds ``config.json`` (an ``OPTConfig``) and the weights as
``model.safetensors`` or ``pytorch_model.bin`` (or their sharded ``*.index.json`` forms).
The project's parameter names are the HF names, so loading is a validated copy: every
problem (missing tensor, wrong shape, unexpected tensor, unknown config field) is reported
in one ``HFCheckpointError`` that names the key. Weights are read safely: safetensors, or
``torch.load(weights_only=True)``; never arbitrary pickles.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

from opt_ray.config import ConfigError, ModelConfig
from opt_ray.errors import UserError
from opt_ray.model.opt import OPT


class HFCheckpointError(UserError, ValueError):
    """An HF checkpoint directory that cannot be loaded as OPT; the message names the key."""


CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
BIN_NAME = "pytorch_model.bin"

# HF OPTConfig fields that map one to one onto ModelConfig.
_MAPPED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim",
           "max_position_embeddings", "word_embed_proj_dim", "do_layer_norm_before",
           "enable_bias", "layer_norm_elementwise_affine", "dropout", "attention_dropout",
           "activation_function", "init_std", "pad_token_id", "bos_token_id", "eos_token_id")

# Keys that describe how a checkpoint was saved or how HF should generate with it, not the
# network: PretrainedConfig bookkeeping across transformers 4.x / 5.x, generation defaults
# that older configs carried, and OPT fields with no effect on the forward pass.
_BOOKKEEPING = frozenset("""
    _name_or_path architectures auto_map model_type transformers_version torch_dtype dtype
    use_cache return_dict output_hidden_states output_attentions output_scores torchscript
    chunk_size_feed_forward is_encoder_decoder is_decoder add_cross_attention
    cross_attention_hidden_size tie_encoder_decoder id2label label2id num_labels problem_type
    finetuning_task task_specific_params tokenizer_class prefix pruned_heads use_bfloat16
    tf_legacy_loss gradient_checkpointing sep_token_id decoder_start_token_id
    max_length min_length do_sample early_stopping num_beams num_beam_groups diversity_penalty
    temperature top_k top_p typical_p repetition_penalty length_penalty no_repeat_ngram_size
    encoder_no_repeat_ngram_size bad_words_ids num_return_sequences return_dict_in_generate
    forced_bos_token_id forced_eos_token_id remove_invalid_values
    exponential_decay_length_penalty suppress_tokens begin_suppress_tokens
    layerdrop activation_dropout
""".split())


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------

def config_from_hf(d: Mapping[str, Any], *, source: str = CONFIG_NAME) -> ModelConfig:
    """ModelConfig from an HF OPTConfig dict; unknown fields are an error naming the key."""
    if d.get("model_type", "opt") != "opt":
        raise HFCheckpointError(f"{source}: model_type is {d['model_type']!r}, expected 'opt'")
    unknown = sorted(k for k in d if k not in _MAPPED and k not in _BOOKKEEPING
                     and k not in ("tie_word_embeddings", "_remove_final_layer_norm"))
    if unknown:
        raise HFCheckpointError(f"{source}: unknown config field {unknown[0]!r}"
                                + (f" (and {unknown[1:]})" if unknown[1:] else "")
                                + "; not an OPT field. Remove it, or check this is an OPT checkpoint")
    if d.get("tie_word_embeddings", True) is not True:
        raise HFCheckpointError(f"{source}: tie_word_embeddings is {d['tie_word_embeddings']!r}; "
                                "OPT ties the LM head to the token embedding, untied heads are not supported")
    if d.get("_remove_final_layer_norm", False) and d.get("do_layer_norm_before", True):
        raise HFCheckpointError(f"{source}: _remove_final_layer_norm=true (a pre-LN stack without its "
                                "final LayerNorm) is not supported")
    try:
        return ModelConfig(**{k: d[k] for k in _MAPPED if k in d})
    except (ConfigError, TypeError) as e:
        raise HFCheckpointError(f"{source}: invalid OPT config: {e}") from e


def config_to_hf(cfg: ModelConfig, *, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """An HF OPTConfig dict with every field spelled out."""
    d: dict[str, Any] = {"architectures": ["OPTForCausalLM"], "model_type": "opt"}
    d.update({k: getattr(cfg, k) for k in _MAPPED})
    d.update({"tie_word_embeddings": True, "_remove_final_layer_norm": False, "layerdrop": 0.0,
              "use_cache": True, "torch_dtype": str(dtype).removeprefix("torch.")})
    return d


# --------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------

def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of an HF OPTForCausalLM checkpoint for ``cfg`` -> its shape
    (``lm_head.weight`` included; it is tied and optional in files)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in OPT(cfg).state_dict().items()}


def _normalise_key(key: str) -> str:
    # OPTModel checkpoints (no LM head) store "decoder.*"; OPTForCausalLM "model.decoder.*".
    return "model." + key if key.startswith("decoder.") else key


def _read_weight_file(f: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A weight file's tensors, each cast to ``dtype`` as it is read (a safetensors file
    is never held whole in its own dtype beside the cast copy)."""
    try:
        if f.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(f), framework="pt") as fh:
                return {k: fh.get_tensor(k) if dtype is None else fh.get_tensor(k).to(dtype)
                        for k in fh.keys()}
        sd = torch.load(f, map_location="cpu", weights_only=True)
        return sd if dtype is None else {k: v.to(dtype) for k, v in sd.items()}
    except Exception as e:
        raise HFCheckpointError(f"{f}: cannot read weights ({type(e).__name__}: {e}); "
                                "is the file complete and a safetensors / torch state dict?") from e


def _weight_files(path: Path) -> list[Path]:
    """The checkpoint's weight files: the single file, or the shards its index names."""
    for single, index in ((SAFETENSORS_NAME, SAFETENSORS_NAME + ".index.json"),
                          (BIN_NAME, BIN_NAME + ".index.json")):
        if (path / single).is_file():
            return [path / single]
        if (path / index).is_file():
            try:
                weight_map = json.loads((path / index).read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise HFCheckpointError(f"{path / index}: not a readable shard index ({e})") from e
            return [path / shard for shard in sorted(set(weight_map.values()))]
    raise HFCheckpointError(f"{path}: no weights found; expected {SAFETENSORS_NAME} or {BIN_NAME} "
                            "(or a sharded *.index.json)")


def _read_weights(path: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's weight files, cast to ``dtype`` tensor by tensor
    as they are read: the model is held once, in ``dtype``."""
    out: dict[str, torch.Tensor] = {}
    for f in _weight_files(path):
        out.update(_read_weight_file(f, dtype))
    return out


def _lazy_tensors(f: Path) -> dict[str, tuple[tuple[int, ...], Any]]:
    """A weight file's tensors, not yet read: key -> (shape, ``take(dim, lo, hi, dtype)``),
    which reads rows (dim 0) or columns (dim 1) ``lo:hi`` of it (dim None: all of it),
    cast to ``dtype``. Safetensors slices read only those bytes; a ``.bin`` is mapped."""
    def take_slice(sl, dim, lo, hi, dtype):
        t = sl[:] if dim is None else sl[lo:hi] if dim == 0 else sl[:, lo:hi]
        return t.to(dtype)

    def take_tensor(t, dim, lo, hi, dtype):
        t = t if dim is None else t.narrow(dim, lo, hi - lo)
        return t.to(dtype, copy=True)      # a copy: nothing keeps the mapped file alive

    try:
        if f.suffix == ".safetensors":
            from safetensors import safe_open
            fh = safe_open(str(f), framework="pt")
            return {k: (tuple(sl.get_shape()), functools.partial(take_slice, sl))
                    for k in fh.keys() for sl in [fh.get_slice(k)]}
        sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        return {k: (tuple(v.shape), functools.partial(take_tensor, v)) for k, v in sd.items()}
    except Exception as e:
        raise HFCheckpointError(f"{f}: cannot read weights ({type(e).__name__}: {e}); "
                                "is the file complete and a safetensors / torch state dict?") from e


def _check_weights(sd: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]],
                   source: str) -> None:
    """All problems at once, in one error: missing, wrongly shaped and unexpected tensors."""
    problems = []
    for k, shape in shapes.items():
        if k not in sd:
            if k != "lm_head.weight":  # tied: absent in most HF checkpoints
                problems.append(f"missing tensor {k!r} (expected shape {list(shape)})")
        elif tuple(sd[k].shape) != shape:
            problems.append(f"tensor {k!r} has shape {list(sd[k].shape)}, expected {list(shape)}")
    problems += [f"unexpected tensor {k!r} (shape {list(sd[k].shape)})" for k in sd if k not in shapes]
    if problems:
        raise HFCheckpointError(f"{source}: weights do not match config.json: " + "; ".join(problems))


def from_hf(path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> OPT:
    """Load an HF-format OPT checkpoint directory into an ``OPT`` (eval mode).

    ``dtype``: the parameters' dtype (None: float32, whatever the file stores). Tensors
    are assigned, not copied into a randomly initialised model, so loading needs about
    one copy of the weights in memory."""
    path = Path(path)
    cfg = read_config(path)
    dtype = dtype or torch.float32
    sd = {_normalise_key(k): v for k, v in _read_weights(path, dtype).items()}
    _check_weights(sd, expected_shapes(cfg), str(path))
    _check_tied(path, sd.pop("lm_head.weight", None), sd["model.decoder.embed_tokens.weight"])
    with torch.device("meta"):
        model = OPT(cfg)
    return _assign(model, sd)


def _check_tied(path: Path, head: torch.Tensor | None, emb: torch.Tensor) -> None:
    """OPT ties its LM head to the token embedding: a checkpoint whose head differs is refused."""
    if head is not None and not torch.equal(head, emb):
        raise HFCheckpointError(f"{path}: 'lm_head.weight' differs from 'model.decoder.embed_tokens.weight'; "
                                "OPT ties them, an untied LM head is not supported")


def _assign(model: OPT, sd: Mapping[str, torch.Tensor]) -> OPT:
    """``model`` (built on meta) with the tensors of ``sd`` as its parameters, in eval mode."""
    model.load_state_dict(sd, strict=False, assign=True)
    # assign=True put a new tensor in embed_tokens only; tie the head to it again.
    model.lm_head.weight = model.decoder.embed_tokens.weight
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    assert not leftover, leftover  # _check_weights guarantees every tensor was present
    return model.eval()


def read_config(path: Path) -> ModelConfig:
    """The ``ModelConfig`` of the HF checkpoint directory ``path`` (its ``config.json``)."""
    if not (path / CONFIG_NAME).is_file():
        raise HFCheckpointError(f"{path}: no {CONFIG_NAME}; expected an HF-format OPT checkpoint directory")
    try:
        raw = json.loads((path / CONFIG_NAME).read_text())
    except ValueError as e:
        raise HFCheckpointError(f"{path / CONFIG_NAME}: not valid JSON ({e})") from e
    return config_from_hf(raw, source=str(path / CONFIG_NAME))


def from_hf_sharded(path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> OPT:
    """This tensor-parallel rank's part of an HF-format OPT checkpoint: the model with
    fairscale's parallel layers (``parallel.apply_tensor_parallel``; needs
    ``parallel.init_model_parallel`` first), holding only this rank's slice of each split
    tensor, read as a slice from the files: a rank reads and holds about 1/tp of the
    weights (plus the replicated LayerNorms, positions and biases), never the whole model.
    The same checks as ``from_hf`` (every tensor present and of its full shape, the LM head
    tied), before any weight is read."""
    from opt_ray.model.parallel import _tp_world_and_rank, apply_tensor_parallel, tp_partition_dims

    path = Path(path)
    cfg = read_config(path)
    dtype = dtype or torch.float32
    tp, rank = _tp_world_and_rank(None)
    dims = tp_partition_dims(cfg)
    lazy: dict[str, tuple[tuple[int, ...], Any]] = {}
    for f in _weight_files(path):
        lazy.update({_normalise_key(k): v for k, v in _lazy_tensors(f).items()})
    _check_weights({k: torch.empty(shape, device="meta") for k, (shape, _) in lazy.items()},
                   expected_shapes(cfg), str(path))
    with torch.device("meta"):
        model = OPT(cfg)
    apply_tensor_parallel(model)       # on meta: the layers' shapes, no weights

    def take(key: str) -> torch.Tensor:
        shape, read = lazy[key]
        dim = dims.get(key)
        if dim is None:
            return read(None, 0, 0, dtype)
        n = shape[dim] // tp
        return read(dim, rank * n, (rank + 1) * n, dtype)

    sd = {k: take(k) for k in lazy if k != "lm_head.weight"}
    _check_tied(path, take("lm_head.weight") if "lm_head.weight" in lazy else None,
                sd["model.decoder.embed_tokens.weight"])
    return _assign(model, sd)


#: HF's ``save_pretrained`` default: a model larger than this is split into files of at
#: most this size (one tensor larger than it gets a file of its own) with an index.
MAX_SHARD_BYTES = 5 * 10**9


def to_hf(model: OPT, path: str | os.PathLike, *, overwrite: bool = False,
          max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write ``model`` as an HF-format checkpoint directory (config.json +
    model.safetensors, or ``model-0000i-of-0000n.safetensors`` files and their index past
    ``max_shard_bytes``) that ``transformers.OPTForCausalLM.from_pretrained`` loads.
    Written to a temporary directory and renamed into place, so ``path`` is either
    complete or absent. An existing non-empty ``path`` is replaced only with
    ``overwrite=True``. Returns the path."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    sd.pop("lm_head.weight", None)
    # A tensor-parallel or sharded model would write slices under full names: refuse.
    shapes = expected_shapes(model.config)
    shapes.pop("lm_head.weight")
    _check_weights(sd, shapes, "to_hf(model)")
    dtype = sd["model.decoder.embed_tokens.weight"].dtype
    return write_hf(model.config, lambda keys: {k: sd[k] for k in keys}, path, dtype=dtype,
                    overwrite=overwrite, max_shard_bytes=max_shard_bytes)


def write_hf(cfg: ModelConfig, read, path: str | os.PathLike, *, dtype: torch.dtype,
             overwrite: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES,
             on_file=None, extra=None) -> Path:
    """``to_hf`` from a reader of tensors instead of a model in memory: ``read(keys)``
    returns those tensors (HF names, full shapes), called once per weight file with that
    file's tensors, which are cast to ``dtype``, written and dropped; so an export holds
    one file's worth of weights at a time (<= ``max_shard_bytes``), whatever the model's
    size. The files are planned from the config's shapes, HF's way (in state-dict order,
    a new file when the next tensor would pass the limit). ``on_file(name, path)`` is
    called after each weight file is written (an uploader may move it away: it is not
    needed again); ``extra(dir)`` writes more files (the tokenizer) into the directory
    before it is renamed into place, so no reader sees the export without them. Returns
    the path."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise HFCheckpointError(f"{path} exists and is not empty; choose a new directory or pass overwrite=True")
    shapes = expected_shapes(cfg)
    shapes.pop("lm_head.weight")       # tied to the embedding; HF omits it
    item = torch.empty((), dtype=dtype).element_size()
    groups: list[list[str]] = [[]]
    size = 0
    for k, shape in shapes.items():
        n = item * int(torch.Size(shape).numel())
        if groups[-1] and size + n > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += n
    names = ([SAFETENSORS_NAME] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        total = 0
        for keys, name in zip(groups, names):
            got = read(keys)
            _check_weights(got, {k: shapes[k] for k in keys}, f"export to {path}")
            part = {k: got.pop(k).to("cpu", dtype).contiguous() for k in keys}
            total += sum(t.numel() * t.element_size() for t in part.values())
            save_file(part, str(tmp / name), metadata={"format": "pt"})
            del part
            if on_file is not None:
                on_file(name, tmp / name)
        if len(groups) > 1:
            index = {"metadata": {"total_size": total},
                     "weight_map": {k: name for keys, name in zip(groups, names) for k in keys}}
            (tmp / (SAFETENSORS_NAME + ".index.json")).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / CONFIG_NAME).write_text(json.dumps(config_to_hf(cfg, dtype=dtype), indent=2) + "\n")
        if extra is not None:
            extra(tmp)
        os.chmod(tmp, 0o755)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
