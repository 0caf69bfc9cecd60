"""One mutating operation per VM at a time, across services: leases in the `edgevm_locks` bucket.

This module is the only writer of the bucket. A lease names the operation, its task and, once a process
runs the task, that process (`holder`). A lease that names a holder belongs to a running task: another
process takes it over (`take_over`) only when the holder is known dead (a process of this host's boot and
PID namespace that no longer exists) or after seeing the lease unrenewed for `stale_after` seconds, so a
task delivered again while it still runs elsewhere is not run twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
from nats.js import JetStreamContext
from nats.js.api import Header
from nats.js.errors import APIError, KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KV_DEL, KV_OP, KeyValue

from edgevm.shared.clock import now
from edgevm.shared.errors import Conflict, Unavailable

log = logging.getLogger(__name__)
# The bucket's TTL is 30 s (bus.LOCKS): a holder renews its lease well within it, so a lease whose holder
# died expires by itself and the VM is free again.
RENEW_EVERY = 8.0
STALE_AFTER = 2 * RENEW_EVERY


class Lease(msgspec.Struct):
    """Who holds a VM: the operation and the task that runs it."""

    operation: str
    task_id: str | None
    service: str
    since: str
    # The process instance that runs the task, when the service tells them apart (None: not said).
    holder: str | None = None


class VmLocks:
    """Leases on VMs of one node, held while an operation runs."""

    def __init__(self, kv: KeyValue, node: str, service: str, js: JetStreamContext | None = None, *,
                 stale_after: float = STALE_AFTER) -> None:
        self._kv = kv
        self._node = node
        self._service = service
        self._stale_after = stale_after
        self._seen: dict[str, tuple[int, float]] = {}  # VM -> revision of another holder's lease, first seen
        # With `js`, a release writes the delete marker itself and remembers its revision, so the next
        # acquire of that VM is one conditional write (KeyValue.create on a deleted key takes three).
        self._js = js
        self._bucket: str = kv._name  # nats-py keeps the bucket name only there
        self._tombstones: dict[str, int] = {}

    def _key(self, vm: str) -> str:
        return f"{self._node}.{vm}"

    async def acquire(self, vm: str, operation: str, task_id: str | None = None, *, holder: str | None = None,
                      field: str = "name") -> int:
        """Take the lease on `vm`, or raise Conflict naming the operation (and task) that holds it; the
        Conflict names `field`, the request field that named the VM."""
        lease = Lease(operation=operation, task_id=task_id, service=self._service, since=now(), holder=holder)
        tombstone = self._tombstones.pop(vm, None)
        if tombstone is not None:
            with contextlib.suppress(KeyWrongLastSequenceError):  # someone else took it since: the usual path
                return await self._kv.update(self._key(vm), msgspec.json.encode(lease), last=tombstone)
        try:
            return await self._kv.create(self._key(vm), msgspec.json.encode(lease))
        except KeyWrongLastSequenceError:
            current = await self.holder(vm)
            if current is None:  # expired between our create and our read: try once more
                return await self._kv.create(self._key(vm), msgspec.json.encode(lease))
            raise _busy(vm, current, field) from None

    async def holder(self, vm: str) -> Lease | None:
        """Return the lease on `vm`, or None when it is free."""
        try:
            entry = await self._kv.get(self._key(vm))
        except (KeyNotFoundError, KeyDeletedError):
            return None
        except Exception as exc:  # not "free": the bucket cannot say
            raise Unavailable(f"the lease of VM {vm} cannot be read: {exc}") from None
        if not entry.value:
            return None
        return msgspec.json.decode(entry.value, type=Lease)

    async def clear(self, vm: str, task_id: str) -> bool:
        """Delete the lease on `vm` if a task `task_id` holds it (one that will never end: its service
        restarted); return whether it did."""
        try:
            entry = await self._kv.get(self._key(vm))
        except (KeyNotFoundError, KeyDeletedError):
            return False
        if not entry.value or msgspec.json.decode(entry.value, type=Lease).task_id != task_id:
            return False
        assert entry.revision is not None
        await self.release(vm, entry.revision)
        return True

    async def release(self, vm: str, revision: int) -> None:
        """Give the lease back (only if it is still ours)."""
        if self._js is None:
            try:
                await self._kv.delete(self._key(vm), last=revision)
            except KeyWrongLastSequenceError:
                log.warning("lease on %s changed hands before release", vm)
            return
        headers = {KV_OP: KV_DEL, Header.EXPECTED_LAST_SUBJECT_SEQUENCE: str(revision)}
        try:
            ack = await self._js.publish(f"$KV.{self._bucket}.{self._key(vm)}", headers=headers)
        except APIError as exc:
            if exc.err_code in (10071, 10164):  # wrong last sequence
                log.warning("lease on %s changed hands before release", vm)
                return
            raise
        self._tombstones[vm] = ack.seq

    async def renew(self, vm: str, revision: int) -> int:
        """Keep the lease alive; return its new revision."""
        entry = await self._kv.get(self._key(vm))
        assert entry.value is not None
        return await self._kv.update(self._key(vm), entry.value, last=revision)

    async def take(self, vm: str, operation: str, task_id: str | None = None, *,
                   holder: str | None = None, field: str = "name") -> HeldLease:
        """Take the lease on `vm` and keep it renewed until the returned handle is released."""
        return HeldLease(self, vm, await self.acquire(vm, operation, task_id, holder=holder, field=field))

    async def take_over(self, vm: str, operation: str, task_id: str, holder: str, *,
                        field: str = "vm") -> HeldLease:
        """The lease of task `task_id` for `holder`, the process that runs it: taken over in one conditional
        write (or taken anew when it lapsed). Conflict when another operation holds the VM, or when the
        task runs in another process that is alive and renews its lease."""
        entry = await self._entry(vm)
        lease = _decode(entry.value) if entry is not None and entry.value else None
        if entry is None or lease is None or entry.revision is None:
            return await self.take(vm, operation, task_id, holder=holder, field=field)  # lapsed meanwhile
        if lease.task_id != task_id:
            raise _busy(vm, lease, field)
        elsewhere = lease.holder is not None and lease.holder != holder
        if elsewhere and not (holder_is_dead(lease.holder or "") or self._stale(vm, entry.revision)):
            raise Conflict(f"task {task_id} runs in {lease.service} process {lease.holder}", field)
        self._seen.pop(vm, None)
        mine = msgspec.structs.replace(lease, holder=holder)
        try:
            revision = await self._kv.update(self._key(vm), msgspec.json.encode(mine), last=entry.revision)
        except KeyWrongLastSequenceError:
            raise Conflict(f"the lease of task {task_id} on VM {vm} changed meanwhile", field) from None
        if elsewhere:
            log.warning("task %s: took over the lease of process %s (gone, or silent for %g s)",
                        task_id, lease.holder, self._stale_after)
        return HeldLease(self, vm, revision)

    async def release_task(self, vm: str, task_id: str, holder: str | None) -> None:
        """Give back the lease of task `task_id` on `vm` (it ended, or was cancelled) when `holder` holds it
        or no process runs the task yet; a live holder elsewhere releases its own."""
        self._seen.pop(vm, None)
        entry = await self._entry(vm)
        lease = _decode(entry.value) if entry is not None and entry.value else None
        if entry is None or lease is None or entry.revision is None or lease.task_id != task_id:
            return
        if lease.holder in (None, holder):
            await self.release(vm, entry.revision)

    def _stale(self, vm: str, revision: int) -> bool:
        """Whether this process has seen the lease at `revision` for stale_after seconds (no renewals)."""
        now_ = time.monotonic()
        seen = self._seen.get(vm)
        if seen is None or seen[0] != revision:
            self._seen[vm] = (revision, now_)
            return False
        return now_ - seen[1] >= self._stale_after

    async def _entry(self, vm: str) -> KeyValue.Entry | None:
        try:
            return await self._kv.get(self._key(vm))
        except (KeyNotFoundError, KeyDeletedError):
            return None

    @contextlib.asynccontextmanager
    async def hold(self, vm: str, operation: str, task_id: str | None = None) -> AsyncIterator[None]:
        """Hold the lease on `vm` for the duration of the block."""
        lease = await self.take(vm, operation, task_id)
        try:
            yield
        finally:
            await lease.release()


class HeldLease:
    """A lease this process holds: renewed in the background until `release`."""

    def __init__(self, locks: VmLocks, vm: str, revision: int) -> None:
        self._locks = locks
        self._vm = vm
        self._revision = revision
        self.lost = False  # the lease changed hands or expired: this handle no longer holds the VM
        self._keeper = asyncio.create_task(self._keep())

    async def _keep(self) -> None:
        while True:
            await asyncio.sleep(RENEW_EVERY)
            try:
                self._revision = await self._locks.renew(self._vm, self._revision)
            except (KeyWrongLastSequenceError, KeyNotFoundError, KeyDeletedError):
                # Someone else wrote the lease (a takeover) or it expired: renewing can never succeed again.
                log.warning("lease on %s is no longer ours; not renewed any more", self._vm)
                self.lost = True
                return
            except Exception as exc:
                log.warning("lease on %s not renewed: %s", self._vm, exc)

    async def stop(self) -> None:
        """Stop renewing without giving the lease back: it expires, or another holder takes it over."""
        self._keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._keeper

    async def release(self) -> None:
        """Stop renewing and give the lease back."""
        await self.stop()
        if not self.lost:
            await self._locks.release(self._vm, self._revision)


def _busy(vm: str, lease: Lease, field: str) -> Conflict:
    task = f" (task {lease.task_id})" if lease.task_id else ""
    return Conflict(f"VM {vm} is busy with {lease.operation}{task}; try again when it ends", field)


def _decode(value: bytes) -> Lease | None:
    try:
        return msgspec.json.decode(value, type=Lease)
    except msgspec.DecodeError:
        return None


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
