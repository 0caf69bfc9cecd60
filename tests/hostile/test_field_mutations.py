"""Every field of a valid request of every subject, replaced by each hostile value in turn (on a node of its own).

Whatever the value, the node answers within the deadline, never with a 500 or 503 (a hostile value is the
caller's fault, never a backend's), an error stays short, and no service logs a traceback or restarts.
Some values are valid (`"0"` is a name): those requests succeed, which is why this runs on its own node.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.hostile.conftest import HostileNode
from tests.hostile.test_hostile_requests import DEADLINE, assert_every_service_answers, subject_of

VALID: dict[str, dict[str, Any]] = {
    "image.import": {"name": "hx", "path": "base.qcow2", "guest_os": "linux", "format": "qcow2"},
    "image.get": {"name": "nope"},
    "image.delete": {"name": "nope"},
    "vm.create": {
        "name": "hx", "image": "base", "description": "", "firmware": "bios", "device_bus": "virtio",
        "hostname": "h", "stop_timeout": 5, "auto_start": False, "cpu": 1, "memory": "64MB",
        "volumes": [{"name": "d", "size": "1MB", "kind": "disk", "bus": "sata"}],
        "network": {"vrf": "blue", "port_mappings": [
            {"host_interface": "lo", "host_port": 8080, "vm_port": 80, "protocol": "tcp"}],
            "virtual_networks": [{"network": "vn", "virtual_ip": "172.16.9.5", "allow_outbound": False}],
            "virtual_interfaces": [{"name": "lo", "destination": "eth1"}]},
        "cloud_init": {"user_data": "#cloud-config\n", "network_config": None, "meta_data": {"a": 1}},
    },
    "vm.get": {"name": "nope"},
    "vm.list": {"limit": 5, "after": "a"},
    "vm.update": {"name": "web", "revision": 999, "description": "x", "cpu": 1, "memory": "64MB"},
    "vm.start": {"name": "nope"},
    "vm.stop": {"name": "nope", "force": True},
    "vm.restart": {"name": "nope"},
    "vm.delete": {"name": "nope"},
    "task.get": {"id": "0" * 26},
    "task.cancel": {"id": "0" * 26},
    "task.list": {"vm": "web", "limit": 5},
    "net.vrf.create": {"name": "blue", "subnet": "10.46.0.0/24"},
    "net.vrf.delete": {"name": "nope"},
    "net.vnet.create": {"name": "vn", "cidr": "172.16.9.0/24", "vni": 9, "peers": ["192.0.2.1"]},
    "net.vnet.delete": {"name": "nope"},
    "net.status": {"vm": "nope"},
    "net.vm.prepare": {"vm": "nope", "network": {"vrf": "nope"}, "hostname": None},
    "net.vm.activate": {"vm": "nope"},
    "net.vm.deactivate": {"vm": "nope"},
    "net.vm.release": {"vm": "nope"},
    "snapshot.create": {"vm": "nope", "name": "s", "description": "", "request_id": "r1"},
    "snapshot.restore": {"vm": "nope", "name": "s"},
    "snapshot.delete": {"vm": "nope", "name": "s"},
    "snapshot.list": {"vm": "nope"},
    "flow.list": {"vm": "nope", "status": "all", "limit": 5},
    "flow.terminate": {"vm": "nope", "id": "x"},
    "gw.vm.list": {"node": "e2e", "limit": 5, "after": "e2e/a"},
    "gw.task.list": {"node": "e2e", "vm": "web", "limit": 5},
    "gw.flow.list": {"node": "e2e", "vm": "web", "status": "all", "limit": 5},
}
HOSTILE: list[Any] = [
    "x" * 200_000, "1" * 200_000, "9" * 200_000 + "GB", "", " ", "0", "a\n", "../../x", "\u0000", "é" * 70,
    "%s%n", "\ud800", -1, 0, 10**30, -(10**30), 1.5, 1e308, None, True, [], {}, [[[[[[1]]]]]],
    {"a": {"b": 1}}, ["x"] * 1000,
]


def paths(value: Any, at: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path into `value` (keys and list indexes), deepest first."""
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    for key, child in children:
        yield from paths(child, (*at, key))
    if at:
        yield at


def replaced(doc: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    copy = json.loads(json.dumps(doc))
    parent = copy
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return copy  # type: ignore[no-any-return]


MUTATIONS = [(verb, path) for verb, doc in VALID.items() for path in paths(doc)]


@pytest.mark.parametrize(("verb", "path"), MUTATIONS, ids=[f"{v}:{'.'.join(map(str, p))}" for v, p in MUTATIONS])
async def test_no_hostile_value_in_any_field_gets_a_5xx(hostile_node: HostileNode, verb: str,
                                                        path: tuple[Any, ...]) -> None:
    for value in HOSTILE:
        data = json.dumps(replaced(VALID[verb], path, value)).encode("utf-8", "surrogatepass")
        msg = await hostile_node.nc.request(subject_of(verb), data, timeout=DEADLINE)
        headers = msg.headers or {}
        code = headers.get("Nats-Service-Error-Code", "200")
        shown = repr(value)[:40]
        assert code not in ("500", "503"), f"{verb} {path} = {shown}: {msg.data[:300]!r}"
        if code != "200":
            assert len(msg.data) < 3000 and len(headers["Nats-Service-Error"]) <= 1024, f"{verb} {path} = {shown}"


async def test_afterwards_every_service_answers_and_none_logged_a_traceback(hostile_node: HostileNode) -> None:
    await assert_every_service_answers(hostile_node)
    log = hostile_node.log()
    assert "Traceback" not in log, log[log.index("Traceback") - 2000: log.index("Traceback") + 3000]
    assert "exited with code" not in log
