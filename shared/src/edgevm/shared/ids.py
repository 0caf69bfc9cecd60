"""Identifiers that sort by creation time (ULID: 48-bit milliseconds + 80 random bits, Crockford base32)."""

from __future__ import annotations

import os
import threading
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_lock = threading.Lock()
_last_ms = 0
_last_random = 0


def new_id() -> str:
    """Return a new 26-character id, strictly greater than every id this process made before."""
    global _last_ms, _last_random
    with _lock:
        now = time.time_ns() // 1_000_000
        if now <= _last_ms:
            # Same (or a past) millisecond: keep the time, count up the random part, so order holds.
            now, random = _last_ms, _last_random + 1
        else:
            random = int.from_bytes(os.urandom(10), "big")
        _last_ms, _last_random = now, random
    value = (now << 80) | (random & ((1 << 80) - 1))
    chars = []
    for _ in range(26):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def id_time_ms(identifier: str) -> int:
    """Return the creation time in milliseconds encoded in an id from `new_id`."""
    value = 0
    for char in identifier[:10]:
        value = value * 32 + _ALPHABET.index(char)
    return value
