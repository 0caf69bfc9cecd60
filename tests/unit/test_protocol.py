"""Protocol structs: round trips, size parsing, and bad input named by field and rule."""

from __future__ import annotations

import msgspec
import pytest

from edgevm.shared import commands as c
from edgevm.shared.errors import InvalidRequest, invalid_from_msgspec
from edgevm.shared.events import (
    FlowOpened,
    Heartbeat,
    NetApplied,
    TaskUpdated,
    VmCreated,
    decode_event,
    event_subject_tail,
)
from edgevm.shared.ids import id_time_ms, new_id
from edgevm.shared.objects import Flow, Image, Snapshot, Task, Vm, VmStatus
from edgevm.shared.spec import VmSpec
from edgevm.shared.units import format_size, parse_size

FULL_SPEC = {
    "name": "web-1",
    "description": "a web server",
    "image": "debian-12",
    "firmware": "uefi",
    "device_bus": "sata",
    "hostname": "web1.example.org",
    "stop_timeout": 30,
    "auto_start": True,
    "cpu": 2,
    "memory": "2GiB",
    "volumes": [
        {"name": "data", "kind": "disk", "size": "10GB", "bus": "virtio"},
        {"name": "tools", "kind": "cdrom", "source": "tools-iso"},
    ],
    "network": {
        "vrf": "blue",
        "port_mappings": [{"protocol": None, "host_interface": "eth0", "host_port": 8080, "vm_port": 80}],
        "virtual_networks": [{"network": "backend", "virtual_ip": "10.99.0.5", "allow_outbound": True}],
        "virtual_interfaces": [{"name": "eth1", "destination": "eth1"}],
    },
    "cloud_init": {"user_data": "#cloud-config\n{}\n", "network_config": None, "meta_data": {"k": "v"}},
}


def decode_spec(doc: dict) -> VmSpec:
    return msgspec.json.decode(msgspec.json.encode(doc), type=VmSpec)


def test_vm_spec_round_trips_with_memory_in_bytes() -> None:
    spec = decode_spec(FULL_SPEC)
    assert spec.memory == 2 * 1024**3
    assert spec.volumes[0].size == 10 * 1024**3
    again = msgspec.json.decode(msgspec.json.encode(spec), type=VmSpec)
    assert again == spec


def test_defaults_follow_the_protocol() -> None:
    spec = decode_spec({"name": "a", "image": "img"})
    assert (spec.firmware, spec.device_bus, spec.stop_timeout, spec.cpu) == ("bios", "virtio", 120, 1)
    assert spec.memory == 512 * 1024**2
    assert spec.network.vrf == "default" and spec.cloud_init is None and spec.hostname is None


@pytest.mark.parametrize(
    "obj",
    [
        Vm(decode_spec(FULL_SPEC), VmStatus("running", 3, "2026-01-01T00:00:00Z", "2026-01-01T00:00:01Z")),
        Image("deb", "qcow2", "linux", 123, "ab" * 32, "2026-01-01T00:00:00Z"),
        Task(new_id(), "n1", "vm.start", "running", "2026-01-01T00:00:00Z", vm="a", progress=50),
        Snapshot("s1", "a", "2026-01-01T00:00:00Z", "running", "internal", parent=None, current=True),
        Flow("f1", "n1", "a", "tcp", "10.0.0.1", 1234, "10.0.0.2", 80, "inbound", "active", "2026-01-01T00:00:00Z"),
    ],
    ids=lambda o: type(o).__name__,
)
def test_objects_round_trip(obj: object) -> None:
    assert msgspec.json.decode(msgspec.json.encode(obj), type=type(obj)) == obj


def test_events_are_a_tagged_union_with_subjects() -> None:
    vm = Vm(decode_spec(FULL_SPEC), VmStatus("defined", 1, "t", "t"))
    task = Task("01J0000000000000000000000A", "n1", "vm.start", "queued", "t")
    flow = Flow("f", "n1", "web-1", "tcp", "a", 1, "b", 2, "inbound", "active", "t")
    cases = [
        (VmCreated(at="t", vm=vm), "vm.created", "vm.web-1"),
        (TaskUpdated(at="t", task=task), "task.updated", f"task.{task.id}"),
        (FlowOpened(at="t", flow=flow), "flow.opened", "flow.web-1"),
        (NetApplied(at="t", vm="web-1", detail={"x": 1}), "net.applied", "net.web-1"),
        (Heartbeat(at="t", node="n1", services=["lifecycle"], cpus=2, memory_bytes=1), "node.heartbeat", "node.heartbeat"),
    ]
    for event, type_, tail in cases:
        raw = msgspec.json.encode(event)
        assert msgspec.json.decode(raw)["type"] == type_
        assert decode_event(raw) == event
        assert event_subject_tail(event) == tail


@pytest.mark.parametrize(
    ("text", "size"),
    [
        (1073741824, 1073741824),
        ("512MB", 512 * 1024**2),
        ("512MiB", 512 * 1024**2),
        ("2GiB", 2 * 1024**3),
        ("2 gb", 2 * 1024**3),
        ("1KB", 1024),
        ("100B", 100),
        ("1.5GiB", 1536 * 1024**2),
        ("4096", 4096),
    ],
)
def test_sizes_parse_as_binary_units(text: int | str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["12XB", "MB", "-1GB", "1.3B", "", "1e9"])
def test_bad_sizes_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_format_size_picks_the_largest_exact_unit() -> None:
    assert [format_size(s) for s in (512 * 1024**2, 1024**3, 1000, 1536)] == ["512MiB", "1GiB", "1000B", "1536B"]


def test_ids_sort_by_creation_time() -> None:
    ids = [new_id() for _ in range(2000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert abs(id_time_ms(ids[0]) - id_time_ms(ids[-1])) < 5000


# Each bad spec must fail with a 400 whose field is the offending field and whose message says the rule.
BAD_SPECS = [
    ({"image": "x"}, "name", "required"),
    ({"name": "Bad_Name", "image": "x"}, "name", "matching regex"),
    ({"name": "-a", "image": "x"}, "name", "matching regex"),
    ({"name": "a", "image": "x", "cpu": 0}, "cpu", ">= 1"),
    ({"name": "a", "image": "x", "cpu": "two"}, "cpu", "int"),
    ({"name": "a", "image": "x", "stop_timeout": 0}, "stop_timeout", ">= 1"),
    ({"name": "a", "image": "x", "stop_timeout": 3601}, "stop_timeout", "<= 3600"),
    ({"name": "a", "image": "x", "memory": "12XB"}, "memory", "unit"),
    ({"name": "a", "image": "x", "memory": "1MB"}, "memory", "at least"),
    ({"name": "a", "image": "x", "firmware": "coreboot"}, "firmware", "bios"),
    ({"name": "a", "image": "x", "device_bus": "scsi"}, "device_bus", "virtio"),
    ({"name": "a", "image": "x", "colour": "red"}, "colour", "not a known field"),
    ({"name": "a", "image": "x", "hostname": "bad_host!"}, "hostname", "RFC 1123"),
    ({"name": "a", "image": "x", "cloud_init": {"user_data": "x" * 65537}}, "cloud_init.user_data", "length"),
    ({"name": "a", "image": "x", "volumes": [{"name": "d", "size": "1GB"}, {"name": "d", "size": "1GB"}]},
     "volumes[1].name", "used twice"),
    ({"name": "a", "image": "x", "volumes": [{"name": "d"}]}, "volumes[0].source", "size"),
    ({"name": "a", "image": "x", "volumes": [{"name": "d", "size": "1QB"}]}, "volumes[0].size", "unit"),
    ({"name": "a", "image": "x", "network": {"port_mappings": [
        {"host_interface": "eth0", "host_port": 0, "vm_port": 80}]}}, "network.port_mappings[0].host_port", ">= 1"),
    ({"name": "a", "image": "x", "network": {"port_mappings": [
        {"host_interface": "eth0", "host_port": 70000, "vm_port": 80}]}}, "network.port_mappings[0].host_port", "<= 65535"),
    ({"name": "a", "image": "x", "network": {"port_mappings": [
        {"host_interface": "eth0", "host_port": 80, "vm_port": 80, "protocol": "sctp"}]}},
     "network.port_mappings[0].protocol", "tcp"),
    ({"name": "a", "image": "x", "network": {"port_mappings": [
        {"host_interface": "eth0", "host_port": 80, "vm_port": 80, "protocol": None},
        {"host_interface": "eth0", "host_port": 80, "vm_port": 81, "protocol": "udp"}]}},
     "network.port_mappings[1].host_port", "mapped twice"),
    ({"name": "a", "image": "x", "network": {"virtual_networks": [
        {"network": "n", "virtual_ip": "10.0.0.300"}]}}, "network.virtual_networks[0].virtual_ip", "IPv4"),
]


@pytest.mark.parametrize(("doc", "field", "rule"), BAD_SPECS, ids=[f for _, f, _ in BAD_SPECS])
def test_bad_specs_name_the_field_and_the_rule(doc: dict, field: str, rule: str) -> None:
    with pytest.raises(msgspec.ValidationError) as info:
        decode_spec(doc)
    error = invalid_from_msgspec(info.value, VmSpec)
    assert isinstance(error, InvalidRequest)
    assert error.field == field
    assert error.message.startswith(f"{field}: ")
    assert rule in error.message


def test_update_lists_only_the_fields_given() -> None:
    update = msgspec.json.decode(b'{"name":"a","revision":3,"cpu":2,"memory":"1GiB"}', type=c.UpdateVm)
    assert update.changes() == {"cpu": 2, "memory": 1024**3}


def test_malformed_json_is_a_400_without_field() -> None:
    with pytest.raises(msgspec.DecodeError) as info:
        msgspec.json.decode(b'{"name": ', type=VmSpec)
    error = invalid_from_msgspec(info.value)
    assert error.code == "400" and error.field is None and "JSON" in error.message
