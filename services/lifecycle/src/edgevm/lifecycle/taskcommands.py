"""task.* commands for every task of the node, whichever service runs it."""

from __future__ import annotations

from edgevm.lifecycle.taskindex import TaskIndex
from edgevm.shared.commands import TaskList, TaskListRequest, TaskRef
from edgevm.shared.errors import Conflict
from edgevm.shared.objects import Task
from edgevm.shared.tasks import TaskStore


class TaskCommands:
    """Reads from the index; cancels through the store, so a race with the task's own writer is a 409."""

    def __init__(self, index: TaskIndex, store: TaskStore, node: str) -> None:
        self._index = index
        self._store = store
        self._node = node

    async def get(self, req: TaskRef) -> Task:
        """task.get."""
        task = self._index.get(req.id)
        if task is None:
            task, _ = await self._store.get(req.id)  # written a moment ago, not yet seen by the watch
        return task

    async def list(self, req: TaskListRequest) -> TaskList:
        """task.list: newest first, every kind from every service."""
        return TaskList(self._index.list(req.vm, req.limit))

    async def cancel(self, req: TaskRef) -> Task:
        """task.cancel: only a queued task can be cancelled; its worker then skips it."""
        task, revision = await self._store.get(req.id)
        if task.status != "queued":
            raise Conflict(f"task {req.id} is {task.status}: only a queued task can be cancelled", "id")
        cancelled, _ = await self._store.update(task, revision, status="cancelled", message="cancelled by request")
        self._index.put(cancelled)
        return cancelled
