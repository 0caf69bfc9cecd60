"""The per-VM leases of snapshot tasks: taken at submit, taken over by the one worker that runs the task.

A lease taken at submit names the task but no holder: it keeps the VM for the queued task. The worker that
runs the task takes it over with a conditional write naming its process (`holder`), so the submitter's
renewals stop (they find the lease changed) and only one process renews it. A lease that names a holder
belongs to a running task: another process takes it over only when the holder is known dead (a process of
the same host and PID namespace that no longer exists: the snapshotter runs on its node) or after seeing
the lease unrenewed for STALE_AFTER seconds, so a task redelivered while it still runs elsewhere is not run
twice.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path

import msgspec
from nats.js.errors import KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from edgevm.shared.errors import Conflict
from edgevm.shared.locks import RENEW_EVERY, HeldLease, Lease, VmLocks

log = logging.getLogger(__name__)
STALE_AFTER = 2 * RENEW_EVERY


def process_instance() -> str:
    """This process as a lease holder: `<boot id>.<pid namespace>.<pid>.<random>`."""
    return f"{_boot_id()}.{_pid_namespace()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"


def holder_is_dead(holder: str) -> bool:
    """Whether `holder` is a process of this host's boot and PID namespace that no longer exists (False
    when that cannot be known: another host, or a process of that PID alive, maybe a new one)."""
    parts = holder.split(".")
    if len(parts) != 4 or not parts[2].isdecimal() or parts[:2] != [_boot_id(), _pid_namespace()]:
        return False
    try:
        os.kill(int(parts[2]), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:12]
    except OSError:
        return "unknown"


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "unknown"


class TaskLeases:
    """Leases held for queued or running snapshot tasks, by task id, for one snapshotter process."""

    def __init__(self, locks: VmLocks, kv: KeyValue, node: str, instance: str | None = None,
                 stale_after: float = STALE_AFTER) -> None:
        self._locks = locks
        self._kv = kv
        self._node = node
        self.instance = instance or process_instance()  # this process, as lease holder
        self._stale_after = stale_after
        self._held: dict[str, HeldLease] = {}  # leases of queued tasks submitted here
        self._seen: dict[str, tuple[int, float]] = {}  # task -> revision of another holder's lease, first seen

    async def take(self, vm: str, operation: str, task_id: str) -> None:
        """Lease `vm` for task `task_id`, or raise Conflict naming the operation and task that hold it."""
        self._held[task_id] = await self._locks.take(vm, operation, task_id)

    async def claim(self, vm: str, operation: str, task_id: str) -> HeldLease:
        """The task's lease for the worker that runs it, taken over in one conditional write (or taken anew
        when it lapsed); Conflict when another operation holds the VM or the task runs in a live process."""
        submitted = self._held.pop(task_id, None)
        if submitted is not None:
            await submitted.stop()
        entry = await self._entry(vm)
        lease = _decode(entry.value) if entry is not None and entry.value else None
        if entry is None or lease is None or entry.revision is None:
            # Lapsed: its submitter stopped (or died) while the task was queued.
            return await self._locks.take(vm, operation, task_id, holder=self.instance)
        if lease.task_id != task_id:
            task = f" (task {lease.task_id})" if lease.task_id else ""
            raise Conflict(f"VM {vm} is busy with {lease.operation}{task}; try again when it ends", "vm")
        # This process runs a task once at a time (the workers see to it): a lease naming it is a leftover.
        elsewhere = lease.holder is not None and lease.holder != self.instance
        if elsewhere and not (holder_is_dead(lease.holder or "") or self._stale(task_id, entry.revision)):
            raise Conflict(f"task {task_id} runs in snapshotter process {lease.holder}", "vm")
        self._seen.pop(task_id, None)
        mine = msgspec.structs.replace(lease, holder=self.instance)
        try:
            revision = await self._kv.update(self._key(vm), msgspec.json.encode(mine), last=entry.revision)
        except KeyWrongLastSequenceError:
            raise Conflict(f"the lease of task {task_id} on VM {vm} changed meanwhile", "vm") from None
        if elsewhere:
            log.warning("task %s: took over the lease of snapshotter process %s (gone, or silent for %g s)",
                        task_id, lease.holder, self._stale_after)
        return HeldLease(self._locks, vm, revision)

    def _stale(self, task_id: str, revision: int) -> bool:
        """Whether this process has seen the lease at `revision` for stale_after seconds (no renewals)."""
        now = time.monotonic()
        seen = self._seen.get(task_id)
        if seen is None or seen[0] != revision:
            self._seen[task_id] = (revision, now)
            return False
        return now - seen[1] >= self._stale_after

    async def release_for(self, vm: str, task_id: str) -> None:
        """Give back the lease of task `task_id` on `vm` (it ended, or was cancelled) when it is this
        process's or nobody runs the task; a live holder elsewhere releases its own."""
        self._seen.pop(task_id, None)
        lease = self._held.pop(task_id, None)
        if lease is not None:
            await lease.release()
            return
        entry = await self._entry(vm)
        holder = _decode(entry.value) if entry is not None and entry.value else None
        if entry is None or holder is None or entry.revision is None or holder.task_id != task_id:
            return
        if holder.holder in (None, self.instance):
            await self._locks.release(vm, entry.revision)

    async def release_all(self) -> None:
        """Give back the leases of tasks submitted here that no worker of this process took (at shutdown):
        a worker that runs such a task later takes the lease anew, waiting while another operation holds it."""
        for task_id in list(self._held):
            lease = self._held.pop(task_id)
            try:
                await lease.release()
            except Exception as exc:
                log.warning("lease of task %s not released: %s", task_id, exc)

    def _key(self, vm: str) -> str:
        return f"{self._node}.{vm}"

    async def _entry(self, vm: str) -> KeyValue.Entry | None:
        try:
            return await self._kv.get(self._key(vm))
        except (KeyNotFoundError, KeyDeletedError):
            return None


def _decode(value: bytes) -> Lease | None:
    try:
        return msgspec.json.decode(value, type=Lease)
    except msgspec.DecodeError:
        return None
