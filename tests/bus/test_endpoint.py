"""The endpoint adapter over a real nats-server: typed replies, error codes and headers, no Python text."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import msgspec
import pytest
from nats.aio.client import Client as NATS

from edgevm.cli.natsserver import MAX_PAYLOAD
from edgevm.shared import subjects
from edgevm.shared.client import Client
from edgevm.shared.commands import VmRef
from edgevm.shared.endpoint import CommandService
from edgevm.shared.errors import Conflict, RemoteError
from edgevm.shared.objects import Vm, VmStatus
from edgevm.shared.paging import Page, Paged
from edgevm.shared.spec import VmSpec
from tests.unit.test_protocol import BAD_SPECS


class Echo(msgspec.Struct):
    spec: VmSpec


@pytest.fixture
async def service(nc: NATS) -> AsyncIterator[tuple[Client, CommandService]]:
    """A command service on a node of its own with a few handlers that show each path of the adapter."""
    node = f"t{uuid.uuid4().hex[:8]}"
    svc = CommandService(nc, "edgevm-test")
    await svc.start()

    async def create(spec: VmSpec) -> Vm:
        return Vm(spec, VmStatus("defined", 1, "t", "t"))

    async def boom(ref: VmRef) -> Vm:
        raise RuntimeError("secret <object at 0xdeadbeef> in a repr")

    async def busy(ref: VmRef) -> Vm:
        raise Conflict(f"VM {ref.name} is busy with vm.start (task X)", "name")

    async def slow(ref: VmRef) -> Vm:
        await asyncio.sleep(10)
        raise AssertionError("not reached")

    async def huge(ref: VmRef) -> dict[str, str]:
        return {"blob": "x" * nc.max_payload}  # one byte of JSON around it is already too much

    for verb, handler, deadline in [("vm.create", create, 2.0), ("vm.boom", boom, 2.0),
                                     ("vm.busy", busy, 2.0), ("vm.slow", slow, 0.2), ("vm.huge", huge, 2.0)]:
        await svc.add(subjects.command(node, verb), handler, verb=verb, deadline=deadline)
    yield Client(nc, node), svc
    await svc.stop()


async def test_typed_reply(service: tuple[Client, CommandService]) -> None:
    client, _ = service
    vm = await client.call("vm.create", {"name": "a", "image": "img", "memory": "1GiB"}, Vm)
    assert vm.spec.memory == 1024**3 and vm.status.state == "defined"


@pytest.mark.parametrize(("doc", "field", "rule"), BAD_SPECS, ids=[f for _, f, _ in BAD_SPECS])
async def test_bad_input_is_400_naming_the_field_over_nats(
    service: tuple[Client, CommandService], doc: dict, field: str, rule: str
) -> None:
    client, _ = service
    msg = await client.nc.request(subjects.command(client.node, "vm.create"), json.dumps(doc).encode(), timeout=2)
    assert msg.headers is not None
    assert msg.headers["Nats-Service-Error-Code"] == "400"
    assert field in msg.headers["Nats-Service-Error"]
    body = json.loads(msg.data)["error"]
    assert body["code"] == "400" and body["field"] == field and rule in body["message"]


async def test_unknown_enum_value_lists_the_allowed_ones(service: tuple[Client, CommandService]) -> None:
    client, _ = service
    with pytest.raises(RemoteError) as info:
        await client.call("vm.create", {"name": "a", "image": "i", "firmware": "coreboot"})
    assert info.value.field == "firmware" and "'bios', 'uefi'" in info.value.message


async def test_malformed_json_and_empty_body(service: tuple[Client, CommandService]) -> None:
    client, _ = service
    msg = await client.nc.request(subjects.command(client.node, "vm.create"), b'{"name":', timeout=2)
    assert json.loads(msg.data)["error"]["code"] == "400"
    msg = await client.nc.request(subjects.command(client.node, "vm.create"), b"", timeout=2)
    body = json.loads(msg.data)["error"]
    assert body["code"] == "400" and body["field"] == "name"  # empty means {}: name is missing


async def test_unexpected_exception_is_500_without_python_text(service: tuple[Client, CommandService]) -> None:
    client, _ = service
    msg = await client.nc.request(subjects.command(client.node, "vm.boom"), b'{"name":"a"}', timeout=2)
    assert msg.headers is not None and msg.headers["Nats-Service-Error-Code"] == "500"
    text = msg.data.decode() + msg.headers["Nats-Service-Error"]
    for leak in ("RuntimeError", "0xdeadbeef", "Traceback", "secret", "repr"):
        assert leak not in text
    assert json.loads(msg.data)["error"]["message"].startswith("vm.boom failed because of an internal error")
    # and the service keeps serving
    vm = await client.call("vm.create", {"name": "b", "image": "img"}, Vm)
    assert vm.spec.name == "b"


async def test_domain_errors_keep_their_code_and_field(service: tuple[Client, CommandService]) -> None:
    client, _ = service
    with pytest.raises(RemoteError) as info:
        await client.call("vm.busy", {"name": "a"})
    assert (info.value.code, info.value.field) == ("409", "name") and "task X" in info.value.message


async def test_a_handler_past_its_deadline_is_503_and_does_not_block_others(
    service: tuple[Client, CommandService],
) -> None:
    client, _ = service
    slow = asyncio.create_task(client.call("vm.slow", {"name": "a"}))
    vm = await client.call("vm.create", {"name": "c", "image": "img"}, Vm)  # answered while slow still runs
    assert vm.spec.name == "c" and not slow.done()
    with pytest.raises(RemoteError) as info:
        await slow
    assert info.value.code == "503"


async def test_micro_ping_and_info_list_the_endpoints(service: tuple[Client, CommandService]) -> None:
    client, _ = service
    info = json.loads((await client.nc.request("$SRV.INFO.edgevm-test", b"", timeout=2)).data)
    assert {e["subject"] for e in info["endpoints"]} >= {subjects.command(client.node, "vm.create")}
    ping = json.loads((await client.nc.request("$SRV.PING.edgevm-test", b"", timeout=2)).data)
    assert ping["name"] == "edgevm-test"


async def test_a_reply_over_max_payload_is_422_naming_the_size_and_the_limit(
    service: tuple[Client, CommandService],
) -> None:
    client, _ = service
    limit = client.nc.max_payload
    with pytest.raises(RemoteError) as info:  # not a 503 "did not answer" after the client's timeout
        await client.call("vm.huge", {"name": "a"})
    size = limit + len('{"blob":""}')
    assert info.value.code == "422" and info.value.field is None
    assert f"{size} bytes" in info.value.message and f"{limit} bytes" in info.value.message
    assert "max_payload" in info.value.message
    assert "`limit`" not in info.value.message  # only a listing that comes in pages says to page
    vm = await client.call("vm.create", {"name": "d", "image": "img"}, Vm)  # and the service keeps serving
    assert vm.spec.name == "d"


class RowsRequest(Paged):
    after: str | None = None


async def test_a_listing_in_pages_fills_each_page_up_to_max_payload_and_only_a_whole_one_is_told_to_page(
    nc: NATS,
) -> None:
    node = f"t{uuid.uuid4().hex[:8]}"
    svc = CommandService(nc, "edgevm-test-pages")
    rows = [(f"r{i:02d}", msgspec.json.encode("x" * MEGA)) for i in range(20)]  # 20 MiB, over two max_payloads

    async def listing(req: RowsRequest) -> Page:
        return Page("rows", (row for row in rows if req.after is None or row[0] > req.after), req.limit)

    async def huge(req: RowsRequest) -> Page:  # one entry alone over max_payload: no page can hold it
        return Page("rows", iter([("big", msgspec.json.encode("x" * nc.max_payload))]), req.limit)

    for verb, handler in [("rows.list", listing), ("huge.list", huge)]:
        await svc.add(subjects.command(node, verb), handler, verb=verb)
    client = Client(nc, node, timeout=10)
    try:
        with pytest.raises(RemoteError) as info:
            await client.call("rows.list")
        assert info.value.code == "422" and "`limit`" in info.value.message and "`after`" in info.value.message
        seen: list[str] = []
        after = None
        while True:
            msg = await nc.request(subjects.command(node, "rows.list"),
                                   json.dumps({"limit": 1000, "after": after}).encode(), timeout=10)
            assert msg.headers is None and len(msg.data) <= nc.max_payload
            page = json.loads(msg.data)
            assert len(page["rows"]) == MAX_PAYLOAD // (MEGA + 3) or page["next"] is None  # as many as fit
            seen += [f"r{i:02d}" for i in range(len(seen), len(seen) + len(page["rows"]))]
            after = page["next"]
            if after is None:
                break
            assert after == seen[-1]
        assert seen == [key for key, _ in rows]
        for body, hinted in [({}, True), ({"limit": 1}, False)]:
            with pytest.raises(RemoteError) as info:
                await client.call("huge.list", body)
            assert info.value.code == "422" and ("`limit`" in info.value.message) == hinted, info.value.message
    finally:
        await svc.stop()


async def test_the_embedded_server_takes_8_mb_messages(nc: NATS) -> None:
    assert nc.max_payload == MAX_PAYLOAD == 8 * 1024 * 1024  # conftest's server is `edgevm node up`'s


async def _error_of(client: Client, verb: str, data: bytes) -> tuple[dict, dict[str, str]]:
    msg = await client.nc.request(subjects.command(client.node, verb), data, timeout=2)
    assert msg.headers is not None, msg.data[:200]
    return json.loads(msg.data)["error"], msg.headers


MEGA = 1024 * 1024
BIG = MEGA - 4096  # under the request limit, so the value itself reaches validation
# Each bad value is almost 1 MiB: repeated whole in the body and the header, the reply would be 2 MB.
HUGE_VALUES = [
    ("unknown-field", {"name": "a", "image": "i", "x" * BIG: 1}, "x" * 64),
    ("enum", {"name": "a", "image": "i", "firmware": "e" * BIG}, "firmware"),
    ("memory", {"name": "a", "image": "i", "memory": "m" * BIG}, "memory"),
    ("volume-size", {"name": "a", "image": "i", "volumes": [{"name": "d", "size": "9" * BIG}]}, "volumes[0].size"),
    ("virtual-ip", {"name": "a", "image": "i", "network": {"virtual_networks": [
        {"network": "n", "virtual_ip": "1" * BIG}]}}, "network.virtual_networks[0].virtual_ip"),
]


@pytest.mark.parametrize(("doc", "field"), [(d, f) for _, d, f in HUGE_VALUES], ids=[i for i, _, _ in HUGE_VALUES])
async def test_an_error_quotes_a_bounded_excerpt_of_a_huge_value(
    service: tuple[Client, CommandService], doc: dict, field: str
) -> None:
    client, _ = service
    error, headers = await _error_of(client, "vm.create", json.dumps(doc).encode())
    assert error["code"] == "400" and field in error["message"]
    assert len(error["message"]) <= 1024 and len(headers["Nats-Service-Error"]) <= 1024
    assert len(error["field"]) <= 256


async def test_a_request_over_the_limit_is_413_before_it_is_decoded(service: tuple[Client, CommandService]) -> None:
    client, _ = service
    doc = {"name": "a", "image": "i", "description": "d" * (MEGA + 1)}
    error, headers = await _error_of(client, "vm.create", json.dumps(doc).encode())
    assert error["code"] == headers["Nats-Service-Error-Code"] == "413"
    assert str(MEGA) in error["message"]
    vm = await client.call("vm.create", {"name": "e", "image": "img"}, Vm)
    assert vm.spec.name == "e"


@pytest.mark.parametrize("data", [b'{"name": "a\xff"}', b'{"na\xffme": "a"}'], ids=["in-a-value", "in-a-key"])
async def test_a_body_that_is_not_utf8_is_400(service: tuple[Client, CommandService], data: bytes) -> None:
    client, _ = service
    error, headers = await _error_of(client, "vm.busy", data)
    assert error["code"] == headers["Nats-Service-Error-Code"] == "400"
    assert "UTF-8" in error["message"] and "0xff" in error["message"] and "Error" not in headers["Nats-Service-Error"]


async def test_nesting_past_msgspec_is_400_naming_the_field(service: tuple[Client, CommandService]) -> None:
    client, _ = service
    deep = b"[" * 100_000 + b"]" * 100_000
    data = b'{"name": "a", "image": "i", "cloud_init": {"meta_data": {"k": ' + deep + b"}}}"
    error, _ = await _error_of(client, "vm.create", data)
    assert error["code"] == "400" and error["field"].startswith("cloud_init.meta_data.k[0]")
    assert "deeper than 32 levels" in error["message"]
