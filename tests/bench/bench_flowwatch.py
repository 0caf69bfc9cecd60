"""Benchmark of flowwatch's service path against `conntrack -L`: resyncs, sustained events, bytes per flow.

Run as root: `.venv/bin/python tests/bench/bench_flowwatch.py` (`make bench` runs it). It works in a throw-away
namespace `edgevm-t-<random>-fwbench` and removes it, with a nats-server (JetStream) of its own. Flows are UDP
from 127.0.0.1 to addresses of 127.1.0.0/16 that belong to 100 VMs, so every entry is attributed; they are made
by separate processes. What is timed is what the service runs, measured where the service measures it:

- dump + attribution: `NamespaceWatch.resync` itself (what `edgevm_flowwatch_dump_duration_seconds` observes),
  into an empty table (start-up: every entry becomes a flow, handed to the recorder and the outbox) and into a
  full one (after an overrun: every flow's counters taken). Goal: <= 3x `conntrack -L` of the same table, in
  the same run. The announcing of the flows a resync opens (their Flows built and encoded as flow.opened) is
  the outbox's background work; it is timed apart, and both together are shown too.
- events: a sustained stream, new flows paced by a sender while the table is flushed every 0.5 s, through
  the whole path: the namespace watch, the recorder, the outbox publishing to JetStream and acknowledged.
  Goal: >= 20,000 conntrack events/s on one core with no loss: no overrun, every flow opened and closed.
- memory per active flow: in a fresh process (no cache warmed by the rest), a start-up resync of the 20,000
  entries with each flow's id made (the service makes one for each flow it announces). Goal: <= 1 KiB.
"""

from __future__ import annotations

import asyncio
import gc
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import nats

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

# The namespace, the generator of entries and the report line are bench_conntrack's (same directory).
from bench_conntrack import GENERATOR, in_netns, make_netns, report

from edgevm.cli.natsserver import free_port, start_nats_server
from edgevm.flowwatch.drivers import ctsource
from edgevm.flowwatch.flowtable import Changes, NamespaceFlows
from edgevm.flowwatch.outbox import Outbox
from edgevm.flowwatch.recorder import FlowRecorder
from edgevm.flowwatch.watcher import NamespaceWatch
from edgevm.shared import bus

ENTRIES = 20_000
ROUNDS = 5
GOAL_DUMP_RATIO = 3.0
GOAL_EVENTS = 20_000
GOAL_BYTES_PER_FLOW = 1024
STREAM_SECONDS = 10.0
STREAM_FLOWS_PER_SECOND = 11_000  # each a NEW and a DESTROY: 22,000 events/s offered
FLUSH_EVERY = 0.5

# New flows at a steady rate (each to its own address and port), the table flushed every FLUSH_EVERY s:
# every flow brings a NEW and a DESTROY event. Prints how many flows it made.
PACED = """
import socket, subprocess, sys, time
rate, seconds, flush_every = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
start = time.perf_counter()
n = 0
next_flush = flush_every
while True:
    elapsed = time.perf_counter() - start
    if elapsed >= seconds:
        break
    due = min(int(elapsed * rate), int(seconds * rate))
    while n < due:
        sock.sendto(b"x", (f"127.1.{n // 250 % 80}.{n % 250 + 1}", 1000 + n // 20000))
        n += 1
    if elapsed >= next_flush:
        subprocess.run(["conntrack", "-F"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        next_flush += flush_every
    time.sleep(0.001)
subprocess.run(["conntrack", "-F"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(n)
"""


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"



def vm_addresses() -> dict[str, str]:
    """Every destination address of the generators, owned by one of 100 VMs."""
    return {f"127.1.{n // 250}.{n % 250 + 1}": f"vm-{n % 100}" for n in range(ENTRIES)}


class Counting:
    """The recorder the service uses, counting what it is handed."""

    def __init__(self, recorder: FlowRecorder) -> None:
        self.recorder = recorder
        self.opened = self.closed = 0

    def __call__(self, flows: NamespaceFlows, changes: Changes) -> None:
        self.opened += len(changes.opened)
        self.closed += len(changes.closed) + len(changes.closing)
        self.recorder.report(flows, changes)


async def until(check: Callable[[], bool], timeout: float = 60.0) -> float:
    """Poll check() every ms; the time it first held."""
    deadline = time.perf_counter() + timeout
    while not check():
        if time.perf_counter() > deadline:
            raise TimeoutError("the bench condition was not reached")
        await asyncio.sleep(0.001)
    return time.perf_counter()


class Nats:
    """A nats-server of the bench's own, with edgevm's streams."""

    async def __aenter__(self) -> nats.NATS:
        self.store = Path(tempfile.mkdtemp(prefix="edgevm-bench-nats-"))
        self.server = start_nats_server(self.store, port=free_port())
        self.nc = await nats.connect(self.server.url)
        await bus.ensure_jetstream(self.nc.jetstream(timeout=10))
        return self.nc

    async def __aexit__(self, *exc: object) -> None:
        await self.nc.close()
        self.server.stop()
        shutil.rmtree(self.store, ignore_errors=True)


def conntrack_cli(netns: str) -> float:
    start = time.perf_counter()
    in_netns(netns, "conntrack", "-L")
    return time.perf_counter() - start


async def resyncs(netns: str, nc: nats.NATS) -> None:
    """NamespaceWatch.resync as the service runs it: into an empty table, then into a full one."""
    cli_times, empty_times, full_times, announce_times = [], [], [], []
    for _ in range(ROUNDS):  # interleaved, so the machine's drift hits all alike
        cli_times.append(await asyncio.to_thread(conntrack_cli, netns))
        outbox = Outbox(nc, "bench")  # not running: what the resync queues is made into messages below
        flows = NamespaceFlows(netns, vm_addresses())
        watch = NamespaceWatch(flows, netns, FlowRecorder("bench", outbox).report)
        start = time.perf_counter()
        await watch.resync("start")
        empty_times.append(time.perf_counter() - start)
        assert len(flows) == ENTRIES, len(flows)
        start = time.perf_counter()
        while outbox._queue:  # what the outbox's task does before publishing: the deferred flow.opened made
            item = outbox._queue.popleft()
            if len(item) == 2:
                item[1]()  # type: ignore[misc]
        announce_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        await watch.resync("overrun")
        full_times.append(time.perf_counter() - start)
        assert len(flows) == ENTRIES, len(flows)
        await watch.stop()
        del flows, watch, outbox
        gc.collect()
    cli, empty, full, announce = min(cli_times), min(empty_times), min(full_times), min(announce_times)
    report("entries in the table", f"{ENTRIES:,}", "each attributed to one of 100 VMs")
    report("conntrack -L (via ip netns exec)", f"{cli * 1e3:.1f} ms", "baseline")
    report(
        "resync into an empty table (start-up)", f"{empty * 1e3:.1f} ms",
        f"{empty / cli:.2f}x conntrack -L, goal <= {GOAL_DUMP_RATIO}x: {verdict(empty / cli <= GOAL_DUMP_RATIO)}",
    )
    report(
        "resync into the full table (overrun)", f"{full * 1e3:.1f} ms",
        f"{full / cli:.2f}x conntrack -L, goal <= {GOAL_DUMP_RATIO}x: {verdict(full / cli <= GOAL_DUMP_RATIO)}",
    )
    report(
        "  flow.opened of the 20,000 made (outbox, background)", f"{announce * 1e3:.1f} ms",
        f"{(empty + announce) / cli:.2f}x conntrack -L with the start-up resync (off its path; no goal)",
    )


async def sustained_events(netns: str, nc: nats.NATS) -> None:
    """A paced stream of NEW and DESTROY events through the whole path, every message acknowledged."""
    outbox = Outbox(nc, "bench")
    publisher = asyncio.create_task(outbox.run())
    sink = Counting(FlowRecorder("bench", outbox))
    flows = NamespaceFlows(netns, {f"127.1.{n // 250}.{n % 250 + 1}": f"vm-{n % 100}" for n in range(ENTRIES)})
    watch = NamespaceWatch(flows, netns, sink)
    watch.start()
    try:
        await asyncio.wait_for(watch.ready.wait(), 30)
        cpu0, start = time.process_time(), time.perf_counter()
        sender = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", netns, sys.executable, "-c", PACED,
            str(STREAM_FLOWS_PER_SECOND), str(STREAM_SECONDS), str(FLUSH_EVERY), stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await sender.communicate()
        made = int(out)
        sent_in = time.perf_counter() - start
        try:
            end = await until(lambda: sink.closed >= made and len(flows) == 0, 30)
        except TimeoutError:
            end = time.perf_counter()
        cpu = time.process_time() - cpu0
        await until(lambda: len(outbox) == 0 and outbox.unacked == 0, 60)
        drained = time.perf_counter()
        events = 2 * made
        rate = events / (end - start)
        overruns = watch.resyncs["overrun"]
        complete = sink.opened == made and sink.closed == made
        report(
            "events, sustained, through to JetStream", f"{rate:,.0f} ev/s",
            f"goal >= {GOAL_EVENTS:,}/s, no loss: {verdict(rate >= GOAL_EVENTS and overruns == 0 and complete)} "
            f"({made:,} flows in {sent_in:.1f} s, opened {sink.opened:,}, closed {sink.closed:,}; overruns {overruns})",
        )
        report(
            "  our CPU over the stream", f"{cpu:.2f} s",
            f"{cpu / (end - start):.0%} of one core; {events / cpu:,.0f} events per CPU-second; "
            f"{3 * made:,} messages acknowledged {drained - end:.2f} s after the last event",
        )
    finally:
        await watch.stop()
        publisher.cancel()
        await asyncio.gather(publisher, return_exceptions=True)


async def backlog_drain(netns: str) -> None:
    """The top rate: 20,000 DESTROY queued while nothing reads, then drained (informative, no goal)."""
    in_netns(netns, sys.executable, "-c", GENERATOR, str(ENTRIES))
    outbox_free = Counting(FlowRecorder("bench", _NullOutbox()))  # type: ignore[arg-type]
    flows = NamespaceFlows(netns, vm_addresses())
    watch = NamespaceWatch(flows, netns, outbox_free)
    watch.start()
    try:
        await asyncio.wait_for(watch.ready.wait(), 30)
        in_netns(netns, "conntrack", "-F")  # on the loop's thread: nothing is read meanwhile
        cpu0, start = time.process_time(), time.perf_counter()
        end = await until(lambda: outbox_free.closed >= ENTRIES)
        cpu = time.process_time() - cpu0
        report(
            "events, a backlog of 20,000 DESTROY drained", f"{ENTRIES / (end - start):,.0f} ev/s",
            f"top rate with Flows built and encoded, no publishing ({cpu:.2f} s CPU; informative)",
        )
    finally:
        await watch.stop()


class _NullOutbox:
    """An outbox that encodes what it is given and sends nothing."""

    def opened(self, flow: object, at: str | None = None) -> None:
        pass

    def opened_later(self, count: int, make: Callable[[], list[object]]) -> None:
        make()

    def ended(self, flow: object, at: str | None = None) -> None:
        pass


def bytes_per_flow(netns: str) -> None:
    """In this fresh process: memory an active flow holds (object, table slot, entry and tuples, id)."""
    addresses = vm_addresses()
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    flows = NamespaceFlows(netns, addresses)
    changes = Changes()
    flows.resync(ctsource.dump(netns), changes)
    for flow in changes.opened:
        _ = flow.id  # the service makes every announced flow's id, and keeps it
    del changes
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    per_flow = grown / len(flows)
    report(
        "memory per active flow (fresh process, ids made)", f"{per_flow:,.0f} B",
        f"{len(flows):,} flows; goal <= {GOAL_BYTES_PER_FLOW} B: {verdict(per_flow <= GOAL_BYTES_PER_FLOW)}",
    )


async def main() -> None:
    netns = make_netns("fwbench")
    try:
        print(f"namespace {netns}, {ENTRIES:,} UDP flows", flush=True)
        async with Nats() as nc:
            await sustained_events(netns, nc)
            in_netns(netns, sys.executable, "-c", GENERATOR, str(ENTRIES))
            await resyncs(netns, nc)
        subprocess.run([sys.executable, __file__, "--bytes-per-flow", netns], check=True)
        in_netns(netns, "conntrack", "-F")
        await backlog_drain(netns)
    finally:
        subprocess.run(["ip", "netns", "delete", netns], check=False)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--bytes-per-flow"]:
        bytes_per_flow(sys.argv[2])
    else:
        asyncio.run(main())
