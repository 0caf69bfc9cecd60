"""gw.vm.list in pages (`limit`, `after` = `<node>/<vm>`, `next`) over a real nats-server, from simulated nodes'
events; and `edgevm fleet vms`, which pages, on a server whose max_payload is too small for one reply."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS

from edgevm.cli.natsserver import NatsServer, free_port, start_nats_server
from edgevm.shared import subjects
from edgevm.shared.bus import ensure_jetstream
from edgevm.shared.client import Client
from edgevm.shared.clock import now
from edgevm.shared.commands import GwVmList
from edgevm.shared.errors import RemoteError
from edgevm.shared.events import VmCreated, VmDeleted
from edgevm.shared.limits import MAX_PAGE
from edgevm.shared.objects import Vm, VmStatus
from edgevm.shared.spec import CloudInit, VmSpec
from tests.gateway.nodes import FakeNode, gateway_process, vm
from tests.gateway.test_cli_fleet import edgevm, rows
from tests.helpers import ServiceProcess, eventually

NAMES = ["z", "b0", "a", "b-1", "b"]


async def publish(node: FakeNode, *vms: Vm) -> None:
    for each in vms:
        await node.publisher.publish(VmCreated(at=now(), vm=each))
    await node.publisher.flush()


async def listing(client: Client, body: dict[str, Any]) -> dict[str, Any]:
    return await client.gateway("vm.list", body)  # type: ignore[no-any-return]


async def walk(client: Client, limit: int, first: str | None = None, **body: Any) -> list[dict[str, Any]]:
    """Every page of gw.vm.list with `limit` from `first` on, each checked against the rules of paging."""
    pages = []
    after = first
    while True:
        page = await listing(client, {**body, "limit": limit, **({"after": after} if after is not None else {})})
        assert set(page) == {"vms", "next"} and len(page["vms"]) <= limit, page
        pages.append(page)
        if page["next"] is None:
            return pages
        last = page["vms"][-1]
        assert page["next"] == f"{last['node']}/{last['spec']['name']}"  # the cursor is the page's last VM
        after = page["next"]


def keys(pages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(v["node"], v["spec"]["name"]) for page in pages for v in page["vms"]]


async def has(client: Client, node: str, count: int) -> bool:
    return len((await client.gateway("vm.list", {"node": node}, GwVmList)).vms) == count


@pytest.fixture
async def paged_fleet(nc: NATS, nats_server: NatsServer, tmp_path: Path
                      ) -> AsyncIterator[tuple[Client, FakeNode, FakeNode]]:
    """Nodes p<tag> and p<tag>-x with the VMs of NAMES each, and a gateway that has them all.

    `p<tag>-x` sorts after `p<tag>` as a node, although `p<tag>-x/a` sorts before `p<tag>/z` as a string: a
    cursor compared as one string would skip the second node.
    """
    await ensure_jetstream(nc.jetstream())
    tag = uuid.uuid4().hex[:6]
    a, b = FakeNode(nc, f"p{tag}"), FakeNode(nc, f"p{tag}-x")
    for node in (a, b):
        await publish(node, *(vm(name) for name in NAMES))
    gateway = gateway_process(nats_server, tmp_path).start()
    client = Client(nc, "unused")
    try:
        await eventually(lambda: has(client, b.name, len(NAMES)), what="the gateway has both nodes' VMs")
        yield client, a, b
    finally:
        assert gateway.stop() == 0, gateway.log()


async def test_pages_walk_the_fleet_once_in_node_then_name_order(
    paged_fleet: tuple[Client, FakeNode, FakeNode],
) -> None:
    client, a, b = paged_fleet
    whole = keys([await listing(client, {})])
    ours = [(node.name, name) for node in (a, b) for name in sorted(NAMES)]
    assert [k for k in whole if k[0] in (a.name, b.name)] == ours
    for limit in (1, 2, 3, 5, 7, MAX_PAGE):
        assert keys(await walk(client, limit)) == whole, limit
        one = await walk(client, limit, node=a.name)
        assert keys(one) == ours[:len(NAMES)] and all(len(p["vms"]) == limit for p in one[:-1]), limit
    # Across the two nodes of the fleet: from the last VM of the first to the first of the second.
    page = await listing(client, {"node": None, "limit": 1, "after": f"{a.name}/z"})
    assert keys([page]) == [(b.name, "a")] and page["next"] == f"{b.name}/a"


async def test_without_limit_the_reply_is_the_one_of_before_paging(
    paged_fleet: tuple[Client, FakeNode, FakeNode], nc: NATS,
) -> None:
    client, a, _ = paged_fleet
    msg = await nc.request(subjects.gateway("vm.list"), json.dumps({"node": a.name}).encode(), timeout=5)
    assert list(json.loads(msg.data)) == ["vms"]
    assert msg.data == msgspec.json.encode(msgspec.json.decode(msg.data, type=GwVmList))
    assert await listing(client, {"node": a.name, "limit": None, "after": None}) == json.loads(msg.data)
    rest = await listing(client, {"node": a.name, "after": f"{a.name}/b-1"})  # a cursor alone: the rest, whole
    assert list(rest) == ["vms"] and [v["spec"]["name"] for v in rest["vms"]] == ["b0", "z"]


async def test_a_cursor_whose_vm_is_gone_continues_after_its_place(
    paged_fleet: tuple[Client, FakeNode, FakeNode],
) -> None:
    client, a, b = paged_fleet
    first = await listing(client, {"node": a.name, "limit": 3})
    assert first["next"] == f"{a.name}/b-1"
    await a.publisher.publish(VmDeleted(at=now(), vm=vm("b-1")))
    await publish(a, vm("b-2"), vm("aa"))  # b-2 sorts after the cursor, aa before it
    await eventually(lambda: has(client, a.name, len(NAMES) + 1), what="the gateway applied the changes")
    assert keys(await walk(client, 2, first["next"], node=a.name)) == [(a.name, "b-2"), (a.name, "b0"),
                                                                      (a.name, "z")]
    # Nor need the cursor's node exist: the fleet goes on after its place.
    assert keys(await walk(client, 10, f"{a.name}-a/zz", node=None))[:len(NAMES)] == [
        (b.name, name) for name in sorted(NAMES)]


BAD = [
    ({"limit": 0}, "limit", ">= 1"),
    ({"limit": MAX_PAGE + 1}, "limit", f"<= {MAX_PAGE}"),
    ({"limit": "5"}, "limit", "got `str`"),
    ({"limit": 2.5}, "limit", "got `float`"),
    ({"limit": False}, "limit", "got `bool`"),
    ({"after": 7}, "after", "got `int`"),
    ({"after": "web"}, "after", "matching regex"),  # a VM name alone: the fleet's cursor names the node too
    ({"after": "n1/web/x"}, "after", "matching regex"),
    ({"after": "N1/web"}, "after", "matching regex"),
    ({"after": "n1/"}, "after", "matching regex"),
    ({"after": "/web"}, "after", "matching regex"),
    ({"after": "n1/web\n"}, "after", "matching regex"),
    ({"after": "n1/w\u0000b"}, "after", "matching regex"),
    ({"after": "n" * 63 + "/" + "w" * 64}, "after", "length <= 127"),
    ({"after": "x" * 200_000}, "after", "length <= 127"),
    ({"limit": 5, "cursor": "n1/web"}, "cursor", "not a known field"),
]


async def test_bad_paging_values_are_400_naming_the_field_and_change_nothing(
    paged_fleet: tuple[Client, FakeNode, FakeNode],
) -> None:
    client, a, _ = paged_fleet
    before = await listing(client, {"node": a.name})
    for body, field, rule in BAD:
        with pytest.raises(RemoteError) as info:
            await listing(client, body)
        error = info.value
        assert (error.code, error.field) == ("400", field), (body, error.message)
        assert error.message.startswith(f"{field}: ") and rule in error.message, (body, error.message)
        assert len(error.message) < 300
    assert await listing(client, {"node": a.name}) == before


USER_DATA = "#cloud-config\nwrite_files:\n- path: /etc/motd\n  content: " + "x" * 12_000 + "\n"
SMALL_PAYLOAD = 64 * 1024


def big(name: str) -> Vm:
    spec = VmSpec(name=name, image="img", cloud_init=CloudInit(user_data=USER_DATA))
    return Vm(spec, VmStatus("running", 1, now(), now()))  # type: ignore[arg-type]


@pytest.fixture
async def small_payload_fleet(tmp_path: Path) -> AsyncIterator[tuple[Client, NatsServer, list[tuple[str, str]]]]:
    """A nats-server of its own with a 64 KiB max_payload, a gateway on it, two nodes of 4 VMs of ~12 KB each."""
    server = start_nats_server(tmp_path / "nats", port=free_port(), extra={"max_payload": SMALL_PAYLOAD})
    conn = await nats.connect(server.url)
    gateway: ServiceProcess | None = None
    try:
        await ensure_jetstream(conn.jetstream())
        nodes = [FakeNode(conn, f"s{uuid.uuid4().hex[:6]}") for _ in range(2)]
        for node in nodes:
            await publish(node, *(big(f"big{i}") for i in range(4)))
        gateway = gateway_process(server, tmp_path).start()
        client = Client(conn, "unused")
        await eventually(lambda: all_in(client, nodes), what="the gateway has every VM")
        yield client, server, sorted((n.name, f"big{i}") for n in nodes for i in range(4))
    finally:
        if gateway is not None:
            assert gateway.stop() == 0, gateway.log()
        await conn.close()
        server.stop()


async def all_in(client: Client, nodes: list[FakeNode]) -> bool:
    return all([await has(client, node.name, 4) for node in nodes])


async def test_a_fleet_too_large_for_one_reply_is_a_422_that_says_to_page_and_pages_go_through(
    small_payload_fleet: tuple[Client, NatsServer, list[tuple[str, str]]],
) -> None:
    client, server, every = small_payload_fleet
    with pytest.raises(RemoteError) as info:
        await listing(client, {})
    error = info.value
    assert (error.code, error.field) == ("422", None) and f"{SMALL_PAYLOAD} bytes" in error.message
    assert "`limit`" in error.message and "`after`" in error.message, error.message
    pages = await walk(client, MAX_PAGE)  # more asked than fits: each page holds what fits
    assert keys(pages) == every and len(pages) >= 2
    assert all(len(msgspec.json.encode(page)) <= SMALL_PAYLOAD for page in pages)

    listed = await edgevm(server, "fleet", "vms")
    assert listed.returncode == 0, listed.stderr
    assert [(r[0].split()[0], r[1]) for r in rows(listed.stdout)] == every  # nodes that never beat: "(unreachable)"
    as_json = json.loads((await edgevm(server, "--json", "fleet", "vms")).stdout)
    assert list(as_json) == ["vms"] and [(v["node"], v["spec"]["name"]) for v in as_json["vms"]] == every
