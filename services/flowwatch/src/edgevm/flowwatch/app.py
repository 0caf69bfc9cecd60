"""The flowwatch service assembled: netplumb's records followed, namespaces watched, flow.* served."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from prometheus_client import REGISTRY

from edgevm.flowwatch.collector import ActiveFlowsCollector
from edgevm.flowwatch.drivers.cutting import KernelCutting
from edgevm.flowwatch.history import FlowHistory
from edgevm.flowwatch.nodeflows import NodeFlows
from edgevm.flowwatch.outbox import Outbox
from edgevm.shared import bus
from edgevm.shared.runtime import ServiceContext, Setup

log = logging.getLogger(__name__)
READY_TIMEOUT = 10.0


def make_setup(node_netns: str | None = None) -> Setup:
    """The set-up of a flowwatch whose node namespace is `node_netns` (None: the process's own)."""

    async def setup(ctx: ServiceContext) -> None:
        node = ctx.config.node
        outbox = Outbox(ctx.nc, node)
        watch = NodeFlows(
            node, FlowHistory(ctx.js, node), outbox, KernelCutting(), node_netns=node_netns,
            state_dir=ctx.config.service_dir("flowwatch"),
        )
        collector = ActiveFlowsCollector(watch.active_counts, asyncio.get_running_loop())
        REGISTRY.register(collector)
        ctx.stack.callback(REGISTRY.unregister, collector)
        ctx.background(outbox.run(), "flow outbox")
        ctx.background(_watch_for_life(watch, ctx), "netplumb records")
        # Serve once the tables are rebuilt from the kernel (bounded: a namespace that is not there yet
        # must not hold the service up).
        with contextlib.suppress(TimeoutError):
            await watch.ready(READY_TIMEOUT)
        await ctx.command("flow.list", watch.list_flows)
        # the steps of a termination have deadlines of their own that add up to less (see terminate.py)
        await ctx.command("flow.terminate", watch.terminate, deadline=5.0)

    return setup


async def _watch_for_life(watch: NodeFlows, ctx: ServiceContext) -> None:
    try:
        await watch.follow_records(ctx.buckets[bus.NET.name])
    finally:
        await watch.stop()


setup = make_setup()
