"""One mutating operation per VM at a time, across services: leases in the `edgevm_locks` bucket."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

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

    def __init__(self, kv: KeyValue, node: str, service: str, js: JetStreamContext | None = None) -> None:
        self._kv = kv
        self._node = node
        self._service = service
        # With `js`, a release writes the delete marker itself and remembers its revision, so the next
        # acquire of that VM is one conditional write (KeyValue.create on a deleted key takes three).
        self._js = js
        self._bucket: str = kv._name  # nats-py keeps the bucket name only there
        self._tombstones: dict[str, int] = {}

    def _key(self, vm: str) -> str:
        return f"{self._node}.{vm}"

    async def acquire(self, vm: str, operation: str, task_id: str | None = None, *, holder: str | None = None) -> int:
        """Take the lease on `vm`, or raise Conflict naming the operation (and task) that holds it."""
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
            task = f" (task {current.task_id})" if current.task_id else ""
            raise Conflict(f"VM {vm} is busy with {current.operation}{task}; try again when it ends", "name") from None

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
                   holder: str | None = None) -> HeldLease:
        """Take the lease on `vm` and keep it renewed until the returned handle is released."""
        return HeldLease(self, vm, await self.acquire(vm, operation, task_id, holder=holder))

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
