"""Flowwatch: VM address map from netplumb's records, one watch per namespace, and the flow.* commands."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
from nats.js.kv import KeyValue
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from edgevm.flowwatch import ctsource, cutoff, metrics, probes
from edgevm.flowwatch.addresses import AddressMap, Netns
from edgevm.flowwatch.ctparse import CtTuple
from edgevm.flowwatch.flowtable import ActiveFlow, Changes, NamespaceFlows, flow_key
from edgevm.flowwatch.history import FlowHistory
from edgevm.flowwatch.outbox import Outbox
from edgevm.flowwatch.watcher import NamespaceWatch
from edgevm.shared.commands import FlowList, FlowListRequest, FlowTerminate
from edgevm.shared.errors import Conflict, NotFound, Unavailable
from edgevm.shared.netstate import VmNetRecord, VrfRecord
from edgevm.shared.objects import Flow

__all__ = ["FlowWatch"]

log = logging.getLogger(__name__)
RECENTLY_ENDED = 50_000  # ids of flows that ended lately, to answer a late terminate with 409 from memory

_vm_decoder = msgspec.json.Decoder(VmNetRecord)
_vrf_decoder = msgspec.json.Decoder(VrfRecord)
_ids_decoder = msgspec.json.Decoder(dict[str, dict[str, tuple[str, int]]])


class FlowWatch:
    """The flows of a node's VMs: active ones in memory per namespace, completed ones in JetStream.

    `node_netns` is where the node's own namespace (netns None in netplumb's records) really is: None in
    production (the process's namespace); a test passes a namespace of its own.
    """

    def __init__(
        self,
        node: str,
        history: FlowHistory,
        outbox: Outbox,
        node_netns: str | None = None,
        cut_seconds: int = cutoff.CUT_SECONDS,
        state_dir: Path | None = None,
    ) -> None:
        self.node = node
        self.history = history
        self.outbox = outbox
        self.node_netns = node_netns
        self.cut_seconds = cut_seconds
        self.addresses = AddressMap()
        self.watches: dict[Netns, NamespaceWatch] = {}
        self._tasks: dict[Netns, asyncio.Task[None]] = {}
        self._ended: collections.OrderedDict[str, str] = collections.OrderedDict()  # flow id -> vm
        self.records_loaded = asyncio.Event()
        # ids of the flows active when the last run stopped, by namespace, handed to each first resync
        self._ids_file = state_dir / "active-ids.json" if state_dir is not None else None
        self._remembered = self._load_ids()

    # -- namespaces ---------------------------------------------------------------------------------
    def kernel_netns(self, netns: Netns) -> str | None:
        """Where a namespace of netplumb's records really is."""
        return self.node_netns if netns is None else netns

    def _sync_watches(self) -> None:
        wanted = self.addresses.namespaces()
        for netns in wanted - self.watches.keys():
            flows = NamespaceFlows(netns or "", self.addresses.addresses(netns))
            flows.remembered = self._remembered.pop(netns or "", {})
            watch = self.watches[netns] = NamespaceWatch(flows, self.kernel_netns(netns), self._report)
            self._tasks[netns] = asyncio.create_task(watch.run(), name=f"conntrack {watch.label}")
            log.info("watching conntrack in %s", watch.label)
        for netns in self.watches.keys() - wanted:
            watch = self.watches.pop(netns)
            self._tasks.pop(netns).cancel()
            changes = Changes()
            now_ns = time.time_ns()
            changes.closed.extend((flow, now_ns) for flow in watch.flows.flows())
            self._report(watch.flows, changes)
            log.info("no longer watching %s", watch.label)
        metrics.WATCHED.set(len(self.watches))

    async def ready(self, timeout: float = 30.0) -> None:
        """Wait until the records are read and every namespace that exists has had its first dump."""
        async with asyncio.timeout(timeout):
            await self.records_loaded.wait()
            for watch in list(self.watches.values()):
                await watch.settled.wait()

    # -- netplumb's records -------------------------------------------------------------------------
    def apply_record(self, key: str, value: bytes | None) -> None:
        """Take one `edgevm_net` entry (None: deleted) into the address map."""
        parts = key.split(".")
        if len(parts) != 3 or parts[0] != self.node:
            return
        _, kind, name = parts
        touched: set[Netns] = set()
        try:
            if kind == "vm":
                touched = self.addresses.put_vm(_vm_decoder.decode(value)) if value else self.addresses.remove_vm(name)
            elif kind == "vrf":
                if value:
                    self.addresses.put_vrf(_vrf_decoder.decode(value))
                else:
                    self.addresses.remove_vrf(name)
        except msgspec.DecodeError as exc:
            log.warning("edgevm_net %s ignored: %s", key, exc)
            return
        self._sync_watches()
        for netns in touched:
            watch = self.watches.get(netns)
            # before its first dump a watch needs nothing: that dump is attributed with the map as it is then
            if watch is not None and watch.ready.is_set():
                watch.request_resync()

    async def follow_records(self, kv: KeyValue) -> None:
        """Follow `<node>.>` of `edgevm_net` for ever (the initial values first)."""
        self._sync_watches()
        while True:
            try:
                watcher = await kv.watch(f"{self.node}.>")
                try:
                    async for entry in watcher:
                        if entry is None:
                            self.records_loaded.set()
                            continue
                        deleted = entry.operation in ("DEL", "PURGE")
                        self.apply_record(entry.key, None if deleted else entry.value)
                        if entry.delta == 0:
                            self.records_loaded.set()
                finally:
                    with contextlib.suppress(Exception):
                        await watcher.stop()  # type: ignore[no-untyped-call]
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("following edgevm_net failed (%s); again in 1 s", exc)
            await asyncio.sleep(1)

    async def stop(self) -> None:
        """Stop every namespace watch; remember the active flows' ids for the next run."""
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self._tasks.clear()
        self._save_ids()
        for netns in self.watches:
            try:
                await cutoff.remove_table_unless_cutting(self.kernel_netns(netns))
            except (OSError, cutoff.CutoffError) as exc:
                log.info("table %s left in %s: %s", cutoff.TABLE, netns or "the node namespace", exc)

    def _load_ids(self) -> dict[str, dict[str, tuple[str, int]]]:
        if self._ids_file is None or not self._ids_file.exists():
            return {}
        try:
            saved = _ids_decoder.decode(self._ids_file.read_bytes())
        except (OSError, msgspec.DecodeError) as exc:
            log.warning("ids of the last run's active flows not read: %s", exc)
            saved = {}
        with contextlib.suppress(OSError):
            self._ids_file.unlink()  # good for one start only
        return saved

    def _save_ids(self) -> None:
        if self._ids_file is None:
            return
        saved: dict[str, dict[str, tuple[str, int]]] = {}
        for watch in self.watches.values():
            flows = watch.flows
            saved[flows.netns] = {
                flow_key(flows.netns, f.entry.id, f.entry.orig, f.outbound): (f.id, f.start_ns) for f in flows.flows()
            }
        try:
            partial = self._ids_file.with_suffix(".partial")
            partial.write_bytes(msgspec.json.encode(saved))
            partial.replace(self._ids_file)
        except OSError as exc:
            log.warning("ids of the active flows not saved: %s", exc)

    # -- changes --------------------------------------------------------------------------------------
    def _report(self, flows: NamespaceFlows, changes: Changes) -> None:
        node, outbox = self.node, self.outbox
        counts: collections.Counter[tuple[str, str]] = collections.Counter()
        for flow in changes.opened:
            outbox.opened(flow.to_flow(node, "active"))
            counts[(flow.vm, "opened")] += 1
        for flow, end_ns in changes.closed:
            self._ended_now(flow, "completed", end_ns)
            counts[(flow.vm, "closed")] += 1
        for (vm, event), n in counts.items():
            metrics.FLOWS.labels(vm, event).inc(n)

    def _ended_now(self, flow: ActiveFlow, status: str, end_ns: int) -> Flow:
        record = flow.to_flow(self.node, status, end_ns)
        self.outbox.ended(record)
        self._ended[flow.id] = flow.vm
        if len(self._ended) > RECENTLY_ENDED:
            self._ended.popitem(last=False)
        return record

    # -- commands -------------------------------------------------------------------------------------
    def _check_vm(self, vm: str) -> None:
        if not self.addresses.knows(vm):
            raise NotFound(f"VM {vm!r} is not known to this node's network", "vm")

    def active(self, vm: str) -> list[ActiveFlow]:
        """The VM's active flows, newest first."""
        if not self.addresses.knows(vm):
            return []
        watch = self.watches.get(self.addresses.netns_of(vm))
        if watch is None:
            return []
        flows = [flow for flow in watch.flows.flows() if flow.vm == vm]
        flows.sort(key=lambda f: f.start_ns, reverse=True)
        return flows

    async def list_flows(self, req: FlowListRequest) -> FlowList:
        """flow.list: active, completed or all flows of a VM, newest first."""
        known = self.addresses.knows(req.vm)
        rows: list[Flow] = []
        if req.status in ("active", "all"):
            page = self.active(req.vm)[: req.limit]
            await self._refresh_counters(req.vm, page)
            rows += [flow.to_flow(self.node, "active") for flow in page]
        if req.status in ("completed", "all"):
            rows += await self._history(req.vm, req.limit)
        if not known and not rows and (req.status == "active" or await self._history_count(req.vm) == 0):
            raise NotFound(f"VM {req.vm!r} is not known to this node's network and has no flow history", "vm")
        rows.sort(key=lambda f: f.started_at, reverse=True)
        return FlowList(flows=rows[: req.limit])

    async def _refresh_counters(self, vm: str, flows: list[ActiveFlow]) -> None:
        """Read the live byte and packet counters of `flows` (events carry them only when a flow ends).

        One pipelined conntrack GET per flow on the namespace's lookup socket; when the kernel does not
        answer in time the counters stay those last seen (the last dump or event), logged.
        """
        if not flows:
            return
        watch = self.watches.get(self.addresses.netns_of(vm))
        if watch is None:
            return
        try:
            current = await watch.lookup.get([flow.as_entry() for flow in flows])
        except (TimeoutError, OSError) as exc:
            log.warning("live counters of %d flows of %s not read: %s", len(flows), vm, exc)
            return
        for flow, entry in zip(flows, current, strict=True):
            if entry is not None:
                flow.count(entry)

    async def _history(self, vm: str, limit: int) -> list[Flow]:
        try:
            return await self.history.recent(vm, limit)
        except TimeoutError:
            raise Unavailable("the flow history (JetStream) did not answer in time") from None

    async def _history_count(self, vm: str) -> int:
        try:
            return await self.history.count(vm)
        except TimeoutError:
            raise Unavailable("the flow history (JetStream) did not answer in time") from None

    async def terminate(self, req: FlowTerminate) -> Flow:
        """flow.terminate: delete the conntrack entry and cut the 5-tuple for a while; the flow is `terminated`."""
        self._check_vm(req.vm)
        netns = self.addresses.netns_of(req.vm)
        watch = self.watches.get(netns)
        flow = watch.flows.find(req.id) if watch is not None else None
        if flow is None or flow.vm != req.vm:
            if self._ended.get(req.id) == req.vm or await self.history.find(req.vm, req.id) is not None:
                raise Conflict(f"flow {req.id} of VM {req.vm!r} has already ended", "id")
            raise NotFound(f"VM {req.vm!r} has no flow {req.id}", "id")
        assert watch is not None
        flows = watch.flows
        flows.take(flow)  # ours now: events about its entry are ignored until the cut ends
        kernel_netns = self.kernel_netns(netns)
        try:
            await cutoff.cut(kernel_netns, flow, self.cut_seconds)
            [current] = await watch.lookup.get([flow.as_entry()])
            if current is not None:
                flow.count(current)
            await ctsource.delete(kernel_netns, flow.as_entry())
        except (OSError, TimeoutError) as exc:
            flows.release(flow, restore=True)
            raise Unavailable(f"the flow could not be cut: {exc}") from None
        try:
            await self._probe(netns, flow)
        except (OSError, TimeoutError) as exc:  # the cut holds; the ends learn at their next packet
            log.warning("flow %s cut, but its ends not probed: %s", flow.id, exc)
        asyncio.get_running_loop().call_later(self.cut_seconds, flows.release, flow, False)
        metrics.FLOWS.labels(flow.vm, "terminated").inc()
        return self._ended_now(flow, "terminated", time.time_ns())


    async def _probe(self, netns: Netns, flow: ActiveFlow) -> None:
        """Make both ends of a cut TCP flow learn of it now (see probes.py).

        The ends in the flow's own namespace are probed from there. A flow of a VRF also passes the node
        namespace (a host port mapping in, or the masquerade out): its end out there is probed from the node
        namespace, as the node's own conntrack entry of the connection shows it.
        """
        kernel_netns = self.kernel_netns(netns)
        await asyncio.to_thread(probes.send_probes, kernel_netns, flow.orig, flow.reply)
        node = self.watches.get(None)
        if netns is None or node is None or flow.orig.proto != socket.IPPROTO_TCP:
            return
        came_in = flow.as_entry()._replace(reply=_reversed(flow.orig))  # the node entry's reply is our orig
        went_out = flow.as_entry()._replace(orig=_reversed(flow.reply))  # its orig is our reply, reversed
        [inside] = await node.lookup.get([came_in], by_reply=True)
        [outside] = await node.lookup.get([went_out])
        node_netns = self.kernel_netns(None)
        if inside is not None:
            await asyncio.to_thread(probes.send_probes, node_netns, inside.orig, inside.reply, True, False)
        if outside is not None:
            await asyncio.to_thread(probes.send_probes, node_netns, outside.orig, outside.reply, False, True)


def _reversed(t: CtTuple) -> CtTuple:
    return t._replace(src=t.dst, dst=t.src, sport=t.dport, dport=t.sport)


class ActiveFlowsCollector(Collector):
    """Active flows per VM, counted at scrape time (nothing to keep up on the event path)."""

    def __init__(self, watch: FlowWatch) -> None:
        self._watch = watch

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Yield the gauge."""
        gauge = GaugeMetricFamily("edgevm_flowwatch_active_flows", "Active flows, by VM.", labels=["vm"])
        counts: collections.Counter[str] = collections.Counter()
        for watch in list(self._watch.watches.values()):
            for flow in list(watch.flows.flows()):
                counts[flow.vm] += 1
        for vm, count in sorted(counts.items()):
            gauge.add_metric([vm], count)
        yield gauge
