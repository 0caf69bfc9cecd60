"""The outbox against a real nats-server: history records and events stored and acknowledged, failures counted."""

from __future__ import annotations

import asyncio
import secrets

from nats.aio.client import Client as NATS
from nats.js.api import StreamConfig
from prometheus_client import REGISTRY

from edgevm.flowwatch.history import FlowHistory
from edgevm.flowwatch.outbox import HISTORY, Outbox
from edgevm.shared import bus, subjects
from edgevm.shared.objects import Flow

from ..helpers import EventCollector, eventually


def flow(node: str, n: int, status: str) -> Flow:
    return Flow(
        id=f"f{n:04d}", node=node, vm="web", protocol="udp", src_ip="10.0.0.5", src_port=n, dst_ip="1.1.1.1",
        dst_port=53, direction="outbound", status=status, started_at="2026-11-27T21:00:00.000Z",  # type: ignore[arg-type]
    )


def failures() -> float:
    return REGISTRY.get_sample_value("edgevm_flowwatch_publish_failures_total") or 0.0


def dropped(kind: str) -> float:
    return REGISTRY.get_sample_value("edgevm_flowwatch_dropped_events_total", {"type": kind}) or 0.0


async def test_every_message_is_stored_and_acknowledged_and_a_refusal_is_counted(nc: NATS) -> None:
    js = nc.jetstream()
    await bus.ensure_jetstream(js)
    node = f"o{secrets.token_hex(3)}"
    events = await EventCollector().start(nc, subjects.event(node, "flow.>"))
    await nc.flush()
    outbox = Outbox(nc, node)
    runner = asyncio.create_task(outbox.run())
    try:
        for n in range(300):
            outbox.opened(flow(node, n, "active"))
            outbox.ended(flow(node, n, "completed" if n % 3 else "terminated"))
        await eventually(lambda: _now(len(outbox) == 0 and outbox.unacked == 0), 10, "all acknowledged")
        history = await FlowHistory(js, node).recent("web", 500)
        assert [f.id for f in history] == [f"f{n:04d}" for n in range(299, -1, -1)]
        await eventually(lambda: _now(len(events.events) == 600), 5, "the events")
        kinds = [e.__struct_config__.tag for _, e in events.events]
        assert kinds.count("flow.opened") == 300 and kinds.count("flow.terminated") == 100

        before = failures()
        outbox._put(("edgevm.nostream.x", b"{}", None, "flow.opened", 0))  # no stream takes it: not stored
        await eventually(lambda: _now(failures() == before + 1), 5, "the failure counted")
        assert outbox.unacked == 0
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await events.stop()
    stored = await js.stream_info("EDGEVM_FLOWS", subjects_filter=subjects.flow_log(node, "web"))
    assert stored.state.subjects == {subjects.flow_log(node, "web"): 300}


async def _now(value: object) -> object:
    return value


async def test_the_queue_is_bounded_while_nothing_is_published_and_what_is_dropped_is_counted(nc: NATS) -> None:
    outbox = Outbox(nc, "capped", max_queued=10, max_queued_opened=4)  # never run: JetStream "away"
    before = {kind: dropped(kind) for kind in ("flow.opened", "flow.closed", HISTORY)}
    for n in range(6):
        outbox.opened(flow("capped", n, "active"))
    outbox.opened_later(3, lambda: [flow("capped", n, "active") for n in range(3)])
    assert len(outbox) == 4 and dropped("flow.opened") == before["flow.opened"] + 5
    for n in range(5):
        outbox.ended(flow("capped", n, "completed"))
    assert len(outbox) == 10  # the hard cap: 3 history records and 3 flow.closed fitted
    assert dropped(HISTORY) == before[HISTORY] + 2 and dropped("flow.closed") == before["flow.closed"] + 2


async def test_an_unacknowledged_history_record_is_published_again_and_stored_once(nc: NATS) -> None:
    js = nc.jetstream()
    tag = secrets.token_hex(3)
    subject = f"edgevm.fwretry{tag}.web"
    outbox = Outbox(nc, "retry", ack_timeout=0.3)
    runner = asyncio.create_task(outbox.run())
    before = failures()
    try:
        record = flow("retry", 1, "completed")
        outbox._put((subject, b'{"id": "f0001"}', {"Nats-Msg-Id": record.id}, HISTORY, 0))
        await asyncio.sleep(1.0)  # no stream yet: each try is refused with "no responders", and parked
        assert outbox.unacked == 1
        await js.add_stream(StreamConfig(name=f"FWRETRY{tag}", subjects=[f"edgevm.fwretry{tag}.>"]))
        await eventually(lambda: _now(outbox.unacked == 0 and len(outbox) == 0), 5, "the record stored")
        info = await js.stream_info(f"FWRETRY{tag}")
        assert info.state.messages == 1
        assert failures() == before
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await js.delete_stream(f"FWRETRY{tag}")


def test_an_event_written_around_the_flows_json_is_what_msgspec_writes() -> None:
    """The outbox encodes a Flow once and writes the event around it: it must equal the FlowEvent struct."""
    import msgspec

    from edgevm.flowwatch.outbox import _event_body
    from edgevm.shared.events import FlowClosed

    record = flow("n", 7, "completed")
    at = "2026-11-27T21:00:01.000Z"
    assert _event_body("flow.closed", at, msgspec.json.encode(record)) == msgspec.json.encode(
        FlowClosed(at=at, flow=record)
    )
