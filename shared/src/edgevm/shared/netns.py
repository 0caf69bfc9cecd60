"""Entering a named network namespace from a thread: the setns(2) call netplumb and flowwatch both make.

A namespace name is a file under /run/netns; None always means the namespace the process runs in. Only
the calling thread enters: sockets and /proc/sys/net files opened inside stay bound to the namespace after
the thread has come back. Standard library only (ctypes), so importing it costs a service nothing.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

__all__ = ["NETNS_DIR", "NamespaceNotFound", "call_in_netns", "entered", "namespace_id", "write_sysctl"]

T = TypeVar("T")

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class NamespaceNotFound(LookupError):
    """No network namespace of that name exists."""


def _setns(fd: int, name: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns({name}): {os.strerror(err)}")


@contextmanager
def entered(name: str | None) -> Iterator[None]:
    """Runs the calling thread (only it) inside the named namespace, and brings it back after.

    Raises NamespaceNotFound when there is no such namespace, OSError when it cannot be entered.
    """
    if name is None:
        yield
        return
    try:
        target = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NamespaceNotFound(name) from None
    try:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target, name)
            try:
                yield
            finally:
                _setns(home, "back")
        finally:
            os.close(home)
    finally:
        os.close(target)


def call_in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """fn() run in network namespace netns on a short-lived thread (None: the caller's own, on its thread).

    The thread ends with the call, so nothing else of the process ever runs in the namespace.
    """
    if netns is None:
        return fn()
    results: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with entered(netns):
                results.append(fn())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, name=f"netns-{netns}")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return results[0]


def namespace_id(netns: str | None) -> tuple[int, int] | None:
    """What tells a named namespace from one made later under the same name: its file's (st_dev, st_ino);
    None if there is none of that name. The node's own namespace (None) is (0, 0): it never goes."""
    if netns is None:
        return (0, 0)
    try:
        st = os.stat(os.path.join(NETNS_DIR, netns))
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


def write_sysctl(netns: str | None, key: str, value: str) -> None:
    """Write a per-namespace sysctl such as net.netfilter.nf_conntrack_acct inside netns."""
    path = "/proc/sys/" + key.replace(".", "/")

    def write() -> None:
        with open(path, "w") as f:
            f.write(value)

    call_in_netns(netns, write)
