"""The snapshotter service assembled: libvirt, the work queue, the workers and the snapshot commands."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable

from prometheus_client import REGISTRY

from edgevm.shared import bus
from edgevm.shared.layout import Layout
from edgevm.shared.libvirt.connection import HypervisorConnection
from edgevm.shared.libvirt.snapshots import Snapshots
from edgevm.shared.locks import VmLocks
from edgevm.shared.metrics import SCRAPE_TIMEOUT, on_loop
from edgevm.shared.qemuimg import QemuImg
from edgevm.shared.records import VmRecordReader
from edgevm.shared.runtime import ServiceContext
from edgevm.shared.tasks import TaskStore
from edgevm.snapshotter.commands import SnapshotCommands
from edgevm.snapshotter.dedupe import RequestIds, open_bucket
from edgevm.snapshotter.drivers.domains import Domains
from edgevm.snapshotter.layers import VmFiles
from edgevm.snapshotter.leases import TaskLeases
from edgevm.snapshotter.metrics import SnapshotCollector, count_snapshots, snapshot_use
from edgevm.snapshotter.operations import SnapshotOperations
from edgevm.snapshotter.worker import Workers
from edgevm.snapshotter.workqueue import WorkQueue

log = logging.getLogger(__name__)
DEFAULT_WORKERS = 2
MAX_WORKERS = 64
QEMU_IMG_TIMEOUT = 600.0  # a rebase copies a whole layer


def workers_from_env(env: dict[str, str] | None = None) -> int:
    """EDGEVM_SNAPSHOT_WORKERS: how many tasks run at once (0: this process only takes commands)."""
    raw = (os.environ if env is None else env).get("EDGEVM_SNAPSHOT_WORKERS", "").strip()
    if not raw:
        return DEFAULT_WORKERS
    if not raw.isdecimal() or int(raw) > MAX_WORKERS:
        raise ValueError(f"EDGEVM_SNAPSHOT_WORKERS must be a whole number from 0 to {MAX_WORKERS}, not {raw!r}")
    return int(raw)


def make_setup(workers: int | None = None) -> Callable[[ServiceContext], Awaitable[None]]:
    """The service's set-up with `workers` concurrent tasks (EDGEVM_SNAPSHOT_WORKERS; 0: commands only)."""

    async def setup(ctx: ServiceContext) -> None:
        count = workers if workers is not None else workers_from_env()
        config = ctx.config
        node = config.node

        hypervisor = HypervisorConnection(config.libvirt_uri)  # no events: the lifecycle's, if any
        await hypervisor.open()
        ctx.stack.push_async_callback(hypervisor.close)
        layout = Layout.of(config.state_dir)
        operations = SnapshotOperations(
            Snapshots(hypervisor), Domains(hypervisor), QemuImg(timeout=QEMU_IMG_TIMEOUT),
            lambda vm: VmFiles(layout.vm_dir(vm)),  # VmFiles resolves links: one name per file
        )
        store = TaskStore(ctx.buckets[bus.TASKS.name], ctx.publisher, node)
        leases = TaskLeases(VmLocks(ctx.buckets[bus.LOCKS.name], node, "snapshotter"))
        ctx.stack.push_async_callback(leases.release_all)
        records = VmRecordReader(ctx.buckets[bus.VMS.name], node)
        queue = WorkQueue(ctx.js, node)
        request_ids = RequestIds(await open_bucket(ctx.js), node)
        commands = SnapshotCommands(records, operations, store, leases, queue, request_ids)

        if count > 0:
            await queue.subscribe()
            ctx.stack.push_async_callback(queue.close)
            pool = Workers(queue, store, leases, records, operations, concurrency=count)
            # Shutdown: the fetch loop stops first (background tasks), then the running tasks drain.
            ctx.stack.push_async_callback(pool.drain)
            ctx.background(pool.run(), "snapshot workers")
        log.info("snapshotter on %s: %d worker(s)", config.libvirt_uri, count)
        register_snapshot_metrics(ctx, hypervisor)

        await ctx.command("snapshot.list", commands.list)
        for verb, handler in [
            ("snapshot.create", commands.create),
            ("snapshot.restore", commands.restore),
            ("snapshot.delete", commands.delete),
        ]:
            await ctx.command(verb, handler)

    return setup


def register_snapshot_metrics(ctx: ServiceContext, hypervisor: HypervisorConnection) -> None:
    """Export the snapshots per VM and their disk use, counted at scrape time, for the life of the service."""
    counts = on_loop(lambda: hypervisor.call(count_snapshots, timeout=SCRAPE_TIMEOUT), asyncio.get_running_loop())
    collector = SnapshotCollector(lambda: snapshot_use(counts(), ctx.config.state_dir), ctx.config.node)
    try:
        REGISTRY.register(collector)
    except ValueError:  # only where tests run two snapshotter services in one process at once
        log.warning("snapshot metrics not exported: another snapshotter service of this process exports them")
        return
    ctx.stack.callback(REGISTRY.unregister, collector)


setup = make_setup()
