"""The built-in sample corpus: real English text from the Python standard library, with a
known set of near-duplicates mixed in, assembled at run time without any download.

Sources, all present wherever CPython is installed:

* ``pydoc_data.topics``: the language reference topics behind ``help()`` (prose);
* docstrings of modules, classes and functions of the standard library's own ``.py``
  files, read with ``ast`` (never imported, so no module runs).

Originals are filtered so that no two of them are near-duplicates (shingle Jaccard below
0.5), which makes the planted set *the* set of duplicates. Variants of about 6% of the
originals are mixed in, each recorded in the record (``dup_of``, ``variant``) and in a
side file ``<name>.dups.json`` with its shingle Jaccard to the original:

* ``exact``: the same text;
* ``case_whitespace``: changed case and whitespace (Jaccard 1.0 under the shingling rule);
* ``word_edit``: one or two words replaced in a long document (Jaccard >= 0.95).

Shingles follow DESIGN.md: lowercase, split on ``\\W+``, word 5-grams joined by a space.
The output is a pure function of (Python installation, ``n_docs``, ``seed``).
"""

from __future__ import annotations

import ast
import collections
import json
import os
import random
import re
import sys
import sysconfig
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

from opt_ray.artifacts import write_text_atomic

# Directories of the standard library that are tests, tools or generated tables rather
# than prose (encodings/ is ~100 copies of one generated docstring).
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3",
              "__pycache__", "encodings", "turtledemo", "ensurepip", "venv", "__phello__"}
MIN_WORDS = 20
# About 2 MB of text: enough that every stage has real work, small enough that the demo
# (dedup, tokenizer, tokenize, tiny training) takes minutes on 2 cores.
DEFAULT_TARGET_CHARS = 2_000_000
VARIANT_RATE = 0.06
NGRAM = 5
_ORIGINAL_MAX_JACCARD = 0.5
_EDIT_MIN_JACCARD = 0.955
_REPLACEMENTS = ["banana", "quartz", "velvet", "harbour", "meadow", "lantern", "saffron", "cobalt"]


def shingles(text: str, n: int = NGRAM) -> set[str]:
    """Word n-gram shingles as DESIGN.md defines them (same rule as the dedup stage)."""
    words = [w for w in re.split(r"\W+", text.lower()) if w]
    if len(words) < n:
        return {" ".join(words)}
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def _pydoc_topics() -> Iterator[tuple[str, str]]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # a stripped-down Python; the docstrings still suffice
        return
    for name in sorted(topics):
        yield f"pydoc:{name}", topics[name]


_BLOCKS = (ast.stmt, ast.ExceptHandler, ast.match_case)


def _statements(tree: ast.Module) -> Iterator[ast.AST]:
    """``ast.walk`` (breadth first) restricted to the module and its statements, the only
    nodes that hold docstrings (defs nest only in statements, ``except`` and ``case``
    blocks): the same nodes in the same order, without visiting every expression (that
    was half the sample's build time)."""
    todo = collections.deque([tree])
    while todo:
        node = todo.popleft()
        todo.extend(c for c in ast.iter_child_nodes(node) if isinstance(c, _BLOCKS))
        yield node


def _docstrings() -> Iterator[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for fn in sorted(filenames):
            if not fn.endswith(".py"):
                continue
            path = Path(dirpath) / fn
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
                continue
            rel = path.relative_to(root).as_posix()
            for node in _statements(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc:
                        yield f"stdlib:{rel}:{getattr(node, 'name', '<module>')}", doc


def _originals(n_docs: int | None, target_chars: int) -> list[dict[str, Any]]:
    """Real documents with no near-duplicate among them, in a deterministic order."""
    docs: list[dict[str, Any]] = []
    index: dict[str, list[int]] = defaultdict(list)   # shingle -> docs holding it
    sizes: list[int] = []
    chars = 0
    for source, text in _iter_sources():
        text = text.strip()
        if len(text.split()) < MIN_WORDS:
            continue
        sh = shingles(text)
        # Count shingles shared with every earlier document through the inverted index;
        # drop this one if it is even loosely similar to one already kept.
        shared: dict[int, int] = defaultdict(int)
        for s in sh:
            for j in index.get(s, ()):
                shared[j] += 1
        if any(c / (len(sh) + sizes[j] - c) >= _ORIGINAL_MAX_JACCARD for j, c in shared.items()):
            continue
        k = len(docs)
        for s in sh:
            index[s].append(k)
        sizes.append(len(sh))
        docs.append({"id": f"d{k:05d}", "text": text, "source": source})
        chars += len(text)
        if (n_docs is not None and len(docs) >= n_docs) or (n_docs is None and chars >= target_chars):
            break
    return docs


def _iter_sources() -> Iterator[tuple[str, str]]:
    yield from _pydoc_topics()
    yield from _docstrings()


def _case_whitespace(text: str, rng: random.Random) -> str:
    words = text.split()
    out = []
    for w in words:
        r = rng.random()
        out.append(w.upper() if r < 0.1 else w.lower() if r < 0.3 else w)
    return "  ".join(out) + "\n"


def _word_edit(text: str, edits: int, rng: random.Random) -> str:
    """Replace ``edits`` words (of 4+ letters) by words that occur nowhere in the corpus."""
    spans = [m.span() for m in re.finditer(r"[A-Za-z]{4,}", text)]
    for i in sorted(rng.sample(range(len(spans)), min(edits, len(spans))), reverse=True):
        a, b = spans[i]
        text = text[:a] + rng.choice(_REPLACEMENTS) + text[b:]
    return text


def _plant_variants(originals: list[dict[str, Any]], rng: random.Random) -> list[dict[str, Any]]:
    """Pick about ``VARIANT_RATE`` of the originals and make one variant of each: a third
    word edits (only long documents stay >= 0.95 Jaccard after an edit: one replaced word
    changes up to ``NGRAM`` shingles), the rest exact and case/whitespace copies."""
    n = max(3, round(VARIANT_RATE * len(originals))) if len(originals) >= 3 else len(originals)
    sizes = {d["id"]: len(shingles(d["text"])) for d in originals}
    long_docs = [d for d in originals if sizes[d["id"]] >= 250]
    edit = rng.sample(long_docs, min(n // 3, len(long_docs)))
    taken = {d["id"] for d in edit}
    rest = rng.sample([d for d in originals if d["id"] not in taken], n - len(edit))
    variants = []
    for k, doc in enumerate(edit + rest):
        if k < len(edit):
            kind = "word_edit"
            text = _word_edit(doc["text"], 1 if sizes[doc["id"]] < 600 else 2, rng)
        elif k % 2:
            kind, text = "exact", doc["text"]
        else:
            kind, text = "case_whitespace", _case_whitespace(doc["text"], rng)
        j = jaccard(shingles(doc["text"]), shingles(text))
        if j < _EDIT_MIN_JACCARD:  # cannot happen with the sizes above; never plant a miss
            kind, text, j = "exact", doc["text"], 1.0
        variants.append({"id": f"{doc['id']}~{kind}", "text": text, "source": doc["source"],
                         "dup_of": doc["id"], "variant": kind, "jaccard": round(j, 4)})
    return variants


def write_sample_corpus(out_dir: str | os.PathLike, *, n_docs: int | None = None, seed: int = 0,
                        name: str = "sample") -> Path:
    """Write ``<out_dir>/<name>.jsonl`` (fields ``id``, ``text``, ``source``, ``dup_of``,
    ``variant``) and ``<name>.dups.json`` listing every planted near-duplicate.

    ``n_docs`` is the number of original documents (default: about 2 MB of text); variants
    come on top. Returns the jsonl path. Deterministic for a given Python and ``seed``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    originals = _originals(n_docs, DEFAULT_TARGET_CHARS)
    variants = _plant_variants(originals, random.Random(seed))
    # Shuffle, but keep every original before its variants: a dedup that keeps the first
    # occurrence (or the lowest id: "d00012" < "d00012~exact") then removes exactly the
    # planted variants.
    order = random.Random(seed + 1)
    keys = {d["id"]: order.random() for d in originals}
    records = [{**d, "dup_of": None, "variant": "original"} for d in originals]
    records += [{k: v for k, v in d.items() if k != "jaccard"} for d in variants]
    for d in variants:
        keys[d["id"]] = order.uniform(keys[d["dup_of"]], 1.0)
    records.sort(key=lambda r: keys[r["id"]])

    path = out_dir / f"{name}.jsonl"
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    side = {
        "corpus": path.name, "seed": seed, "python": sys.version.split()[0],
        "originals": len(originals), "variants": len(variants), "records": len(records),
        "chars": sum(len(r["text"]) for r in records),
        "shingles": f"lowercase, split on \\W+, word {NGRAM}-grams",
        "duplicates": [{k: d[k] for k in ("id", "dup_of", "variant", "jaccard")} for d in variants],
    }
    write_text_atomic(out_dir / f"{name}.dups.json", json.dumps(side, indent=1) + "\n")
    return path


