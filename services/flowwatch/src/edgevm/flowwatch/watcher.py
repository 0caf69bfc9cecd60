"""One namespace watched: its conntrack events applied to its flow table, resynced by a dump when needed."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable

from edgevm.flowwatch import ctsource, cutoff, metrics
from edgevm.flowwatch.ctsource import CtLookup, Overrun
from edgevm.flowwatch.flowtable import Changes, NamespaceFlows
from edgevm.flowwatch.netns import NamespaceNotFound

__all__ = ["NamespaceWatch"]

log = logging.getLogger(__name__)

Report = Callable[[NamespaceFlows, Changes], None]


class NamespaceWatch:
    """Keeps a namespace's active flows true to its conntrack table and reports every change.

    Start-up: flowwatch's nft table (so conntrack tracks), accounting on, the event socket opened, then a full
    dump. Afterwards events are applied as they come; an overrun (events lost) or a change of the namespace's
    addresses is answered with a new dump. A failure (the namespace is not there yet) is retried with backoff.
    """

    def __init__(
        self, flows: NamespaceFlows, kernel_netns: str | None, report: Report, rcvbuf: int = ctsource.EVENT_RCVBUF
    ) -> None:
        self.flows = flows
        self.rcvbuf = rcvbuf
        self.resyncs: collections.Counter[str] = collections.Counter()
        self.kernel_netns = kernel_netns  # where the namespace really is (None: the process's own)
        self.label = flows.netns or "node"
        self.lookup = CtLookup(kernel_netns)
        self.ready = asyncio.Event()  # set once the first dump is applied
        self.settled = asyncio.Event()  # set once the first dump is applied, or the first attempt failed
        self._report = report
        self._resync_wanted = asyncio.Event()
        self._events = metrics.CT_EVENTS.labels(self.label)

    def request_resync(self) -> None:
        """Dump the table again soon (the namespace's addresses changed)."""
        self._resync_wanted.set()

    async def run(self) -> None:
        """Watch until cancelled."""
        delay = 0.2
        try:
            while True:
                try:
                    await self._watch()
                except asyncio.CancelledError:
                    raise
                except NamespaceNotFound:
                    log.info("namespace %s is not there (yet); retrying in %.1f s", self.label, delay)
                except Exception:
                    log.exception("watching conntrack in %s failed; retrying in %.1f s", self.label, delay)
                self.settled.set()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        finally:
            self.lookup.close()

    async def _watch(self) -> None:
        await asyncio.to_thread(ctsource.enable_accounting, self.kernel_netns)
        await cutoff.ensure_table(self.kernel_netns)
        async with ctsource.events(self.kernel_netns, self.rcvbuf) as stream:
            self._resync_wanted.clear()  # the dump below covers what was asked so far
            await self.resync("start")
            self.ready.set()
            self.settled.set()
            next_batch: asyncio.Future[object] = asyncio.ensure_future(anext(stream))
            resync = asyncio.ensure_future(self._resync_wanted.wait())
            try:
                while True:
                    await asyncio.wait((next_batch, resync), return_when=asyncio.FIRST_COMPLETED)
                    if resync.done():
                        self._resync_wanted.clear()
                        resync = asyncio.ensure_future(self._resync_wanted.wait())
                        await self.resync("addresses")
                    if next_batch.done():
                        batch = next_batch.result()
                        next_batch = asyncio.ensure_future(anext(stream))
                        if isinstance(batch, Overrun):
                            metrics.OVERRUNS.labels(self.label).inc()
                            log.warning("conntrack events lost in %s (overrun %d): resyncing", self.label, batch.number)
                            await self.resync("overrun")
                        else:
                            assert isinstance(batch, list)
                            self._events.inc(len(batch))
                            changes = Changes()
                            self.flows.apply(batch, changes)
                            if changes:
                                await self._settle(changes)
            finally:
                next_batch.cancel()
                resync.cancel()

    async def resync(self, reason: str) -> None:
        """Apply a full dump of the namespace's table."""
        started = time.perf_counter()
        entries = await asyncio.to_thread(ctsource.dump, self.kernel_netns)
        changes = Changes()
        self.flows.resync(entries, changes)
        await self._settle(changes)
        self.resyncs[reason] += 1
        metrics.RESYNCS.labels(self.label, reason).inc()
        metrics.DUMP_DURATION.labels(self.label).observe(time.perf_counter() - started)

    async def _settle(self, changes: Changes) -> None:
        """Read the final counters of the TCP flows that are over, then report everything."""
        if changes.closing:
            try:
                current = await self.lookup.get([flow.as_entry() for flow in changes.closing])
            except (OSError, TimeoutError) as exc:
                log.warning("counters of %d closed flows in %s not read: %s", len(changes.closing), self.label, exc)
                current = [None] * len(changes.closing)
            now_ns = time.time_ns()
            for flow, entry in zip(changes.closing, current, strict=True):
                if entry is not None:
                    flow.count(entry)
                changes.closed.append((flow, now_ns))
            changes.closing.clear()
        self._report(self.flows, changes)
