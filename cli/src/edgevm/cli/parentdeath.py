"""Children that end with the process that started them, even when it is killed (SIGKILL)."""

from __future__ import annotations

import contextlib
import ctypes
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """A `preexec_fn`: the child gets SIGTERM when its parent dies.

    Linux sends it when the *thread* that started the child ends, not the process: start such children
    from the main thread (an executor's worker thread may end before the process does).
    """
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
