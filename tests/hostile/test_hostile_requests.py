"""Hostile requests, as an attacker sends them, to every subject of a running node.

Each must be answered within the deadline with a 4xx whose message and field are bounded and name the
field; afterwards every service still answers $SRV.PING, no service restarted, the node's log has no
traceback, and the node's images, VMs, VRFs, virtual networks and tasks are as they were.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import pytest

from edgevm.shared import subjects
from edgevm.shared.errors import RemoteError
from edgevm.shared.limits import (
    MAX_DEPTH,
    MAX_ERROR_FIELD,
    MAX_ERROR_MESSAGE,
    MAX_PEERS,
    MAX_PORT_MAPPINGS,
    MAX_REQUEST_BYTES,
    MAX_VIRTUAL_INTERFACES,
    MAX_VIRTUAL_NETWORKS,
    MAX_VOLUMES,
)
from tests.e2e.test_node_up import ping_names
from tests.hostile.conftest import HostileNode

NODE = "e2e"
DEADLINE = 10.0  # commands answer within 2 s; the rest is room for a loaded machine and 4 MB on the wire
MEGA = 1024 * 1024
BIG = MEGA - 4096  # a value just under the request limit, so it reaches validation
TASK_ID = "0" * 26

# Every command subject of a node, by the service that serves it (checked against $SRV.INFO below).
VERBS = {
    "lifecycle": ["image.import", "image.list", "image.get", "image.delete", "vm.create", "vm.get", "vm.list",
                  "vm.update", "vm.start", "vm.stop", "vm.restart", "vm.delete", "task.get", "task.cancel",
                  "task.list"],
    "netplumb": ["net.vrf.create", "net.vrf.list", "net.vrf.delete", "net.vnet.create", "net.vnet.list",
                 "net.vnet.delete", "net.status", "net.vm.prepare", "net.vm.activate", "net.vm.deactivate",
                 "net.vm.release", "net.reconcile"],
    "snapshotter": ["snapshot.create", "snapshot.restore", "snapshot.delete", "snapshot.list"],
    "flowwatch": ["flow.list", "flow.terminate"],
    "gateway": ["gw.node.list", "gw.vm.list", "gw.task.list", "gw.flow.list"],
}
ALL_VERBS = [verb for verbs in VERBS.values() for verb in verbs]


def subject_of(verb: str) -> str:
    return subjects.gateway(verb[3:]) if verb.startswith("gw.") else subjects.command(NODE, verb)


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# Bodies every subject must refuse with a 400 (or 413), whatever it takes.
GENERIC: list[tuple[str, bytes, str, str | None]] = [
    ("utf8-key", b'{"\xff\xfe": 1}', "400", None),
    ("utf8-value", b'{"zz": "a\xff"}', "400", None),
    ("not-json", b'{"name":', "400", None),
    ("array-body", b"[1, 2]", "400", None),
    ("null-body", b"null", "400", None),
    ("nested-body", nested(100_000), "400", None),
    ("nested-unknown", b'{"zz": ' + nested(100_000) + b"}", "400", "zz"),
    ("unknown-field", b'{"zz": 1}', "400", "zz"),
    ("huge-unknown-field", json.dumps({"k" * BIG: 1}).encode(), "400", "k" * 64),
    ("over-the-limit", b'{"zz": "' + b"x" * (MAX_REQUEST_BYTES + 1) + b'"}', "413", None),
    ("4mb", b'{"zz": "' + b"x" * (4 * MEGA) + b'"}', "413", None),
]


@dataclass(frozen=True)
class Case:
    """One hostile request: what is sent where, and the code and field of the error it must get."""

    id: str
    verb: str
    body: Any  # encoded as JSON, or bytes sent as they are
    code: str = "400"
    field: str | None = None
    says: str = ""  # a piece of the message


def vm(**fields: Any) -> dict[str, Any]:
    return {"name": "hx", "image": "base", **fields}


def billion_laughs(head: str, levels: int = 10) -> str:
    """YAML of 9 aliases of 9 aliases ... `levels` deep: 9**levels values in under 1 KB."""
    lines = [head, "a0: &a0 [" + ", ".join(["lol"] * 9) + "]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def deep_object(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"k": value}
    return value


CASES = [
    # 1: huge values are quoted as a bounded excerpt, whatever the field.
    Case("huge-memory", "vm.create", vm(memory="m" * BIG), field="memory"),
    Case("huge-subnet", "net.vrf.create", {"name": "hx", "subnet": "1" * BIG}, field="subnet"),
    Case("huge-firmware", "vm.create", vm(firmware="f" * BIG), field="firmware"),
    Case("huge-image-path", "image.import", {"name": "hx", "path": "p" * BIG}, field="path"),
    Case("huge-description", "snapshot.create", {"vm": "web", "name": "s", "description": "d" * BIG},
         field="description"),
    Case("huge-flow-id", "flow.terminate", {"vm": "web", "id": "i" * BIG}, field="id"),
    Case("huge-user-data", "vm.create", vm(cloud_init={"user_data": "#cloud-config\n" + "u" * BIG}),
         field="cloud_init.user_data"),
    Case("huge-network-config", "vm.update", {"name": "web", "revision": 1, "cloud_init": {
        "network_config": "n" * BIG}}, field="cloud_init.network_config"),
    Case("update-huge-image", "vm.update", {"name": "web", "revision": 1, "image": "i" * BIG}, field="image"),
    Case("update-huge-hostname", "vm.update", {"name": "web", "revision": 1, "hostname": "h" * BIG},
         field="hostname"),
    Case("update-huge-memory", "vm.update", {"name": "web", "revision": 1, "memory": "9" * BIG}, field="memory"),
    # 3: numbers past their range.
    Case("memory-400-nines", "vm.create", vm(memory="9" * 400 + "GB"), field="memory", says="at most"),
    Case("memory-10e30", "vm.create", vm(memory=10**30), field="memory", says="at most"),
    Case("volume-size-10e30", "vm.create", vm(volumes=[{"name": "d", "size": 10**30}]), field="volumes[0].size",
         says="at most"),
    Case("volume-size-nines", "vm.create", vm(volumes=[{"name": "d", "size": "9" * 400 + "GB"}]),
         field="volumes[0].size", says="at most"),
    Case("cpu-10e30", "vm.create", vm(cpu=10**30), field="cpu"),
    Case("cpu-0", "vm.create", vm(cpu=0), field="cpu"),
    Case("stop-timeout-negative", "vm.create", vm(stop_timeout=-1), field="stop_timeout"),
    Case("host-port-70000", "vm.create", vm(network={"port_mappings": [
        {"host_interface": "eth0", "host_port": 70000, "vm_port": 80}]}),
        field="network.port_mappings[0].host_port"),
    Case("vni-2e24", "net.vnet.create", {"name": "hx", "cidr": "172.16.9.0/24", "vni": 2**24}, field="vni"),
    Case("task-limit-10e30", "task.list", {"limit": 10**30}, field="limit"),
    Case("flow-limit-0", "flow.list", {"vm": "web", "limit": 0}, field="limit"),
    Case("gw-limit-float", "gw.task.list", {"limit": 1.5}, field="limit"),
    Case("vm-list-limit-0", "vm.list", {"limit": 0}, field="limit", says=">= 1"),
    Case("vm-list-limit-1001", "vm.list", {"limit": 1001}, field="limit", says="<= 1000"),
    Case("vm-list-limit-string", "vm.list", {"limit": "10"}, field="limit"),
    Case("vm-list-after-huge", "vm.list", {"limit": 5, "after": "a" * BIG}, field="after", says="length <= 63"),
    Case("vm-list-after-control", "vm.list", {"after": "a\u0007"}, field="after"),
    Case("gw-vm-list-limit-10e30", "gw.vm.list", {"limit": 10**30}, field="limit"),
    Case("gw-vm-list-after-huge", "gw.vm.list", {"after": "e2e/" + "a" * BIG}, field="after", says="length <= 127"),
    Case("gw-vm-list-after-no-node", "gw.vm.list", {"limit": 5, "after": "web"}, field="after"),
    # 4: deep nesting.
    Case("meta-data-100000-deep", "vm.create",
         b'{"name": "hx", "image": "base", "cloud_init": {"meta_data": ' + b'{"k": ' * 100_000 + b"1" + b"}" * 100_002,
         field="cloud_init.meta_data.k.k", says=f"deeper than {MAX_DEPTH}"),
    Case("meta-data-40-deep", "vm.create", vm(cloud_init={"meta_data": deep_object(40)}),
         field="cloud_init.meta_data", says=f"deeper than {MAX_DEPTH}"),
    Case("user-data-60000-brackets", "vm.create", vm(cloud_init={"user_data": "#cloud-config\n" + "[" * 60000}),
         field="cloud_init.user_data"),
    Case("network-config-60000-brackets", "vm.create", vm(cloud_init={"network_config": "[" * 60000}),
         field="cloud_init.network_config"),
    Case("network-config-40-deep", "vm.create", vm(cloud_init={"network_config": json.dumps(deep_object(40))}),
         field="cloud_init.network_config", says=f"deeper than {MAX_DEPTH}"),
    # Aliases of aliases: a walk of the expansion held lifecycle's event loop for minutes (no reply, no PING).
    Case("user-data-billion-laughs", "vm.create", vm(cloud_init={"user_data": billion_laughs("#cloud-config")}),
         field="cloud_init.user_data", says="aliases"),
    Case("network-config-billion-laughs", "vm.update", {"name": "web", "revision": 1, "cloud_init": {
        "network_config": billion_laughs("version: 2", 30)}}, field="cloud_init.network_config", says="aliases"),
    # Control characters in a description: libvirt's XML refused them only once the snapshot task ran.
    Case("snapshot-description-control", "snapshot.create", {"vm": "web", "name": "s", "description": "a\u0001b"},
         field="description"),
    Case("snapshot-description-nul", "snapshot.create", {"vm": "web", "name": "s", "description": "a\u0000b"},
         field="description"),
    Case("snapshot-description-fffe", "snapshot.create", {"vm": "web", "name": "s", "description": "\ufffe"},
         field="description"),
    Case("vm-description-control", "vm.create", vm(description="a\u001bb"), field="description"),
    Case("update-description-nul", "vm.update", {"name": "web", "revision": 1, "description": "\u0000"},
         field="description"),
    # 5: names ending in a newline.
    Case("image-name-newline", "image.import", {"name": "imp\n", "path": "base.qcow2"}, field="name"),
    Case("image-get-newline", "image.get", {"name": "base\n"}, field="name"),
    Case("vm-name-newline", "vm.create", vm(name="fzn\n"), field="name"),
    Case("vm-get-newline", "vm.get", {"name": "web\n"}, field="name"),
    Case("hostname-newline", "vm.create", vm(hostname="x\n"), field="hostname"),
    Case("volume-name-newline", "vm.create", vm(volumes=[{"name": "d\n", "size": "1MB"}]), field="volumes[0].name"),
    Case("interface-newline", "vm.create", vm(network={"port_mappings": [
        {"host_interface": "eth0\n", "host_port": 8080, "vm_port": 80}]}),
        field="network.port_mappings[0].host_interface"),
    Case("vrf-name-newline", "net.vrf.create", {"name": "red\n", "subnet": "10.45.0.0/24"}, field="name"),
    Case("vnet-name-newline", "net.vnet.create", {"name": "vn\n", "cidr": "172.16.9.0/24", "vni": 9}, field="name"),
    Case("snapshot-request-id-newline", "snapshot.create", {"vm": "web", "name": "s1", "request_id": "r\n"},
         field="request_id"),
    Case("snapshot-name-newline", "snapshot.delete", {"vm": "web", "name": "s1\n"}, field="name"),
    Case("task-id-newline", "task.get", {"id": TASK_ID + "\n"}, field="id"),
    Case("flow-vm-newline", "flow.list", {"vm": "web\n"}, field="vm"),
    Case("gw-node-newline", "gw.vm.list", {"node": "e2e\n"}, field="node"),
    Case("vm-list-after-newline", "vm.list", {"limit": 5, "after": "web\n"}, field="after"),
    Case("gw-vm-list-after-newline", "gw.vm.list", {"limit": 5, "after": "e2e/web\n"}, field="after"),
    # 6: subnets that are never a network of VMs.
    *[Case(f"vrf-subnet-{net}", "net.vrf.create", {"name": "hx", "subnet": net}, field="subnet", says=why)
      for net, why in [("0.0.0.0/0", "whole IPv4 space"), ("127.0.0.0/8", "loopback"),
                       ("224.0.0.0/24", "multicast"), ("169.254.64.0/24", "link-local"),
                       ("240.0.0.0/24", "reserved"), ("10.77.0.0/25", "default VRF")]],
    Case("vnet-cidr-default-route", "net.vnet.create", {"name": "hx", "cidr": "0.0.0.0/0", "vni": 9},
         field="cidr", says="whole IPv4 space"),
    Case("vnet-cidr-loopback", "net.vnet.create", {"name": "hx", "cidr": "127.0.0.0/24", "vni": 9},
         field="cidr", says="loopback"),
    # 7: lists past their maximum.
    Case("volumes-max+1", "vm.create", vm(volumes=[{"name": f"d{i}", "size": "1MB"} for i in range(MAX_VOLUMES + 1)]),
         field="volumes"),
    Case("volumes-10000", "vm.create", vm(volumes=[{"name": f"d{i}", "size": "1MB"} for i in range(10_000)]),
         field="volumes"),
    Case("port-mappings-max+1", "vm.create", vm(network={"port_mappings": [
        {"host_interface": "eth0", "host_port": 1000 + i, "vm_port": 80} for i in range(MAX_PORT_MAPPINGS + 1)]}),
        field="network.port_mappings"),
    Case("virtual-networks-max+1", "vm.create", vm(network={"virtual_networks": [
        {"network": f"n{i}", "virtual_ip": f"172.16.0.{i + 1}"} for i in range(MAX_VIRTUAL_NETWORKS + 1)]}),
        field="network.virtual_networks"),
    Case("virtual-interfaces-max+1", "vm.create", vm(network={"virtual_interfaces": [
        {"name": f"eth{i}", "destination": "eth0"} for i in range(MAX_VIRTUAL_INTERFACES + 1)]}), field="network.virtual_interfaces"),
    Case("peers-max+1", "net.vnet.create", {"name": "hx", "cidr": "172.16.9.0/24", "vni": 9,
                                          "peers": [f"192.0.2.{i % 250 + 1}" for i in range(MAX_PEERS + 1)]}, field="peers"),
    Case("update-volumes-max+1", "vm.update", {"name": "web", "revision": 1, "volumes": [
        {"name": f"d{i}", "size": "1MB"} for i in range(MAX_VOLUMES + 1)]}, field="volumes"),
    # 8: the node-internal net.vm.* requests are as strict as the public ones.
    Case("net-vm-deactivate-unknown-field", "net.vm.deactivate", {"vm": "web", "zz": 1}, field="zz"),
    Case("net-vm-release-unknown-field", "net.vm.release", {"vm": "web", "zz": 1}, field="zz"),
    Case("net-vm-activate-unknown-field", "net.vm.activate", {"vm": "web", "zz": 1}, field="zz"),
    Case("net-vm-prepare-path", "net.vm.prepare", {"vm": "../x", "network": {}}, field="vm"),
    Case("net-vm-prepare-hostname", "net.vm.prepare", {"vm": "hx", "network": {}, "hostname": "x\n"},
         field="hostname"),
    Case("net-vm-release-path", "net.vm.release", {"vm": "../../etc"}, field="vm"),
    # Refused well already (keep them so): traversal, special files, bad ports and prefixes, IPv6, ids as paths.
    Case("import-traversal", "image.import", {"name": "hx", "path": "../../../etc/shadow"}, field="path"),
    Case("import-absolute", "image.import", {"name": "hx", "path": "/etc/shadow"}, field="path"),
    Case("import-dev-zero", "image.import", {"name": "hx", "path": "/dev/zero"}, field="path"),
    Case("volume-source-escape", "vm.create", vm(volumes=[{"name": "d", "source": "../../../etc/passwd"}]),
         field="volumes[0].source"),
    Case("vrf-ipv6", "net.vrf.create", {"name": "hx", "subnet": "fd00::/64"}, field="subnet"),
    Case("vrf-prefix-30", "net.vrf.create", {"name": "hx", "subnet": "10.45.0.0/30"}, field="subnet"),
    Case("vrf-host-bits", "net.vrf.create", {"name": "hx", "subnet": "10.45.0.1/24"}, field="subnet"),
    Case("virtual-ip-ipv6", "vm.create", vm(network={"virtual_networks": [{"network": "n", "virtual_ip": "::1"}]}),
         field="network.virtual_networks[0].virtual_ip"),
    Case("nested-unknown-field", "vm.create", vm(network={"vrf": "blue", "zz": 1}), field="network.zz"),
    Case("task-id-path", "task.get", {"id": "../../etc/passwd"}, field="id"),
    Case("flow-id-path", "flow.terminate", {"vm": "web", "id": "../../etc/passwd"}, code="404", field="id"),
    Case("memory-negative", "vm.create", vm(memory=-1), field="memory"),
    Case("memory-bool", "vm.create", vm(memory=True), field="memory"),
    Case("name-too-long", "vm.create", vm(name="a" * 64), field="name"),
    Case("name-uppercase", "net.vrf.create", {"name": "RED", "subnet": "10.45.0.0/24"}, field="name"),
    Case("vm-exists", "vm.create", vm(name="web"), code="409", field="name"),
    Case("vrf-in-use", "net.vrf.delete", {"name": "blue"}, code="409", field="name"),
    Case("task-unknown", "task.get", {"id": TASK_ID}, code="404", field="id"),
]


async def send(hostile_node: HostileNode, verb: str, data: bytes) -> tuple[dict[str, Any], dict[str, str]]:
    """Send `data` to `verb`'s subject; return the error object and headers (the reply must be an error)."""
    msg = await hostile_node.nc.request(subject_of(verb), data, timeout=DEADLINE)
    assert msg.headers is not None and "Nats-Service-Error-Code" in msg.headers, f"not an error: {msg.data[:300]!r}"
    error = json.loads(msg.data)["error"]
    assert error["code"] == msg.headers["Nats-Service-Error-Code"]
    assert len(error["message"]) <= MAX_ERROR_MESSAGE and len(msg.headers["Nats-Service-Error"]) <= MAX_ERROR_MESSAGE
    assert error["field"] is None or len(error["field"]) <= MAX_ERROR_FIELD
    for leak in ("Traceback", "Error(", "<object", "File \""):
        assert leak not in error["message"] and leak not in msg.headers["Nats-Service-Error"]
    return error, msg.headers


async def node_state(hostile_node: HostileNode) -> dict[str, Any]:
    """What the node holds, as its commands list it, and the files of its image store."""
    call = hostile_node.client.call
    images = hostile_node.state / "images"
    return {
        "images": await call("image.list"),
        "vms": await call("vm.list"),
        "vrfs": await call("net.vrf.list"),
        "vnets": await call("net.vnet.list"),
        "tasks": await call("task.list", {"limit": 500}),
        "files": sorted(str(p.relative_to(hostile_node.state)) for p in images.rglob("*")) if images.exists() else [],
    }


@pytest.fixture(scope="module")
async def before(hostile_node: HostileNode) -> dict[str, Any]:
    return await node_state(hostile_node)


async def test_the_table_covers_every_subject_the_node_serves(hostile_node: HostileNode,
                                                             before: dict[str, Any]) -> None:
    served = set()
    for service in hostile_node.services:
        info = json.loads((await hostile_node.nc.request(f"$SRV.INFO.edgevm-{service}", b"", timeout=5)).data)
        served |= {endpoint["subject"] for endpoint in info["endpoints"]}
    assert served == {subject_of(verb) for verb in ALL_VERBS}


@pytest.mark.parametrize("verb", ALL_VERBS)
@pytest.mark.parametrize(("data", "code", "field"), [g[1:] for g in GENERIC], ids=[g[0] for g in GENERIC])
async def test_every_subject_refuses_malformed_bodies(hostile_node: HostileNode, before: dict[str, Any], verb: str,
                                                      data: bytes, code: str, field: str | None) -> None:
    error, _ = await send(hostile_node, verb, data)
    assert error["code"] == code, error
    if field is not None:
        assert error["field"].startswith(field) and field[:64] in error["message"], error
    if data.startswith(b'{"\xff'):
        assert "UTF-8" in error["message"]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_hostile_requests_get_a_4xx_naming_the_field(hostile_node: HostileNode, before: dict[str, Any],
                                                           case: Case) -> None:
    data = case.body if isinstance(case.body, bytes) else json.dumps(case.body).encode()
    error, _ = await send(hostile_node, case.verb, data)
    assert error["code"] == case.code, error
    assert error["field"].startswith(case.field), error
    if case.code == "400":  # a 400 names the field in its message too
        assert error["field"] in error["message"], error
    assert case.says in error["message"], error


# 4 MB bodies whose bad value (or field name) an error used to repeat whole, in the body and the header: over
# the embedded server's 8 MB max_payload, the reply took the service off NATS for good.
FOUR_MB = 4 * MEGA + 300 * 1024
ECHOED = [
    ("lifecycle", "vm.create", json.dumps(vm(memory="9" * FOUR_MB)).encode()),
    ("netplumb", "net.vrf.create", json.dumps({"name": "hx", "subnet": "1" * FOUR_MB}).encode()),
    ("snapshotter", "snapshot.create", json.dumps({"vm": "web", "name": "s", "k" * FOUR_MB: 1}).encode()),
    ("flowwatch", "flow.list", json.dumps({"vm": "web", "k" * FOUR_MB: 1}).encode()),
    ("gateway", "gw.vm.list", json.dumps({"k" * FOUR_MB: 1}).encode()),
]


async def test_a_4mb_request_to_each_service_then_a_normal_command_to_each(hostile_node: HostileNode,
                                                                          before: dict[str, Any]) -> None:
    for _, verb, data in ECHOED:
        error, _ = await send(hostile_node, verb, data)
        assert error["code"] == "413", error
    await assert_every_service_answers(hostile_node)


async def assert_every_service_answers(hostile_node: HostileNode) -> None:
    """Every service answers $SRV.PING and a normal command of its own."""
    assert {f"edgevm-{s}" for s in hostile_node.services} <= await ping_names(hostile_node.node.url)
    client = hostile_node.client
    assert (await client.call("vm.get", {"name": "web"}))["spec"]["name"] == "web"
    assert (await client.call("net.status", {"vm": "web"}))["vrf"] == "blue"
    # Each service opens its own test:///default, whose domains live in that process: the snapshotter's has no
    # `web`, and says so with a 404.
    with pytest.raises(RemoteError) as info:
        await client.call("snapshot.list", {"vm": "web"})
    assert info.value.code == "404"
    assert (await client.call("flow.list", {"vm": "web"}))["flows"] == []
    assert "nodes" in await client.gateway("node.list")


async def discovery_replies(hostile_node: HostileNode, subject: str, headers: dict[str, str]) -> set[str]:
    """Send one discovery request to `subject` with `headers`; return the names of the services that answer."""
    nc = hostile_node.nc
    wanted = {f"edgevm-{s}" for s in hostile_node.services}
    inbox = await nc.subscribe(nc.new_inbox())
    try:
        await nc.publish(subject, b"", reply=inbox.subject, headers=headers)
        names: set[str] = set()
        while names != wanted:
            try:
                msg = await inbox.next_msg(timeout=DEADLINE)
            except TimeoutError:
                break
            names.add(json.loads(msg.data)["name"])
        return names
    finally:
        await inbox.unsubscribe()


@pytest.mark.parametrize("verb", ["PING", "INFO", "STATS"])
async def test_discovery_with_headers_near_max_payload_is_answered_by_every_service(
        hostile_node: HostileNode, before: dict[str, Any], verb: str) -> None:
    # nats.micro's discovery replies used to echo the request's headers: one $SRV.PING with 8 MB of them made
    # every service's reply too large for NATS, and the server closed all five connections at once.
    headers = {"X-Pad": "p" * (hostile_node.nc.max_payload - 64)}
    names = await discovery_replies(hostile_node, f"$SRV.{verb}", headers)
    assert names == {f"edgevm-{s}" for s in hostile_node.services}
    assert "exited with code" not in hostile_node.log()


async def test_requests_without_a_reply_subject_are_served_quietly(hostile_node: HostileNode,
                                                                   before: dict[str, Any]) -> None:
    start = len(hostile_node.log())
    for verb in ("vm.get", "net.status", "snapshot.list", "flow.list", "gw.vm.list"):
        await hostile_node.nc.publish(subject_of(verb), json.dumps({"name": "web"} if verb == "vm.get" else
                                                                   {} if verb.startswith("gw.") else
                                                                   {"vm": "web"}).encode())
    for service in hostile_node.services:
        await hostile_node.nc.publish(f"$SRV.PING.edgevm-{service}", b"")
    await assert_every_service_answers(hostile_node)  # served after the publishes, on the same connections
    await asyncio.sleep(1)  # a service's log reaches the file a moment after its reply (only absence is checked)
    logged = hostile_node.log()[start:]
    assert "Traceback" not in logged and "no reply subject" not in logged, logged



async def test_after_the_attack_the_node_answers_and_is_unchanged(hostile_node: HostileNode,
                                                                 before: dict[str, Any]) -> None:
    await assert_every_service_answers(hostile_node)
    assert await node_state(hostile_node) == before
    log = hostile_node.log()
    assert "Traceback" not in log, log[log.index("Traceback") - 2000: log.index("Traceback") + 3000]
    assert "exited with code" not in log, "a service crashed (and was restarted) during the attack"
