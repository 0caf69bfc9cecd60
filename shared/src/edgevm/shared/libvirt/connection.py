"""One libvirt connection: blocking calls in worker threads, each with a deadline, reopened when lost.

With `events=True` the connection dispatches libvirt's events on the running asyncio loop (libvirtaio),
which domain event subscribers need. libvirt takes one event implementation per process, so a service that
needs no events (the snapshotter polls the few states it waits for) leaves it to one that does.
"""

import asyncio
import functools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Self, TypeVar

import libvirt

from .errors import HypervisorError, HypervisorTimeout, HypervisorUnavailable, translate
from .event_loop import quiet_errors, register_event_loop

log = logging.getLogger(__name__)

T = TypeVar("T")
OpenHook = Callable[[libvirt.virConnect], None]


class HypervisorConnection:
    """A libvirt connection whose calls never block the event loop and never outlive their deadline."""

    def __init__(self, uri: str, *, events: bool = False, timeout: float = 30.0, workers: int = 4,
                 reconnect_delay: float = 0.5) -> None:
        self.uri = uri
        self._events = events
        self.timeout = timeout
        self._reconnect_delay = reconnect_delay
        # libvirt connections are thread-safe: with a small pool a slow call (starting a domain) does not
        # hold up quick ones (reading a state), nor does a hung call that missed its deadline hold up all.
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="libvirt")
        self._conn: libvirt.virConnect | None = None
        self._lock = asyncio.Lock()
        self._hooks: list[OpenHook] = []
        self._reconnect: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def open(self) -> None:
        """Connect now; raises HypervisorUnavailable when the hypervisor cannot be reached."""
        if self._events:
            register_event_loop()
        else:
            quiet_errors()
        self._loop = asyncio.get_running_loop()
        await self._connected()

    async def close(self) -> None:
        """Stop reconnecting and close the connection; the object cannot be used afterwards."""
        self._closed = True
        if self._reconnect is not None:
            self._reconnect.cancel()
            await asyncio.gather(self._reconnect, return_exceptions=True)
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await self._in_thread(functools.partial(_close_quietly, conn), self.timeout)
            except HypervisorTimeout:
                log.warning("closing the libvirt connection to %s timed out", self.uri)
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def call(self, function: Callable[[libvirt.virConnect], T], *, timeout: float | None = None) -> T:
        """function(conn) run in a worker thread within the deadline, with libvirt's errors made ours."""
        conn = await self._connected()
        try:
            return await self._in_thread(functools.partial(_translated, conn, function), timeout)
        except HypervisorUnavailable:
            self._lost(conn)
            raise

    def call_here(self, function: Callable[[libvirt.virConnect], T]) -> T:
        """function(conn) on the calling thread, which must not be the event loop's (a scrape's thread, say).

        Unlike `call` it has no deadline (a thread cannot be stopped in libvirt: whoever waits for this thread
        has one) and does not wait for a lost connection to be reopened: it raises HypervisorUnavailable at
        once, and the event loop reopens the connection as it does after a failed `call`.
        """
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None  # no loop runs on this thread: as it should be
        if running is not None and running is self._loop:
            raise RuntimeError("call_here on the event loop's thread would block the loop: use call")
        conn = self._conn
        if conn is None or self._closed:
            raise HypervisorUnavailable(f"not connected to {self.uri}")
        try:
            return _translated(conn, function)
        except HypervisorUnavailable:
            self._on_close(conn, libvirt.VIR_CONNECT_CLOSE_REASON_ERROR, None)
            raise

    async def add_open_hook(self, hook: OpenHook) -> None:
        """Run hook(conn) in a worker thread now, if connected, and again on every reopened connection."""
        async with self._lock:
            self._hooks.append(hook)
            if self._conn is not None:
                try:
                    await self._in_thread(functools.partial(_translated, self._conn, hook), None)
                except BaseException:
                    self._hooks.remove(hook)
                    raise

    def remove_open_hook(self, hook: OpenHook) -> None:
        """Stop running hook on reopened connections."""
        if hook in self._hooks:
            self._hooks.remove(hook)

    async def _connected(self) -> libvirt.virConnect:
        conn = self._conn
        if conn is not None:
            return conn
        if self._closed:
            raise HypervisorUnavailable(f"the connection to {self.uri} is closed")
        async with self._lock:
            if self._conn is None:
                self._conn = await self._in_thread(self._open_in_thread, self.timeout)
            return self._conn

    def _open_in_thread(self) -> libvirt.virConnect:
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError as error:
            message = error.get_error_message() or str(error)
            raise HypervisorUnavailable(f"cannot connect to {self.uri}: {message}") from None
        try:
            conn.registerCloseCallback(self._on_close, None)
            for hook in self._hooks:
                _translated(conn, hook)
        except BaseException:
            _close_quietly(conn)
            raise
        return conn

    def _on_close(self, conn: libvirt.virConnect, reason: int, _opaque: object) -> None:
        # Called by libvirt from whichever thread noticed the loss.
        if reason != libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._lost, conn)
            except RuntimeError:
                pass  # the loop is closed: so is everything that used this connection

    def _lost(self, conn: libvirt.virConnect) -> None:
        if self._conn is not conn:
            return  # already replaced
        log.warning("lost the libvirt connection to %s; reconnecting", self.uri)
        self._conn = None
        self._executor.submit(_close_quietly, conn)
        # Reopen in the background, not at the next call: event subscribers need the connection too.
        if not self._closed and (self._reconnect is None or self._reconnect.done()):
            self._reconnect = asyncio.get_running_loop().create_task(
                self._reconnect_until_open(), name=f"libvirt reconnect {self.uri}"
            )

    async def _reconnect_until_open(self) -> None:
        delay = self._reconnect_delay
        while not self._closed:
            try:
                await self._connected()
                log.info("reconnected to %s", self.uri)
                return
            except HypervisorError as error:
                log.warning("%s; retrying in %g s", error, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def _in_thread(self, function: Callable[[], T], timeout: float | None) -> T:
        deadline = self.timeout if timeout is None else timeout
        scope = asyncio.timeout(deadline)
        try:
            async with scope:
                return await asyncio.get_running_loop().run_in_executor(self._executor, function)
        except TimeoutError:
            if not scope.expired():
                raise
            # The worker thread keeps waiting on libvirt: threads cannot be cancelled.
            raise HypervisorTimeout(f"libvirt ({self.uri}) did not answer within {deadline:g} s") from None


def _translated(conn: libvirt.virConnect, function: Callable[[libvirt.virConnect], T]) -> T:
    try:
        return function(conn)
    except libvirt.libvirtError as error:
        raise translate(error, connection_alive=_alive(conn)) from None


def _alive(conn: libvirt.virConnect) -> bool:
    try:
        return bool(conn.isAlive())
    except libvirt.libvirtError:
        return False


def _close_quietly(conn: Any) -> None:
    # The close callback holds a reference on the connection: without unregistering, close() frees nothing.
    for close in (conn.unregisterCloseCallback, conn.close):
        try:
            close()
        except libvirt.libvirtError:
            pass
