"""The kernel steps of a flow's termination, behind one small protocol so they can be given (STYLE 4-5).

`__main__` (through app.py) passes KernelCutting, the host's own; a test passes one that fails or is slow
on purpose. Only conntrack entries, tuples and namespace names cross.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from edgevm.flowwatch.drivers import ctsource, cutoff, probes
from edgevm.flowwatch.drivers.ctparse import CtEntry, CtTuple

__all__ = ["Cutting", "KernelCutting"]


class Cutting(Protocol):
    """Cut a flow's packets, delete its conntrack entry, probe its ends; each within `timeout` s."""

    async def cut(self, netns: str | None, flow: CtEntry, seconds: int, timeout: float) -> bool: ...
    async def uncut(self, netns: str | None, flow: CtEntry, timeout: float) -> None: ...
    async def delete(self, netns: str | None, entry: CtEntry, timeout: float) -> bool: ...
    async def probe(
        self, netns: str | None, orig: CtTuple, reply: CtTuple, initiator: bool = True, responder: bool = True
    ) -> int: ...


class KernelCutting:
    """The steps on this host: flowwatch's nftables sets, ctnetlink, raw sockets."""

    async def cut(self, netns: str | None, flow: CtEntry, seconds: int, timeout: float) -> bool:
        """Reject or drop the flow's packets for `seconds` (see cutoff.py); False if it has no ports."""
        return await cutoff.cut(netns, flow, seconds, timeout)

    async def uncut(self, netns: str | None, flow: CtEntry, timeout: float) -> None:
        """Lift a cut before it expires."""
        await cutoff.uncut(netns, flow, timeout)

    async def delete(self, netns: str | None, entry: CtEntry, timeout: float) -> bool:
        """Delete the conntrack entry (its id spares a newer entry of the same tuple); False if none."""
        return await ctsource.delete(netns, entry, timeout)

    async def probe(
        self, netns: str | None, orig: CtTuple, reply: CtTuple, initiator: bool = True, responder: bool = True
    ) -> int:
        """Send the ends of a TCP connection a probe each (see probes.py); the number sent."""
        return await asyncio.to_thread(probes.send_probes, netns, orig, reply, initiator, responder)
