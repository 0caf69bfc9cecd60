"""Benchmark of the snapshotter: task pick-up latency and an internal snapshot through the service.

Run as root: `.venv/bin/python tests/bench/bench_snapshotter.py`. Starts its own nats-server, a lifecycle
and a snapshotter service in this process. Raw baselines are measured in the same run:
- queued -> running with an idle worker, against a bare JetStream work-queue publish -> pull fetch;
- an internal snapshot (with memory) of a running BIOS test guest on qemu:///system through the service
  (request to the `succeeded` event), against libvirt's snapshotCreateXML on the same guest.
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
import uuid
from pathlib import Path

import libvirt
import msgspec
import nats
from nats.js.api import RetentionPolicy, StorageType, StreamConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from edgevm.cli.natsserver import free_port, start_nats_server
from edgevm.lifecycle.app import setup as lifecycle_setup
from edgevm.shared import subjects
from edgevm.shared.client import Client
from edgevm.shared.config import Config
from edgevm.shared.errors import RemoteError
from edgevm.shared.events import TaskUpdated, decode_event
from edgevm.shared.runtime import serve
from edgevm.snapshotter.app import make_setup

ROUNDS_LATENCY = 60
ROUNDS_SNAPSHOT = 5
GOAL_LATENCY = 0.050
GOAL_RATIO = 1.2


def report(name: str, value: str, baseline: str, ratio: str, goal: str, ok: bool) -> None:
    print(f"{name:<44} {value:>14}  baseline {baseline:>14}  {ratio:>12}  goal {goal:<14} {'ok' if ok else 'MISSED'}",
          flush=True)


class Node:
    """A lifecycle and a snapshotter of one node in this process."""

    def __init__(self, url: str, uri: str) -> None:
        self.state = Path(tempfile.mkdtemp(prefix="edgevm-bench-snap-", dir="/var/tmp"))
        os.chmod(self.state, 0o755)
        self.config = Config(f"b{uuid.uuid4().hex[:6]}", url, self.state, uri, "127.0.0.1", 0, 0, "WARNING",
                             network="none")
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.times: dict[tuple[str, str], float] = {}

    async def start(self, nc: nats.NATS) -> Client:
        self.tasks.append(asyncio.create_task(serve("lifecycle", lifecycle_setup, self.config, self.stop)))
        self.tasks.append(asyncio.create_task(serve("snapshotter", make_setup(1), self.config, self.stop)))
        client = Client(nc, self.config.node, timeout=30)

        async def on_event(msg: nats.aio.msg.Msg) -> None:
            event = decode_event(msg.data)
            if isinstance(event, TaskUpdated):
                self.times.setdefault((event.task.id, event.task.status), time.perf_counter())

        await nc.subscribe(subjects.event(self.config.node, "task.>"), cb=on_event)
        for _ in range(300):
            try:
                await client.call("vm.list")
                await client.call("snapshot.list", {"vm": "none"})
            except RemoteError as error:
                if error.code == "404":  # both answer
                    break
            except Exception:
                pass
            await asyncio.sleep(0.1)
        return client

    async def finished(self, task_id: str, timeout: float = 300) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for status in ("succeeded", "failed"):
                if (task_id, status) in self.times:
                    assert status == "succeeded", f"task {task_id} failed"
                    return self.times[(task_id, status)]
            await asyncio.sleep(0.001)
        raise TimeoutError(task_id)

    async def close(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        shutil.rmtree(self.state, ignore_errors=True)


async def import_image(client: Client, node: Node, name: str, source: Path | None) -> None:
    (node.state / "import").mkdir(exist_ok=True)
    target = node.state / "import" / f"{name}.qcow2"
    if source is None:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(target), "64M"], check=True)
    else:
        shutil.copyfile(source, target)
    reply = await client.call("image.import", {"name": name, "path": target.name})
    while (await client.call("task.get", {"id": reply["task"]["id"]}))["status"] not in ("succeeded", "failed"):
        await asyncio.sleep(0.05)


async def wait_task(client: Client, reply: dict) -> None:
    while True:
        task = await client.call("task.get", {"id": reply["task"]["id"]})
        if task["status"] in ("succeeded", "failed"):
            assert task["status"] == "succeeded", task
            return
        await asyncio.sleep(0.01)


async def bench_pickup(url: str) -> None:
    nc = await nats.connect(url)
    node = Node(url, "test:///default")
    try:
        client = await node.start(nc)
        await import_image(client, node, "base", None)
        await client.call("vm.create", {"name": "pick", "image": "base", "memory": "64MB"})
        latencies = []
        for i in range(ROUNDS_LATENCY):
            reply = await client.call("snapshot.create", {"vm": "pick", "name": f"p{i}"})
            task_id = reply["task"]["id"]
            await node.finished(task_id)
            latencies.append(node.times[(task_id, "running")] - node.times[(task_id, "queued")])
            await wait_task(client, await client.call("snapshot.delete", {"vm": "pick", "name": f"p{i}"}))
        ours = statistics.median(latencies)
        p95 = sorted(latencies)[int(0.95 * len(latencies)) - 1]
    finally:
        await node.close()

    # Baseline: a bare work-queue stream, a publish, and an idle pull consumer's fetch returning it.
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="BENCH_SNAP_WORK", subjects=["bench.snapwork"],
                                     retention=RetentionPolicy.WORK_QUEUE, storage=StorageType.FILE))
    sub = await js.pull_subscribe("bench.snapwork", durable="bench", stream="BENCH_SNAP_WORK")
    raw = []
    for _ in range(ROUNDS_LATENCY):
        fetch = asyncio.create_task(sub.fetch(1, timeout=5))
        await asyncio.sleep(0.005)  # the fetch waits, as an idle worker's does
        start = time.perf_counter()
        await js.publish("bench.snapwork", msgspec.json.encode({"n": 1}))
        msgs = await fetch
        raw.append(time.perf_counter() - start)
        await msgs[0].ack()
    await js.delete_stream("BENCH_SNAP_WORK")
    await nc.close()
    base = statistics.median(raw)
    report("snapshot task queued -> running (p50)", f"{ours * 1e3:.1f} ms", f"{base * 1e3:.2f} ms",
           f"{ours / base:.1f}x", "p50 <= 50 ms", ours <= GOAL_LATENCY)
    print(f"    (p95 {p95 * 1e3:.1f} ms over {ROUNDS_LATENCY} tasks; baseline: JetStream publish -> waiting fetch)")


async def bench_internal_snapshot(url: str) -> None:
    from tests.guest.build import build_images, default_cache_dir

    images = build_images(default_cache_dir())
    nc = await nats.connect(url)
    node = Node(url, "qemu:///system")
    conn = libvirt.open("qemu:///system")
    try:
        client = await node.start(nc)
        await import_image(client, node, "guest-bios", images.bios)
        await client.call("vm.create", {"name": "bench-snap", "image": "guest-bios", "memory": "256MB"})
        await wait_task(client, await client.call("vm.start", {"name": "bench-snap"}))
        log = node.state / "lifecycle" / "vms" / "bench-snap" / "console.log"
        for _ in range(600):
            if log.exists() and b"EDGEVM-GUEST: ready" in log.read_bytes():
                break
            await asyncio.sleep(0.2)
        domain = conn.lookupByName("edgevm-bench-snap")
        ours, raw = [], []
        for i in range(ROUNDS_SNAPSHOT):
            start = time.perf_counter()
            reply = await client.call("snapshot.create", {"vm": "bench-snap", "name": f"svc{i}"})
            ours.append(await node.finished(reply["task"]["id"]) - start)
            await wait_task(client, await client.call("snapshot.delete", {"vm": "bench-snap", "name": f"svc{i}"}))

            start = time.perf_counter()
            snap = await asyncio.to_thread(
                domain.snapshotCreateXML, f"<domainsnapshot><name>raw{i}</name></domainsnapshot>", 0)
            raw.append(time.perf_counter() - start)
            await asyncio.to_thread(snap.delete, 0)
        await wait_task(client, await client.call("vm.delete", {"name": "bench-snap"}))
    finally:
        conn.close()
        await node.close()
        await nc.close()
    a, r = statistics.median(ours), statistics.median(raw)
    report("internal snapshot with memory (median)", f"{a:.2f} s", f"{r:.2f} s", f"{a / r:.2f}x",
           f"<= {GOAL_RATIO}x", a / r <= GOAL_RATIO)
    print(f"    (BIOS test guest, 256 MB, TCG; service: request -> succeeded event; raw: snapshotCreateXML;"
          f" {ROUNDS_SNAPSHOT} rounds interleaved)")


async def main() -> None:
    store = Path(tempfile.mkdtemp(prefix="edgevm-bench-nats-"))
    server = start_nats_server(store, port=free_port())
    try:
        await bench_pickup(server.url)
        await bench_internal_snapshot(server.url)
    finally:
        server.stop()
        shutil.rmtree(store, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
