"""The hub's JetStream streams: EDGEVM_EVENTS sources every node's EDGEVM_EVENTS across the node's domain.

The hub's EDGEVM_EVENTS has no subjects of its own, so the gateway at the hub reads the whole fleet's events
exactly as it reads one node's. The hub's own services (its gateway's heartbeats) publish under the hub's id
into EDGEVM_HUB_EVENTS, which is not sourced into EDGEVM_EVENTS (the hub is not a node).
"""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, ExternalStream, RetentionPolicy, StorageType, StreamConfig, StreamSource
from nats.js.errors import NotFoundError

from edgevm.cli.fleetstate import HUB_DOMAIN
from edgevm.shared.bus import EVENTS_STREAM, events_stream

DAY = 24 * 3600
HUB_EVENTS = "EDGEVM_HUB_EVENTS"


def node_source(node: str) -> StreamSource:
    """Return the source of node `node`'s EDGEVM_EVENTS, reached through its JetStream domain."""
    return StreamSource(name=str(EVENTS_STREAM.name), external=ExternalStream(api=f"$JS.{node}.API"))


def source_node(source: StreamSource) -> str | None:
    """Return the node a source of the hub's stream reads from (None for any other source)."""
    return node_of_api(source.external.api if source.external is not None else None)


def node_of_api(api: str | None) -> str | None:
    """Return the node of a JetStream API prefix `$JS.<node>.API` (None for anything else)."""
    if api is None or not api.startswith("$JS.") or not api.endswith(".API"):
        return None
    return api[len("$JS."):-len(".API")]


def fleet_stream(nodes: list[str]) -> StreamConfig:
    """Return the hub's EDGEVM_EVENTS sourcing the EDGEVM_EVENTS of every node in `nodes`."""
    return StreamConfig(
        name=EVENTS_STREAM.name,
        subjects=[],
        sources=[node_source(node) for node in sorted(nodes)],
        retention=RetentionPolicy.LIMITS,
        # As long as a node keeps its own. No byte limit of its own: a fixed one would have to fit every hub's
        # disk (JetStream refuses a stream whose limit exceeds the store), so the server's store limit bounds it.
        max_age=EVENTS_STREAM.max_age,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
    )


async def ensure_hub_streams(js: JetStreamContext, nodes: list[str]) -> None:
    """Create the hub's streams, or bring EDGEVM_EVENTS's sources to `nodes` (sources already there keep going)."""
    try:
        await js.stream_info(str(EVENTS_STREAM.name))
    except NotFoundError:
        await js.add_stream(fleet_stream(nodes))
    else:
        await set_sources(js, nodes)
    hub_own = events_stream(HUB_DOMAIN).evolve(name=HUB_EVENTS, max_bytes=64 << 20)
    try:
        await js.add_stream(hub_own)
    except Exception:
        await js.update_stream(hub_own)


async def set_sources(js: JetStreamContext, nodes: list[str]) -> list[str]:
    """Make EDGEVM_EVENTS source exactly the nodes in `nodes`; return the nodes it sourced before.

    A source that stays is untouched (the hub carries on from the last event it has of that node); a source
    added again later resumes after the last event the hub still holds of it, so nothing comes twice.
    """
    info = await js.stream_info(str(EVENTS_STREAM.name))
    before = [node for node in (source_node(s) for s in info.config.sources or []) if node is not None]
    if sorted(before) != sorted(nodes):
        await js.update_stream(info.config.evolve(subjects=[], sources=[node_source(node) for node in sorted(nodes)]))
    return before

