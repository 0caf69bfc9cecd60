"""The node's snapshot tasks on the JetStream work-queue stream EDGEVM_SNAPSHOT_WORK."""

from __future__ import annotations

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from edgevm.shared import subjects
from edgevm.shared.bus import SNAPSHOT_WORK_STREAM

# A message a worker does not acknowledge within this time (it died) goes to the next worker; a live
# worker reports progress well within it.
ACK_WAIT = 12.0
PROGRESS_EVERY = 4.0


class WorkItem(msgspec.Struct, frozen=True):
    """One snapshot task as queued: which task, and what it is to do."""

    task_id: str
    kind: str
    vm: str
    name: str
    description: str = ""


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(WorkItem)


def decode_item(data: bytes) -> WorkItem:
    """Decode a queued work item."""
    return _decoder.decode(data)


class WorkQueue:
    """Enqueues work items (deduplicated by task id) and fetches them for the node's workers."""

    def __init__(self, js: JetStreamContext, node: str) -> None:
        self._js = js
        self._node = node
        self._subject = subjects.snapshot_work(node)
        self._sub: JetStreamContext.PullSubscription | None = None

    async def enqueue(self, item: WorkItem) -> None:
        """Queue `item`; JetStream drops a second publish of the same task (Nats-Msg-Id = task id), e.g. a
        publish that reached the stream although its answer was lost."""
        await self._js.publish(self._subject, _encoder.encode(item), timeout=2.0,
                               stream=SNAPSHOT_WORK_STREAM.name, headers={"Nats-Msg-Id": item.task_id})

    async def subscribe(self) -> None:
        """Bind to the node's durable consumer (shared by every snapshotter process of the node)."""
        config = ConsumerConfig(
            ack_policy=AckPolicy.EXPLICIT, ack_wait=ACK_WAIT, max_deliver=-1, deliver_policy=DeliverPolicy.ALL,
            filter_subject=self._subject, max_ack_pending=256,
        )
        self._sub = await self._js.pull_subscribe(
            self._subject, durable=f"snapshotter-{self._node}", stream=SNAPSHOT_WORK_STREAM.name, config=config
        )

    async def fetch(self, wait: float) -> list[Msg]:
        """Wait up to `wait` seconds for one item; [] when none came."""
        if self._sub is None:
            raise RuntimeError("WorkQueue.fetch before subscribe()")
        try:
            return await self._sub.fetch(1, timeout=wait)
        except TimeoutError:
            return []

    async def close(self) -> None:
        """Stop fetching (the durable consumer stays, with what it has not delivered)."""
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None
