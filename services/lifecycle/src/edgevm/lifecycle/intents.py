"""Marks of creations under way (a VM, an image), and the requests of tasks a restart may cut.

Marks: what a creation cut by a crash left behind is found and removed.

vm.create marks its VM here before it asks netplumb for anything and clears the mark once the VM's record
is written (or its undo is done). A mark left with no record is a create the process died in: its network,
domain and directory are this service's own half-made work, which the start-up sweep (or the next create of
that name) removes. Without a mark, a record-less directory or domain is not known to be ours and is left
alone (vm.create then refuses the name, asking for it to be removed by hand). image.import marks its image
the same way, in `<state>/lifecycle/importing/`, until the image's record is written.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from edgevm.shared.objects import Task

log = logging.getLogger(__name__)


class Intents:
    """One empty file per thing being created, in a directory of its own."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def mark(self, name: str) -> None:
        """Record that a create of `name` begins."""
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / name).touch()

    def marked(self, name: str) -> bool:
        """Whether a create of `name` began and was neither finished nor undone."""
        return (self.root / name).exists()

    def clear(self, name: str) -> None:
        """The create of `name` is over (its record is written, or all it made is removed)."""
        (self.root / name).unlink(missing_ok=True)

    def pending(self) -> list[str]:
        """The names whose create began and never ended."""
        return sorted(p.name for p in self.root.iterdir()) if self.root.is_dir() else []


class RequestUnreadable(Exception):
    """A kept request's file is there but cannot be read back (torn by a power loss, or edited by hand)."""


class KeptRequests:
    """What a task was asked, for the parts its Task does not carry: one JSON file per task, by its id.

    Why a file here (`<state>/lifecycle/requests/<task id>.json`), not a key in NATS next to the task: it is
    written before the task is (the runner is given the id), durably on the local disk, with no second network
    write that could fail apart from the task's; and it lives beside the image store and the import marks it
    goes with, all read at start-up before anything is served. A file is written whole or not at all
    (a temporary file, then renamed), read back by the resume after a restart, and removed when the
    task's end is written (`ended`); those of tasks that ended meanwhile are swept at start-up (`sweep`).
    Only what a resume needs is kept: an image.import's request, a forced vm.stop's `force`.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, task_id: str) -> Path:
        return self.root / f"{task_id}.json"

    def keep(self, task_id: str, kind: str, request: dict[str, Any]) -> None:
        """Write the request of task `task_id` (of `kind`), before the task is submitted."""
        self.root.mkdir(parents=True, exist_ok=True)
        temporary = self.root / f".{task_id}.new"
        # Renamed into place whole, so a crash of the process never leaves it torn. Not fsynced: the task it
        # belongs to is no more durable (JetStream syncs its files every 2 minutes by default); after a power
        # loss a missing or torn file fails the resumed task, saying so (RequestUnreadable).
        temporary.write_bytes(json.dumps({"kind": kind, "request": request}).encode())
        os.rename(temporary, self._path(task_id))

    def read(self, task_id: str, kind: str) -> dict[str, Any] | None:
        """The request kept for task `task_id`; None when none was; RequestUnreadable when it cannot be read."""
        path = self._path(task_id)
        try:
            doc = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise RequestUnreadable(f"its request, kept in {path}, cannot be read ({exc})") from None
        if not isinstance(doc, dict) or doc.get("kind") != kind or not isinstance(doc.get("request"), dict):
            raise RequestUnreadable(f"its request, kept in {path}, is not the request of a {kind} task")
        return doc["request"]  # type: ignore[no-any-return]

    def drop(self, task_id: str) -> None:
        """Forget the request of task `task_id` (it ended, or was never submitted)."""
        self._path(task_id).unlink(missing_ok=True)

    def ended(self, task: Task) -> None:
        """Called with every write of a task: the request goes with the write of its end. A file that cannot
        be removed now is logged, never the task's failure: the next start-up sweeps it."""
        if task.finished:
            try:
                self.drop(task.id)
            except OSError as exc:
                log.warning("task %s ended; its kept request stays until the next start: %s", task.id, exc)

    def sweep(self, unfinished: set[str]) -> list[str]:
        """At start-up: remove the requests (and half-written files) of tasks not in `unfinished`."""
        if not self.root.is_dir():
            return []
        swept = []
        for path in self.root.iterdir():
            if path.suffix != ".json" or path.stem not in unfinished:
                path.unlink(missing_ok=True)
                swept.append(path.name)
        return sorted(swept)
