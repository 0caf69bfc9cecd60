"""Feeding the read model: every event of EDGEVM_EVENTS from the first kept one, then live.

On a lone node EDGEVM_EVENTS holds the node's own events; at the hub it is the stream that sources every
node's EDGEVM_EVENTS (PROTOCOL.md "Fleet"). Both keep the events under their original subjects
`edgevm.evt.<node>.>`, so the gateway reads them the same way.
"""

from __future__ import annotations

import logging

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from prometheus_client import Counter, Histogram

from edgevm.gateway.model import FleetModel
from edgevm.shared import subjects

log = logging.getLogger(__name__)
STREAM = "EDGEVM_EVENTS"  # the same name on a node and at the hub
INGESTED = Counter("edgevm_gateway_events_total", "Events applied to the fleet read model.", ["result"])
LAG = Histogram(
    "edgevm_fleet_event_lag_seconds",
    "Seconds from an event's `at` (the node's clock) to its ingest by the gateway; live events only "
    "(the replay at the gateway's start is not counted).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
)


async def follow_events(js: JetStreamContext, model: FleetModel) -> object:
    """Subscribe with an ordered consumer that replays the stream, so the model catches up after downtime.

    The model lives in memory and is rebuilt from the stream at every start: the stream (bounded by age
    and bytes) is the record, so there is no second copy of it to keep consistent.
    """
    applied = INGESTED.labels("applied")
    skipped = INGESTED.labels("skipped")
    # Events stored before the subscription are the start-up replay: their lag is the gateway's downtime.
    replay_until = (await js.stream_info(STREAM)).state.last_seq

    async def on_event(msg: Msg) -> None:
        try:
            lag = model.ingest(msg.subject, msg.data)
            applied.inc()
        except Exception as exc:  # an event this gateway does not know: skip it, keep the rest
            skipped.inc()
            log.warning("event on %s skipped: %s", msg.subject, exc)
            return
        if lag is not None and msg.metadata.sequence.stream > replay_until:
            LAG.observe(max(0.0, lag))

    return await js.subscribe(
        subjects.all_events(),
        stream=STREAM,
        cb=on_event,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.ALL,
        pending_msgs_limit=1_000_000,
        pending_bytes_limit=1 << 30,
    )
