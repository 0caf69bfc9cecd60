"""Lifecycle events of edgevm's domains, as an async iterator of plain values that survives reconnects."""

import asyncio
from dataclasses import dataclass
from typing import Self

import libvirt

from .connection import HypervisorConnection
from .errors import HypervisorError
from .naming import vm_name
from .states import EventKind, event_from_libvirt


@dataclass(frozen=True, slots=True)
class DomainEvent:
    """Something that happened to an edgevm domain; vm is None only for RESYNC, which concerns them all."""

    vm: str | None
    kind: EventKind
    detail: str = ""


RESYNC = DomainEvent(vm=None, kind=EventKind.RESYNC)


class LifecycleEvents:
    """The lifecycle events of edgevm's domains on a connection, from `async with` to its end."""

    def __init__(self, connection: HypervisorConnection, *, max_pending: int = 10_000) -> None:
        self._connection = connection
        self._queue: asyncio.Queue[DomainEvent] = asyncio.Queue(max_pending)
        self._registration: tuple[libvirt.virConnect, int] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._overflowed = False

    async def __aenter__(self) -> Self:
        self._loop = asyncio.get_running_loop()
        await self._connection.add_open_hook(self._register)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._connection.remove_open_hook(self._register)
        if self._registration is None:
            return
        conn, callback_id = self._registration

        def deregister(current: libvirt.virConnect) -> None:
            if current is conn:  # a replaced connection took its registration with it
                current.domainEventDeregisterAny(callback_id)

        try:
            await self._connection.call(deregister)
        except HypervisorError:
            pass  # the connection is gone, and the registration with it

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> DomainEvent:
        if self._overflowed and self._queue.empty():
            self._overflowed = False
            return RESYNC
        return await self._queue.get()

    def _register(self, conn: libvirt.virConnect) -> None:
        # Runs in a worker thread, on the first connection and on every reopened one, where the events
        # sent while there was no connection are lost: RESYNC says so.
        callback_id = conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None)
        if self._registration is not None:
            self._threadsafe_put(RESYNC)
        self._registration = (conn, callback_id)

    def _on_lifecycle(
        self, _conn: libvirt.virConnect, domain: libvirt.virDomain, event: int, detail: int, _opaque: object
    ) -> None:
        vm = vm_name(domain.name())  # name() reads the handle: no call to libvirtd here
        mapped = event_from_libvirt(event, detail)
        if vm is not None and mapped is not None:
            self._threadsafe_put(DomainEvent(vm=vm, kind=mapped[0], detail=mapped[1]))

    def _threadsafe_put(self, event: DomainEvent) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._put, event)
        except RuntimeError:
            pass  # the loop is closed: nobody is listening any more

    def _put(self, event: DomainEvent) -> None:
        # Once max_pending events wait, drop everything until the consumer has caught up; it then gets RESYNC.
        if self._overflowed or self._queue.full():
            self._overflowed = True
            return
        self._queue.put_nowait(event)
