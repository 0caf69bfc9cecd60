"""edgevm-gateway: the fleet read model over every node's events."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping

from prometheus_client import REGISTRY

from edgevm.gateway.handlers import GatewayHandlers
from edgevm.gateway.ingest import follow_events
from edgevm.gateway.metrics import FleetCollector
from edgevm.gateway.model import NODE_TIMEOUT, FleetModel
from edgevm.shared import subjects
from edgevm.shared.runtime import ServiceContext
from edgevm.shared.runtime import main as run


async def setup(ctx: ServiceContext, timeout: float = NODE_TIMEOUT) -> None:
    """Build the model, follow the event stream and serve `edgevm.gw.*`."""
    model = FleetModel(timeout=timeout)
    collector = FleetCollector(model, asyncio.get_running_loop())
    REGISTRY.register(collector)
    ctx.stack.callback(REGISTRY.unregister, collector)
    subscription = await follow_events(ctx.js, model)
    ctx.stack.push_async_callback(subscription.unsubscribe)  # type: ignore[attr-defined]
    handlers = GatewayHandlers(model)
    for verb, handler in [
        ("node.list", handlers.node_list),
        ("vm.list", handlers.vm_list),
        ("task.list", handlers.task_list),
        ("flow.list", handlers.flow_list),
    ]:
        await ctx.commands.add(subjects.gateway(verb), handler, verb=f"gw.{verb}", inline=True)


def node_timeout(env: Mapping[str, str]) -> float:
    """Return EDGEVM_GW_NODE_TIMEOUT: seconds without a heartbeat after which a node is unreachable."""
    text = env.get("EDGEVM_GW_NODE_TIMEOUT", "")
    if not text:
        return NODE_TIMEOUT
    try:
        value: float = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= 86400:
        raise SystemExit(f"EDGEVM_GW_NODE_TIMEOUT must be a number of seconds in (0, 86400], not {text!r}")
    return value


def main() -> None:
    """Run the gateway until SIGTERM."""
    timeout = node_timeout(os.environ)  # checked before anything starts

    async def configured(ctx: ServiceContext) -> None:
        await setup(ctx, timeout)

    run("gateway", configured)


if __name__ == "__main__":
    main()
