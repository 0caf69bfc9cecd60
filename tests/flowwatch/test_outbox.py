"""The outbox against a real nats-server: history records and events stored and acknowledged, failures counted."""

from __future__ import annotations

import asyncio
import secrets

from nats.aio.client import Client as NATS
from prometheus_client import REGISTRY

from edgevm.flowwatch.history import FlowHistory
from edgevm.flowwatch.outbox import Outbox
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
        outbox._put("edgevm.nostream.x", b"{}", None, "")  # no stream takes it: not stored
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
