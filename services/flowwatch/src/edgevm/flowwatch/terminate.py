"""flow.terminate: a flow cut in nftables, its conntrack entry deleted, its ends probed, its end recorded once."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable

from edgevm.flowwatch import metrics
from edgevm.flowwatch.addresses import Netns
from edgevm.flowwatch.drivers import cutoff
from edgevm.flowwatch.drivers.ctparse import CtTuple
from edgevm.flowwatch.drivers.cutting import Cutting
from edgevm.flowwatch.flowtable import ActiveFlow, NamespaceFlows
from edgevm.flowwatch.recorder import FlowRecorder
from edgevm.flowwatch.watcher import NamespaceWatch
from edgevm.shared.background import Background
from edgevm.shared.errors import BackendUnavailable
from edgevm.shared.netns import NamespaceNotFound
from edgevm.shared.objects import Flow

__all__ = ["TerminateFailed", "Terminator"]

log = logging.getLogger(__name__)

# Each step's deadline; together under the command's 5 s, so that the command's own deadline never cancels
# a termination halfway (it could not then say what it did).
CUT_TIMEOUT = 1.5
LOOKUP_TIMEOUT = 0.5
DELETE_TIMEOUT = 1.5
PROBE_TIMEOUT = 1.0
UNCUT_TIMEOUT = 5.0


class TerminateFailed(BackendUnavailable):
    """The kernel refused (or did not answer) a step before the entry was deleted; nothing is changed."""


class Terminator:
    """Terminates active flows; owns the timers that end their cuts and the undoing of failed ones."""

    def __init__(
        self,
        recorder: FlowRecorder,
        watches: dict[Netns, NamespaceWatch],
        kernel_netns: Callable[[Netns], str | None],
        cutting: Cutting,
        cut_seconds: int = cutoff.CUT_SECONDS,
    ) -> None:
        self._recorder = recorder
        self._watches = watches
        self._kernel_netns = kernel_netns
        self._kernel = cutting
        self.cut_seconds = cut_seconds
        self._undoing = Background("flowwatch: lifting cuts")  # of failed terminations
        self._timers = Background("flowwatch: ends of cuts")  # when the flows' entries may come again

    async def terminate(self, netns: Netns, watch: NamespaceWatch, flow: ActiveFlow) -> Flow:
        """Cut, delete and probe an active flow of watch's; its record, status `terminated`.

        Until the entry is deleted any failure, or a cancellation, undoes what was done (the flow is active
        again, its cut lifted) and raises TerminateFailed (or the cancellation); once it is deleted the flow
        is recorded terminated, whatever comes after.
        """
        flows = watch.flows
        kernel_netns = self._kernel_netns(netns)
        flows.take(flow)  # ours now: events about its entry are ignored until the cut ends
        self._recorder.terminating[flow.id] = flow.vm
        cut = deleted = False
        try:
            async with asyncio.timeout(CUT_TIMEOUT):
                cut = await self._kernel.cut(kernel_netns, flow.as_entry(), self.cut_seconds, CUT_TIMEOUT)
            [current] = await watch.lookup.get([flow.as_entry()], LOOKUP_TIMEOUT)
            if current is not None:
                flow.count(current)  # not if the tuple is another connection's now
            async with asyncio.timeout(DELETE_TIMEOUT):  # its id spares a newer entry of the same tuple
                await self._kernel.delete(kernel_netns, flow.as_entry(), DELETE_TIMEOUT)
            deleted = True
        except (OSError, TimeoutError, NamespaceNotFound) as exc:
            reason = str(exc) or type(exc).__name__
            raise TerminateFailed(f"the flow could not be cut ({reason}); it is still active") from None
        finally:
            if not deleted:
                self._undo(kernel_netns, flows, flow, cut)
        record = self._recorder.ended(flow, "terminated", time.time_ns())
        metrics.FLOWS.labels(flow.vm, "terminated").inc()
        self._timers.start(self._release_later(flows, flow), flow.id)
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                await self._probe(netns, flow)
        except (OSError, TimeoutError, NamespaceNotFound) as exc:  # the cut holds; the ends learn at their next packet
            log.warning("flow %s cut, but its ends not probed: %s", flow.id, exc)
        return record

    def _undo(self, kernel_netns: str | None, flows: NamespaceFlows, flow: ActiveFlow, cut: bool) -> None:
        flows.release(flow, restore=True)
        self._recorder.terminating.pop(flow.id, None)
        if cut:
            self._undoing.start(self._uncut(kernel_netns, flow), flow.id)

    async def _uncut(self, kernel_netns: str | None, flow: ActiveFlow) -> None:
        try:
            await self._kernel.uncut(kernel_netns, flow.as_entry(), UNCUT_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            log.warning("the cut of flow %s, whose termination failed, stays until it expires: %s", flow.id, exc)

    async def _release_later(self, flows: NamespaceFlows, flow: ActiveFlow) -> None:
        await asyncio.sleep(self.cut_seconds)
        flows.release(flow, restore=False)

    async def stop(self) -> None:
        """Finish lifting the cuts of failed terminations; drop the timers (the cuts expire by themselves)."""
        await self._timers.close()
        await self._undoing.drain(None)

    async def _probe(self, netns: Netns, flow: ActiveFlow) -> None:
        """Make both ends of a cut TCP flow learn of it now (see probes.py).

        The ends in the flow's own namespace are probed from there. A flow of a VRF also passes the node
        namespace (a host port mapping in, or the masquerade out): its end out there is probed from the node
        namespace, as the node's own conntrack entry of the connection shows it.
        """
        kernel_netns = self._kernel_netns(netns)
        await self._kernel.probe(kernel_netns, flow.orig, flow.reply)
        node = self._watches.get(None)
        if netns is None or node is None or flow.orig.proto != socket.IPPROTO_TCP:
            return
        came_in = flow.as_entry()._replace(reply=_reversed(flow.orig))  # the node entry's reply is our orig
        went_out = flow.as_entry()._replace(orig=_reversed(flow.reply))  # its orig is our reply, reversed
        [inside] = await node.lookup.get([came_in], LOOKUP_TIMEOUT, by_reply=True)
        [outside] = await node.lookup.get([went_out], LOOKUP_TIMEOUT)
        node_netns = self._kernel_netns(None)
        if inside is not None:
            await self._kernel.probe(node_netns, inside.orig, inside.reply, True, False)
        if outside is not None:
            await self._kernel.probe(node_netns, outside.orig, outside.reply, False, True)


def _reversed(t: CtTuple) -> CtTuple:
    return t._replace(src=t.dst, dst=t.src, sport=t.dport, dport=t.sport)
