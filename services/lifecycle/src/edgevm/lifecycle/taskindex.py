"""Every task of the node, from every service, kept in memory by watching the `edgevm_tasks` bucket."""

from __future__ import annotations

import asyncio
import heapq
import logging

from nats.js.kv import KeyValue

from edgevm.shared.objects import Task
from edgevm.shared.tasks import decode_task

log = logging.getLogger(__name__)


class TaskIndex:
    """Answers task.get and task.list without reading the bucket per request."""

    def __init__(self, kv: KeyValue, node: str) -> None:
        self._kv = kv
        self._node = node
        self._tasks: dict[str, Task] = {}
        self.ready = asyncio.Event()

    def put(self, task: Task) -> None:
        """Record a task version (newer writes replace older ones)."""
        self._tasks[task.id] = task

    def get(self, task_id: str) -> Task | None:
        """Return a task or None."""
        return self._tasks.get(task_id)

    def list(self, vm: str | None, limit: int) -> list[Task]:
        """Return the newest tasks first (ids sort by creation time), optionally of one VM."""
        # A partial selection, not a sort of the whole index (7 days of tasks) per request.
        ids = self._tasks if vm is None else (i for i, t in self._tasks.items() if t.vm == vm)
        return [self._tasks[i] for i in heapq.nlargest(limit, ids)]

    def unfinished(self) -> list[Task]:
        """Return the tasks that have not ended."""
        return [t for t in self._tasks.values() if not t.finished]

    async def follow(self) -> None:
        """Watch the node's keys: the current value of each, then every change, until cancelled."""
        watcher = await self._kv.watch(f"{self._node}.>")
        try:
            async for entry in watcher:
                if entry is None:  # the initial values are all delivered
                    self.ready.set()
                    continue
                if entry.value and entry.operation is None:
                    try:
                        self.put(decode_task(entry.value))
                    except Exception as exc:
                        log.warning("task entry %s skipped: %s", entry.key, exc)
                elif entry.key:
                    self._tasks.pop(entry.key.split(".", 1)[1], None)
        finally:
            await watcher.stop()
