"""Sizes as users write them on the command line and in the environment."""

from __future__ import annotations

import re

from opt_ray.errors import UserError

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str, what: str) -> int:
    """``5GB``, ``500MB``, ``2GiB``, ``1e9`` -> bytes; ``UserError`` naming ``what``."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]i?B|B)?\s*", text or "", re.IGNORECASE)
    try:
        n = int(float(m.group(1)) * _UNITS[(m.group(2) or "B").lower()]) if m else 0
    except ValueError:
        n = 0
    if n <= 0:
        raise UserError(f"{what} {text!r} is not a size; use e.g. 5GB, 500MB or 2GiB")
    return n
