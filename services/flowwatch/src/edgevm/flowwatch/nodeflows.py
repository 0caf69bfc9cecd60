"""Flowwatch: the address map from netplumb's records, one watch per namespace, and the flow.* commands."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from pathlib import Path

import msgspec
from nats.js.kv import KeyValue

from edgevm.flowwatch import metrics, saved
from edgevm.flowwatch.addresses import AddressMap, Netns
from edgevm.flowwatch.drivers import cutoff
from edgevm.flowwatch.drivers.cutting import Cutting
from edgevm.flowwatch.flowtable import ActiveFlow, Changes, NamespaceFlows, flow_key
from edgevm.flowwatch.history import FlowHistory
from edgevm.flowwatch.outbox import Outbox
from edgevm.flowwatch.recorder import FlowRecorder
from edgevm.flowwatch.terminate import Terminator
from edgevm.flowwatch.watcher import NamespaceWatch
from edgevm.shared.background import Background
from edgevm.shared.commands import FlowList, FlowListRequest, FlowTerminate
from edgevm.shared.errors import Conflict, NotFound
from edgevm.shared.netstate import VmNetRecord, VrfRecord
from edgevm.shared.objects import Flow

__all__ = ["NodeFlows"]

log = logging.getLogger(__name__)

_vm_decoder = msgspec.json.Decoder(VmNetRecord)
_vrf_decoder = msgspec.json.Decoder(VrfRecord)


class NodeFlows:
    """The flows of a node's VMs: active ones in memory per namespace, completed ones in JetStream.

    `node_netns` is where the node's own namespace (netns None in netplumb's records) really is: None in
    production (the process's namespace); a test passes a namespace of its own.
    """

    def __init__(
        self,
        node: str,
        history: FlowHistory,
        outbox: Outbox,
        cutting: Cutting,
        node_netns: str | None = None,
        cut_seconds: int = cutoff.CUT_SECONDS,
        state_dir: Path | None = None,
    ) -> None:
        self.node = node
        self.history = history
        self.node_netns = node_netns
        self.addresses = AddressMap()
        self.watches: dict[Netns, NamespaceWatch] = {}
        self.recorder = FlowRecorder(node, outbox)
        self.terminator = Terminator(self.recorder, self.watches, self.kernel_netns, cutting, cut_seconds)
        self.records_loaded = asyncio.Event()
        self._retiring = Background("flowwatch: namespaces left")
        # what the last run left: its active flows by namespace, handed to each first resync
        self._state_file = state_dir / "flows.json" if state_dir is not None else None
        state = saved.load(self._state_file)
        self._left: dict[str, dict[str, Flow]] = {}
        self._remembered: dict[str, dict[str, tuple[str, int]]] = {}
        for netns, flows in state.active.items():
            self._left[netns] = {f.key: f.flow for f in flows}
            self._remembered[netns] = {f.key: (f.flow.id, f.start_ns) for f in flows}
        for flow_id, vm in state.ended:
            self.recorder.remember_ended(flow_id, vm)

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
            watch.start()
            log.info("watching conntrack in %s", watch.label)
        for netns in self.watches.keys() - wanted:
            self._retiring.start(self._retire(netns, self.watches.pop(netns)), netns or "node")
        metrics.WATCHED.set(len(self.watches))

    async def _retire(self, netns: Netns, watch: NamespaceWatch) -> None:
        """A namespace left the records: its flows end (with their final counters) and our table goes."""
        await watch.retire()
        log.info("no longer watching %s", watch.label)
        if netns in self.watches:  # wanted again meanwhile: the new watch keeps the table
            return
        try:
            await cutoff.remove_table_unless_cutting(self.kernel_netns(netns))
        except (OSError, cutoff.CutoffError) as exc:
            log.info("table %s left in %s: %s", cutoff.TABLE, watch.label, exc)

    async def ready(self, timeout: float = 30.0) -> None:
        """Wait until the records are read and every namespace that exists has had its first dump."""
        async with asyncio.timeout(timeout):
            await self.records_loaded.wait()
            for watch in list(self.watches.values()):
                await watch.settled.wait()

    def active_counts(self) -> dict[str, int]:
        """Active flows by VM (on the event loop: the tables change there)."""
        counts: collections.Counter[str] = collections.Counter()
        for watch in self.watches.values():
            for flow in watch.flows.flows():
                counts[flow.vm] += 1
        return dict(counts)

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
                        if entry is not None:
                            deleted = entry.operation in ("DEL", "PURGE")
                            self.apply_record(entry.key, None if deleted else entry.value)
                        if (entry is None or entry.delta == 0) and not self.records_loaded.is_set():
                            self.records_loaded.set()
                            self._forget_unwatched()
                finally:
                    with contextlib.suppress(Exception):
                        await watcher.stop()  # type: ignore[no-untyped-call]
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("following edgevm_net failed (%s); again in 1 s", exc)
            await asyncio.sleep(1)

    async def stop(self) -> None:
        """Stop every namespace watch; leave the active flows and the ended ids to the next run."""
        await asyncio.gather(*(watch.stop() for watch in self.watches.values()))
        await self._retiring.drain(None)
        await self.terminator.stop()
        self._save()
        for netns, watch in self.watches.items():
            try:
                await cutoff.remove_table_unless_cutting(self.kernel_netns(netns))
            except (OSError, cutoff.CutoffError) as exc:
                log.info("table %s left in %s: %s", cutoff.TABLE, watch.label, exc)

    def _save(self) -> None:
        state = saved.SavedState(ended=self.recorder.recently_ended())
        for watch in self.watches.values():
            flows = watch.flows
            netns, node = flows.netns, self.node
            left = [
                saved.SavedFlow(flow_key(netns, f.entry.id, f.orig, f.outbound), f.start_ns, f.to_flow(node, "active"))
                for f in flows.flows()
            ]
            # flows of a namespace whose first dump never came are still the last run's
            left += [
                saved.SavedFlow(key, flows.remembered[key][1], flow)
                for key, flow in self._left.get(flows.netns, {}).items()
                if key in flows.remembered
            ]
            state.active[flows.netns] = left
        saved.save(self._state_file, state)

    # -- changes --------------------------------------------------------------------------------------
    def _report(self, flows: NamespaceFlows, changes: Changes) -> None:
        if flows.netns in self._left and not flows.remembered:  # the namespace's first dump came (or never will)
            left = self._left.pop(flows.netns)
            self.recorder.forgotten([left[key] for key in changes.forgotten if key in left])
        self.recorder.report(flows, changes)

    def _forget_unwatched(self) -> None:
        """Flows the last run left in namespaces no record names any more: they ended while nobody watched."""
        for netns in list(self._remembered):
            left = self._left.pop(netns, {})
            del self._remembered[netns]
            self.recorder.forgotten(list(left.values()))

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
            rows += await self.history.recent(req.vm, req.limit)
        if not known and not rows and (req.status == "active" or await self.history.count(req.vm) == 0):
            raise NotFound(f"VM {req.vm!r} is not known to this node's network and has no flow history", "vm")
        rows.sort(key=lambda f: f.started_at, reverse=True)
        return FlowList(flows=rows[: req.limit])

    async def _refresh_counters(self, vm: str, flows: list[ActiveFlow]) -> None:
        """Read the live byte and packet counters of `flows` (events carry them only when a flow ends).

        One pipelined conntrack GET per flow on the namespace's lookup socket; when the kernel does not
        answer in time the counters stay those last seen (the last dump or event), logged. An answer for
        another connection on the same tuple (a different conntrack id) is not taken.
        """
        if not flows:
            return
        watch = self.watches.get(self.addresses.netns_of(vm))
        if watch is None:
            return
        try:
            current = await watch.lookup.get([flow.as_entry() for flow in flows])
        except (TimeoutError, OSError, LookupError) as exc:
            log.warning("live counters of %d flows of %s not read: %s", len(flows), vm, exc)
            return
        for flow, entry in zip(flows, current, strict=True):
            if entry is not None:
                flow.count(entry)

    async def terminate(self, req: FlowTerminate) -> Flow:
        """flow.terminate: delete the conntrack entry and cut the 5-tuple for a while; the flow is `terminated`."""
        self._check_vm(req.vm)
        netns = self.addresses.netns_of(req.vm)
        watch = self.watches.get(netns)
        flow = watch.flows.find(req.id) if watch is not None else None
        if watch is None or flow is None or flow.vm != req.vm:
            if self.recorder.ended_vm(req.id) == req.vm:
                raise Conflict(f"flow {req.id} of VM {req.vm!r} has already ended", "id")
            if await self.history.find(req.vm, req.id) is not None:
                raise Conflict(f"flow {req.id} of VM {req.vm!r} has already ended", "id")
            raise NotFound(f"VM {req.vm!r} has no flow {req.id}", "id")
        return await self.terminator.terminate(netns, watch, flow)  # TerminateFailed: 503, nothing changed
