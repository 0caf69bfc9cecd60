"""Completed flows in the EDGEVM_FLOWS stream, one subject per VM, and reading a VM's newest ones back."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import msgspec
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from edgevm.shared import subjects
from edgevm.shared.bus import FLOWS_STREAM
from edgevm.shared.errors import BackendTimeout
from edgevm.shared.objects import Flow

__all__ = ["FlowHistory", "HistoryTimeout"]

STREAM: str = FLOWS_STREAM.name or "EDGEVM_FLOWS"
_decoder = msgspec.json.Decoder(Flow)


class HistoryTimeout(BackendTimeout):
    """The flow history (JetStream) did not answer in time."""


@contextlib.contextmanager
def _in_time() -> Iterator[None]:
    """JetStream's timeouts (nats' and our deadlines) as the history's own error."""
    try:
        yield
    except TimeoutError:
        raise HistoryTimeout("the flow history (JetStream) did not answer in time") from None


class FlowHistory:
    """Reads a VM's completed flows, newest first, from its subject of the EDGEVM_FLOWS stream.

    The stream interleaves every VM's flows, and JetStream reads subjects forward only. So the last N of one
    subject are read with a short-lived ordered consumer that starts where they should begin, estimated from
    the subject's share of the stream (one `stream info` with a subject filter), and starts earlier if the
    window held fewer than N. The server skips other subjects itself: nothing but the VM's flows travel.
    """

    def __init__(self, js: JetStreamContext, node: str, timeout: float = 1.5) -> None:
        self._js = js
        self._node = node
        self._timeout = timeout

    def subject(self, vm: str) -> str:
        """The subject of a VM's completed flows."""
        return subjects.flow_log(self._node, vm)

    async def count(self, vm: str) -> int:
        """How many completed flows of the VM the stream holds."""
        subject = self.subject(vm)
        with _in_time():
            info = await self._js.stream_info(STREAM, subjects_filter=subject)
        return int((info.state.subjects or {}).get(subject, 0))

    async def recent(self, vm: str, limit: int) -> list[Flow]:
        """The VM's last `limit` completed flows, newest (last recorded) first."""
        subject = self.subject(vm)
        with _in_time():
            return await self._recent(subject, limit)

    async def _recent(self, subject: str, limit: int) -> list[Flow]:
        async with asyncio.timeout(self._timeout):
            info = await self._js.stream_info(STREAM, subjects_filter=subject)
            state = info.state
            count = (state.subjects or {}).get(subject, 0)
            if count == 0:
                return []
            wanted = min(limit, count)
            share = count / max(state.messages, 1)
            span = int(wanted / share * 1.25) + 16
            start = max(state.first_seq, state.last_seq - span + 1)
            while True:
                flows = await self._read(subject, start)
                if len(flows) >= wanted or start <= state.first_seq:
                    break
                span *= 4
                start = max(state.first_seq, state.last_seq - span + 1)
        flows.reverse()
        return flows[:limit]

    async def _read(self, subject: str, start: int) -> list[Flow]:
        """Every flow of `subject` from stream sequence `start` on, oldest first."""
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start)
        sub = await self._js.subscribe(subject, stream=STREAM, ordered_consumer=True, config=config)
        flows: list[Flow] = []
        try:
            info = await sub.consumer_info()
            expected = (info.num_pending or 0) + ((info.delivered.consumer_seq or 0) if info.delivered else 0)
            while len(flows) < expected:
                msg = await sub.next_msg(timeout=self._timeout)
                with contextlib.suppress(msgspec.DecodeError):  # not ours: skipped, never fatal
                    flows.append(_decoder.decode(msg.data))
                if msg.metadata.num_pending == 0:
                    break
        finally:
            await sub.unsubscribe()
        return flows

    async def find(self, vm: str, flow_id: str, depth: int = 5000) -> Flow | None:
        """A completed flow of the VM by id (terminate asks, to answer 409): read from the flow's start, which
        its id holds (a flow is recorded when it ends, after it starts), among the VM's first `depth` records
        from then on. None if it is not there, or the id is not one of ours."""
        try:
            start_ms = int(flow_id[:11], 16)
        except ValueError:
            return None
        if start_ms > time.time() * 1000 + 60_000:
            return None
        since = datetime.fromtimestamp(start_ms / 1000, UTC)
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=since)
        with _in_time():
            return await self._find(vm, flow_id, config, depth)

    async def _find(self, vm: str, flow_id: str, config: ConsumerConfig, depth: int) -> Flow | None:
        async with asyncio.timeout(self._timeout):
            sub = await self._js.subscribe(self.subject(vm), stream=STREAM, ordered_consumer=True, config=config)
            try:
                info = await sub.consumer_info()  # some may have been delivered already: they count
                delivered = (info.delivered.consumer_seq or 0) if info.delivered else 0
                left = min(depth, (info.num_pending or 0) + delivered)
                while left > 0:
                    msg = await sub.next_msg(timeout=self._timeout)
                    left -= 1
                    with contextlib.suppress(msgspec.DecodeError):
                        flow = _decoder.decode(msg.data)
                        if flow.id == flow_id:
                            return flow
                    if msg.metadata.num_pending == 0:
                        break
            finally:
                await sub.unsubscribe()
        return None
