"""One namespace watched: its conntrack events applied to its flow table, resynced by a dump when needed."""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import time
from collections.abc import Callable

from edgevm.flowwatch import metrics
from edgevm.flowwatch.drivers import ctevents, ctsource, cutoff
from edgevm.flowwatch.drivers.ctevents import CtEventStream, Overrun
from edgevm.flowwatch.drivers.ctsource import CtLookup
from edgevm.flowwatch.flowtable import Changes, NamespaceFlows
from edgevm.flowwatch.gcpause import gc_paused
from edgevm.shared.netns import NamespaceNotFound, namespace_id

__all__ = ["NamespaceChanged", "NamespaceWatch"]

log = logging.getLogger(__name__)

Report = Callable[[NamespaceFlows, Changes], None]
CHECK_INTERVAL = 2.0  # how often the namespace's identity is checked (a namespace deleted or made anew)
SWEEP_INTERVAL = 30.0  # how often every flow is looked up in the kernel (see _sweep)
SWEEP_TIMEOUT = 10.0
DUMP_TIMEOUT = 30.0
FINAL_COUNTERS_TIMEOUT = 2.0


class NamespaceChanged(Exception):
    """The watched namespace is gone, or its name now names another namespace."""


class NamespaceWatch:
    """Keeps a namespace's active flows true to its conntrack table and reports every change.

    Start-up: flowwatch's nft table (so conntrack tracks), accounting on, the event socket opened, then a full
    dump. Afterwards events are applied as they come; an overrun (events lost) or a change of the namespace's
    addresses is answered with a new dump. A failure (the namespace is not there yet) is retried with backoff.
    The namespace's identity is checked every CHECK_INTERVAL s: when it is gone or made anew its flows end
    (with the counters last seen: the kernel's table went with it) and the watch starts again.
    """

    def __init__(
        self, flows: NamespaceFlows, kernel_netns: str | None, report: Report, rcvbuf: int = ctsource.EVENT_RCVBUF,
        sweep_interval: float = SWEEP_INTERVAL,
    ) -> None:
        self.flows = flows
        self.sweep_interval = sweep_interval
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
        self._dump_sock: socket.socket | None = None
        self._identity: tuple[int, int] | None = None
        self._task: asyncio.Task[None] | None = None

    def request_resync(self) -> None:
        """Dump the table again soon (the namespace's addresses changed)."""
        self._resync_wanted.set()

    # -- life -----------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start watching, in a task of the watch's own."""
        self._task = asyncio.create_task(self.run(), name=f"conntrack {self.label}")

    async def stop(self) -> None:
        """Stop watching and close the sockets (the flows stay as they are)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self._close_dump_socket()
        self.lookup.close()

    async def retire(self) -> None:
        """Stop watching for good (the namespace left netplumb's records): every flow ends, with its final
        counters when the kernel still has them."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        flows = list(self.flows.flows())
        try:
            current = await self.lookup.get([flow.as_entry() for flow in flows], FINAL_COUNTERS_TIMEOUT)
        except (OSError, TimeoutError, NamespaceNotFound) as exc:
            log.info("final counters of %d flows in %s not read: %s", len(flows), self.label, exc)
            current = [None] * len(flows)
        finally:
            self.lookup.close()
        self._end_all(dict(zip(map(id, flows), current, strict=True)))

    def _end_all(self, final: dict[int, ctsource.CtEntry | None] | None = None) -> None:
        """Every flow ends now, with the counters final holds for it (by id()), or those last seen."""
        changes = Changes()
        now_ns = time.time_ns()
        for flow in self.flows.clear():
            entry = final.get(id(flow)) if final else None
            if entry is not None:
                flow.count(entry)
            changes.closed.append((flow, now_ns))
        if changes:
            self._report(self.flows, changes)

    async def run(self) -> None:
        """Watch until cancelled."""
        delay = 0.2
        while True:
            try:
                await self._watch()
            except asyncio.CancelledError:
                raise
            except NamespaceNotFound:
                log.info("namespace %s is not there (yet); retrying in %.1f s", self.label, delay)
                self._forget_namespace()
                if self.flows.remembered:  # the last run's flows there ended with it
                    changes = Changes()
                    changes.forgotten.extend(self.flows.remembered)
                    self.flows.remembered = {}
                    self._report(self.flows, changes)
            except NamespaceChanged as exc:
                log.warning("namespace %s %s: its flows end, watching again", self.label, exc)
                self._forget_namespace()
                delay = 0.2
            except Exception:
                log.exception("watching conntrack in %s failed; retrying in %.1f s", self.label, delay)
            finally:
                self._close_dump_socket()
            self.settled.set()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _forget_namespace(self) -> None:
        """The namespace we knew is gone: its flows end and the lookup socket, which pins it, is let go."""
        if self._identity is not None:
            self._identity = None
            self._end_all()
        self.lookup.reset()

    def _check_namespace(self) -> None:
        now = namespace_id(self.kernel_netns)
        if now is None:
            raise NamespaceChanged("is gone")
        if self._identity is None:
            self._identity = now
        elif now != self._identity:
            raise NamespaceChanged("was made anew")

    def _close_dump_socket(self) -> None:
        sock, self._dump_sock = self._dump_sock, None
        if sock is not None:
            sock.close()

    # -- watching ---------------------------------------------------------------------------------------
    async def _watch(self) -> None:
        if namespace_id(self.kernel_netns) is None:
            raise NamespaceNotFound(self.kernel_netns)
        self._check_namespace()
        await asyncio.to_thread(ctsource.enable_accounting, self.kernel_netns)
        await cutoff.ensure_table(self.kernel_netns)
        async with ctevents.events(self.kernel_netns, self.rcvbuf) as stream:
            self._check_namespace()  # the sockets were made in the namespace we know
            self._resync_wanted.clear()  # the dump below covers what was asked so far
            await self.resync("start")
            self.ready.set()
            self.settled.set()
            await self._follow(stream)

    async def _follow(self, stream: CtEventStream) -> None:
        next_batch: asyncio.Future[object] = asyncio.ensure_future(anext(stream))
        resync: asyncio.Future[object] = asyncio.ensure_future(self._resync_wanted.wait())
        checked = swept = time.monotonic()
        try:
            while True:
                await asyncio.wait((next_batch, resync), timeout=CHECK_INTERVAL, return_when=asyncio.FIRST_COMPLETED)
                if next_batch.done():
                    batch = next_batch.result()
                    next_batch = asyncio.ensure_future(anext(stream))
                    await self._take(batch)
                if resync.done():
                    self._resync_wanted.clear()
                    resync = asyncio.ensure_future(self._resync_wanted.wait())
                    # what is queued comes first: a DESTROY among it brings the final counters of its flow
                    await self._catch_up(stream, next_batch)
                    if not stream.lost:  # else the Overrun comes next, and its resync covers the addresses
                        await self.resync("addresses")
                    next_batch = asyncio.ensure_future(anext(stream))
                if time.monotonic() - checked >= CHECK_INTERVAL:
                    self._check_namespace()
                    checked = time.monotonic()
                if time.monotonic() - swept >= self.sweep_interval:
                    await self._sweep(stream, next_batch)
                    next_batch = asyncio.ensure_future(anext(stream))
                    swept = time.monotonic()
        finally:
            for pending in (next_batch, resync):
                pending.cancel()
            await asyncio.gather(next_batch, resync, return_exceptions=True)

    async def _catch_up(self, stream: CtEventStream, next_batch: asyncio.Future[object]) -> None:
        """Stop the pending read (applying what it got, if it got something) and apply what is queued."""
        if not next_batch.done():
            next_batch.cancel()
            await asyncio.gather(next_batch, return_exceptions=True)
        if not next_batch.cancelled():
            await self._take(next_batch.result())
        await self._take(stream.drain_now())

    async def _sweep(self, stream: CtEventStream, next_batch: asyncio.Future[object]) -> None:
        """Look every flow up in the kernel: end those whose entry is gone though no DESTROY came.

        That happens to an entry made while nobody listened to the namespace's events (the kernel gives an
        entry events only if there was a listener when it was made, unless nf_conntrack_events is 1, which the
        watch sets): a flow found by a dump may be one. It also keeps a flow kept by an address resync
        from lingering if its DESTROY never comes. The counters of the others are brought up to date.
        """
        flows = list(self.flows.flows())
        if not flows:
            await self._catch_up(stream, next_batch)  # the caller reads on with a new pending read
            return
        try:
            current = await self.lookup.get([flow.as_entry() for flow in flows], SWEEP_TIMEOUT)
        except (OSError, TimeoutError, NamespaceNotFound) as exc:
            log.warning("the sweep of %d flows in %s failed: %s", len(flows), self.label, exc)
            await self._catch_up(stream, next_batch)
            return
        await self._catch_up(stream, next_batch)  # a DESTROY queued meanwhile ends its flow with its counters
        changes = Changes()
        now_ns = time.time_ns()
        for flow, entry in zip(flows, current, strict=True):
            if entry is not None and flow.count(entry):
                continue
            if self.flows.remove(flow):
                changes.closed.append((flow, now_ns))
        if changes:
            self._report(self.flows, changes)

    async def _take(self, batch: object) -> None:
        """Apply an item of the event stream: a batch of events, or an Overrun (then resync)."""
        if isinstance(batch, Overrun):
            metrics.OVERRUNS.labels(self.label).inc()
            log.warning("conntrack events lost in %s (overrun %d): resyncing", self.label, batch.number)
            await self.resync("overrun")
            return
        assert isinstance(batch, list)
        if not batch:
            return
        self._events.inc(len(batch))
        changes = Changes()
        self.flows.apply(batch, changes)
        if changes:
            await self._settle(changes)

    async def resync(self, reason: str) -> None:
        """Apply a full dump of the namespace's table: the table is true to the kernel when this returns.

        Flows missing from the dump end, unless no event was lost (reason "addresses"): their DESTROY is on
        its way. Announcing the flows it opens is the outbox's work, in the background.
        """
        self._check_namespace()
        started = time.perf_counter()
        if self._dump_sock is None:  # kept for the next dumps: pyroute2 takes ~10 ms to make one in a namespace
            self._dump_sock = await asyncio.to_thread(ctsource.open_socket, self.kernel_netns)
        changes = Changes()
        with gc_paused():
            entries = await asyncio.to_thread(ctsource.dump, self.kernel_netns, DUMP_TIMEOUT, self._dump_sock)
            self.flows.resync(entries, changes, keep_absent=reason == "addresses")
            del entries
        await self._settle(changes)
        self.resyncs[reason] += 1
        metrics.RESYNCS.labels(self.label, reason).inc()
        metrics.DUMP_DURATION.labels(self.label).observe(time.perf_counter() - started)

    async def _settle(self, changes: Changes) -> None:
        """Read the final counters of the TCP flows that are over, then report everything."""
        if changes.closing:
            try:
                current = await self.lookup.get([flow.as_entry() for flow in changes.closing])
            except (OSError, TimeoutError, NamespaceNotFound) as exc:
                log.warning("counters of %d closed flows in %s not read: %s", len(changes.closing), self.label, exc)
                current = [None] * len(changes.closing)
            now_ns = time.time_ns()
            for flow, entry in zip(changes.closing, current, strict=True):
                if entry is not None:
                    flow.count(entry)  # taken only if it is still the same connection
                changes.closed.append((flow, now_ns))
            changes.closing.clear()
        self._report(self.flows, changes)

