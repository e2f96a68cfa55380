"""Seeds for every random choice, derived from the experiment's seed and a purpose name."""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, *purpose: object) -> int:
    """A 63-bit seed that depends only on `seed` and the purpose names (stable across runs and machines)."""
    text = "/".join([str(seed), *map(str, purpose)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1
