"""Flow events and completed flows on their way to JetStream, published in the background, acknowledged."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec
from nats.aio.client import Client as NATS

from edgevm.flowwatch import metrics
from edgevm.shared import subjects
from edgevm.shared.clock import now
from edgevm.shared.events import FlowClosed, FlowOpened, FlowTerminated
from edgevm.shared.metrics import EVENTS_PUBLISHED
from edgevm.shared.objects import Flow

__all__ = ["HISTORY", "Message", "Outbox"]

log = logging.getLogger(__name__)
_encoder = msgspec.json.Encoder()
MAX_QUEUED_OPENED = 200_000  # past this many queued messages flow.opened events are dropped
MAX_QUEUED = 300_000  # past this many every message is dropped (each about 0.6 KiB)
MAX_IN_FLIGHT = 4_000
YIELD_EVERY = 128  # publishing rarely suspends: let the event loop (conntrack's events) run this often
ACK_TIMEOUT = 5.0
# a history record is published again (same Nats-Msg-Id) while unacknowledged, up to this many times: all
# within EDGEVM_FLOWS' 2-minute duplicate window, so a record JetStream did store is not stored twice
MAX_ATTEMPTS = 12
FLUSH_TIMEOUT = 3.0
HISTORY = "history"  # the kind of a history record; other messages are events, of their type

# subject, body, headers, kind (an event type, or HISTORY), attempts so far
Message = tuple[str, bytes, dict[str, str] | None, str, int]
_OPENED, _CLOSED, _TERMINATED = (e.__struct_config__.tag for e in (FlowOpened, FlowClosed, FlowTerminated))


def _event_body(tag: str, at: str, flow_json: bytes) -> bytes:
    """A flow event as msgspec writes the FlowEvent structs (type, flow, at: keyword-only fields come in that
    order), around the Flow's JSON, which the history record of an ended flow shares: it is encoded once."""
    return b'{"type":"%s","flow":%s,"at":"%s"}' % (tag.encode(), flow_json, at.encode())
Deferred = tuple[int, Callable[[], list[Message]]]  # (how many messages, what makes them when their turn comes)


class Outbox:
    """A queue of messages for JetStream that conntrack never waits on; a background task sends them.

    Each message is published with a reply subject of its own under our inbox, where JetStream
    acknowledges it; up to MAX_IN_FLIGHT await their acknowledgement. This is nats-py's `publish_async`
    without its per-message future and JSON decoding of the ack, which took three quarters of the CPU at
    20,000 flows/s: an ack is matched by its subject, and read only when it reports an error. A history
    record not acknowledged within ACK_TIMEOUT is published again with its Nats-Msg-Id (JetStream drops a
    duplicate); an event is counted as a failure. Announcements of many new flows (a resync's) are queued
    as one deferred item and made into messages only when their turn comes, in the background.
    When MAX_QUEUED_OPENED messages wait, `flow.opened` events are dropped; past MAX_QUEUED, every message
    is (both counted, by type): memory stays bounded while JetStream is away.
    """

    def __init__(
        self, nc: NATS, node: str, max_queued: int = MAX_QUEUED, max_queued_opened: int = MAX_QUEUED_OPENED,
        ack_timeout: float = ACK_TIMEOUT,
    ) -> None:
        self._nc = nc
        self._node = node
        self._queue: collections.deque[Message | Deferred] = collections.deque()
        self._queued = 0  # messages in the queue, counting those deferred items will make
        self._max_queued = max_queued
        self._max_opened = max_queued_opened
        self._ack_timeout = ack_timeout
        self._ready = asyncio.Event()
        self._inbox = f"{nc.new_inbox()}.flowwatch"
        self._sent = 0
        self._in_flight: dict[str, tuple[Message, float]] = {}  # reply subject -> message, when sent
        self._parked: collections.deque[tuple[Message, float]] = collections.deque()  # refused for now: retried later
        self._acked = asyncio.Event()
        self._published: collections.Counter[str] = collections.Counter()  # by type, not yet counted in metrics
        self._subjects: dict[str, str] = {}  # VM -> the subject of its flow events

    # -- queueing ---------------------------------------------------------------------------------------
    def opened(self, flow: Flow, at: str | None = None) -> None:
        """Announce a new flow (at: the event's time, default now)."""
        if self._queued >= self._max_opened:
            self._dropped(_OPENED, 1)
            return
        self._put(self._event_message(_OPENED, at or now(), flow))

    def opened_later(self, count: int, make: Callable[[], list[Flow]]) -> None:
        """Announce count new flows whose Flows make() builds when their turn comes (a resync's many)."""
        taken = min(count, self._max_opened - self._queued)
        if taken < count:
            self._dropped(_OPENED, count - max(taken, 0))
        if taken <= 0:
            return
        at = now()

        def messages() -> list[Message]:
            return [self._event_message(_OPENED, at, flow) for flow in make()[:taken]]

        self._queue.append((taken, messages))
        self._queued += taken
        self._ready.set()

    def ended(self, flow: Flow, at: str | None = None) -> None:
        """Record a completed or terminated flow in the VM's history and announce it."""
        body = _encoder.encode(flow)
        self._put((subjects.flow_log(self._node, flow.vm), body, {"Nats-Msg-Id": flow.id}, HISTORY, 0))
        tag = _TERMINATED if flow.status == "terminated" else _CLOSED
        self._put((self._event_subject(flow.vm), _event_body(tag, at or now(), body), None, tag, 0))

    def _event_message(self, tag: str, at: str, flow: Flow) -> Message:
        return (self._event_subject(flow.vm), _event_body(tag, at, _encoder.encode(flow)), None, tag, 0)

    def _event_subject(self, vm: str) -> str:
        subject = self._subjects.get(vm)
        if subject is None:
            if len(self._subjects) >= 10_000:
                self._subjects.clear()
            subject = self._subjects[vm] = subjects.event(self._node, f"flow.{vm}")
        return subject

    def _put(self, message: Message) -> None:
        if self._queued >= self._max_queued:
            self._dropped(message[3], 1)
            return
        self._queue.append(message)
        self._queued += 1
        self._ready.set()

    def _dropped(self, kind: str, count: int) -> None:
        metrics.DROPPED.labels(kind).inc(count)

    def __len__(self) -> int:
        """Messages queued, not yet published."""
        return self._queued

    @property
    def unacked(self) -> int:
        """Messages published whose acknowledgement has not come yet (or that wait to be published again)."""
        return len(self._in_flight) + len(self._parked)

    # -- publishing ---------------------------------------------------------------------------------------
    async def run(self) -> None:
        """Publish what is queued until cancelled; then publish what is left, for a few seconds at most."""
        sub = await self._nc.subscribe(f"{self._inbox}.*", cb=self._on_ack)
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
        sent = self._in_flight.pop(msg.subject, None)
        self._acked.set()
        if sent is None:
            return  # the ack of a message given up on, or published again meanwhile
        refused = b'"error"' in msg.data
        if refused or (msg.headers and msg.headers.get("Status") == "503"):  # refused, or no stream (yet)
            message = sent[0]
            if not refused and message[3] == HISTORY and message[4] < MAX_ATTEMPTS:
                self._parked.append((message, time.monotonic()))  # no stream answered: again after the ack timeout
                return
            metrics.PUBLISH_FAILURES.inc()
            detail = msg.data[:200].decode(errors="replace") or "no stream takes the subject"
            log.warning("JetStream did not store a flow message: %s", detail)

    def _retry(self, message: Message) -> None:
        subject, data, headers, kind, attempts = message
        self._queue.appendleft((subject, data, headers, kind, attempts + 1))
        self._queued += 1
        self._ready.set()

    def _expire(self) -> None:
        """Give up waiting for acks older than the ack timeout: history records go out again, events count as
        failures."""
        deadline = time.monotonic() - self._ack_timeout
        while self._parked and self._parked[0][1] <= deadline:
            self._retry(self._parked.popleft()[0])
        expired = []
        for reply, (message, sent_at) in self._in_flight.items():  # in the order sent
            if sent_at > deadline:
                break
            expired.append((reply, message))
        failed = 0
        for reply, message in expired:
            del self._in_flight[reply]
            if message[3] == HISTORY and message[4] < MAX_ATTEMPTS:
                self._retry(message)
            else:
                failed += 1
        if expired:
            log.warning("%d flow messages not acknowledged within %g s", len(expired), self._ack_timeout)
        if failed:
            metrics.PUBLISH_FAILURES.inc(failed)

    async def _flush(self) -> None:
        while self._queue:
            await self._publish_next()
        self._count_published()
        await self._nc.flush()
        while self._in_flight or self._parked:
            await self._wait_for_acks()
            while self._queue:
                await self._publish_next()

    async def _publish_next(self) -> None:
        item = self._queue.popleft()
        if len(item) == 2:  # deferred: its messages, made now, go first
            count, make = item
            self._queued -= count
            messages = make()
            self._queue.extendleft(reversed(messages))
            self._queued += len(messages)
            return
        message = item
        self._queued -= 1
        try:
            await self._publish(message)
        except BaseException:
            self._queue.appendleft(message)
            self._queued += 1
            raise

    async def _publish(self, message: Message) -> None:
        subject, data, headers, kind, _ = message
        self._sent += 1
        reply = f"{self._inbox}.{self._sent}"
        await self._nc.publish(subject, data, reply=reply, headers=headers)
        self._in_flight[reply] = (message, time.monotonic())
        if kind != HISTORY:
            self._published[kind] += 1

    def _count_published(self) -> None:
        """Add the events published since the last call to the metric (once per streak: a counter's inc is
        dearer than a publish)."""
        for kind, n in self._published.items():
            EVENTS_PUBLISHED.labels("flowwatch", kind).inc(n)
        self._published.clear()

    async def _wait_for_acks(self) -> None:
        """Wait for some ack, or until the oldest outstanding one is due; expire those overdue."""
        self._acked.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._acked.wait(), self._wait_time())
        self._expire()

    def _wait_time(self) -> float:
        """Until the oldest outstanding ack, or parked message, is due."""
        times = []
        if self._in_flight:
            times.append(next(iter(self._in_flight.values()))[1])
        if self._parked:
            times.append(self._parked[0][1])
        if not times:
            return self._ack_timeout
        return max(0.01, min(times) + self._ack_timeout - time.monotonic())

    async def _publish_forever(self) -> None:
        streak = 0
        while True:
            streak += 1
            if streak >= YIELD_EVERY:
                streak = 0
                self._count_published()
                await asyncio.sleep(0)
            if len(self._in_flight) >= MAX_IN_FLIGHT:
                await self._wait_for_acks()
                continue
            if not self._queue:
                self._count_published()
                self._ready.clear()
                if self._in_flight or self._parked:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._ready.wait(), self._wait_time())
                    self._expire()
                else:
                    await self._ready.wait()
                continue
            try:
                await self._publish_next()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS away: the message stays first in the queue; try again shortly
                metrics.PUBLISH_FAILURES.inc()
                log.warning("a flow message was not published (%s); retrying", exc)
                await asyncio.sleep(0.5)
