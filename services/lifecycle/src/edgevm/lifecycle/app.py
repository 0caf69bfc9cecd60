"""The lifecycle service assembled: stores, libvirt, tasks and every command it serves."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from pathlib import Path

from edgevm.lifecycle.drivers.host import detect_domain_type, guest_user
from edgevm.lifecycle.images import ImageService
from edgevm.lifecycle.imagestore import ImageStore
from edgevm.lifecycle.intents import KeptRequests
from edgevm.lifecycle.network import NetplumbNetwork, NoNetwork, VmNetwork
from edgevm.lifecycle.paths import default_import_roots
from edgevm.lifecycle.planner import Planner
from edgevm.lifecycle.reach import make_reachable
from edgevm.lifecycle.records import VmRecords
from edgevm.lifecycle.resume import Resumer, Resumption
from edgevm.lifecycle.taskcommands import TaskCommands
from edgevm.lifecycle.taskindex import TaskIndex
from edgevm.lifecycle.vmmetrics import VmMetrics, free_in_background, read_bulk_stats
from edgevm.lifecycle.vms import VmService
from edgevm.shared import bus
from edgevm.shared.client import Client
from edgevm.shared.heartbeat import host_memory_bytes
from edgevm.shared.layout import Layout
from edgevm.shared.libvirt.connection import HypervisorConnection
from edgevm.shared.libvirt.events import LifecycleEvents
from edgevm.shared.libvirt.plan import DomainType
from edgevm.shared.locks import VmLocks, process_instance
from edgevm.shared.metrics import EXPOSITION
from edgevm.shared.objects import Task
from edgevm.shared.runtime import ServiceContext
from edgevm.shared.taskrunner import TaskRunner
from edgevm.shared.tasks import TaskStore

log = logging.getLogger(__name__)
NET_TIMEOUT = 10.0  # netplumb's activate may wait behind one of its reconciles
RECOVERY_WAIT = 10.0


def import_roots(state_dir: Path) -> list[Path]:
    """Return where image.import may read: `<state>/import` plus EDGEVM_IMPORT_DIRS (colon-separated)."""
    roots = default_import_roots(state_dir)
    extra = os.environ.get("EDGEVM_IMPORT_DIRS", "")
    roots += [Path(p) for p in extra.split(":") if p]
    return roots


async def open_hypervisor(ctx: ServiceContext) -> tuple[HypervisorConnection, DomainType]:
    """Connect to libvirt (with its events: they drive VM states) and probe the domain type of guests."""
    uri = ctx.config.libvirt_uri
    connection = HypervisorConnection(uri, events=True)
    await connection.open()
    ctx.stack.push_async_callback(connection.close)
    domain_type: DomainType = await detect_domain_type(connection) if uri.startswith("qemu") else "qemu"
    log.info("libvirt %s: guests run as domain type %s", uri, domain_type)
    return connection, domain_type


async def setup(ctx: ServiceContext) -> None:
    """Wire the lifecycle service into `ctx` and start its background work."""
    config = ctx.config
    node = config.node
    layout = Layout(config.service_dir("lifecycle"))
    layout.ensure()
    roots = import_roots(config.state_dir)
    for root in roots[:1]:
        root.mkdir(parents=True, exist_ok=True)

    connection, domain_type = await open_hypervisor(ctx)
    guest = await guest_user(connection, domain_type) if config.libvirt_uri.startswith("qemu") else None
    if guest is not None:
        make_reachable(config.state_dir, *guest)  # or StateDirUnreachable, naming the directory and the fix

    store = TaskStore(ctx.buckets[bus.TASKS.name], ctx.publisher, node)
    index = TaskIndex(ctx.buckets[bus.TASKS.name], node)
    locks = VmLocks(ctx.buckets[bus.LOCKS.name], node, "lifecycle", ctx.js)
    holder = process_instance()
    requests = KeptRequests(layout.root / "requests")  # what a cut task's resume needs (see resume.py)

    def written(task: Task) -> None:
        index.put(task)
        requests.ended(task)  # a task's request goes with the write of its end

    runner = TaskRunner(store, locks, "lifecycle", holder=holder, on_write=written)
    ctx.stack.push_async_callback(runner.drain)
    records = VmRecords(ctx.buckets[bus.VMS.name], node)
    await records.load()
    image_store = ImageStore(layout.images)
    image_store.remove_partials()
    vms: VmService
    images = ImageService(ctx.buckets[bus.IMAGES.name], node, image_store, runner, roots,
                          lambda name: vms.users_of_image(name), requests)
    await images.load()
    network: VmNetwork = NoNetwork() if config.network == "none" else NetplumbNetwork(Client(ctx.nc, node, NET_TIMEOUT))
    log.info("VM networks: %s", "none (EDGEVM_NETWORK=none)" if config.network == "none" else "from netplumb")
    vms = VmService(node, records, images, connection, Planner(layout, node, domain_type), runner, locks,
                    ctx.publisher, os.cpu_count() or 1, host_memory_bytes(), network=network)
    ctx.stack.push_async_callback(vms.reconciler.close)
    register_vm_metrics(ctx, connection, vms)
    tasks = TaskCommands(index, store, node)

    ctx.background(index.follow(), "task index")
    await asyncio.wait_for(index.ready.wait(), 30)
    # Events first, then the look at every domain: a change between the two is not missed.
    events = await ctx.stack.enter_async_context(LifecycleEvents(connection))
    await vms.reconciler.reconcile()
    # Tasks the last restart cut go on from libvirt's real state, under their leases taken over now.
    resumer = Resumer(index, store, locks, runner, vms, holder)
    resumptions = await resumer.take_over_all()
    ctx.background(vms.reconciler.follow(events), "libvirt events")
    # Lost domains and auto starts need netplumb, which may come up after us: wait a little for it, then
    # serve anyway and let the recovery finish in the background.
    recovery = ctx.background(recover(ctx, vms, resumer, resumptions), "recovery after start-up")
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(recovery), RECOVERY_WAIT)

    await serve_commands(ctx, images, vms, tasks)


async def recover(ctx: ServiceContext, vms: VmService, resumer: Resumer, resumptions: list[Resumption]) -> None:
    """Once netplumb answers: define lost domains, start auto_start VMs, remove what cut creates left, then
    resume the cut tasks (their domains are all defined by then)."""
    try:
        await vms.reconciler.recover()
        swept = await vms.sweep_cut_creates()
        if swept:
            log.warning("removed what %d create(s) cut by the last restart left: %s", len(swept), ", ".join(swept))
    except asyncio.CancelledError:
        for taken in resumptions:  # a shutdown came first: the next process takes them over
            await taken.abandon()
        raise
    except Exception:
        log.exception("the recovery after start-up failed; resuming the cut tasks anyway")
    for taken in resumptions:
        ctx.background(resumer.run(taken), f"resumed task {taken.task.id}")


async def serve_commands(ctx: ServiceContext, images: ImageService, vms: VmService, tasks: TaskCommands) -> None:
    """Serve the lifecycle's commands."""
    # Reads answer from memory, inline; the rest may wait on libvirt, JetStream or a disk.
    for verb, handler in [
        ("image.list", images.list),
        ("image.get", images.get),
        ("vm.get", vms.get),
        ("vm.list", vms.list),
        ("task.list", tasks.list),
    ]:
        await ctx.command(verb, handler, inline=True)
    for verb, handler in [
        ("image.import", images.import_image),
        ("image.delete", images.delete),
        ("vm.create", vms.create),
        ("vm.update", vms.update),
        ("vm.start", vms.start),
        ("vm.stop", vms.stop),
        ("vm.restart", vms.restart),
        ("vm.delete", vms.delete),
        ("task.get", tasks.get),
        ("task.cancel", tasks.cancel),
    ]:
        await ctx.command(verb, handler)


def register_vm_metrics(ctx: ServiceContext, connection: HypervisorConnection, vms: VmService) -> None:
    """Serve the per-VM metrics from one bulk stats call per scrape, for the life of the service."""
    read = functools.partial(connection.call_here, functools.partial(read_bulk_stats, dispose=free_in_background))
    vm_metrics = VmMetrics(read, ctx.config.node, vms.builder.host_cpus, vms.builder.host_memory)
    EXPOSITION.add(vm_metrics.exposition)
    ctx.stack.callback(EXPOSITION.remove, vm_metrics.exposition)

