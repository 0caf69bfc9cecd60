"""Flow events and completed flows on their way to JetStream, published in the background, acknowledged."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from typing import Any

import msgspec
from nats.aio.client import Client as NATS

from edgevm.flowwatch import metrics
from edgevm.shared import subjects
from edgevm.shared.clock import now
from edgevm.shared.events import FlowClosed, FlowEvent, FlowOpened, FlowTerminated
from edgevm.shared.metrics import EVENTS_PUBLISHED
from edgevm.shared.objects import Flow

__all__ = ["Outbox"]

log = logging.getLogger(__name__)
_encoder = msgspec.json.Encoder()
MAX_QUEUED = 200_000
MAX_IN_FLIGHT = 4_000
ACK_TIMEOUT = 5.0
FLUSH_TIMEOUT = 3.0

Message = tuple[str, bytes, dict[str, str] | None, str]  # subject, body, headers, event type ("": history)


class Outbox:
    """A queue of messages for JetStream that conntrack never waits on; a background task sends them.

    Messages are published with a reply subject of our own, where JetStream acknowledges them; up to
    MAX_IN_FLIGHT await their acknowledgement. This is nats-py's `publish_async` without its per-message
    future, token and JSON decoding of the ack, which took three quarters of the CPU at 20,000 flows/s: an
    ack is counted, and read only when it reports an error. Acks that do not come within ACK_TIMEOUT are
    given up on and counted as failures. When the queue is full, `flow.opened` events are the first to go
    (counted): a completed flow and its `flow.closed` event are kept.
    """

    def __init__(self, nc: NATS, node: str) -> None:
        self._nc = nc
        self._node = node
        self._queue: collections.deque[Message] = collections.deque()
        self._ready = asyncio.Event()
        self._inbox = f"{nc.new_inbox()}.flowwatch"
        self._unacked = 0
        self._acked = asyncio.Event()
        self._published: dict[str, Any] = {}  # event type -> its counter

    def opened(self, flow: Flow) -> None:
        """Announce a new flow."""
        if len(self._queue) >= MAX_QUEUED:
            metrics.DROPPED.inc()
            return
        self._event(FlowOpened(at=now(), flow=flow))

    def ended(self, flow: Flow) -> None:
        """Record a completed or terminated flow in the VM's history and announce it."""
        self._put(subjects.flow_log(self._node, flow.vm), _encoder.encode(flow), {"Nats-Msg-Id": flow.id}, "")
        event = FlowTerminated if flow.status == "terminated" else FlowClosed
        self._event(event(at=now(), flow=flow))

    def _event(self, event: FlowEvent) -> None:
        subject = subjects.event(self._node, f"flow.{event.flow.vm}")
        self._put(subject, _encoder.encode(event), None, event.__struct_config__.tag)  # type: ignore[arg-type]

    def _put(self, subject: str, data: bytes, headers: dict[str, str] | None, kind: str) -> None:
        self._queue.append((subject, data, headers, kind))
        self._ready.set()

    def __len__(self) -> int:
        """Messages queued, not yet published."""
        return len(self._queue)

    @property
    def unacked(self) -> int:
        """Messages published whose acknowledgement has not come yet."""
        return self._unacked

    async def run(self) -> None:
        """Publish what is queued until cancelled; then publish what is left, for a few seconds at most."""
        sub = await self._nc.subscribe(self._inbox, cb=self._on_ack)
        try:
            await self._publish_forever()
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._flush(), FLUSH_TIMEOUT)
            raise
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _on_ack(self, msg: Any) -> None:
        self._unacked = max(0, self._unacked - 1)
        self._acked.set()
        if b'"error"' in msg.data or (msg.headers and msg.headers.get("Status") == "503"):  # refused, or no stream
            metrics.PUBLISH_FAILURES.inc()
            detail = msg.data[:200].decode(errors="replace") or "no stream takes the subject"
            log.warning("JetStream did not store a flow message: %s", detail)

    async def _flush(self) -> None:
        while self._queue:
            await self._publish(self._queue.popleft())
        await self._nc.flush()
        while self._unacked:
            await self._wait_for_acks()

    async def _publish(self, message: Message) -> None:
        subject, data, headers, kind = message
        await self._nc.publish(subject, data, reply=self._inbox, headers=headers)
        self._unacked += 1
        if kind:
            counter = self._published.get(kind)
            if counter is None:
                counter = self._published[kind] = EVENTS_PUBLISHED.labels("flowwatch", kind)
            counter.inc()

    async def _wait_for_acks(self) -> None:
        """Wait for some ack; if none comes within ACK_TIMEOUT, give up on every one outstanding."""
        self._acked.clear()
        try:
            await asyncio.wait_for(self._acked.wait(), ACK_TIMEOUT)
        except TimeoutError:
            log.warning("%d flow messages not acknowledged within %g s", self._unacked, ACK_TIMEOUT)
            metrics.PUBLISH_FAILURES.inc(self._unacked)
            self._unacked = 0

    async def _publish_forever(self) -> None:
        while True:
            if self._unacked >= MAX_IN_FLIGHT:
                await self._wait_for_acks()
                continue
            if not self._queue:
                self._ready.clear()
                await self._ready.wait()
                continue
            message = self._queue.popleft()
            try:
                await self._publish(message)
            except asyncio.CancelledError:
                self._queue.appendleft(message)
                raise
            except Exception as exc:  # NATS away: keep the message, try again shortly
                self._queue.appendleft(message)
                metrics.PUBLISH_FAILURES.inc()
                log.warning("flow message on %s not published (%s); retrying", message[0], exc)
                await asyncio.sleep(0.5)
