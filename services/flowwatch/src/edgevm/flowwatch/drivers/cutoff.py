"""Flowwatch's own nftables table in a watched namespace: it makes conntrack track, and cuts flows.

`inet edgevm_flows` is ours alone; netplumb's `edgevm` table is never touched, and replacing that one
leaves this one (and the timed elements of its sets) alone. Cutting a flow puts its 5-tuples, as packets
carry them on either side of NAT, into a set with a timeout: TCP packets that match are answered with a
reset, others are dropped, until the element expires.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterable

from edgevm.flowwatch.drivers.ctparse import CtEntry, CtTuple
from edgevm.flowwatch.drivers.probes import PROBE_MARK

__all__ = [
    "TABLE", "CutoffError", "cut", "cut_elements", "ensure_table", "remove_table", "remove_table_unless_cutting",
    "uncut",
]

TABLE = "edgevm_flows"
CUT_SECONDS = 10

# `add` keeps what exists (so the sets keep their elements across restarts); the chains' rules are
# flushed and written again in the same transaction.
_CHAINS = (
    ("probes", "output", -300, (f"meta mark {PROBE_MARK:#x} notrack",)),  # see probes.py
    ("track_pre", "prerouting", -150, ("ct state new counter",)),
    ("track_out", "output", -150, ("ct state new counter",)),
    ("cut_in", "input", -5, ("jump cut",)),
    ("cut_fwd", "forward", -5, ("jump cut",)),
    ("cut_out", "output", -5, ("jump cut",)),
)
_CUT_RULES = (
    "tcp flags rst return",  # the resets we send pass our own output chain: let every reset through
    f"meta mark {PROBE_MARK:#x} return",
    "meta l4proto . ip saddr . th sport . ip daddr . th dport @cut4 meta l4proto tcp reject with tcp reset",
    "meta l4proto . ip saddr . th sport . ip daddr . th dport @cut4 drop",
    "meta l4proto . ip6 saddr . th sport . ip6 daddr . th dport @cut6 meta l4proto tcp reject with tcp reset",
    "meta l4proto . ip6 saddr . th sport . ip6 daddr . th dport @cut6 drop",
)


class CutoffError(OSError):
    """nft refused a change to flowwatch's table."""


def _table_script() -> str:
    t = f"inet {TABLE}"
    lines = [
        f"add table {t}",
        f"add set {t} cut4 {{ type inet_proto . ipv4_addr . inet_service . ipv4_addr . inet_service; flags timeout; }}",
        f"add set {t} cut6 {{ type inet_proto . ipv6_addr . inet_service . ipv6_addr . inet_service; flags timeout; }}",
        f"add chain {t} cut",
        f"flush chain {t} cut",
        *(f"add rule {t} cut {rule}" for rule in _CUT_RULES),
    ]
    for name, hook, priority, rules in _CHAINS:
        lines += [
            f"add chain {t} {name} {{ type filter hook {hook} priority {priority}; policy accept; }}",
            f"flush chain {t} {name}",
            *(f"add rule {t} {name} {rule}" for rule in rules),
        ]
    return "\n".join(lines) + "\n"


async def _nft(netns: str | None, script: str, timeout: float = 5.0) -> None:
    argv = ["nft", "-f", "-"] if netns is None else ["ip", "netns", "exec", netns, "nft", "-f", "-"]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(timeout):
            _, err = await proc.communicate(script.encode())
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise CutoffError(f"nft in {netns or 'the node namespace'} did not answer within {timeout:g} s") from None
    if proc.returncode != 0:
        raise CutoffError(f"nft in {netns or 'the node namespace'}: {err.decode(errors='replace').strip()}")


async def ensure_table(netns: str | None) -> None:
    """Create or refresh flowwatch's table in a namespace (idempotent; keeps current cuts)."""
    await _nft(netns, _table_script())


async def remove_table(netns: str | None) -> None:
    """Remove flowwatch's table from a namespace, if there."""
    await _nft(netns, f"add table inet {TABLE}\ndelete table inet {TABLE}\n")


async def remove_table_unless_cutting(netns: str | None, timeout: float = 5.0) -> bool:
    """Remove flowwatch's table when no cut is pending in it (a stopping flowwatch leaves no trace, but a
    cut outlives it); True if removed."""
    argv = ["nft", "list", "table", "inet", TABLE]
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        async with asyncio.timeout(timeout):
            listed, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return False
    if proc.returncode != 0 or b"elements = " in listed:
        return False
    await remove_table(netns)
    return True


def cut_elements(orig: CtTuple, reply: CtTuple) -> set[tuple[int, str, int, str, int]]:
    """The 5-tuples a flow's packets carry where our chains see them (input, forward, output: after the
    DNAT, before the SNAT) and, once the entry is gone and NAT no longer applies, as they arrive."""
    if orig.sport is None or orig.dport is None or reply.sport is None or reply.dport is None:
        return set()
    p = orig.proto
    return {
        (p, orig.src, orig.sport, orig.dst, orig.dport),  # original direction, on the wire
        (p, orig.src, orig.sport, reply.src, reply.sport),  # original direction, after the DNAT
        (p, reply.src, reply.sport, reply.dst, reply.dport),  # reply direction, on the wire
        (p, reply.src, reply.sport, orig.src, orig.sport),  # reply direction, after undoing the SNAT
    }


def _element_script(family: int, elements: Iterable[tuple[int, str, int, str, int]], seconds: int | None) -> str:
    name = "cut4" if family == socket.AF_INET else "cut6"
    if seconds is None:  # their removal
        items = ", ".join(f"{p} . {a} . {pa} . {b} . {pb}" for p, a, pa, b, pb in sorted(elements))
        return f"delete element inet {TABLE} {name} {{ {items} }}\n"
    items = ", ".join(f"{p} . {a} . {pa} . {b} . {pb} timeout {seconds}s" for p, a, pa, b, pb in sorted(elements))
    return f"add element inet {TABLE} {name} {{ {items} }}\n"


async def cut(netns: str | None, flow: CtEntry, seconds: int = CUT_SECONDS, timeout: float = 5.0) -> bool:
    """Reject (TCP) or drop (UDP) the packets of a flow (its conntrack entry) for `seconds`; False if it has
    no ports to match."""
    elements = cut_elements(flow.orig, flow.reply)
    if not elements:
        return False
    await _nft(netns, _element_script(flow.family, elements, seconds), timeout)
    return True


async def uncut(netns: str | None, flow: CtEntry, timeout: float = 5.0) -> None:
    """Let a flow's packets pass again (a cut whose termination failed); nothing to do if it expired."""
    elements = cut_elements(flow.orig, flow.reply)
    for element in sorted(elements):  # one by one: deleting one that expired fails its whole command
        try:
            await _nft(netns, _element_script(flow.family, [element], None), timeout)
        except CutoffError as exc:
            if "No such file or directory" not in str(exc):
                raise

