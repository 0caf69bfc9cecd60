"""Benchmark of the per-VM metrics: a scrape of the lifecycle service with 1,000 defined VMs (test driver).

Run as root: `.venv/bin/python tests/bench/bench_vm_metrics.py` (`make bench` runs it). Starts its own
nats-server and a lifecycle service in this process on libvirt's `test:///default` (shared by the
connections of this process, so the bench's own connection sees the service's domains). The raw baseline,
measured in the same run: libvirt's bulk stats call (`getAllDomainStats` with the groups the collector asks
for) on that driver. The scrape is an HTTP GET of the service's /metrics as Prometheus 2.42 sends it
(gzip accepted; one connection kept alive), from a process of its own, each one past the collector's cache,
so each reads libvirt anew. Its two parts are timed apart: the per-VM text (the bulk read and its
rendering) and the service's other metrics (the registry, rendered by edgevm.shared.textformat).
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import libvirt
import nats
from prometheus_client import REGISTRY, generate_latest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.helpers import eventually

from edgevm.cli.natsserver import free_port, start_nats_server
from edgevm.lifecycle.app import setup
from edgevm.lifecycle.vmmetrics import STATS_GROUPS, VmMetrics, free_in_background, read_bulk_stats
from edgevm.shared import textformat
from edgevm.shared.client import Client
from edgevm.shared.commands import TaskReply
from edgevm.shared.config import Config
from edgevm.shared.libvirt.connection import HypervisorConnection
from edgevm.shared.runtime import serve

VMS = 1000
ROUNDS = 16
CACHE_AGE = 1.0  # the collector's max_age: scrapes are spaced past it
GOAL_RATIO = 1.5


def report(name: str, value: str, baseline: str, ratio: str, goal: str, ok: bool) -> None:
    print(f"{name:<44} {value:>14}  baseline {baseline:>14}  {ratio:>12}  goal {goal:<14} {'ok' if ok else 'MISSED'}",
          flush=True)


def _timed(function: Callable[[], object]) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


class Scraper:
    """A process of its own that GETs /metrics on request as Prometheus 2.42 does: its headers (gzip accepted)
    on one HTTP/1.1 connection kept alive from scrape to scrape (as Prometheus keeps it; seen with Debian's)."""

    SCRIPT = (
        "import http.client,sys,time\n"
        "headers={'User-Agent':'Prometheus/2.42.0','Accept-Encoding':'gzip','X-Prometheus-Scrape-Timeout-Seconds':'10',"
        "'Accept':'application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
        "text/plain;version=0.0.4;q=0.5,*/*;q=0.1'}\n"
        "host,port=sys.argv[1],int(sys.argv[2])\n"
        "conn=http.client.HTTPConnection(host,port,timeout=30)\n"
        "for path in sys.stdin:\n"
        " started=time.perf_counter()\n"
        " conn.request('GET',path.strip(),headers=headers)\n"
        " body=conn.getresponse().read()\n"
        " print(time.perf_counter()-started,len(body),flush=True)\n"
    )

    def __init__(self, host: str, port: int) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", self.SCRIPT, host, str(port)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)

    def get(self, path: str) -> tuple[float, int]:
        """One GET: (seconds, body bytes)."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(path + "\n")
        self.process.stdin.flush()
        took, size = self.process.stdout.readline().split()
        return float(took), int(size)

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(10)


async def define_vms(client: Client, count: int) -> None:
    reply = await client.call("image.import", {"name": "base", "path": "base.qcow2"}, TaskReply)
    while (await client.call("task.get", {"id": reply.task.id}))["status"] != "succeeded":
        await asyncio.sleep(0.05)
    for start in range(0, count, 50):
        await asyncio.gather(*(client.call("vm.create", {"name": f"m{i:04d}", "image": "base"})
                               for i in range(start, min(start + 50, count))))


async def main() -> None:
    store = Path(tempfile.mkdtemp(prefix="edgevm-bench-nats-"))
    server = start_nats_server(store, port=free_port())
    state = Path(tempfile.mkdtemp(prefix="edgevm-bench-", dir="/var/tmp"))
    os.chmod(state, 0o755)
    (state / "import").mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(state / "import" / "base.qcow2"), "64M"],
                   check=True)
    node, port = f"m{uuid.uuid4().hex[:6]}", free_port()
    config = Config(node, server.url, state, "test:///default", "127.0.0.1", 0, port, "WARNING", network="none")
    stop = asyncio.Event()
    task = asyncio.create_task(serve("lifecycle", setup, config, stop))
    nc = await nats.connect(server.url)
    conn = libvirt.open("test:///default")
    try:
        client = Client(nc, node, timeout=30)
        await eventually(lambda: client.call("vm.list"), timeout=30, what="lifecycle answers")
        await define_vms(client, VMS)
        # The per-VM text alone, read the way the service reads it (a libvirt connection of its own kind,
        # on this event loop), to tell it from the rest of the lifecycle's metrics.
        connection = HypervisorConnection("test:///default")
        await connection.open()
        read = functools.partial(connection.call_here, functools.partial(read_bulk_stats, dispose=free_in_background))
        vm_text = VmMetrics(read, node, 1, 1, max_age=0).exposition
        scraper = Scraper("127.0.0.1", port)
        await asyncio.to_thread(scraper.get, "/metrics")  # connects, as Prometheus's first scrape does
        samples: dict[str, list[float]] = {"raw": [], "scrape": [], "vms": [], "registry": [], "generate_latest": []}
        # Each measure after the same pause (past the cache's age): a call after an idle second is slower
        # than one right after another, whichever it is.
        for _ in range(ROUNDS):
            await asyncio.sleep(CACHE_AGE)
            samples["raw"].append(await asyncio.to_thread(_timed, lambda: conn.getAllDomainStats(STATS_GROUPS)))
            await asyncio.sleep(CACHE_AGE)
            took, size = await asyncio.to_thread(scraper.get, "/metrics")
            samples["scrape"].append(took)
            await asyncio.sleep(CACHE_AGE)
            samples["vms"].append(await asyncio.to_thread(_timed, vm_text))
            await asyncio.sleep(CACHE_AGE)
            samples["registry"].append(await asyncio.to_thread(_timed, lambda: textformat.render(REGISTRY)))
            await asyncio.sleep(CACHE_AGE)
            samples["generate_latest"].append(await asyncio.to_thread(_timed, lambda: generate_latest(REGISTRY)))
        await connection.close()
        scraper.close()
        stats = conn.getAllDomainStats(STATS_GROUPS)
        assert sum(1 for domain, _ in stats if domain.name().startswith("edgevm-m")) == VMS
        raw, scraped, vms, registry = (statistics.median(samples[k]) for k in ("raw", "scrape", "vms", "registry"))
        report(f"scrape of lifecycle, {VMS} VMs (median)", f"{scraped * 1e3:.1f} ms", f"{raw * 1e3:.1f} ms",
               f"{scraped / raw:.2f}x", f"<= {GOAL_RATIO}x", scraped / raw <= GOAL_RATIO)
        report("  its per-VM text (bulk read + rendering)", f"{vms * 1e3:.1f} ms", f"{raw * 1e3:.1f} ms",
               f"{vms / raw:.2f}x", f"<= {GOAL_RATIO}x", vms / raw <= GOAL_RATIO)
        print(f"  its other metrics (the registry): {registry * 1e3:.1f} ms (prometheus_client's generate_latest: "
              f"{statistics.median(samples['generate_latest']) * 1e3:.1f} ms); body {size} bytes (loopback: not "
              f"gzipped); the raw call returns {len(stats)} domains", flush=True)
        # The machine is shared: each figure's spread, and the ratio of the quickest of each.
        for name in ("raw", "scrape", "vms", "registry"):
            print(f"  spread of {name:<9} min {min(samples[name]) * 1e3:6.1f}  median {statistics.median(samples[name]) * 1e3:6.1f}"
                  f"  max {max(samples[name]) * 1e3:6.1f} ms", flush=True)
        print(f"  quickest scrape / quickest raw call: {min(samples['scrape']) / min(samples['raw']):.2f}x", flush=True)
    finally:
        conn.close()
        stop.set()
        await task
        await nc.close()
        server.stop()
        shutil.rmtree(state, ignore_errors=True)
        shutil.rmtree(store, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
