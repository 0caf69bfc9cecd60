"""A VM's recorded state: each change saved in `edgevm_vms` and published as an event."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import msgspec

from edgevm.lifecycle.records import VmRecords
from edgevm.shared.clock import now
from edgevm.shared.events import VmUpdated
from edgevm.shared.objects import Vm, VmState
from edgevm.shared.publisher import EventPublisher

TRANSIENT_AFTER = 0.2  # a step shorter than this never records its `starting` / `stopping` state


class VmStates:
    """Writes VM states: the record first, then the event (a subscriber never sees a state the bucket lacks)."""

    def __init__(self, records: VmRecords, publisher: EventPublisher) -> None:
        self.records = records
        self.publisher = publisher

    async def set(self, vm: Vm, state: VmState, error: str | None = None, event: type | None = None) -> Vm:
        """Record `state` (with `error` when it is `error`) and publish `event` (vm.updated by default)."""
        status = msgspec.structs.replace(vm.status, state=state, updated_at=now(),
                                         last_error=error if state == "error" else vm.status.last_error)
        updated = Vm(vm.spec, status)
        await self.records.save(updated)
        await self.publisher.publish((event or VmUpdated)(at=now(), vm=updated))
        return updated

    @contextlib.asynccontextmanager
    async def transient(self, name: str, state: VmState) -> AsyncIterator[None]:
        """Record `state` (starting, stopping) for the block, but only once it lasts TRANSIENT_AFTER.

        A test-driver start takes a millisecond; a write of `starting` then `running` a millisecond apart
        tells no one anything and costs two bucket writes and two events.
        """
        writing = False

        async def later() -> None:
            nonlocal writing
            await asyncio.sleep(TRANSIENT_AFTER)
            writing = True
            await self.set(self.records.get(name), state)

        job = asyncio.create_task(later())
        try:
            yield
        finally:
            if not writing:
                job.cancel()
            await asyncio.gather(job, return_exceptions=True)  # a write under way ends before the next
