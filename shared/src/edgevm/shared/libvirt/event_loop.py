"""libvirt's event loop on asyncio (libvirtaio), made safe for libvirt calls that run in worker threads."""

import asyncio
from collections.abc import Callable
from typing import Any

import libvirt
import libvirtaio


# libvirt changes watches and timers from whichever thread calls it: a worker thread opening a connection,
# or defining a domain on the test driver, which arms its event timer there. libvirtaio touches the loop
# directly in these callbacks, which asyncio does not allow off the loop's thread (debug mode raises
# "Non-thread-safe operation"; otherwise the change waits until the loop wakes for something else).
# Here each change is queued with call_soon_threadsafe, in call order; only the id is made at once.
class _ThreadSafeAsyncIOImpl(libvirtaio.virEventAsyncIOImpl):  # type: ignore[misc]  # libvirtaio is untyped
    """libvirtaio's event implementation with every watch and timer change run on the loop's thread."""

    def _soon(self, function: Callable[..., Any], *args: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(function, *args)
        except RuntimeError:
            pass  # the loop is closed: nothing dispatches libvirt's events any more

    def _add_handle(self, fd: int, event: int, cb: Any, opaque: Any) -> int:
        callback = libvirtaio.FDCallback(self, cb, opaque, descriptor=None, event=event)
        self._soon(self._add_handle_now, fd, callback)
        return int(callback.iden)

    def _add_handle_now(self, fd: int, callback: libvirtaio.FDCallback) -> None:
        callback.descriptor = self.descriptors[fd]
        self.callbacks[callback.iden] = callback
        callback.descriptor.add_handle(callback)
        self._pending_inc()

    def _update_handle(self, watch: int, event: int) -> None:
        self._soon(super()._update_handle, watch, event)

    def _remove_handle(self, watch: int) -> int:
        self._soon(super()._remove_handle, watch)
        return 0

    def _add_timeout(self, timeout: int, cb: Any, opaque: Any) -> int:
        callback = libvirtaio.TimeoutCallback(self, cb, opaque)
        self._soon(self._add_timeout_now, callback, timeout)
        return int(callback.iden)

    def _add_timeout_now(self, callback: libvirtaio.TimeoutCallback, timeout: int) -> None:
        self.callbacks[callback.iden] = callback
        callback.update(timeout=timeout)
        self._pending_inc()

    def _update_timeout(self, timer: int, timeout: int) -> None:
        self._soon(super()._update_timeout, timer, timeout)

    def _remove_timeout(self, timer: int) -> int:
        self._soon(super()._remove_timeout, timer)
        return 0


_registered: _ThreadSafeAsyncIOImpl | None = None


def register_event_loop() -> None:
    """Dispatch libvirt's events on the running loop: once per process, before the first connection."""
    # libvirt keeps the first event implementation it is given, so a second loop is refused here.
    global _registered
    loop = asyncio.get_running_loop()
    if _registered is None:
        quiet_errors()
        _registered = _ThreadSafeAsyncIOImpl(loop=loop).register()
    elif _registered.loop is not loop:
        raise RuntimeError(
            "libvirt's events are bound to another asyncio loop: libvirt takes one event loop per process"
        )


def quiet_errors() -> None:
    """Stop libvirt from printing every error to stderr: ours are raised as exceptions."""
    libvirt.registerErrorHandler(lambda _context, _error: None, None)
