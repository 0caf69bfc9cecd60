"""Publishing events into the EDGEVM_EVENTS stream, with JetStream's acks checked off the caller's path.

A publish goes out in order on the service's one connection, after the state it reports was written, and
returns without waiting for the stream's ack: the ack is checked in the background, and a late one (the
event may be stored or not) or a negative one is logged and counted (`edgevm_events_unacked_total`).
Waiting for every ack inline cost a VM power task about 2 ms of its ~8. What a crash can lose is the same
either way (an event between the state write and the stream), and the KV buckets stay the record.
`flush` waits for every pending ack (at shutdown, and where a test or a caller needs the event stored).
"""

from __future__ import annotations

import asyncio
import logging

import msgspec
from nats.js import JetStreamContext
from nats.js.api import PubAck

from edgevm.shared import subjects
from edgevm.shared.events import Event, event_subject_tail
from edgevm.shared.metrics import EVENTS_PUBLISHED, EVENTS_UNACKED

log = logging.getLogger(__name__)
_encoder = msgspec.json.Encoder()


class EventPublisher:
    """Publishes a service's events for one node; JetStream's acks are awaited in the background."""

    def __init__(self, js: JetStreamContext, node: str, service: str, timeout: float = 2.0) -> None:
        self._js = js
        self._node = node
        self._service = service
        self._timeout = timeout
        self._pending: set[asyncio.Future[PubAck]] = set()

    async def publish(self, event: Event) -> None:
        """Publish `event` on `edgevm.evt.<node>.<kind>.<id>`; raises only when the connection cannot send."""
        subject = subjects.event(self._node, event_subject_tail(event))
        kind = event.__struct_config__.tag
        ack = await self._js.publish_async(subject, _encoder.encode(event), wait_stall=self._timeout)
        self._pending.add(ack)
        timer = asyncio.get_running_loop().call_later(self._timeout, ack.cancel)

        def done(future: asyncio.Future[PubAck]) -> None:
            timer.cancel()
            self._pending.discard(future)
            if future.cancelled():
                # Only the ack is late: the event may well be stored (or not); nobody can tell from here.
                log.warning("event %s on %s: JetStream did not acknowledge it within %g s (whether it is stored "
                            "is unknown)", kind, subject, self._timeout)
                EVENTS_UNACKED.labels(self._service, kind).inc()
            elif future.exception() is not None:
                log.error("event %s on %s refused by JetStream: %s", kind, subject, future.exception())
                EVENTS_UNACKED.labels(self._service, kind).inc()
            else:
                EVENTS_PUBLISHED.labels(self._service, kind).inc()

        ack.add_done_callback(done)

    async def flush(self) -> None:
        """Wait until every event published so far is acked (or given up on)."""
        if self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)
