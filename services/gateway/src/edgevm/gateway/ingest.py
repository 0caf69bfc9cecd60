"""Feeding the read model: every event of EDGEVM_EVENTS from the first kept one, then live."""

from __future__ import annotations

import logging

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from prometheus_client import Counter

from edgevm.gateway.model import FleetModel
from edgevm.shared import subjects
from edgevm.shared.bus import EVENTS_STREAM

log = logging.getLogger(__name__)
INGESTED = Counter("edgevm_gateway_events_total", "Events applied to the fleet read model.", ["result"])


async def follow_events(js: JetStreamContext, model: FleetModel) -> object:
    """Subscribe with an ordered consumer that replays the stream, so the model catches up after downtime.

    The model lives in memory and is rebuilt from the stream at every start: the stream (bounded by age
    and bytes) is the record, so there is no second copy of it to keep consistent.
    """
    applied = INGESTED.labels("applied")
    skipped = INGESTED.labels("skipped")

    async def on_event(msg: Msg) -> None:
        try:
            model.ingest(msg.subject, msg.data)
            applied.inc()
        except Exception as exc:  # an event this gateway does not know: skip it, keep the rest
            skipped.inc()
            log.warning("event on %s skipped: %s", msg.subject, exc)

    return await js.subscribe(
        subjects.all_events(),
        stream=EVENTS_STREAM.name,
        cb=on_event,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.ALL,
        pending_msgs_limit=1_000_000,
        pending_bytes_limit=1 << 30,
    )
