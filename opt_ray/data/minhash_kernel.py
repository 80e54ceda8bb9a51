"""Compiled inner loop for ``minhash.signatures``: shingle, SHA-1, permute, min, in C.

Why C: per shingle, the pure-numpy path still pays one Python-level ``hashlib.sha1`` call,
a bytes slice and nine numpy passes over 128 uint64 values; together that is only ~1.5x
datasketch. In C the whole shingle costs a SHA-1 block and ~128 multiply-adds.

The C source below is compiled on first use with the system C compiler into a per-user
cache (``$XDG_CACHE_HOME/opt_ray`` or ``~/.cache/opt_ray``), keyed by the source hash, and
loaded with ctypes; nothing is needed at install time. Without a compiler ``load()``
returns None and ``minhash`` falls back to its numpy path (same output, tested).

The kernel reproduces the shingling rule exactly for the two input forms it accepts:
- raw ASCII text (``mode 1``): words are runs of ``[A-Za-z0-9_]`` (what Python's ``\\w``
  matches among ASCII characters) lowercased (what ``str.lower`` does to ASCII);
- normalised text (``mode 0``): the words already lowercased and joined by one space;
  Python prepares this for non-ASCII texts, where Unicode ``\\w`` and ``lower`` apply.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

C_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline uint32_t rol(uint32_t x, int n) { return (x << n) | (x >> (32 - n)); }

static void sha1_block(uint32_t h[5], const uint8_t *p) {
    uint32_t w[80];
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4*i] << 24 | (uint32_t)p[4*i+1] << 16 | (uint32_t)p[4*i+2] << 8 | p[4*i+3];
    for (int i = 16; i < 80; i++) w[i] = rol(w[i-3] ^ w[i-8] ^ w[i-14] ^ w[i-16], 1);
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], t;
    /* Four branch-free loops of 20 rounds: the compiler unrolls each. */
#define ROUND(F, K) t = rol(a, 5) + (F) + e + (K) + w[i]; e = d; d = c; c = rol(b, 30); b = a; a = t;
    int i = 0;
    for (; i < 20; i++) { ROUND(d ^ (b & (c ^ d)), 0x5A827999u) }
    for (; i < 40; i++) { ROUND(b ^ c ^ d, 0x6ED9EBA1u) }
    for (; i < 60; i++) { ROUND((b & c) | (d & (b | c)), 0x8F1BBCDCu) }
    for (; i < 80; i++) { ROUND(b ^ c ^ d, 0xCA62C1D6u) }
#undef ROUND
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e;
}

static void sha1(const uint8_t *m, size_t len, uint32_t h[5]) {
    h[0] = 0x67452301u; h[1] = 0xEFCDAB89u; h[2] = 0x98BADCFEu; h[3] = 0x10325476u; h[4] = 0xC3D2E1F0u;
    size_t i = 0;
    for (; i + 64 <= len; i += 64) sha1_block(h, m + i);
    uint8_t blk[128];
    size_t rem = len - i;
    memcpy(blk, m + i, rem);
    blk[rem] = 0x80;
    size_t tot = (rem + 1 + 8 <= 64) ? 64 : 128;
    memset(blk + rem + 1, 0, tot - rem - 1 - 8);
    uint64_t bits = (uint64_t)len * 8;
    for (int j = 0; j < 8; j++) blk[tot - 1 - j] = (uint8_t)(bits >> (8 * j));
    sha1_block(h, blk);
    if (tot == 128) sha1_block(h, blk + 64);
}

static inline int ascii_word(uint8_t c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
}

/* Signatures and content digests of n documents.
   buf[off[i]:off[i+1]] is document i, mode[i] 1 = raw ASCII, 0 = normalised.
   sig: n x num_perm uint64 (output); digest: n x 16 bytes = first 16 bytes of the SHA-1
   of the normalised text (output). Returns 0, or -1 when out of memory. */
int minhash_batch(const uint8_t *buf, const int64_t *off, const uint8_t *mode, int64_t n,
                  int64_t ngram, const uint64_t *pa, const uint64_t *pb, int64_t num_perm,
                  uint64_t *sig, uint8_t *digest) {
    const uint64_t P61 = (1ULL << 61) - 1, MASK = 0xFFFFFFFFULL;
    int64_t cap = 0;
    uint8_t *norm = NULL;
    int64_t *start = NULL;
    for (int64_t d = 0; d < n; d++) {
        const uint8_t *src = buf + off[d];
        int64_t len = off[d + 1] - off[d];
        if (len + 1 > cap) {
            cap = 2 * (len + 1);
            free(norm); free(start);
            norm = malloc(cap); start = malloc(cap * sizeof(int64_t));
            if (!norm || !start) { free(norm); free(start); return -1; }
        }
        /* Normalise: words lowercased, joined by one space; remember where each starts. */
        int64_t ntok = 0, pos = 0, i = 0;
        int raw = mode[d];
        while (i < len) {
            while (i < len && !(raw ? ascii_word(src[i]) : src[i] != ' ')) i++;
            if (i >= len) break;
            if (pos > 0) norm[pos++] = ' ';
            start[ntok++] = pos;
            while (i < len && (raw ? ascii_word(src[i]) : src[i] != ' ')) {
                uint8_t c = src[i++];
                norm[pos++] = (raw && c >= 'A' && c <= 'Z') ? (uint8_t)(c + 32) : c;
            }
        }
        uint32_t h[5];
        sha1(norm, (size_t)pos, h);
        for (int j = 0; j < 4; j++) {
            digest[16 * d + 4 * j + 0] = (uint8_t)(h[j] >> 24);
            digest[16 * d + 4 * j + 1] = (uint8_t)(h[j] >> 16);
            digest[16 * d + 4 * j + 2] = (uint8_t)(h[j] >> 8);
            digest[16 * d + 4 * j + 3] = (uint8_t)h[j];
        }
        uint64_t *mins = sig + d * num_perm;
        for (int64_t k = 0; k < num_perm; k++) mins[k] = MASK;
        if (ntok == 0) continue;
        int64_t nsh = ntok <= ngram ? 1 : ntok - ngram + 1;
        for (int64_t s = 0; s < nsh; s++) {
            int64_t a0 = ntok <= ngram ? 0 : start[s];
            int64_t last = ntok <= ngram ? ntok - 1 : s + ngram - 1;
            int64_t a1 = last + 1 < ntok ? start[last + 1] - 1 : pos;
            sha1(norm + a0, (size_t)(a1 - a0), h);
            /* datasketch: first 4 digest bytes read little-endian. */
            uint64_t hv = ((h[0] >> 24) & 0xFF) | ((h[0] >> 8) & 0xFF00) |
                          ((h[0] << 8) & 0xFF0000) | ((uint64_t)(h[0] & 0xFF) << 24);
            for (int64_t k = 0; k < num_perm; k++) {
                uint64_t v = pa[k] * hv + pb[k];          /* wrapping, as datasketch */
                v = (v & P61) + (v >> 61);                /* Mersenne reduction */
                v += (v + 1) >> 61;                       /* y >= p: low bits + 1 */
                v &= MASK;
                mins[k] = v < mins[k] ? v : mins[k];
            }
        }
    }
    free(norm); free(start);
    return 0;
}
"""

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "opt_ray"


def _cpu_flags() -> bytes:
    try:
        with open("/proc/cpuinfo", "rb") as f:
            for line in f:
                if line.startswith(b"flags"):
                    return line
    except OSError:
        pass
    return b""


def _build(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        src = Path(tmp) / "minhash.c"
        src.write_text(C_SOURCE)
        out = Path(tmp) / path.name
        cc = os.environ.get("CC", "cc")
        base = [cc, "-O3", "-fPIC", "-shared", "-o", str(out), str(src)]
        try:
            # -march=native vectorises the permutation loop (AVX-512 has a 64-bit
            # multiply: ~5x on that loop). The cache key includes this CPU's flags, so
            # a node with another CPU builds its own copy.
            subprocess.run(base + ["-march=native"], check=True, capture_output=True,
                           timeout=120)
        except subprocess.CalledProcessError:
            subprocess.run(base, check=True, capture_output=True, timeout=120)
        # Atomic: concurrent workers compiling at once each rename a complete file.
        os.replace(out, path)


def load() -> ctypes.CDLL | None:
    """The compiled kernel, building it on first use; None if no C compiler works."""
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("OPT_RAY_MINHASH_NO_C"):
            return None
        tag = hashlib.sha256(C_SOURCE.encode() + _cpu_flags()).hexdigest()[:16]
        path = _cache_dir() / f"minhash-{tag}-{sys.platform}-{os.uname().machine}.so"
        try:
            if not path.exists():
                _build(path)
            lib = ctypes.CDLL(str(path))
        except (OSError, subprocess.SubprocessError) as e:
            print(f"opt_ray.data.minhash: C kernel unavailable ({e}); using the numpy path",
                  file=sys.stderr)
            return None
        fn = lib.minhash_batch
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 2 + \
                      [ctypes.c_int64] + [ctypes.c_void_p] * 2
        _lib = lib
        return _lib


def run(buf: bytes, offsets: np.ndarray, modes: np.ndarray, ngram: int, a: np.ndarray,
        b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Call the kernel: ``(signatures (n, num_perm) uint64, digests (n, 16) uint8)``."""
    lib = load()
    assert lib is not None
    n = len(offsets) - 1
    num_perm = len(a)
    sig = np.empty((n, num_perm), dtype=np.uint64)
    dig = np.empty((n, 16), dtype=np.uint8)
    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    modes = np.ascontiguousarray(modes, dtype=np.uint8)
    a = np.ascontiguousarray(a, dtype=np.uint64)
    b = np.ascontiguousarray(b, dtype=np.uint64)
    rc = lib.minhash_batch(buf, offsets.ctypes.data, modes.ctypes.data, n, ngram,
                           a.ctypes.data, b.ctypes.data, num_perm, sig.ctypes.data,
                           dig.ctypes.data)
    if rc != 0:
        raise MemoryError("minhash kernel could not allocate its scratch buffers")
    return sig, dig
