"""The background tasks of one owner: started through it, and cancelled and awaited by it when it stops.

Every long-lived task of a service belongs to one such owner (STYLE 6), whose stop is the mirror of its
start: `close` cancels what still runs and waits for it, `drain` first lets it finish within a deadline.
A task that fails is logged with its traceback when it ends (unless someone else reports it), never left
for the garbage collector to report; a cancellation of the one who waits is always re-raised.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["Background"]

log = logging.getLogger(__name__)
T = TypeVar("T")
RECANCEL_AFTER = 0.5  # seconds a cancelled task gets to end before it is cancelled again


class Background:
    """The running tasks of `owner` (a few words for the log)."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def start(self, coro: Coroutine[Any, Any, T], name: str, *, log_failure: bool = True) -> asyncio.Task[T]:
        """Run `coro` as a task of this owner until it ends or the owner stops.

        A failure is logged, unless `log_failure` is False: for a task someone awaits (who then hears how it
        ended) or that reports its own failures.
        """
        task = asyncio.create_task(coro, name=f"{self.owner}: {name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if log_failure:
            task.add_done_callback(_log_failure)
        return task

    async def drain(self, timeout: float | None) -> None:
        """Wait for every task to end (None: however long it takes); cancel those still running after
        `timeout` s, and wait for them too."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)
        await self.close()

    async def close(self) -> None:
        """Cancel every task and wait until all have ended."""
        pending = set(self._tasks)
        # wait, not gather: a cancelled closer stops waiting at once. A task can lose one cancellation
        # (Python 3.11's asyncio.wait_for, inside nats-py's publish, drops a cancel that arrives as the
        # wrapped call ends), so a task still running after a short wait is cancelled again.
        while pending:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=RECANCEL_AFTER)


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("%s failed", task.get_name(), exc_info=task.exception())
