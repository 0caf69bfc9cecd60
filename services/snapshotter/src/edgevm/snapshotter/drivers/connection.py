"""One libvirt connection: blocking calls in worker threads, each with a deadline, reopened when lost.

The snapshotter registers no libvirt event loop: it needs no domain events (it polls the few states it
waits for), and libvirt takes one event implementation per process, which a lifecycle service running in
the same process (as in the tests) may already have registered.
"""

import asyncio
import functools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import libvirt

from .errors import HypervisorTimeout, HypervisorUnavailable
from .libvirt_errors import translate

log = logging.getLogger(__name__)
T = TypeVar("T")


class Hypervisor:
    """A libvirt connection whose calls never block the event loop and never outlive their deadline."""

    def __init__(self, uri: str, *, timeout: float = 30.0, workers: int = 4) -> None:
        self.uri = uri
        self.timeout = timeout
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="snapshotter-libvirt")
        self._conn: libvirt.virConnect | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    async def open(self) -> None:
        """Connect now; raises HypervisorUnavailable when the hypervisor cannot be reached."""
        # Without a handler libvirt also prints every error to stderr; ours are raised as exceptions.
        libvirt.registerErrorHandler(lambda _context, _error: None, None)
        await self._connected()

    async def close(self) -> None:
        """Close the connection; the object cannot be used afterwards."""
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await self._in_thread(functools.partial(_close_quietly, conn), 10)
            except HypervisorTimeout:
                log.warning("closing the libvirt connection to %s timed out", self.uri)
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def call(self, function: Callable[[libvirt.virConnect], T], *, timeout: float | None = None) -> T:
        """function(conn) run in a worker thread within the deadline, with libvirt's errors made ours."""
        conn = await self._connected()
        try:
            return await self._in_thread(functools.partial(_translated, conn, function), timeout)
        except HypervisorUnavailable:
            if self._conn is conn:
                self._conn = None  # the next call opens a new connection
                self._executor.submit(_close_quietly, conn)
            raise

    async def _connected(self) -> libvirt.virConnect:
        if self._conn is not None:
            return self._conn
        if self._closed:
            raise HypervisorUnavailable(f"the connection to {self.uri} is closed")
        async with self._lock:
            if self._conn is None:
                self._conn = await self._in_thread(self._open_in_thread, self.timeout)
            return self._conn

    def _open_in_thread(self) -> libvirt.virConnect:
        try:
            return libvirt.open(self.uri)
        except libvirt.libvirtError as error:
            message = error.get_error_message() or str(error)
            raise HypervisorUnavailable(f"cannot connect to {self.uri}: {message}") from None

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


def _close_quietly(conn: libvirt.virConnect) -> None:
    try:
        conn.close()
    except libvirt.libvirtError:
        pass
