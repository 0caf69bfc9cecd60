"""Publishing events into the EDGEVM_EVENTS stream, acknowledged by JetStream."""

from __future__ import annotations

import msgspec
from nats.js import JetStreamContext

from edgevm.shared import subjects
from edgevm.shared.events import Event, event_subject_tail
from edgevm.shared.metrics import EVENTS_PUBLISHED

_encoder = msgspec.json.Encoder()


class EventPublisher:
    """Publishes a service's events for one node; each publish waits for JetStream's ack."""

    def __init__(self, js: JetStreamContext, node: str, service: str, timeout: float = 2.0) -> None:
        self._js = js
        self._node = node
        self._service = service
        self._timeout = timeout

    async def publish(self, event: Event) -> None:
        """Publish `event` on `edgevm.evt.<node>.<kind>.<id>`."""
        subject = subjects.event(self._node, event_subject_tail(event))
        await self._js.publish(subject, _encoder.encode(event), timeout=self._timeout)
        EVENTS_PUBLISHED.labels(self._service, event.__struct_config__.tag).inc()
