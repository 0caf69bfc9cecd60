"""The netplumb service assembled: records, the kernel plumber, reconcile, and every command it serves."""

from __future__ import annotations

import logging

from edgevm.netplumb.converge import Plumber
from edgevm.netplumb.nodenet import NodeNetwork
from edgevm.netplumb.reconcile import ReconcileCommand, reconcile, reconcile_forever
from edgevm.netplumb.records import NetRecords
from edgevm.netplumb.settings import Settings
from edgevm.netplumb.vms import VmNetCommands
from edgevm.netplumb.vmwatch import follow_vms
from edgevm.netplumb.vnets import VnetCommands
from edgevm.netplumb.vrfs import VrfCommands
from edgevm.shared import bus
from edgevm.shared.runtime import ServiceContext, Setup

log = logging.getLogger(__name__)
KERNEL_DEADLINE = 10.0  # commands that change the kernel, and may wait behind a reconcile


def make_setup(settings: Settings | None = None) -> Setup:
    """The set-up of a netplumb service; `settings` default to the environment's."""

    async def setup(ctx: ServiceContext) -> None:
        own = settings or Settings.from_env()
        node = ctx.config.node
        records = NetRecords(ctx.buckets[bus.NET.name], node)
        await records.load()
        net = NodeNetwork(node, records, Plumber(own.node_netns, own.netns_prefix), own, ctx.publisher)
        ctx.stack.push_async_callback(net.close)
        vrfs, vnets, vms = VrfCommands(net), VnetCommands(net), VmNetCommands(net)
        await vrfs.ensure_default()
        done = await reconcile(net)
        log.info("start-up reconcile: %d change(s), %d failure(s)", len(done.changes), len(done.failures))

        for verb, handler in [
            ("net.vrf.list", vrfs.list),
            ("net.vnet.list", vnets.list),
            ("net.status", vms.status),
        ]:
            await ctx.command(verb, handler, inline=True)
        # Every change waits its turn behind the one under way (a reconcile, a VRF being made): all get the
        # deadline of kernel work, not the default that would answer 503 while the change still happens.
        for verb, handler in [
            ("net.vrf.create", vrfs.create),
            ("net.vrf.delete", vrfs.delete),
            ("net.vnet.create", vnets.create),
            ("net.vnet.delete", vnets.delete),
            ("net.vm.prepare", vms.prepare),
            ("net.vm.activate", vms.activate),
            ("net.vm.deactivate", vms.deactivate),
            ("net.vm.release", vms.release),
            ("net.reconcile", ReconcileCommand(net).reconcile),
        ]:
            await ctx.command(verb, handler, deadline=KERNEL_DEADLINE)

        ctx.background(follow_vms(ctx.buckets[bus.VMS.name], node, vms, records.vms.get), "VM states")
        if own.reconcile_interval > 0:
            ctx.background(reconcile_forever(net, own.reconcile_interval), "reconcile")

    return setup


setup = make_setup()
