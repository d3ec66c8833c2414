"""The one seed mixer: every derived seed in l3rs (task samples, heads, batches, noise) comes from here."""

from __future__ import annotations

import hashlib
from typing import Any


def seed_of(*parts: Any) -> int:
    """A stable 61-bit seed from any parts (same on every process and machine, unlike hash())."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 2**61
