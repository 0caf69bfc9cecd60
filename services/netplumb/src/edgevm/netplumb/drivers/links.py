"""Idempotent link, address and route operations inside one network namespace, over netlink."""

import errno
import socket
import threading
from collections.abc import Iterable, Iterator, KeysView
from contextlib import contextmanager
from ipaddress import IPv4Address, IPv4Interface
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from edgevm.netplumb.drivers.netns import entered
from edgevm.netplumb.errors import KernelError

IFF_UP = 0x1
IFF_NOARP = 0x80
IFF_PROMISC = 0x100
# Calls that change nothing; any other call drops the links read so far.
_READS = {
    ("link", ("dump",)),
    ("link", ("get",)),
    ("addr", ("dump",)),
    ("route", ("dump",)),
    ("route", ("get",)),
    ("fdb", ("dump",)),
}


class _Netlink:
    """One namespace's netlink socket and what was read through it, until something changes there."""

    def __init__(self, ipr: IPRoute, netns: str | None) -> None:
        self.ipr = ipr
        self.netns = netns
        self.links: dict[str, Any] | None = None  # links read so far
        self.complete = False  # whether `links` is a dump of every link
        self.addresses: dict[int, set[IPv4Interface]] | None = None  # every IPv4 address, by link index

    def forget(self) -> None:
        self.links = None
        self.complete = False
        self.addresses = None


class Links:
    """Ensures links, addresses and routes in one namespace, recording every change it makes."""

    def __init__(self, netlink: _Netlink) -> None:
        self._nl = netlink
        self.netns = netlink.netns
        self.changes: list[str] = []

    def _where(self) -> str:
        return f" in namespace {self.netns}" if self.netns else ""

    def _call(self, what: str, method: str, *args: Any, **kwargs: Any) -> Any:
        if (method, args[:1]) not in _READS:
            self._nl.forget()
        try:
            return getattr(self._nl.ipr, method)(*args, **kwargs)
        except NetlinkError as exc:
            raise KernelError(f"{what}{self._where()} failed: {exc.args[-1]}") from None

    def _lookup(self, name: str) -> Any:
        # Only links found are remembered: a missing one may be made here from another namespace (a veth's
        # peer), so a miss always asks the kernel again.
        links = self._nl.links
        if links is not None and name in links:
            return links[name]
        try:
            msg = self._nl.ipr.link("get", ifname=name)[0]
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return None
            raise KernelError(f"looking up {name}{self._where()} failed: {exc.args[-1]}") from None
        if self._nl.links is None:
            self._nl.links = {}
        self._nl.links[name] = msg
        return msg

    def names(self, fresh: bool = True) -> set[str]:
        """The names of every link in the namespace, read afresh (or as last dumped, when nothing changed since)."""
        if fresh or not self._nl.complete or self._nl.links is None:
            self._nl.links = {m.get("ifname"): m for m in self._call("listing links", "link", "dump")}
            self._nl.complete = True
        return set(self._nl.links)

    def refresh(self) -> None:
        """Forgets what was read so far (for a caller waiting on a link's state to change by itself)."""
        self._nl.forget()

    def record(self, text: str) -> bool:
        """Notes a change made in this namespace (drivers with their own netlink calls use it too)."""
        self.changes.append(f"{self.netns}: {text}" if self.netns else text)
        return True

    def index(self, name: str) -> int | None:
        """The link's index, or None when there is no such link."""
        msg = self._lookup(name)
        return None if msg is None else int(msg["index"])

    def _require(self, name: str) -> int:
        idx = self.index(name)
        if idx is None:
            raise KernelError(f"link {name} does not exist{self._where()}")
        return idx

    def link(self, name: str) -> Any:
        """The link's netlink message, or None."""
        return self._lookup(name)

    def kind(self, name: str) -> str | None:
        """The link kind (bridge, veth, vxlan, tun, ...), or None when absent."""
        msg = self.link(name)
        return None if msg is None else msg.get(("linkinfo", "kind"))

    def ensure_bridge(self, name: str) -> bool:
        """Creates a bridge (STP off, so ports forward at once) unless it exists."""
        if self.kind(name) == "bridge":
            return False
        if self.index(name) is not None:
            raise KernelError(f"{name} exists but is not a bridge")
        self._call(f"creating bridge {name}", "link", "add", ifname=name, kind="bridge")
        return self.record(f"created bridge {name}")

    def ensure_veth(self, name: str, peer: str, peer_netns: str | None) -> bool:
        """Creates a veth pair, its peer inside `peer_netns` (None: here), unless `name` exists."""
        if self.kind(name) == "veth":
            return False
        if self.index(name) is not None:
            raise KernelError(f"{name} exists but is not a veth")
        spec: dict[str, Any] = {"ifname": peer}
        if peer_netns is not None and peer_netns != self.netns:
            spec["net_ns_fd"] = peer_netns
        self._call(f"creating veth {name}", "link", "add", ifname=name, kind="veth", peer=spec)
        return self.record(f"created veth {name} <-> {peer}")

    def ensure_master(self, name: str, master: str | None) -> bool:
        """Enslaves a link to a bridge (None: to no bridge)."""
        idx = self._require(name)
        want = 0 if master is None else self._require(master)
        if (self.link(name).get("master") or 0) == want:
            return False
        self._call(f"setting master of {name}", "link", "set", index=idx, master=want)
        return self.record(f"set master of {name} to {master}")

    def ensure_flag(self, name: str, flag: int, on: bool, words: tuple[str, str]) -> bool:
        """Sets or clears one interface flag; `words` say it (on, off) in the change record."""
        idx = self._require(name)
        flags = self.link(name)["flags"]
        if bool(flags & flag) == on:
            return False
        wanted = (flags | flag) if on else (flags & ~flag)
        self._call(f"setting {name} {words[not on]}", "link", "set", index=idx, flags=wanted, change=flag)
        return self.record(f"set {name} {words[not on]}")

    def ensure_l2_only(self, name: str) -> bool:
        """Keeps a bridge from answering ARP for the namespace's addresses (it only carries frames)."""
        return self.ensure_flag(name, IFF_NOARP, True, ("arp off", "arp on"))

    def ensure_up(self, name: str) -> bool:
        """Brings a link up."""
        return self.ensure_flag(name, IFF_UP, True, ("up", "down"))

    def ensure_promisc(self, name: str, on: bool) -> bool:
        """Turns promiscuous mode on or off."""
        return self.ensure_flag(name, IFF_PROMISC, on, ("promisc on", "promisc off"))

    def ensure_mtu(self, name: str, mtu: int) -> bool:
        """Sets a link's MTU."""
        idx = self._require(name)
        if self.link(name).get("mtu") == mtu:
            return False
        self._call(f"setting mtu of {name}", "link", "set", index=idx, mtu=mtu)
        return self.record(f"set mtu {mtu} on {name}")

    def addresses(self, name: str) -> set[IPv4Interface]:
        """The IPv4 addresses on a link (the namespace's addresses are read once, until something changes)."""
        idx = self._require(name)
        if self._nl.addresses is None:
            found: dict[int, set[IPv4Interface]] = {}
            for m in self._call("listing addresses", "addr", "dump", family=socket.AF_INET):
                found.setdefault(m["index"], set()).add(IPv4Interface(f"{m.get('address')}/{m['prefixlen']}"))
            self._nl.addresses = found
        return set(self._nl.addresses.get(idx, ()))

    def ensure_addresses(self, name: str, wanted: Iterable[IPv4Interface]) -> bool:
        """Makes the link's IPv4 addresses exactly `wanted`."""
        idx = self._require(name)
        want = set(wanted)
        have = self.addresses(name)
        for extra in sorted(have - want):
            self._call(
                f"removing {extra} from {name}",
                "addr",
                "del",
                index=idx,
                address=str(extra.ip),
                prefixlen=extra.network.prefixlen,
            )
            self.record(f"removed {extra} from {name}")
        for missing in sorted(want - have):
            self._call(
                f"adding {missing} to {name}",
                "addr",
                "add",
                index=idx,
                address=str(missing.ip),
                prefixlen=missing.network.prefixlen,
            )
            self.record(f"added {missing} to {name}")
        return have != want

    def ensure_default_route(self, gateway: IPv4Address, dev: str) -> bool:
        """Makes the main table's IPv4 default route go via `gateway` on `dev`."""
        idx = self._require(dev)
        routes = self._call("reading the default route", "route", "dump", family=socket.AF_INET, table=254, dst_len=0)
        current = [(r.get("gateway"), r.get("oif")) for r in routes if r["dst_len"] == 0]
        if current == [(str(gateway), idx)]:
            return False
        self._call("setting the default route", "route", "replace", dst="0.0.0.0/0", gateway=str(gateway), oif=idx)
        return self.record(f"set default route via {gateway} dev {dev}")

    def remove(self, name: str) -> bool:
        """Deletes a link (a veth takes its peer along) unless it is already gone."""
        idx = self.index(name)
        if idx is None:
            return False
        try:
            self._call(f"deleting {name}", "link", "del", index=idx)
        except KernelError:
            if self.index(name) is None:  # gone meanwhile (a veth whose peer's namespace was torn down)
                return False
            raise
        return self.record(f"deleted {name}")

    def call(self, what: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """A raw pyroute2 IPRoute call with errors translated, for drivers with special needs (fdb)."""
        return self._call(what, method, *args, **kwargs)


_session = threading.local()


@contextmanager
def links_session() -> Iterator[KeysView[str | None]]:
    """A scope (on this thread) in which every `open_links` of one namespace shares one socket and its reads.

    A converge touches the node namespace from many drivers; sharing lets one dump of its links serve them
    all. Anything changed through any of them makes that namespace be read again. Sockets close at the end.
    Yields the namespaces opened so far (it grows as the scope goes on).
    """
    current: dict[str | None, _Netlink] | None = getattr(_session, "open", None)
    if current is not None:
        yield current.keys()
        return
    _session.open = {}
    try:
        yield _session.open.keys()
    finally:
        opened: dict[str | None, _Netlink] = _session.open
        _session.open = None
        for netlink in opened.values():
            netlink.ipr.close()


def _netlink(netns: str | None) -> _Netlink:
    try:
        with entered(netns):  # the socket stays in the namespace it was opened in
            return _Netlink(IPRoute(), netns)
    except OSError as exc:
        raise KernelError(f"cannot open netlink in namespace {netns}: {exc}") from None


@contextmanager
def open_links(netns: str | None = None) -> Iterator[Links]:
    """A Links bound to a namespace (None: the current one) that must already exist."""
    shared: dict[str | None, _Netlink] | None = getattr(_session, "open", None)
    if shared is not None:
        if netns not in shared:
            shared[netns] = _netlink(netns)
        yield Links(shared[netns])
        return
    netlink = _netlink(netns)
    try:
        yield Links(netlink)
    finally:
        netlink.ipr.close()
