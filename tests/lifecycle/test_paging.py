"""vm.list in pages (`limit`, `after`, `next`) over real NATS, on libvirt's test driver; and `edgevm vm list`,
which pages, on a nats-server whose max_payload is too small for the whole list in one reply."""

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
from edgevm.shared.clock import now
from edgevm.shared.commands import Empty, VmList
from edgevm.shared.endpoint import CommandService
from edgevm.shared.limits import MAX_PAGE
from edgevm.shared.objects import Vm, VmStatus
from edgevm.shared.spec import VmSpec
from tests.gateway.test_cli_fleet import edgevm as edgevm_at
from tests.lifecycle.conftest import Node, start_node
from tests.lifecycle.test_cli import edgevm
from tests.lifecycle.test_lifecycle_breadth import expect_error, import_image, wait_task

# `b-1` sorts before `b0` and after `b`: a name order, not the order of creation.
NAMES = ["z", "b0", "a", "b-1", "b", "c9", "c"]


async def create(node: Node, name: str, **spec: Any) -> Vm:
    return await node.client.call("vm.create", {"name": name, "image": "base", **spec}, Vm)


async def walk(node: Node, limit: int, first: str | None = None) -> list[dict[str, Any]]:
    """Every page of vm.list with `limit`, from `first` on; each page checked against the rules of paging."""
    pages = []
    after = first
    while True:
        body = {"limit": limit, **({"after": after} if after is not None else {})}
        page = await node.client.call("vm.list", body)
        assert set(page) == {"vms", "next"} and len(page["vms"]) <= limit, page
        pages.append(page)
        if page["next"] is None:
            return pages
        assert page["next"] == page["vms"][-1]["spec"]["name"]  # the cursor is the page's last VM
        after = page["next"]


def names(pages: list[dict[str, Any]]) -> list[str]:
    return [vm["spec"]["name"] for page in pages for vm in page["vms"]]


@pytest.fixture
async def seven(node: Node) -> Node:
    """The node with image `base` and the VMs of NAMES."""
    await import_image(node)
    for name in NAMES:
        await create(node, name)
    return node


@pytest.mark.parametrize("limit", [1, 2, 3, 6, 7, 8, MAX_PAGE])
async def test_pages_walk_every_vm_once_in_name_order(seven: Node, limit: int) -> None:
    pages = await walk(seven, limit)
    assert names(pages) == sorted(NAMES) == ["a", "b", "b-1", "b0", "c", "c9", "z"]
    assert len(pages) == max(1, -(-len(NAMES) // limit))  # full pages, then the last (null `next`)
    assert all(len(page["vms"]) == limit for page in pages[:-1])


async def test_without_limit_the_reply_is_the_one_of_before_paging(seven: Node, nc: NATS) -> None:
    msg = await nc.request(subjects.command(seven.config.node, "vm.list"), b"{}", timeout=5)
    reply = msgspec.json.decode(msg.data, type=VmList)
    assert list(json.loads(msg.data)) == ["vms"]  # no `next`: a strict client of v1 reads it as before
    assert msg.data == msgspec.json.encode(VmList(reply.vms))
    assert [vm.spec.name for vm in reply.vms] == sorted(NAMES)
    for body in ({"limit": None}, {"after": None}, {"limit": None, "after": None}):  # null is absent
        assert (await seven.client.call("vm.list", body)) == json.loads(msg.data)
    rest = await seven.client.call("vm.list", {"after": "b-1"})  # a cursor alone: the rest of the list, whole
    assert list(rest) == ["vms"] and [vm["spec"]["name"] for vm in rest["vms"]] == ["b0", "c", "c9", "z"]


async def test_a_cursor_whose_vm_is_gone_continues_after_its_place(seven: Node) -> None:
    first = await seven.client.call("vm.list", {"limit": 3})
    assert [vm["spec"]["name"] for vm in first["vms"]] == ["a", "b", "b-1"] and first["next"] == "b-1"
    await wait_task(seven, await seven.client.call("vm.delete", {"name": "b-1"}))
    await create(seven, "b-2")  # sorts after the cursor: it shows up
    await create(seven, "aa")  # sorts before it: it does not
    rest = await walk(seven, 2, first["next"])
    assert names(rest) == ["b-2", "b0", "c", "c9", "z"]
    # A cursor can name a VM that never existed, too: the list goes on after its place.
    assert names(await walk(seven, 10, "c0")) == ["c9", "z"]
    assert names(await walk(seven, 10, "zz")) == []


BAD = [
    ({"limit": 0}, "limit", ">= 1"),
    ({"limit": MAX_PAGE + 1}, "limit", f"<= {MAX_PAGE}"),
    ({"limit": -5}, "limit", ">= 1"),
    ({"limit": 10**30}, "limit", "<= 1000"),
    ({"limit": "5"}, "limit", "got `str`"),
    ({"limit": 2.5}, "limit", "got `float`"),
    ({"limit": True}, "limit", "got `bool`"),
    ({"limit": [5]}, "limit", "got `array`"),
    ({"after": 5}, "after", "got `int`"),
    ({"after": ["a"]}, "after", "got `array`"),
    ({"after": "a" * 64}, "after", "length <= 63"),
    ({"after": "x" * 200_000}, "after", "length <= 63"),
    ({"after": "a\u0001b"}, "after", "matching regex"),
    ({"after": "b\n"}, "after", "matching regex"),
    ({"after": "B"}, "after", "matching regex"),
    ({"after": ""}, "after", "matching regex"),
    ({"limit": 2, "after": "a/b"}, "after", "matching regex"),
    ({"limit": 2, "page": 2}, "page", "not a known field"),
]


async def test_bad_paging_values_are_400_naming_the_field_and_change_nothing(seven: Node) -> None:
    before = await seven.client.call("vm.list")
    for body, field, rule in BAD:
        error = await expect_error(seven, "vm.list", body, "400", field)
        assert error.message.startswith(f"{field}: ") and rule in error.message, (body, error.message)
        assert len(error.message) < 300
    assert await seven.client.call("vm.list") == before


USER_DATA = "#cloud-config\nwrite_files:\n- path: /etc/motd\n  content: " + "x" * 12_000 + "\n"
SMALL_PAYLOAD = 64 * 1024  # the whole list of BIG VMs is about 100 KB


@pytest.fixture
async def small_payload_node(tmp_path: Path) -> AsyncIterator[tuple[Node, NatsServer]]:
    """A lifecycle node on a nats-server of its own with a 64 KiB max_payload, holding 8 VMs of ~12 KB each."""
    server = start_nats_server(tmp_path / "nats", port=free_port(), extra={"max_payload": SMALL_PAYLOAD})
    conn = await nats.connect(server.url)
    try:
        assert conn.max_payload == SMALL_PAYLOAD
        running = await start_node(server, conn)
        try:
            await import_image(running)
            for i in range(8):
                await create(running, f"big{i}", cloud_init={"user_data": USER_DATA})
            yield running, server
        finally:
            await running.shutdown()
    finally:
        await conn.close()
        server.stop()


async def test_a_list_too_large_for_one_reply_is_a_422_that_says_to_page_and_pages_go_through(
    small_payload_node: tuple[Node, NatsServer],
) -> None:
    node, server = small_payload_node
    error = await expect_error(node, "vm.list", {}, "422")
    assert error.field is None and f"{SMALL_PAYLOAD} bytes" in error.message
    assert "`limit`" in error.message and "`after`" in error.message and "`next`" in error.message
    # Asked for more than fit, a page holds what fits: never a 422, every VM once.
    pages = await walk(node, MAX_PAGE)
    assert names(pages) == [f"big{i}" for i in range(8)] and len(pages) >= 2
    for page in pages:
        assert len(msgspec.json.encode(page)) <= SMALL_PAYLOAD

    listed = await edgevm(node, server, "vm", "list")
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[0] for line in listed.stdout.splitlines()[1:]] == [f"big{i}" for i in range(8)]
    as_json = await edgevm(node, server, "--json", "vm", "list")
    assert as_json.returncode == 0, as_json.stderr
    reply = json.loads(as_json.stdout)
    assert list(reply) == ["vms"] and [vm["spec"]["name"] for vm in reply["vms"]] == [f"big{i}" for i in range(8)]
    assert reply["vms"][0]["spec"]["cloud_init"]["user_data"] == USER_DATA


async def test_the_cli_lists_a_node_of_a_version_before_paging_in_one_request(nc: NATS, nats_server: NatsServer
                                                                              ) -> None:
    node = f"old{uuid.uuid4().hex[:6]}"
    service = CommandService(nc, "edgevm-old")
    asked: list[Empty] = []

    async def old_list(req: Empty) -> VmList:  # vm.list before paging: `{}` only, unknown fields refused (400)
        asked.append(req)
        return VmList([Vm(VmSpec(name=n, image="img"), VmStatus("defined", 1, now(), now())) for n in ("a", "b")])

    await service.add(subjects.command(node, "vm.list"), old_list, verb="vm.list")
    await service.start()
    try:
        listed = await edgevm_at(nats_server, "--node", node, "vm", "list")
        assert listed.returncode == 0, listed.stderr
        assert [line.split()[0] for line in listed.stdout.splitlines()[1:]] == ["a", "b"]
        assert len(asked) == 1  # the paged request was refused before the handler; then the whole list
    finally:
        await service.stop()
