"""Conntrack events of a network namespace: batches read off a multicast ctnetlink socket, and the overruns
that say some were lost."""

from __future__ import annotations

import asyncio
import errno
import socket
from typing import NamedTuple

from edgevm.flowwatch.drivers.ctnetlink import CtEntry
from edgevm.flowwatch.drivers.ctparse import parse_into
from edgevm.flowwatch.drivers.ctsource import EVENT_GROUPS, EVENT_RCVBUF, RECV_SIZE, open_socket

__all__ = ["CtEventStream", "Overrun", "events"]


class Overrun(NamedTuple):
    """The kernel dropped events because the socket buffer was full: resync with a dump."""

    number: int  # 1 for the stream's first overrun, and so on


class CtEventStream:
    """Batches of conntrack events from one network namespace, as an async iterator of lists.

    An Overrun item stands where events were lost, and replaces every event still queued then (the kernel
    reports the loss before them), so no event older than the loss follows it: dump to resync. Open the
    stream (async with) before the start-up dump, so that nothing falls between the dump and the first batch.
    """

    def __init__(self, netns: str | None, rcvbuf: int = EVENT_RCVBUF, max_batch: int = 1024) -> None:
        self.netns = netns
        self.rcvbuf = rcvbuf
        self.max_batch = max_batch
        self.overruns = 0
        self._sock: socket.socket | None = None
        self._closed = False
        self._overrun_pending = False
        self._wakeup: asyncio.Future[None] | None = None

    async def open(self) -> None:
        """Subscribe to the namespace's NEW, UPDATE and DESTROY events."""
        if self._sock is None and not self._closed:
            self._sock = await self._subscribe()

    async def _subscribe(self) -> socket.socket | None:
        opening = asyncio.ensure_future(asyncio.to_thread(open_socket, self.netns, EVENT_GROUPS, self.rcvbuf))
        try:
            sock = await asyncio.shield(opening)
        except asyncio.CancelledError:  # the socket the thread makes anyway is closed when it comes
            opening.add_done_callback(_close_when_made)
            raise
        sock.setblocking(False)
        if self._closed:
            sock.close()
            return None
        return sock

    async def _renew(self) -> None:
        """After an overrun: a new subscription first, then the old socket closed with all it still holds
        (older than the loss), which is cheaper than reading it out."""
        fresh = await self._subscribe()
        old, self._sock = self._sock, fresh
        if old is not None:
            old.close()

    def close(self) -> None:
        """Unsubscribe; the stream ends, also for a reader waiting on it."""
        self._closed = True
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if self._wakeup is not None:
            self._wakeup.get_loop().remove_reader(sock.fileno())
            self._wake()
        sock.close()

    async def __aenter__(self) -> CtEventStream:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def __aiter__(self) -> CtEventStream:
        return self

    async def __anext__(self) -> list[CtEntry] | Overrun:
        await self.open()
        while True:
            if self._overrun_pending:
                await self._renew()
                self._overrun_pending = False
                return Overrun(self.overruns)
            sock = self._sock
            if sock is None:
                raise StopAsyncIteration
            await self._readable(sock)
            batch = self._drain()
            if batch:
                return batch

    async def _readable(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        fd = sock.fileno()
        self._wakeup = loop.create_future()
        loop.add_reader(fd, self._wake)
        try:
            await self._wakeup
        finally:
            self._wakeup = None
            if self._sock is sock:
                loop.remove_reader(fd)

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def _drain(self) -> list[CtEntry]:
        """The events queued on the socket, up to max_batch datagrams (one event each)."""
        batch: list[CtEntry] = []
        if self._sock is None:
            return batch
        recv = self._sock.recv
        for _ in range(self.max_batch):
            try:
                data = recv(RECV_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self.overruns += 1
                self._overrun_pending = True
                return []  # what came before the loss is of no use: the resync's dump replaces it
            parse_into(data, batch)
        return batch

    def drain_now(self) -> list[CtEntry]:
        """The events queued on the socket now, read without waiting (none once events were lost: the next
        item of the stream is then the Overrun). Not while a read of the stream is pending."""
        if self._overrun_pending:
            return []
        return self._drain()

    @property
    def lost(self) -> bool:
        """True when events were lost and the stream's next item is the Overrun."""
        return self._overrun_pending


def _close_when_made(opening: asyncio.Future[socket.socket]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        opening.result().close()


def events(netns: str | None, rcvbuf: int = EVENT_RCVBUF, max_batch: int = 1024) -> CtEventStream:
    """A stream of conntrack event batches from netns; use it as `async with events(ns) as stream`."""
    return CtEventStream(netns, rcvbuf, max_batch)
