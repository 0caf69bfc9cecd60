"""Python's cyclic garbage collector paused while a dump is read and applied.

A dump of 20,000 entries makes 60,000 objects (entries and their tuples), none of them in a cycle; each few
hundred of them set off a collection, and the older generations' hold every live flow: 100,000s of objects
scanned for nothing, a quarter of the dump's time (tests/bench/bench_flowwatch.py). Reference counting
frees what dies meanwhile; the collector runs again when the last pause ends.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

__all__ = ["gc_paused"]

_lock = threading.Lock()
_pauses = 0
_was_enabled = False


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic collector for the block (pauses nest, across threads too)."""
    global _pauses, _was_enabled
    with _lock:
        if _pauses == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _pauses += 1
    try:
        yield
    finally:
        with _lock:
            _pauses -= 1
            if _pauses == 0 and _was_enabled:
                gc.enable()
