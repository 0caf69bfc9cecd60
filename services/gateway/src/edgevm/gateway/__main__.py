"""edgevm-gateway: the fleet read model over every node's events."""

from __future__ import annotations

from prometheus_client import REGISTRY

from edgevm.gateway.handlers import GatewayHandlers
from edgevm.gateway.ingest import follow_events
from edgevm.gateway.metrics import FleetCollector
from edgevm.gateway.model import FleetModel
from edgevm.shared import subjects
from edgevm.shared.runtime import ServiceContext
from edgevm.shared.runtime import main as run


async def setup(ctx: ServiceContext) -> None:
    """Build the model, follow the event stream and serve `edgevm.gw.*`."""
    model = FleetModel()
    collector = FleetCollector(model)
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


def main() -> None:
    """Run the gateway until SIGTERM."""
    run("gateway", setup)


if __name__ == "__main__":
    main()
