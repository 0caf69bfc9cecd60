"""Running a function inside a named network namespace, on a short-lived thread."""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from typing import TypeVar

__all__ = ["NamespaceNotFound", "call_in_netns", "namespace_id", "write_sysctl"]

T = TypeVar("T")

NETNS_RUN_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


class NamespaceNotFound(LookupError):
    """No network namespace of that name exists."""


def namespace_id(netns: str | None) -> tuple[int, int] | None:
    """What tells a named namespace from one made later under the same name: its file's (st_dev, st_ino);
    None if there is none of that name. The node's own namespace (None) is (0, 0): it never goes."""
    if netns is None:
        return (0, 0)
    try:
        st = os.stat(os.path.join(NETNS_RUN_DIR, netns))
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


def call_in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """fn() run in network namespace netns (None: the caller's own, on the caller's thread)."""
    if netns is None:
        return fn()
    try:
        nsfd = os.open(os.path.join(NETNS_RUN_DIR, netns), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NamespaceNotFound(netns) from None
    results: list[T] = []
    errors: list[BaseException] = []

    # The network namespace belongs to the thread, so entering it on a thread that then ends leaves
    # the rest of the process alone; sockets and /proc/sys/net files opened there keep their namespace.
    def run() -> None:
        try:
            if _libc.setns(nsfd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns({netns}): {os.strerror(err)}")
            results.append(fn())
        except BaseException as exc:
            errors.append(exc)

    try:
        thread = threading.Thread(target=run, name=f"netns-{netns}")
        thread.start()
        thread.join()
    finally:
        os.close(nsfd)
    if errors:
        raise errors[0]
    return results[0]


def write_sysctl(netns: str | None, key: str, value: str) -> None:
    """Write a per-namespace sysctl such as net.netfilter.nf_conntrack_acct inside netns."""
    path = "/proc/sys/" + key.replace(".", "/")

    def write() -> None:
        with open(path, "w") as f:
            f.write(value)

    call_in_netns(netns, write)
