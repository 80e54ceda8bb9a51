"""Signatures are bit-identical to datasketch (the reference) on both code paths."""

from __future__ import annotations

import glob
import json
import random
from pathlib import Path

import numpy as np
import pytest
from datasketch import MinHash

from opt_ray.data import minhash_kernel
from opt_ray.data.minhash import (MAX_HASH, permutations, shingles, signatures,
                                  signatures_and_digests)

PATHS = [True, False] if minhash_kernel.load() is not None else [False]


def reference(text: str, num_perm: int, seed: int, ngram: int) -> np.ndarray:
    m = MinHash(num_perm=num_perm, seed=seed)
    m.update_batch([s.encode("utf-8") for s in shingles(text, ngram)])
    return m.hashvalues


def random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = ["alpha", "Beta", "γάμμα", "straße", "İstanbul", "ǅemal", "x_1", "42", "日本語",
                "naïve", "ŉ", "ﬁ", "emoji😀", "tab\t", "--", "..."]
    seps = [" ", "  ", "\n", ", ", "-", "!?", "\u00a0", "\u2028"]
    return ["".join(rng.choice(alphabet) + rng.choice(seps) for _ in range(rng.randint(0, 60)))
            for _ in range(n)]


def real_texts(n: int) -> list[str]:
    # The standard library's own sources: real prose, code and licence headers.
    files = sorted(glob.glob(str(Path(json.__file__).parent.parent / "*.py")))
    rng = random.Random(0)
    return [Path(p).read_text(errors="replace") for p in rng.sample(files, min(n, len(files)))]


def test_shingling_rule():
    assert shingles("The quick, brown FOX jumps over", 3) == [
        "the quick brown", "quick brown fox", "brown fox jumps", "fox jumps over"]
    assert shingles("Two words", 5) == ["two words"]   # shorter than n: one shingle
    assert shingles("  ...  ", 5) == [] and shingles("", 5) == []
    # Lowercase first, then split: İ lowercases to i + combining dot (a non-word char).
    assert shingles("İx", 1) == ["i", "x"]


def test_permutations_match_datasketch():
    for seed, num_perm in [(1, 128), (3, 7), (99, 256)]:
        a, b = permutations(num_perm, seed)
        ref = MinHash(num_perm=num_perm, seed=seed).permutations
        assert (a == ref[0]).all() and (b == ref[1]).all()


@pytest.mark.parametrize("use_c", PATHS)
@pytest.mark.parametrize("seed,num_perm,ngram", [(1, 128, 5), (7, 64, 3), (12345, 256, 1),
                                                 (2, 16, 13)])
def test_signatures_equal_datasketch_random(use_c, seed, num_perm, ngram):
    texts = random_texts(120, seed)
    sig = signatures(texts, num_perm=num_perm, seed=seed, ngram=ngram, use_c=use_c)
    assert sig.dtype == np.uint64 and sig.shape == (len(texts), num_perm)
    for i, t in enumerate(texts):
        assert (sig[i] == reference(t, num_perm, seed, ngram)).all(), (i, t)


@pytest.mark.parametrize("use_c", PATHS)
@pytest.mark.parametrize("seed,num_perm", [(1, 128), (42, 64)])
def test_signatures_equal_datasketch_real(use_c, seed, num_perm):
    texts = real_texts(40)
    sig = signatures(texts, num_perm=num_perm, seed=seed, use_c=use_c)
    for i, t in enumerate(texts):
        assert (sig[i] == reference(t, num_perm, seed, 5)).all()


@pytest.mark.parametrize("use_c", PATHS)
def test_empty_text_is_datasketch_empty_set(use_c):
    sig = signatures(["", " ;; ", "one"], use_c=use_c)
    assert (sig[0] == MAX_HASH).all() and (sig[1] == MAX_HASH).all()
    assert (sig[0] == MinHash(num_perm=128, seed=1).hashvalues).all()
    assert (sig[2] < MAX_HASH).any()


def test_batch_boundaries_do_not_matter():
    # The numpy path walks the shingle matrix in blocks; documents straddle them.
    texts = random_texts(50, 5) + real_texts(5)
    whole = signatures(texts, use_c=False)
    for i in (0, 7, len(texts) - 1):
        assert (signatures(texts[i:i + 1], use_c=False)[0] == whole[i]).all()


def test_c_and_numpy_digests_agree():
    if len(PATHS) < 2:
        pytest.skip("no C compiler: only the numpy path exists here")
    texts = random_texts(60, 9) + ["Same  words.", "same words"]
    s1, d1 = signatures_and_digests(texts, use_c=True)
    s2, d2 = signatures_and_digests(texts, use_c=False)
    assert (s1 == s2).all() and (d1 == d2).all()
    assert (d1[-1] == d1[-2]).all()   # equal word sequences, equal digest


def test_no_compiler_falls_back_to_numpy(tmp_path, monkeypatch, capsys):
    # A machine without a working C compiler: the kernel does not build, signatures
    # still come out right through the numpy path, with one line saying so.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(minhash_kernel, "_tried", False)
    monkeypatch.setattr(minhash_kernel, "_lib", None)
    assert minhash_kernel.load() is None
    assert "numpy path" in capsys.readouterr().err
    texts = random_texts(10, 1)
    sig = signatures(texts)
    for i, t in enumerate(texts):
        assert (sig[i] == reference(t, 128, 1, 5)).all()
