"""The tokenize stage at corpus scale: one task per input split (a file, or a run of row
groups / lines of a large Parquet / jsonl file), the driver out of the data path.

Each task (``tokenize_split``; an ``Executor`` runs it in-process or as a retried Ray task)
reads its own input file, assigns every document its split by the hash rule
(``shards.is_valid_doc``: a function of the document's id alone), cuts over-long documents
into pieces at single spaces (``split_long``; the byte-level BPE's pre-tokenizer splits
there too, so the ids are unchanged and no encoder holds a 50 MB document at once),
encodes, packs its own train and valid streams into rows and writes and checksums its
own shards, once. Its files go to the work dir ``.<output>.tokenize-work/sNNNNN/`` with a
``done.json``; a rerun after a killed driver keeps every completed file, and a killed
worker's task is retried.

The driver only plans, tracks and writes the manifest from the tasks' summaries; the
shards are hard-linked into the artifact, not read again.

A bucket output (``s3://bucket/shards``) needs no filesystem shared by the nodes: each
task builds its shards in its own node's staging directory and puts them at their final
names under the URL itself; its ``done.json`` goes to the work prefix beside the URL
(``s3://bucket/.shards.tokenize-work/``). The driver writes the tokenizer and then the
manifest, which readers require: until it is there, no reader takes the prefix for an
artifact. No shard passes through the driver. Packing is per input file:
a file's last partial row of each split is dropped (counted in ``dropped_tail_tokens``),
at most ``seq_len`` tokens per file and split.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from opt_ray.data.readers import (ID_KEY, InputErrors, InputFile, input_fingerprint, iter_file,
                                  plan_splits)
from opt_ray.data.shards import (KIND, SPLITS, TOKENIZER_FILE, SplitWriter, check_shards_url,
                                 encode_docs, is_valid_doc, token_dtype, tokenize_work_url,
                                 upload_shards)
from opt_ray.errors import UserError
from opt_ray.storage import Loc

WORK_VERSION = 1
MAX_DOC_CHARS = 1 << 20     # longer documents are encoded in pieces of about this size


def split_long(text: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """``text`` in pieces of at most about ``max_chars``, cut only before a single space
    between two non-space characters: GPT-2's pre-tokenizer starts a token there
    (`` word``), so encoding the pieces gives the ids of the whole. A stretch with no such
    space is cut at ``max_chars`` (a rare, harmless change of ids at that point)."""
    if len(text) <= max_chars:
        return [text]
    out = []
    start = 0
    while len(text) - start > max_chars:
        limit = start + max_chars
        pos = text.rfind(" ", start + 1, limit + 1)
        while pos > start and (text[pos - 1].isspace() or pos + 1 >= len(text)
                               or text[pos + 1].isspace()):
            pos = text.rfind(" ", start + 1, pos)
        if pos <= start:
            pos = limit
        out.append(text[start:pos])
        start = pos
    out.append(text[start:])
    return out


@dataclass(frozen=True)
class TokenizeJob:
    """What every task needs: the work dir, the inputs and the parameters."""

    work: str
    files: tuple[InputFile, ...]
    tokenizer_json: str
    eos: int
    dtype: str
    seq_len: int
    rows_per_shard: int
    valid_fraction: float
    seed: int
    text_field: str
    id_field: str | None
    batch_chars: int
    max_doc_chars: int = MAX_DOC_CHARS
    # A bucket output: the artifact's URL, where each task puts its own shards (``work``
    # is then the work prefix's URL).
    upload: str | None = None

    def split_dir(self, s: int) -> Path:
        return Path(self.work) / f"s{s:05d}"


def _done(job: TokenizeJob, s: int) -> dict[str, Any] | None:
    from opt_ray.data.artifact_io import read_done
    return read_done([Loc(job.work).child(f"s{s:05d}")])[0]


def tokenize_split(job: TokenizeJob, s: int) -> dict[str, Any]:
    """One input file -> its own packed, checksummed shards (see the module doc)."""
    if (info := _done(job, s)) is not None:
        return info
    out = job.split_dir(s)
    if job.upload:   # this node's staging directory; the shards end in the bucket
        from opt_ray.run_dir import staging_root
        staging_root().mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tokenize-s{s:05d}-", dir=staging_root()))
    else:
        # Which process works on this file (for operators, and the chaos test's victim).
        out.parent.mkdir(parents=True, exist_ok=True)
        (out.parent / f"{out.name}.running").write_text(json.dumps({"pid": os.getpid()}))
        tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.mkdir(parents=True)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"   # one core per task
    from tokenizers import Tokenizer
    tok = Tokenizer.from_str(job.tokenizer_json)
    c0 = time.process_time()
    try:
        writers = {sp: SplitWriter(tmp, sp, job.seq_len, job.dtype, job.rows_per_shard,
                                   prefix=f"{s:05d}-") for sp in SPLITS}
        errors = InputErrors()
        pending: dict[str, list[str]] = {sp: [] for sp in SPLITS}
        docs = {sp: 0 for sp in SPLITS}
        chars = 0
        pieces = 0

        def flush() -> None:
            nonlocal chars
            for sp in SPLITS:
                if pending[sp]:
                    writers[sp].add(_encode_pieces(tok, pending[sp], job), docs[sp])
                    pending[sp], docs[sp] = [], 0
            chars = 0

        for rec in iter_file(job.files[s], text_field=job.text_field, id_field=job.id_field,
                             errors=errors):
            text = rec.get(job.text_field)
            if not text:
                continue
            key = rec.get(job.id_field) if job.id_field else rec.get(ID_KEY)
            sp = "valid" if is_valid_doc(key, job.seed, job.valid_fraction) else "train"
            parts = split_long(text, job.max_doc_chars)
            pieces += len(parts) - 1
            # A document's pieces go together: the eos comes after the last one only.
            pending[sp].append(parts if len(parts) > 1 else text)
            docs[sp] += 1
            chars += len(text)
            if chars >= job.batch_chars:
                flush()
        flush()
        summary = {sp: w.close() for sp, w in writers.items()}
        info = {"split": s, "splits": summary, "errors": errors.to_dict(),
                "long_doc_pieces": pieces, "cpu_s": round(time.process_time() - c0, 3)}
        if job.upload:
            _put_split(job, s, tmp, info)
            shutil.rmtree(tmp, ignore_errors=True)
            return info
        (tmp / "done.json").write_text(json.dumps(info))
        try:
            os.replace(tmp, out)
        except OSError:       # a retried twin finished first: same content
            shutil.rmtree(tmp, ignore_errors=True)
        return info
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _put_split(job: TokenizeJob, s: int, tmp: Path, info: dict[str, Any]) -> None:
    """A bucket output: this task's shards to their final names under the artifact's URL,
    then its ``done.json`` to the work prefix (the driver counts the file done only then;
    a retried twin puts the same bytes). The driver checks their sizes and records their
    ETags in one listing when it puts the manifest."""
    from opt_ray.data.artifact_io import put_files

    names = [sh["name"] for sp in SPLITS for sh in info["splits"][sp]["shards"]]
    put_files(tmp, Loc(job.upload), f"--output {job.upload}", names)
    (tmp / "done.json").write_text(json.dumps(info))
    put_files(tmp, Loc(job.work).child(f"s{s:05d}"), f"--output {job.upload}", ["done.json"])


def _encode_pieces(tok: Any, docs: list, job: TokenizeJob):
    """Encode documents (a str, or a list of pieces of one long document), each followed
    by eos, as one flat token array."""
    import numpy as np
    flat = []
    plain: list[str] = []
    for d in docs:
        if isinstance(d, str):
            plain.append(d)
            continue
        if plain:
            flat.append(encode_docs(tok, plain, job.eos, job.dtype))
            plain = []
        ids = [encode_docs(tok, [p], job.eos, job.dtype)[:-1] for p in d]
        flat.append(np.concatenate(ids + [np.asarray([job.eos], dtype=job.dtype)]))
    if plain:
        flat.append(encode_docs(tok, plain, job.eos, job.dtype))
    return np.concatenate(flat) if flat else np.empty(0, dtype=job.dtype)


def _fingerprint(job: TokenizeJob) -> dict[str, Any]:
    import hashlib
    inputs = [input_fingerprint(f) for f in job.files]
    return {"version": WORK_VERSION, "inputs": inputs,
            "tokenizer": hashlib.sha256(job.tokenizer_json.encode()).hexdigest(),
            "params": [job.seq_len, job.rows_per_shard, job.valid_fraction, job.seed,
                       job.text_field, job.id_field, job.batch_chars, job.max_doc_chars]}


def work_dir(output: str | os.PathLike) -> Path:
    out = Path(output).absolute()
    return out.with_name(f".{out.name}.tokenize-work")


def tokenize_files(files: Sequence[InputFile], tok: Any, out: str | os.PathLike, *,
                   seq_len: int, valid_fraction: float = 0.01, seed: int = 0,
                   text_field: str = "text", id_field: str | None = None,
                   executor: Any = None, shard_tokens: int = 1 << 25,
                   batch_chars: int = 1 << 18, max_doc_chars: int = MAX_DOC_CHARS,
                   split_bytes: int = 256 << 20,
                   source: dict[str, Any] | None = None, progress: bool = False,
                   overwrite: bool = False) -> Path | str:
    """The tokenize stage over ``files`` (``resolve_inputs``) into a shards artifact at
    ``out`` (atomic), or into a bucket URL (the manifest last; see the module doc): returns
    the artifact's path or URL. ``executor``: where the per-file tasks run (default
    in-process).
    Parquet and jsonl files larger than ``split_bytes`` are split by row groups / lines
    (``readers.plan_splits``; one task each; the lines counted by tasks on ``executor``).
    Raises ``UserError`` for a corpus with no documents or too few tokens for one row."""
    from opt_ray.data.artifact_io import PrehashedArtifactWriter, prepare_work, read_done
    from opt_ray.data.dedup import LocalExecutor
    from opt_ray.data.tokenizer import describe

    if seq_len < 1:
        raise UserError(f"--seq-len must be >= 1, got {seq_len}")
    if not 0.0 <= valid_fraction < 1.0:
        raise UserError(f"--valid-fraction must be in [0, 1), got {valid_fraction}")
    from opt_ray.run_dir import is_url, local_run_dir, store_errors

    executor = executor or LocalExecutor()
    url = str(out).rstrip("/") if is_url(out) else None
    if url:     # before planning: counting a large corpus's lines is a read
        with store_errors(f"--output {url}", "the work prefix", "the bucket exists"):
            check_shards_url(url, overwrite=overwrite)
    files = plan_splits(list(files), split_bytes, executor)
    tinfo = describe(tok)
    dtype = token_dtype(tinfo["vocab_size"])
    work = tokenize_work_url(url) if url else str(work_dir(out))
    job = TokenizeJob(work, tuple(files), tok.to_str(), tinfo["special_ids"]["eos"],
                      dtype.name, seq_len, max(1, shard_tokens // (seq_len + 1)),
                      valid_fraction, seed, text_field, id_field, batch_chars, max_doc_chars,
                      upload=url)
    fp = _fingerprint(job)
    wd = Loc(work)
    with store_errors(f"--output {url}", "the work prefix", "the bucket exists"):
        prepare_work(wd, fp, Loc(url) if url else None, overwrite=overwrite)
        done = read_done([wd.child(f"s{s:05d}") for s in range(len(files))])
    results: dict[int, dict] = {s: info for s, info in enumerate(done) if info is not None}
    t0 = time.time()
    todo = [(job, s) for s in range(len(files)) if s not in results]
    from tqdm import tqdm
    bar = tqdm(total=len(files), initial=len(results), unit="file", desc="tokenize",
               disable=not progress, leave=False)
    for info in executor.map(tokenize_split, todo):
        results[info["split"]] = info
        bar.update(1)
    bar.close()
    ordered = [results[s] for s in range(len(files))]
    summary = _merge(ordered)
    docs = sum(v["docs"] for v in summary.values())
    if docs == 0:
        wd.rm()
        raise UserError(f"the corpus has no documents with text (field {text_field!r}); "
                        f"check the input path and --text-field")
    if summary["train"]["rows"] == 0:
        wd.rm()
        raise UserError(f"the corpus has only {summary['train']['stream_tokens']} training "
                        f"tokens, fewer than one row of --seq-len + 1 = {seq_len + 1} in any "
                        f"input file; add data or lower --seq-len")
    bad = _merge_errors(i["errors"] for i in ordered)
    # A bucket output: the manifest and the tokenizer are made in this node's staging
    # directory and go up last; the shards are already in the bucket.
    with PrehashedArtifactWriter(local_run_dir(url) if url else out, kind=KIND,
                                 overwrite=overwrite or bool(url)) as w:
        tok.save(str(w.path / TOKENIZER_FILE))
        for info in ordered:
            src = job.split_dir(info["split"])
            for sp in SPLITS:
                for sh in info["splits"][sp]["shards"]:
                    entry = {"sha256": sh["sha256"], "bytes": sh["bytes"]}
                    if url:
                        w.elsewhere[sh["name"]] = entry
                        continue
                    (w.path / sh["name"]).parent.mkdir(parents=True, exist_ok=True)
                    _link(src / sh["name"], w.path / sh["name"])
                    w.known[sh["name"]] = entry
        tokens = sum(v["stream_tokens"] for v in summary.values())
        w.manifest.update({
            "seq_len": seq_len, "dtype": dtype.name, "tokenizer": tinfo,
            "splits": summary,
            "split": {"by": "document", "valid_fraction": valid_fraction, "seed": seed,
                      "key": id_field or ID_KEY,
                      "rule": "blake2b(f'{seed}\\0{key}') / 2**64 < valid_fraction"},
            "packing": {"separator": "eos after every document", "eos_id": job.eos,
                        "row_tokens": seq_len + 1, "tail": "dropped, per input file",
                        "long_documents": f"encoded in pieces of <= {max_doc_chars} chars"},
            "source": {**(source or {}), "bad_records": bad},
            "tokens_per_second": round(tokens / max(time.time() - t0, 1e-9)),
            "encode_cpu_seconds": round(sum(i["cpu_s"] for i in ordered), 3),
            "long_doc_pieces": sum(i["long_doc_pieces"] for i in ordered),
        })
    if url:
        upload_shards(w.out, url, progress=progress)
        shutil.rmtree(w.out, ignore_errors=True)
        with store_errors(f"--output {url}", "removing the work prefix", "the bucket exists"):
            wd.rm()
        return url
    wd.rm()
    return w.out


def _link(src: Path, dst: Path) -> None:
    """Hard link (no copy; the work dir stays whole until the artifact is committed)."""
    try:
        os.link(src, dst)
    except OSError:      # another filesystem: copy
        shutil.copyfile(src, dst)


def _merge(infos: list[dict]) -> dict[str, Any]:
    out = {}
    for sp in SPLITS:
        parts = [i["splits"][sp] for i in infos]
        out[sp] = {"shards": [sh for p in parts for sh in p["shards"]],
                   **{k: sum(p[k] for p in parts)
                      for k in ("rows", "tokens", "docs", "stream_tokens", "dropped_tail_tokens")}}
    return out


def _merge_errors(dicts: Iterator[dict[str, Any]]) -> dict[str, Any]:
    errors = InputErrors()
    for d in dicts:
        for path, f in d["files"].items():
            errors.files[path] = f
    return errors.to_dict()
