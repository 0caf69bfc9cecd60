"""Per-VM metrics from libvirt's bulk stats: read on a private test driver, and served by the lifecycle service."""

from __future__ import annotations

import asyncio
import gc
import http.client
import subprocess
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgevm.lifecycle.vmmetrics import FAMILIES, VmMetrics, free_in_background, read_bulk_stats
from edgevm.shared.commands import TaskReply
from edgevm.shared.libvirt.connection import HypervisorConnection
from edgevm.shared.libvirt.errors import HypervisorUnavailable
from edgevm.shared.metrics import EXPOSITION, serve_metrics
from tests.helpers import eventually
from tests.lifecycle.conftest import Node, private_test_uri
from tests.lifecycle.test_lifecycle_breadth import import_image, wait_task

DOMAIN = "<domain type='test'><name>{name}</name><memory>{kib}</memory><vcpu>{vcpus}</vcpu><os><type>hvm</type></os></domain>"
# What QEMU's driver returns for a running domain with one disk and one NIC (keys as libvirt 9.0 names them).
QEMU_STATS = {
    "state.state": 1, "state.reason": 1, "cpu.time": 2_500_000_000, "cpu.user": 1_000_000_000,
    "balloon.current": 262144, "balloon.maximum": 524288, "balloon.rss": 131072,
    "vcpu.current": 2, "vcpu.maximum": 2,
    "net.count": 1, "net.0.name": "vnet7", "net.0.rx.bytes": 1500, "net.0.rx.pkts": 10, "net.0.rx.errs": 0,
    "net.0.rx.drop": 1, "net.0.tx.bytes": 900, "net.0.tx.pkts": 9, "net.0.tx.errs": 0, "net.0.tx.drop": 0,
    "block.count": 1, "block.0.name": "vda", "block.0.path": "/x/root.qcow2", "block.0.rd.reqs": 40,
    "block.0.rd.bytes": 409600, "block.0.wr.reqs": 3, "block.0.wr.bytes": 12288, "block.0.capacity": 1073741824,
    "block.0.allocation": 196608, "block.0.physical": 200704,
}


def scrape(metrics: VmMetrics) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Render the metrics as Prometheus gets them; return {sample name: {sorted labels: value}}."""
    found: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(metrics.exposition()):
        for sample in family.samples:
            found.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return found


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[libvirt.virConnect]:
    connection = libvirt.open(private_test_uri(tmp_path))
    yield connection
    connection.close()


def test_one_bulk_read_gives_every_edgevm_domain_and_the_node(conn: libvirt.virConnect) -> None:
    for name, vcpus in [("edgevm-web", 2), ("edgevm-db", 1), ("someone-else", 1)]:
        conn.defineXML(DOMAIN.format(name=name, kib=524288, vcpus=vcpus))
    conn.lookupByName("edgevm-web").create()
    collector = VmMetrics(lambda: read_bulk_stats(conn), "n1", host_cpus=4, host_memory=8 << 30)
    metrics = scrape(collector)
    assert metrics["edgevm_vm_state"] == {
        (("node", "n1"), ("state", "running"), ("vm", "web")): 1.0,
        (("node", "n1"), ("state", "shutoff"), ("vm", "db")): 1.0,
    }, "one series per edgevm domain, none for the domain that is not edgevm's"
    by_state = {dict(labels)["state"]: value for labels, value in metrics["edgevm_node_vms"].items()}
    assert by_state == {"running": 1, "shutoff": 1, "paused": 0, "shutting_down": 0, "crashed": 0, "unknown": 0}
    assert metrics["edgevm_node_cpus"] == {(("node", "n1"),): 4.0}
    assert metrics["edgevm_node_memory_bytes"] == {(("node", "n1"),): float(8 << 30)}
    assert metrics["edgevm_vm_stats_up"] == {(("node", "n1"),): 1.0}
    # The test driver reports states only: the other families are served empty, never missing.
    assert {name for name in FAMILIES} <= {name.removesuffix("_total") for name in _exposed(collector)}


def test_the_domain_objects_are_freed_off_the_scrape(conn: libvirt.virConnect) -> None:
    for name in ("edgevm-web", "edgevm-db"):
        conn.defineXML(DOMAIN.format(name=name, kib=524288, vcpus=1))

    def domain_objects() -> int:
        return sum(isinstance(thing, libvirt.virDomain) for thing in gc.get_objects())

    before = domain_objects()
    handed: list[list] = []
    stats = read_bulk_stats(conn, dispose=handed.append)
    assert sorted(vm for vm, _ in stats) == ["db", "web"]
    assert domain_objects() == before + 2, "the domains were freed on the scrape's thread"
    assert len(handed) == 1 and len(handed[0]) == 2
    free_in_background(handed.pop())

    async def freed() -> bool:
        return domain_objects() == before

    asyncio.run(eventually(freed, timeout=5, what="the domains freed by the background thread"))


async def test_a_read_on_the_scrape_thread_reports_libvirt_errors_as_ours(tmp_path: Path) -> None:
    async with HypervisorConnection(private_test_uri(tmp_path), timeout=5.0) as connection:
        await connection.call(lambda conn: conn.defineXML(DOMAIN.format(name="edgevm-web", kib=524288, vcpus=1)))
        stats = await asyncio.to_thread(connection.call_here, read_bulk_stats)
        assert [vm for vm, _ in stats] == ["web"]
        await connection.call(lambda conn: conn.close())  # libvirt's connection dies under the service
        with pytest.raises(HypervisorUnavailable):
            await asyncio.to_thread(connection.call_here, read_bulk_stats)


def test_qemu_stats_become_base_units_per_disk_and_nic() -> None:
    collector = VmMetrics(lambda: [("web", QEMU_STATS)], "n1", host_cpus=4, host_memory=8 << 30)
    metrics = scrape(collector)
    vm = (("node", "n1"), ("vm", "web"))
    disk, nic = (("disk", "vda"), *vm), (("nic", "vnet7"), *vm)
    assert metrics["edgevm_vm_cpu_seconds_total"] == {vm: 2.5}
    assert metrics["edgevm_vm_vcpus"] == {vm: 2.0}
    assert metrics["edgevm_vm_memory_assigned_bytes"] == {vm: 512 * 1024**2}
    assert metrics["edgevm_vm_memory_balloon_bytes"] == {vm: 256 * 1024**2}
    assert metrics["edgevm_vm_memory_rss_bytes"] == {vm: 128 * 1024**2}
    assert "edgevm_vm_memory_guest_used_bytes" not in metrics, "no balloon driver statistics, no series"
    assert metrics["edgevm_vm_disk_read_bytes_total"] == {disk: 409600.0}
    assert metrics["edgevm_vm_disk_write_ops_total"] == {disk: 3.0}
    assert metrics["edgevm_vm_disk_allocation_bytes"] == {disk: 196608.0}
    assert metrics["edgevm_vm_network_receive_bytes_total"] == {nic: 1500.0}
    assert metrics["edgevm_vm_network_transmit_packets_total"] == {nic: 9.0}
    assert metrics["edgevm_vm_network_receive_drops_total"] == {nic: 1.0}
    assert metrics["edgevm_node_allocated_vcpus"] == {(("node", "n1"),): 2.0}
    assert metrics["edgevm_node_allocated_memory_bytes"] == {(("node", "n1"),): 512.0 * 1024**2}


def test_scrapes_within_max_age_share_one_read(conn: libvirt.virConnect) -> None:
    reads = []

    def read() -> list:
        reads.append(1)
        return read_bulk_stats(conn)

    collector = VmMetrics(read, "n1", 1, 1 << 30, max_age=60)
    scrape(collector)
    scrape(collector)
    assert len(reads) == 1
    fresh = VmMetrics(read, "n1", 1, 1 << 30, max_age=0)
    scrape(fresh)
    scrape(fresh)
    assert len(reads) == 3


def test_a_failed_read_still_serves_the_node_and_says_so() -> None:
    def read() -> list:
        raise TimeoutError("libvirt did not answer")

    metrics = scrape(VmMetrics(read, "n1", 2, 1 << 30))
    assert metrics["edgevm_vm_stats_up"] == {(("node", "n1"),): 0.0}
    assert metrics["edgevm_node_cpus"] == {(("node", "n1"),): 2.0}
    assert "edgevm_vm_state" not in metrics


async def test_the_lifecycle_service_serves_its_vms(node: Node) -> None:
    await import_image(node)
    await node.client.call("vm.create", {"name": "web", "image": "base", "memory": "256MB", "cpu": 1})
    started = await wait_task(node, await node.client.call("vm.start", {"name": "web"}, TaskReply))
    assert started.status == "succeeded", started.error
    text = (await asyncio.to_thread(EXPOSITION.render)).decode()  # on a thread, as the metrics server does
    states = {(s.labels["vm"], s.labels["state"]) for f in text_string_to_metric_families(text)
              if f.name == "edgevm_vm_state" for s in f.samples if s.labels["node"] == node.config.node}
    assert states == {("web", "running")}
    await node.shutdown()
    assert b"edgevm_vm_state" not in await asyncio.to_thread(EXPOSITION.render), "no longer served once stopped"


def prometheus_scrapes(port: int, times: int) -> list[http.client.HTTPResponse]:
    """GET /metrics `times` on one connection, with Prometheus 2.42's headers; the responses, read."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"User-Agent": "Prometheus/2.42.0", "Accept-Encoding": "gzip",
               "Accept": "application/openmetrics-text;version=1.0.0;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"}
    responses = []
    for _ in range(times):
        connection.request("GET", "/metrics", headers=headers)
        response = connection.getresponse()
        response.body = response.read()  # type: ignore[attr-defined]
        responses.append(response)
    assert connection.sock is not None, "the server closed the connection Prometheus keeps open"
    connection.close()
    return responses


async def test_a_scrape_of_the_service_is_valid_for_promtool_and_kept_alive(node: Node) -> None:
    await import_image(node)
    await node.client.call("vm.create", {"name": "web", "image": "base", "memory": "256MB", "cpu": 1})
    port = serve_metrics("127.0.0.1", 0)  # a second server of the process's exposition, on a port of its own
    first, second = await asyncio.to_thread(prometheus_scrapes, port, 2)
    for response in (first, second):
        assert response.status == 200
        assert response.getheader("Content-Encoding") is None, "no gzip for a scraper on this host"
        assert response.getheader("Content-Type") == "text/plain; version=0.0.4; charset=utf-8"
    text = second.body.decode()  # type: ignore[attr-defined]
    assert f'edgevm_vm_state{{node="{node.config.node}",vm="web",state="shutoff"}} 1' in text
    assert "edgevm_command_duration_seconds_bucket{" in text, "the registry is served before the VMs"
    checked = await asyncio.to_thread(subprocess.run, ["promtool", "check", "metrics"], input=text,
                                      capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout + checked.stderr == "", "promtool has remarks on the exposition"


def _exposed(metrics: VmMetrics) -> set[str]:
    return {family.name + ("_total" if family.type == "counter" else "")
            for family in text_string_to_metric_families(metrics.exposition())}
