"""Reading a VM's newest completed flows back from EDGEVM_FLOWS, on a real nats-server."""

from __future__ import annotations

import secrets
import time

import msgspec
import pytest
from nats.aio.client import Client as NATS

from edgevm.flowwatch.history import FlowHistory
from edgevm.shared import bus, subjects
from edgevm.shared.objects import Flow


def flow(node: str, vm: str, n: int) -> Flow:
    return Flow(
        id=f"{vm}-{n:05d}", node=node, vm=vm, protocol="tcp", src_ip="10.0.0.5", src_port=n, dst_ip="1.1.1.1",
        dst_port=443, direction="outbound", status="completed", started_at=f"2026-01-01T00:00:{n % 60:02d}.000Z",
    )


@pytest.fixture
async def history(nc: NATS) -> tuple[FlowHistory, str]:
    js = nc.jetstream()
    await bus.ensure_jetstream(js)
    node = f"h{secrets.token_hex(3)}"
    # a busy VM and a rare one, interleaved: the rare one's flows are far apart in the stream
    for n in range(600):
        await js.publish_async(subjects.flow_log(node, "busy"), msgspec.json.encode(flow(node, "busy", n)))
        if n % 100 == 0:
            await js.publish_async(subjects.flow_log(node, "rare"), msgspec.json.encode(flow(node, "rare", n // 100)))
    await js.publish_async_completed()
    return FlowHistory(js, node), node


@pytest.mark.parametrize(
    ("vm", "limit", "expected"),
    [
        ("busy", 10, [f"busy-{n:05d}" for n in range(599, 589, -1)]),
        ("busy", 500, [f"busy-{n:05d}" for n in range(599, 99, -1)]),
        ("rare", 4, [f"rare-{n:05d}" for n in range(5, 1, -1)]),
        ("rare", 100, [f"rare-{n:05d}" for n in range(5, -1, -1)]),
        ("nobody", 10, []),
    ],
)
async def test_recent_reads_the_last_flows_of_one_vm_newest_first(
    history: tuple[FlowHistory, str], vm: str, limit: int, expected: list[str]
) -> None:
    reader, _ = history
    assert [f.id for f in await reader.recent(vm, limit)] == expected


async def test_count(history: tuple[FlowHistory, str]) -> None:
    reader, _ = history
    assert (await reader.count("busy"), await reader.count("rare"), await reader.count("nobody")) == (600, 6, 0)


async def test_find_reads_from_the_flows_start_so_a_flow_thousands_of_records_back_is_found(nc: NATS) -> None:
    """terminate answers 409 for any ended flow it finds: the search starts at the start time the id holds."""
    js = nc.jetstream()
    await bus.ensure_jetstream(js)
    node = f"h{secrets.token_hex(3)}"
    start_ms = int(time.time() * 1000) - 1000
    old = msgspec.structs.replace(flow(node, "web", 1), id=f"{start_ms:011x}{'a' * 16}")
    await js.publish(subjects.flow_log(node, "web"), msgspec.json.encode(old))
    for n in range(3000):  # far more than a look at the last records would cover
        later = msgspec.structs.replace(flow(node, "web", n), id=f"{start_ms + 500:011x}{n:016x}")
        await js.publish_async(subjects.flow_log(node, "web"), msgspec.json.encode(later))
    await js.publish_async_completed()
    reader = FlowHistory(js, node, timeout=5.0)
    found = await reader.find("web", old.id)
    assert found is not None and found.id == old.id
    assert await reader.find("web", f"{start_ms:011x}{'b' * 16}") is None  # never recorded
    assert await reader.find("web", f"{start_ms + 3_600_000:011x}{'a' * 16}") is None  # starts after every record
    assert await reader.find("web", "not-an-id") is None
    assert await reader.find("nobody", old.id) is None
