"""GPT-2 byte-level BPE tokenizers, loaded or trained, with OPT's special tokens.

OPT uses GPT-2's byte-level BPE (OPT_FACTS.md) with fairseq's special tokens at the front
of the vocabulary: ``<s>`` 0, ``<pad>`` 1, ``</s>`` 2 (bos = eos), ``<unk>`` 3. A
tokenizer comes from one of:

* ``tokenizer.json`` (what ``save_tokenizer`` writes; also shipped by many HF checkpoints),
* ``vocab.json`` + ``merges.txt`` (GPT-2 style; what HF OPT checkpoint directories ship),
  assembled exactly as ``transformers``' GPT2TokenizerFast does (byte-level
  pre-tokenizer without prefix space, byte-level decoder),
* ``train_tokenizer`` on a corpus, when no GPT-2 vocabulary is at hand.

Every stage after this one loads the same ``tokenizer.json`` through :func:`load_tokenizer`
and identifies it by :func:`tokenizer_hash`, which shards record and training checks.

Encoding convention (OPT's, as its HF tokenizer): for vocabularies with ``</s>``,
``tok.encode(text).ids`` starts with bos ``</s>`` (id 2), which is what precedes every
document in the packed training stream; ``tok.encode(text, add_special_tokens=False)``
gives the bare ids (what the tokenize stage uses). A ``tokenizer.json`` is loaded with the
post-processor it ships.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from opt_ray.errors import UserError

# fairseq's dictionary order, which OPT's released vocabulary keeps: pad 1, bos = eos 2.
OPT_SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
# GPT-2's own vocabulary has one special token for everything.
GPT2_EOT = "<|endoftext|>"


def _from_vocab_merges(vocab_file: Path, merges_file: Path) -> Tokenizer:
    """A GPT-2 byte-level BPE built the way transformers' GPT2 converter builds it, so that
    encodings match GPT2TokenizerFast on the same files."""
    try:
        vocab, merges = models.BPE.read_file(str(vocab_file), str(merges_file))
    except Exception as e:
        raise UserError(f"cannot read GPT-2 vocabulary {vocab_file} / {merges_file}: {e}; "
                        f"pass a directory with a valid vocab.json and merges.txt") from e
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None,
                               continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _register_specials(tok: Tokenizer) -> Tokenizer:
    """Mark the special tokens that exist in the vocabulary as special, so that a literal
    ``</s>`` in text maps to its id and decoding can skip them. Ids are not changed."""
    vocab = tok.get_vocab()
    present = [t for t in OPT_SPECIAL_TOKENS + [GPT2_EOT] if t in vocab]
    if present:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in present])
    return tok


def _opt_post_processor(tok: Tokenizer) -> Tokenizer:
    """OPT's convention (as its HF tokenizer): ``encode(text)`` starts with bos ``</s>``,
    which is also what precedes every document in the packed training stream.
    ``encode(text, add_special_tokens=False)`` gives the bare ids. A vocabulary without
    ``</s>`` (plain GPT-2) keeps GPT-2's convention: no bos."""
    eos_id = tok.token_to_id(EOS)
    if eos_id is not None:
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{EOS} $A", pair=f"{EOS} $A {EOS} $B",
                                          special_tokens=[(EOS, eos_id)]),
        ])
    return tok


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer from a directory or a file.

    Accepts a ``tokenizer.json`` file, a ``vocab.json`` file (``merges.txt`` beside it), or
    a directory holding either (an ``opt-ray tokenizer`` output, an HF OPT checkpoint);
    ``tokenizer.json`` wins when both are present; any of these may be in a bucket
    (``s3://bucket/tokenizer``: the files are fetched to this node once, then loaded).
    Raises ``UserError`` naming the path.
    """
    from opt_ray.run_dir import is_url
    if is_url(path):
        return _load_url(str(path))
    p = Path(path)
    if not p.exists():
        raise UserError(f"tokenizer {p} does not exist; pass a tokenizer directory (from "
                        f"'opt-ray tokenizer'), a tokenizer.json, or a dir with vocab.json + merges.txt")
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            p = p / "tokenizer.json"
        elif (p / "vocab.json").is_file() and (p / "merges.txt").is_file():
            return _opt_post_processor(_register_specials(
                _from_vocab_merges(p / "vocab.json", p / "merges.txt")))
        else:
            raise UserError(f"{p} holds neither tokenizer.json nor vocab.json + merges.txt; "
                            f"create one with 'opt-ray tokenizer train' or 'opt-ray tokenizer load'")
    if p.name == "merges.txt" or (p.suffix == ".json" and _looks_like_vocab(p)):
        vocab_file = p if p.suffix == ".json" else p.with_name("vocab.json")
        merges_file = vocab_file.with_name("merges.txt")
        if not vocab_file.is_file() or not merges_file.is_file():
            raise UserError(f"{p}: a GPT-2 vocabulary needs vocab.json and merges.txt side by "
                            f"side in {p.parent}")
        return _opt_post_processor(_register_specials(_from_vocab_merges(vocab_file, merges_file)))
    try:
        tok = Tokenizer.from_file(str(p))
    except Exception as e:
        raise UserError(f"cannot load tokenizer {p}: {e}; expected a tokenizers "
                        f"tokenizer.json") from e
    return _register_specials(tok)


#: The files a tokenizer is loaded from, in a directory or a bucket prefix.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt")


def _load_url(url: str) -> Tokenizer:
    """``load_tokenizer`` of a bucket object (tokenizer.json, vocab.json with merges.txt
    beside it) or prefix holding them: fetched with ``artifact_io.fetch_prefix``, which
    checks them against the prefix's manifest when there is one."""
    from opt_ray.artifacts import MANIFEST
    from opt_ray.data.artifact_io import fetch_prefix
    from opt_ray.run_dir import store_errors
    from opt_ray.storage import Loc

    loc = Loc(url.rstrip("/"))
    with store_errors(f"tokenizer {url}", "a read", "the bucket exists"):
        is_file = loc.isfile()
    if is_file:
        names = [loc.name] + (["merges.txt"] if loc.name == "vocab.json" else [])
        return load_tokenizer(fetch_prefix(str(loc.parent()), "tokenizer", names=names) / loc.name)
    local = fetch_prefix(str(loc), "tokenizer", names=[*TOKENIZER_FILES, MANIFEST])
    return load_tokenizer(local)


def _looks_like_vocab(p: Path) -> bool:
    """A vocab.json is a flat ``{token: id}`` object; a tokenizer.json has a "model" key."""
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{p} is not readable JSON ({e}); pass a tokenizer.json or vocab.json") from e
    return isinstance(obj, dict) and "model" not in obj


def special_ids(tok: Tokenizer) -> dict[str, int]:
    """``{"pad", "bos", "eos"}`` ids: OPT's ``<pad>`` / ``</s>`` when the vocabulary has
    them (1 and 2 in OPT's and in trained vocabularies), else GPT-2's ``<|endoftext|>``
    for all three. Raises ``UserError`` when there is no end-of-document token."""
    vocab = tok.get_vocab()
    if EOS in vocab:
        eos = vocab[EOS]
        return {"pad": vocab.get(PAD, eos), "bos": eos, "eos": eos}
    if GPT2_EOT in vocab:
        eot = vocab[GPT2_EOT]
        return {"pad": eot, "bos": eot, "eos": eot}
    raise UserError(f"the tokenizer has neither {EOS!r} nor {GPT2_EOT!r} in its vocabulary, so "
                    f"documents cannot be separated; use a GPT-2/OPT vocabulary or train one "
                    f"with 'opt-ray tokenizer train'")


def _canonical(tok: Tokenizer) -> dict[str, Any]:
    """The parts of a tokenizer that decide its token ids, in a stable form: padding,
    truncation and serialisation details (e.g. how merges are written) are left out, so a
    vocab.json + merges.txt pair and the tokenizer.json saved from it hash the same."""
    obj = json.loads(tok.to_str())
    model = dict(obj.get("model") or {})
    merges = model.get("merges")
    if merges is not None:
        model["merges"] = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in merges]
    model.pop("dropout", None)
    model.pop("ignore_merges", None)
    # tokenizers writes an unset affix as null, transformers' converter as "": same ids.
    for k in ("continuing_subword_prefix", "end_of_word_suffix"):
        model[k] = model.get(k) or ""
    added = sorted((a["id"], a["content"], bool(a.get("special"))) for a in obj.get("added_tokens") or [])
    return {"model": model, "added": added, "normalizer": obj.get("normalizer"),
            "pre_tokenizer": obj.get("pre_tokenizer")}


def tokenizer_hash(tok: Tokenizer) -> str:
    """sha256 over what decides the ids (vocabulary, merges, special tokens,
    pre-tokenization); equal hashes mean equal encodings."""
    blob = json.dumps(_canonical(tok), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def describe(tok: Tokenizer) -> dict[str, Any]:
    """What manifests record about a tokenizer."""
    return {"hash": tokenizer_hash(tok), "vocab_size": tok.get_vocab_size(with_added_tokens=True),
            "special_ids": special_ids(tok)}


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2,
                    show_progress: bool = False) -> Tokenizer:
    """Train a GPT-2 style byte-level BPE on ``texts`` with OPT's special tokens at ids 0..3.

    The 256 byte symbols are always in the vocabulary, so every text encodes without
    ``<unk>``. Raises ``UserError`` for a vocabulary too small or a corpus with no text.
    """
    floor = len(OPT_SPECIAL_TOKENS) + 256
    if vocab_size < floor + 1:
        raise UserError(f"--vocab-size {vocab_size} is too small: a byte-level BPE needs the "
                        f"{len(OPT_SPECIAL_TOKENS)} special tokens and 256 bytes plus merges; "
                        f"use at least {floor + 1} (OPT uses 50265)")
    seen = {"docs": 0, "chars": 0}

    def counted(it: Iterable[str]) -> Iterator[str]:
        for t in it:
            if t:
                seen["docs"] += 1
                seen["chars"] += len(t)
                yield t

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=OPT_SPECIAL_TOKENS, show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(counted(texts), trainer=trainer)
    if seen["docs"] == 0:
        raise UserError("the corpus has no text to train a tokenizer on (every record was "
                        "empty or there were none); check the input path and --text-field")
    return _opt_post_processor(_register_specials(tok))


def save_tokenizer(tok: Tokenizer, out_dir: str | os.PathLike, *, source: dict[str, Any] | None = None,
                   overwrite: bool = False) -> Path | str:
    """Write ``tokenizer.json`` (plus GPT-2 style ``vocab.json`` / ``merges.txt`` for HF
    interchange) and a manifest of kind ``tokenizer`` atomically; returns the directory.
    ``out_dir`` may be a bucket prefix (``s3://bucket/tokenizer``): written on this node,
    then uploaded with the manifest last (``artifact_io.publish_dir``); returns the URL."""
    from opt_ray.artifacts import ArtifactWriter
    from opt_ray.run_dir import is_url
    if is_url(out_dir):
        import tempfile

        from opt_ray.data.artifact_io import publish_dir
        from opt_ray.run_dir import staging_root
        staging_root().mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=staging_root(), prefix=".tokenizer-") as d:
            local = save_tokenizer(tok, Path(d) / "tokenizer", source=source)
            publish_dir(local, str(out_dir), kind="tokenizer", overwrite=overwrite)
        return str(out_dir).rstrip("/")

    with ArtifactWriter(out_dir, kind="tokenizer", overwrite=overwrite) as w:
        save_tokenizer_files(tok, w.path)
        w.manifest.update({"tokenizer": describe(tok), "source": source or {}})
    return w.out


def save_tokenizer_files(tok: Tokenizer, out_dir: str | os.PathLike) -> None:
    """Write ``tokenizer.json`` (plus ``vocab.json`` / ``merges.txt`` for a BPE) into an
    existing directory, each through a temporary name: an HF checkpoint directory this way
    carries the tokenizer that serving loads."""
    import tempfile

    out = Path(out_dir)
    with tempfile.TemporaryDirectory(dir=out, prefix=".tok-") as tmp:
        tok.save(str(Path(tmp) / "tokenizer.json"))
        if isinstance(tok.model, models.BPE):
            tok.model.save(tmp)  # vocab.json + merges.txt
        for f in sorted(Path(tmp).iterdir()):
            os.replace(f, out / f.name)
