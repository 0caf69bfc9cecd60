"""flow.terminate's hard cases on a NodeFlows in this process, in a namespace of its own with real connections:
a kernel step that fails after the cut, a termination cancelled halfway, two at once, and a flow that ends by
itself meanwhile. The kernel steps are injected (STYLE 4): the host's own, with a deletion that fails or is slow
on purpose."""

from __future__ import annotations

import asyncio
import secrets
import socket
import subprocess
from collections.abc import AsyncIterator

import msgspec
import pytest
from nats.aio.client import Client as NATS

from edgevm.flowwatch.drivers import ctsource, cutoff
from edgevm.flowwatch.drivers.ctparse import CtEntry
from edgevm.flowwatch.drivers.cutting import KernelCutting
from edgevm.flowwatch.flowtable import ActiveFlow, NamespaceFlows
from edgevm.flowwatch.history import FlowHistory
from edgevm.flowwatch.nodeflows import NodeFlows
from edgevm.flowwatch.outbox import Outbox
from edgevm.shared import bus, subjects
from edgevm.shared.commands import FlowTerminate
from edgevm.shared.errors import Conflict, to_edgevm_error
from edgevm.shared.netstate import NicRecord, VmNetRecord

from ..helpers import EventCollector, eventually
from .conftest import TcpPair

pytestmark = pytest.mark.root

VM = "web"


class Deleter(KernelCutting):
    """The kernel steps flowwatch is given: the host's own, but the deletion after `delay` s, or an OSError
    when `fail`."""

    def __init__(self) -> None:
        self.fail = False
        self.delay = 0.0
        self.calls = 0

    async def delete(self, netns: str | None, entry: CtEntry, timeout: float) -> bool:
        self.calls += 1
        await asyncio.sleep(self.delay)
        if self.fail:
            raise OSError("the kernel said no (injected)")
        return await super().delete(netns, entry, timeout)


class Rig:
    """A NodeFlows of node `node` whose node namespace is `netns`, where VM web owns 127.0.0.1."""

    def __init__(self, netns: str, nc: NATS) -> None:
        self.netns = netns
        self.node = f"r{secrets.token_hex(3)}"
        self.deleter = Deleter()
        js = nc.jetstream()
        self.outbox = Outbox(nc, self.node)
        self.fw = NodeFlows(
            self.node, FlowHistory(js, self.node), self.outbox, self.deleter, node_netns=netns, cut_seconds=2,
        )
        record = VmNetRecord(
            vm=VM, vrf="default", netns=None, updated_at="2026-01-01T00:00:00Z",
            nics=[NicRecord(index=0, mac="52:54:00:00:00:01", address="127.0.0.1/8", gateway="", bridge="", tap="")],
        )
        self.fw.apply_record(f"{self.node}.vm.{VM}", msgspec.json.encode(record))
        self.fw.records_loaded.set()

    @property
    def flows(self) -> NamespaceFlows:
        return self.fw.watches[None].flows

    async def connection(self) -> tuple[TcpPair, ActiveFlow]:
        """A new TCP connection and its outbound flow of VM web."""
        pair = await asyncio.to_thread(TcpPair, self.netns)
        pair.exchange(100, 100)
        client = pair.ports[0]

        async def found() -> ActiveFlow | None:
            return next((f for f in self.fw.active(VM) if f.outbound and f.orig.sport == client), None)

        return pair, await eventually(found, 5, "the connection's flow")

    def cut_listed(self) -> str:
        return subprocess.run(
            ["ip", "netns", "exec", self.netns, "nft", "list", "set", "inet", cutoff.TABLE, "cut4"],
            capture_output=True, text=True, check=True,
        ).stdout

    def kernel_has(self, flow: ActiveFlow) -> bool:
        return any(e.orig == flow.orig for e in ctsource.dump(self.netns))


@pytest.fixture
async def rig(netns: str, nc: NATS) -> AsyncIterator[Rig]:
    await bus.ensure_jetstream(nc.jetstream())
    rig = Rig(netns, nc)
    publisher = asyncio.create_task(rig.outbox.run())
    try:
        await rig.fw.ready(10)
        yield rig
    finally:
        await rig.fw.stop()
        publisher.cancel()
        await asyncio.gather(publisher, return_exceptions=True)


async def test_a_failure_after_the_cut_answers_503_and_changes_nothing(rig: Rig) -> None:
    pair, flow = await rig.connection()
    try:
        rig.deleter.fail = True
        with pytest.raises(Exception) as failed:
            await rig.fw.terminate(FlowTerminate(vm=VM, id=flow.id))
        assert _reply_code(failed.value) == "503"
        assert rig.deleter.calls == 1  # it failed after the cut was in place
        # the flow is active again, the kernel still has its entry, and the cut was lifted: the connection works
        assert rig.flows.find(flow.id) is flow and flow.orig not in rig.flows.ignored
        assert rig.kernel_has(flow)
        await eventually(lambda: _now(f"{flow.orig.sport}" not in rig.cut_listed()), 5, "the cut lifted")
        await asyncio.to_thread(pair.exchange, 10, 10)
    finally:
        pair.close()


async def test_a_termination_cancelled_halfway_leaves_the_flow_active(rig: Rig) -> None:
    """The command's deadline cancels a handler; before the entry is deleted that must undo the cut."""
    pair, flow = await rig.connection()
    try:
        rig.deleter.delay = 10
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await rig.fw.terminate(FlowTerminate(vm=VM, id=flow.id))
        assert rig.flows.find(flow.id) is flow and flow.orig not in rig.flows.ignored
        assert rig.fw.recorder.ended_vm(flow.id) is None
        await eventually(lambda: _now(f"{flow.orig.sport}" not in rig.cut_listed()), 5, "the cut lifted")
        await asyncio.to_thread(pair.exchange, 10, 10)
    finally:
        pair.close()


async def test_a_slow_kernel_step_fails_within_the_commands_deadline(rig: Rig) -> None:
    """Each step has its own deadline, under the command's 5 s: a slow deletion is a 503, not a cancellation."""
    pair, flow = await rig.connection()
    try:
        rig.deleter.delay = 10
        async with asyncio.timeout(5.0):  # the deadline app.py gives flow.terminate
            with pytest.raises(Exception) as failed:
                await rig.fw.terminate(FlowTerminate(vm=VM, id=flow.id))
        assert _reply_code(failed.value) == "503"
        assert rig.flows.find(flow.id) is flow
    finally:
        pair.close()


async def test_a_second_terminate_of_a_flow_being_terminated_is_a_conflict(rig: Rig, nc: NATS) -> None:
    events = await EventCollector().start(nc, subjects.event(rig.node, f"flow.{VM}"))
    pair, flow = await rig.connection()
    try:
        rig.deleter.delay = 0.5
        first = asyncio.create_task(rig.fw.terminate(FlowTerminate(vm=VM, id=flow.id)))
        await asyncio.sleep(0.1)
        with pytest.raises(Conflict):
            await rig.fw.terminate(FlowTerminate(vm=VM, id=flow.id))
        record = await first
        assert record.status == "terminated"
        with pytest.raises(Conflict):  # and after it, from memory
            await rig.fw.terminate(FlowTerminate(vm=VM, id=flow.id))
        await eventually(lambda: _now(any(e.flow.id == flow.id for e in events.of_type("flow.terminated"))), 5)
        await asyncio.sleep(0.3)
        ended = [e for e in events.events if e[1].flow.id == flow.id and e[1].flow.status != "active"]
        assert len(ended) == 1
    finally:
        pair.close()
        await events.stop()


async def test_a_flow_that_ends_by_itself_while_being_terminated_is_recorded_once(rig: Rig, nc: NATS) -> None:
    events = await EventCollector().start(nc, subjects.event(rig.node, f"flow.{VM}"))
    pair, flow = await rig.connection()
    try:
        rig.deleter.delay = 0.5
        terminating = asyncio.create_task(rig.fw.terminate(FlowTerminate(vm=VM, id=flow.id)))
        await asyncio.sleep(0.1)
        assert await ctsource.delete(rig.netns, flow.as_entry())  # its own end, as a reset would: a DESTROY comes
        await asyncio.sleep(0.2)
        record = await terminating
        assert record.status == "terminated"
        await asyncio.sleep(0.5)
        mine = [e for _, e in events.events if e.flow.id == flow.id and e.flow.status != "active"]
        assert [e.flow.status for e in mine] == ["terminated"]
        # no flow opened again from the entry while the cut lasts (nothing of this tuple in the table)
        assert [f for f in rig.flows.flows() if f.orig == flow.orig] == []
    finally:
        pair.close()
        await events.stop()


async def test_an_entry_made_again_during_the_cut_opens_no_flow(rig: Rig) -> None:
    """The DESTROY that the termination itself causes does not end the cut's hold on the tuple (ICMP)."""
    def ping() -> None:
        from .conftest import ping as echo

        echo(rig.netns, socket.AF_INET, ident=0x5151)

    await asyncio.to_thread(ping)

    async def found() -> ActiveFlow | None:
        return next((f for f in rig.fw.active(VM) if f.orig.icmp_id == 0x5151 and f.outbound), None)

    flow = await eventually(found, 5, "the ping's flow")
    await rig.fw.terminate(FlowTerminate(vm=VM, id=flow.id))
    await asyncio.to_thread(ping)  # the same id, type and code: the same tuple, a new entry
    await asyncio.sleep(0.5)
    assert [f for f in rig.fw.active(VM) if f.orig.icmp_id == 0x5151] == []
    await asyncio.sleep(2.0)  # the cut (2 s here) is over: a new entry of the tuple is a flow again
    [entry] = [e for e in ctsource.dump(rig.netns) if e.orig.icmp_id == 0x5151]
    await ctsource.delete(rig.netns, entry)
    await asyncio.to_thread(ping)
    await eventually(found, 5, "a new flow after the cut")


async def _now(value: object) -> object:
    return value


def _reply_code(error: BaseException) -> str | None:
    """The code the endpoint adapter answers `error` with (None: an unexpected error, a plain 500)."""
    reply = to_edgevm_error(error)
    return reply.code if reply is not None else None
