"""Benchmark of the gateway at fleet scale: 100 simulated nodes x 50 VMs publishing heartbeats and events.

Run: `.venv/bin/python tests/bench/bench_fleet_gateway.py` (`make bench` runs it). Each simulated node
publishes on its own connection, as its services would. Two topologies, each on a nats-server of its own
(`BENCH_FLEET_TOPOLOGIES=single,sourced` picks):

- `single`: one EDGEVM_EVENTS holding every node's events (what the gateway reads on a lone node);
- `sourced`: 100 node streams, each storing only `edgevm.evt.<node>.>`, sourced into an EDGEVM_EVENTS with
  no subjects of its own: the hub's stream shape and the gateway reading it, but with local sources in
  one server instead of 100 leaf servers and JetStream domains (the leaf links, TLS and the cross-domain
  sourcing are measured by bench_fleet.py's catch-up). It needs a service start that keeps a hub's
  EDGEVM_EVENTS as it is (bus.ensure_jetstream); without it the gateway cannot start and the line says so.

What it measures:

- ingest: every event the nodes publish (5,000 vm.created, then 20,000 vm.updated and task.updated in a
  burst, heartbeats of 5 services per node every 10 s throughout) reaches the gateway's model with no loss:
  the gateway's applied count equals the stream's message count, none skipped, and every VM shows the
  revision of its last event. Baseline: a bare ordered consumer reading the same stream (no decode, no model).
- `gw.vm.list` (all 5,000 VMs, ~3 MB) p50/p99 over 200 requests while the nodes keep beating and publishing,
  in LIST_ROUNDS rounds (the spread says how much the machine's other load moves it, and the load average is
  printed beside it); goal: the median round's p99 < 50 ms. Baseline: a bare responder answering the same bytes.
- the same 5,000 VMs read in pages of 200 (`limit`, `after`; what `edgevm fleet vms` does), the p50 of a whole
  walk against the p50 of one unpaged gw.vm.list measured beside it.
- RSS of the hub (the gateway process plus the nats-server) after the run.

Which hub it is: one nats-server with 100 sourced streams, not 100 leaf servers (100 nats-servers with
JetStream do not fit beside the gateway on 2 cores); the topology line says so.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import msgspec
import nats
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy, RetentionPolicy, StorageType, StreamConfig, StreamSource

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from edgevm.cli.natsserver import free_port, start_nats_server
from edgevm.shared import subjects
from edgevm.shared.bus import ensure_jetstream
from edgevm.shared.clock import now
from edgevm.shared.events import Heartbeat, TaskUpdated, VmCreated, VmUpdated
from edgevm.shared.ids import new_id
from edgevm.shared.objects import Task, Vm, VmStatus
from edgevm.shared.spec import VmSpec

NODES = int(os.environ.get("BENCH_FLEET_NODES", "100"))
VMS_PER_NODE = 50
BURST_EVENTS = 20_000
SERVICES = ("lifecycle", "netplumb", "snapshotter", "flowwatch", "gateway")
HEARTBEAT_INTERVAL = 10.0
LIST_REQUESTS = 200
LIST_ROUNDS = int(os.environ.get("BENCH_FLEET_LIST_ROUNDS", "3"))
GOAL_P99 = 0.050
PAGE = 200  # what `edgevm fleet vms` asks for
_encoder = msgspec.json.Encoder()


def report(name: str, value: str, baseline: str, ratio: str, goal: str, ok: bool) -> None:
    print(f"{name:<44} {value:>14}  baseline {baseline:>14}  {ratio:>12}  goal {goal:<14} {'ok' if ok else 'MISSED'}",
          flush=True)


def rss_mib(pid: int) -> float:
    """Return the resident memory of process `pid` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class SimNode:
    """One simulated node: its own connection, its VMs' revisions, its services' heartbeats."""

    def __init__(self, name: str, nc: nats.NATS) -> None:
        self.name = name
        self.js = nc.jetstream()
        self.revisions = dict.fromkeys((f"vm-{i:02d}" for i in range(VMS_PER_NODE)), 0)
        self.acks: list[asyncio.Future[object]] = []

    async def publish(self, tail: str, event: object) -> None:
        self.acks.append(await self.js.publish_async(subjects.event(self.name, tail), _encoder.encode(event),
                                                     wait_stall=30))

    def vm(self, name: str) -> Vm:
        spec = VmSpec(name=name, image="debian-12", memory=1 << 30, cpu=2, description=f"{name} of {self.name}")
        return Vm(spec, VmStatus("running", self.revisions[name], now(), now(), ip_addresses=["10.77.0.2"]))

    async def create_all(self) -> None:
        for name in self.revisions:
            self.revisions[name] = 1
            await self.publish(f"vm.{name}", VmCreated(at=now(), vm=self.vm(name)))

    async def update(self, i: int) -> None:
        name = f"vm-{i % VMS_PER_NODE:02d}"
        if i % 2:
            self.revisions[name] += 1
            await self.publish(f"vm.{name}", VmUpdated(at=now(), vm=self.vm(name)))
        else:
            task = Task(new_id(), self.name, "vm.start", "succeeded", now(), vm=name, progress=100)
            await self.publish(f"task.{task.id}", TaskUpdated(at=now(), task=task))

    async def beat_forever(self, offset: float) -> None:
        await asyncio.sleep(offset)
        while True:
            for service in SERVICES:
                hb = Heartbeat(at=now(), node=self.name, services=[service], cpus=8, memory_bytes=32 << 30)
                await self.publish("node.heartbeat", hb)
            await asyncio.sleep(HEARTBEAT_INTERVAL)

    async def settle(self) -> None:
        await asyncio.gather(*self.acks)
        self.acks.clear()


async def until(check, timeout: float = 120.0, step: float = 0.05) -> float:  # type: ignore[no-untyped-def]
    """Wait until `check()` (async) is true; return the seconds it took."""
    start = time.perf_counter()
    while not await check():
        if time.perf_counter() - start > timeout:
            raise TimeoutError(f"not reached within {timeout:g} s")
        await asyncio.sleep(step)
    return time.perf_counter() - start


def scrape(url: str) -> dict[str, float]:
    """Return the gateway's samples by name and labels, e.g. 'edgevm_gateway_events_total{result="applied"}'."""
    samples = {}
    for line in urllib.request.urlopen(url, timeout=10).read().decode().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


async def bare_read(url: str, count: int) -> float:
    """Seconds a bare ordered consumer takes to read `count` messages of EDGEVM_EVENTS (the ingest floor)."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    seen = 0
    done = asyncio.Event()

    async def on_msg(msg: object) -> None:
        nonlocal seen
        seen += 1
        if seen >= count:
            done.set()

    start = time.perf_counter()
    sub = await js.subscribe(subjects.all_events(), stream="EDGEVM_EVENTS", cb=on_msg, ordered_consumer=True,
                             deliver_policy=DeliverPolicy.ALL, pending_msgs_limit=1_000_000,
                             pending_bytes_limit=1 << 30)
    await asyncio.wait_for(done.wait(), 120)
    elapsed = time.perf_counter() - start
    await sub.unsubscribe()
    await nc.close()
    return elapsed


async def latencies(nc: nats.NATS, subject: str, body: bytes, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        await nc.request(subject, body, timeout=10)
        samples.append(time.perf_counter() - start)
    return sorted(samples)


def p99(samples: list[float]) -> float:
    return samples[min(len(samples) - 1, int(len(samples) * 0.99))]


TOPOLOGIES = {
    "single": "one nats-server, one EDGEVM_EVENTS holding {n} nodes' events; no leaf links",
    "sourced": "one nats-server, {n} node streams (edgevm.evt.<node>.> each) sourced into the hub's EDGEVM_EVENTS "
               "(no subjects of its own), local sources, no leaf links",
}


async def make_streams(js: JetStreamContext, topology: str, names: list[str]) -> None:
    """Create the event streams of `topology` (the gateway's own start makes the rest)."""
    if topology == "single":
        await ensure_jetstream(js)
        return
    for name in names:
        await js.add_stream(StreamConfig(name=f"EVT_{name}", subjects=[subjects.all_events(name)],
                                         storage=StorageType.FILE, retention=RetentionPolicy.LIMITS))
    await js.add_stream(StreamConfig(name="EDGEVM_EVENTS", subjects=[], storage=StorageType.FILE,
                                     sources=[StreamSource(name=f"EVT_{name}") for name in names]))


async def stored_events(js: JetStreamContext, topology: str, names: list[str]) -> int:
    """Return how many events the gateway's stream holds, once it holds every one the nodes stored."""
    if topology == "single":
        return int((await js.stream_info("EDGEVM_EVENTS")).state.messages)
    total = 0
    for name in names:
        total += (await js.stream_info(f"EVT_{name}")).state.messages

    async def sourced() -> bool:
        return bool((await js.stream_info("EDGEVM_EVENTS")).state.messages >= total)

    took = await until(sourced)
    report("sourcing: every node stream in the hub's", f"{took * 1e3:.0f} ms", "-", "-", "-", True)
    return int((await js.stream_info("EDGEVM_EVENTS")).state.messages)


async def run(url: str, server_pid: int, topology: str) -> None:
    print(f"topology: {topology} ({TOPOLOGIES[topology].format(n=NODES)})", flush=True)
    admin = await nats.connect(url)
    js = admin.jetstream()
    names = [f"node-{i:03d}" for i in range(NODES)]
    await make_streams(js, topology, names)
    metrics_port = free_port()
    env = {**os.environ, "EDGEVM_NATS_URL": url, "EDGEVM_NODE": "hub", "EDGEVM_METRICS_PORT": str(metrics_port),
           "EDGEVM_LOG_LEVEL": "WARNING"}
    gateway = subprocess.Popen([sys.executable, "-m", "edgevm.gateway"], env=env)
    metrics = f"http://127.0.0.1:{metrics_port}/metrics"

    async def applied_at_least(count: int) -> bool:
        try:
            samples = await asyncio.to_thread(scrape, metrics)
        except OSError:
            return False  # not serving metrics yet
        return samples.get('edgevm_gateway_events_total{result="applied"}', 0) + samples.get(
            'edgevm_gateway_events_total{result="skipped"}', 0) >= count

    conns = [await nats.connect(url) for _ in range(NODES)]
    nodes = [SimNode(name, nc) for name, nc in zip(names, conns, strict=True)]
    beats: list[asyncio.Task[None]] = []
    try:
        try:
            await until(lambda: _answers(admin, gateway), timeout=30)
        except (TimeoutError, RuntimeError) as exc:
            report(f"{topology}: the gateway at start", "not serving", "-", "-", "serving", False)
            print(f"  {exc}", flush=True)
            return
        beats = [asyncio.create_task(n.beat_forever(HEARTBEAT_INTERVAL * i / NODES)) for i, n in enumerate(nodes)]
        start = time.perf_counter()
        await asyncio.gather(*(n.create_all() for n in nodes))
        for i in range(BURST_EVENTS):
            await nodes[i % NODES].update(i // NODES)
        await asyncio.wait_for(asyncio.gather(*(n.settle() for n in nodes)), 120)
        published = time.perf_counter() - start
        stored = await stored_events(js, topology, names)
        lag = await until(lambda: applied_at_least(stored))
        events = NODES * VMS_PER_NODE + BURST_EVENTS
        report(f"live: {events:,} events published by {NODES} nodes", f"{events / published:,.0f}/s", "-", "-",
               "-", True)
        await check_ingest(admin, nodes, metrics, stored, "live")
        report("live: gateway caught up after the last ack", f"{lag * 1e3:.0f} ms", "-", "-", "-", True)
        before = await asyncio.to_thread(scrape, metrics)
        p99s = [await list_latency(admin, url, nodes) for _ in range(LIST_ROUNDS)]
        load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
        report(f"gw.vm.list p99 over {LIST_ROUNDS} rounds: median",
               f"{statistics.median(p99s) * 1e3:.1f} ms", f"{min(p99s) * 1e3:.0f}-{max(p99s) * 1e3:.0f} ms",
               "spread", "< 50 ms", statistics.median(p99s) < GOAL_P99)
        print(f"  machine load average (1 / 5 / 15 min): {load} on {os.cpu_count()} cores", flush=True)
        after = await asyncio.to_thread(scrape, metrics)
        key = 'edgevm_command_duration_seconds_%s{endpoint="gw.vm.list",service="edgevm-gateway"}'
        served = after.get(key % "sum", 0) - before.get(key % "sum", 0)
        count = after.get(key % "count", 0) - before.get(key % "count", 0)
        print(f"  gateway-side mean of gw.vm.list: {served / max(count, 1) * 1e3:.1f} ms over {count:.0f}")
        ups = await admin.request(subjects.gateway("node.list"), b"{}", timeout=10)
        states = [n["state"] for n in msgspec.json.decode(ups.data)["nodes"] if n["node"].startswith("node-")]
        report("nodes up (heartbeats every 10 s)", f"{states.count('up')}/{NODES}", "-", "-", f"{NODES}/{NODES}",
               states.count("up") == NODES)
        gw_rss, server_rss = rss_mib(gateway.pid), rss_mib(server_pid)
        report("hub RSS: gateway + nats-server", f"{gw_rss + server_rss:.0f} MiB",
               f"{gw_rss:.0f} + {server_rss:.0f} MiB", "-", "reported", True)

        # A restart: the new gateway replays the whole stream (the hub's case after its own downtime).
        gateway.terminate()
        gateway.wait(15)
        stored = await stored_events(js, topology, names)
        gateway = subprocess.Popen([sys.executable, "-m", "edgevm.gateway"], env=env)
        started = time.perf_counter()
        await until(lambda: applied_at_least(stored), step=0.01)
        replay = time.perf_counter() - started
        floor = await bare_read(url, stored)
        await check_ingest(admin, nodes, metrics, stored, "replay")
        report(f"replay: {stored:,} events at gateway start", f"{stored / replay:,.0f}/s", f"{stored / floor:,.0f}/s",
               f"{replay / floor:.2f}x bare", "-", True)
        report("RSS gateway after the replay", f"{rss_mib(gateway.pid):.0f} MiB", "-", "-", "reported", True)
    finally:
        # Cancel until done: Python 3.11's wait_for (inside nats-py's publish_async) can drop a cancellation.
        while not all(task.done() for task in beats):
            for task in beats:
                task.cancel()
            await asyncio.wait(beats, timeout=1)
        gateway.terminate()
        gateway.wait(15)
        for nc in conns:
            await nc.close()
        await admin.close()


async def _answers(nc: nats.NATS, gateway: subprocess.Popen[bytes]) -> bool:
    if gateway.poll() is not None:
        raise RuntimeError(f"the gateway exited with code {gateway.returncode} (its log above says why)")
    try:
        await nc.request(subjects.gateway("node.list"), b"{}", timeout=1)
        return True
    except Exception:
        return False


async def check_ingest(nc: nats.NATS, nodes: list[SimNode], metrics: str, stored: int, phase: str) -> None:
    samples = await asyncio.to_thread(scrape, metrics)
    applied = samples.get('edgevm_gateway_events_total{result="applied"}', 0)
    skipped = samples.get('edgevm_gateway_events_total{result="skipped"}', 0)
    reply = await nc.request(subjects.gateway("vm.list"), b"{}", timeout=10)
    seen = {(v["node"], v["spec"]["name"]): v["status"]["revision"] for v in msgspec.json.decode(reply.data)["vms"]}
    wanted = {(n.name, vm): rev for n in nodes for vm, rev in n.revisions.items()}
    wrong = sum(1 for key, rev in wanted.items() if seen.get(key) != rev)
    ok = skipped == 0 and applied >= stored and wrong == 0
    report(f"{phase}: applied / stored, VMs wrong", f"{applied:,.0f}/{stored:,}", f"{wrong} wrong",
           f"{skipped:.0f} skipped", "all, 0 wrong", ok)


async def list_latency(nc: nats.NATS, url: str, nodes: list[SimNode]) -> float:
    """gw.vm.list of the whole fleet while the nodes keep publishing, against a bare responder of the same bytes.

    Return the p99 of the whole fleet's list."""
    subject = subjects.gateway("vm.list")
    reply = (await nc.request(subject, b"{}", timeout=10)).data
    raw = await nats.connect(url)

    async def answer(msg: object) -> None:
        await msg.respond(reply)  # type: ignore[attr-defined]

    await raw.subscribe("bench.fleet.raw", cb=answer)
    await raw.flush()
    stop = asyncio.Event()

    async def keep_publishing() -> None:
        i = 0
        while not stop.is_set():
            await nodes[i % NODES].update(BURST_EVENTS + i)
            i += 1
            await asyncio.sleep(0.002)  # ~500 events/s beside the heartbeats

    load = asyncio.create_task(keep_publishing())
    await latencies(nc, subject, b"{}", 20)
    ours: list[float] = []
    bare: list[float] = []
    for _ in range(LIST_REQUESTS // 10):  # interleaved, so the machine's other load hits both alike
        ours += await latencies(nc, subject, b"{}", 10)
        bare += await latencies(nc, "bench.fleet.raw", b"{}", 10)
    ours.sort()
    bare.sort()
    one = await latencies(nc, subject, b'{"node":"node-007"}', LIST_REQUESTS)
    walks = [await walk_pages(nc, subject, PAGE) for _ in range(LIST_REQUESTS // 20)]
    stop.set()
    await load
    await asyncio.wait_for(asyncio.gather(*(n.settle() for n in nodes)), 120)
    await raw.close()
    size = len(reply) / (1 << 20)
    report(f"gw.vm.list {NODES * VMS_PER_NODE:,} VMs ({size:.1f} MiB) p50", f"{statistics.median(ours) * 1e3:.1f} ms",
           f"{statistics.median(bare) * 1e3:.1f} ms", f"{statistics.median(ours) / statistics.median(bare):.2f}x",
           "-", True)
    report(f"gw.vm.list {NODES * VMS_PER_NODE:,} VMs p99", f"{p99(ours) * 1e3:.1f} ms", f"{p99(bare) * 1e3:.1f} ms",
           f"{p99(ours) / p99(bare):.2f}x", "< 50 ms", p99(ours) < GOAL_P99)
    report(f"gw.vm.list {{node}} ({VMS_PER_NODE} VMs) p99", f"{p99(one) * 1e3:.1f} ms", "-", "-", "< 50 ms",
           p99(one) < GOAL_P99)
    walk = statistics.median(t for t, _ in walks)
    pages = -(-NODES * VMS_PER_NODE // PAGE)
    report(f"gw.vm.list walk, {pages} pages of {PAGE}: p50", f"{walk * 1e3:.1f} ms",
           f"{statistics.median(ours) * 1e3:.1f} ms", f"{walk / statistics.median(ours):.2f}x whole", "every VM once",
           all(n == NODES * VMS_PER_NODE for _, n in walks))
    return p99(ours)


class PageHead(msgspec.Struct):
    """What a walk reads of a page: the VMs left raw (the unpaged baseline decodes nothing), and `next`."""

    vms: list[msgspec.Raw]
    next: str | None


async def walk_pages(nc: nats.NATS, subject: str, limit: int) -> tuple[float, int]:
    """Seconds to read the whole fleet page by page (`limit`, `after` = the `next` before), and the VMs read."""
    start = time.perf_counter()
    after = None
    count = 0
    while True:
        body = _encoder.encode({"limit": limit, **({"after": after} if after is not None else {})})
        page = msgspec.json.decode((await nc.request(subject, body, timeout=10)).data, type=PageHead)
        count += len(page.vms)
        after = page.next
        if after is None:
            return time.perf_counter() - start, count


async def main() -> None:
    for topology in os.environ.get("BENCH_FLEET_TOPOLOGIES", "single,sourced").split(","):
        store = Path(tempfile.mkdtemp(prefix="edgevm-bench-fleet-"))
        server = start_nats_server(store, port=free_port())
        try:
            await run(server.url, server.process.pid, topology)
        finally:
            server.stop()
            shutil.rmtree(store, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
