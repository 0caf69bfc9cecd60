"""Benchmark of netplumb's nftables path: 100 VMs' port mappings in one transaction, no-change reconcile.

Run as root: `.venv/bin/python tests/bench/bench_netplumb.py`. It works inside throw-away namespaces
`edgevm-t-bench-<random>` and removes them. Raw baselines (nft alone on the same JSON) are measured in
the same run, so the ratios say what netplumb adds on top of nft. The first part measures the kernel
layer alone; the second the whole service over NATS (its own nats-server on a free port): net.vm.activate
of the 100th VM (all 100 VMs' mappings in the node table, one transaction) and net.reconcile when
nothing changed. The third part shows that a VM's change does not grow with the node's VRFs: net.vm.prepare
followed by net.vm.activate of a VM with one port mapping, at 1, 100 and 500 VRFs, against the raw
`nft -j -f` of the one VRF namespace's table that change rewrites, measured in the same run.
"""

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY

from edgevm.cli.natsserver import free_port, start_nats_server
from edgevm.netplumb import ipam
from edgevm.netplumb.app import make_setup
from edgevm.netplumb.drivers import libnft, nft
from edgevm.netplumb.drivers import netns as ns
from edgevm.netplumb.drivers.links import links_session, open_links
from edgevm.netplumb.drivers.values import PortMappingRule, VrfPlan, plan_vrf
from edgevm.netplumb.drivers.vrf import ensure_vrf
from edgevm.netplumb.nftjson import Table, batch
from edgevm.netplumb.rulesets import FAMILY, TABLE, tables
from edgevm.netplumb.settings import Settings
from edgevm.shared.client import Client
from edgevm.shared.config import Config
from edgevm.shared.runtime import serve

VMS = 100
VRFS = 10
ROUNDS = 15
GOAL_APPLY = 1.0
GOAL_RECONCILE = 0.1


def median_seconds(action: Callable[[], object], rounds: int = ROUNDS) -> float:
    """The median wall time of an action over several rounds."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def raw_apply_seconds(table: Table, netns: str) -> float:
    """The raw baseline: `nft -j -f` of the table's whole batch in `netns`, median seconds."""
    payload = json.dumps(batch(table))
    return median_seconds(
        lambda: subprocess.run(["ip", "netns", "exec", netns, "nft", "-j", "-f", "-"], input=payload, text=True,
                               check=True)
    )


def plan(prefix: str) -> tuple[list[VrfPlan], list[PortMappingRule]]:
    """10 VRFs sharing one subnet, 100 VMs, each with a tcp, a udp and a tcp+udp mapping."""
    vrfs: list[VrfPlan] = []
    uplinks: list[IPv4Network] = []
    for n in range(VRFS):
        uplinks.append(ipam.allocate_uplink(ipam.DEFAULT_UPLINK_POOL, uplinks))
        vrfs.append(plan_vrf(f"v{n}", "10.0.0.0/22", uplink=uplinks[-1], netns_prefix=prefix))
    rules = []
    for vm in range(VMS):
        vrf = vrfs[vm % VRFS].name
        address = IPv4Address("10.0.0.10") + vm
        base = 10000 + 3 * vm
        rules += [
            PortMappingRule("tcp", "eth0", base, address, 22, vrf),
            PortMappingRule("udp", "eth0", base + 1, address, 53, vrf),
            PortMappingRule(None, "eth0", base + 2, address, 8080, vrf),
        ]
    return vrfs, rules


def main() -> None:
    prefix = f"edgevm-t-bench-{secrets.token_hex(3)}-"
    node = f"{prefix}node"
    ns.ensure_netns(node)
    try:
        vrfs, rules = plan(prefix)
        start = time.perf_counter()
        for vrf in vrfs:
            ensure_vrf(vrf, node)
        vrf_setup = time.perf_counter() - start

        def ensure_vrfs() -> None:
            with links_session():  # as a reconcile does: one socket and one read per namespace
                for vrf in vrfs:
                    ensure_vrf(vrf, node)

        vrf_noop = median_seconds(ensure_vrfs, rounds=3)

        build = median_seconds(lambda: tables(vrfs, rules, []))
        desired = tables(vrfs, rules, [])
        node_table = desired[None]
        rule_count = sum(len(chain.rules) for chain in node_table.chains)

        apply = median_seconds(lambda: nft.apply_table(node_table, node))
        raw_apply = raw_apply_seconds(node_table, node)
        reconcile = median_seconds(lambda: nft.ensure_table(node_table, node))
        raw_list = median_seconds(
            lambda: subprocess.run(
                ["ip", "netns", "exec", node, "nft", "-j", "list", "table", FAMILY, TABLE],
                capture_output=True,
                check=True,
            )
        )
        assert nft.ensure_table(node_table, node) is False

        def reconcile_all() -> None:
            results = nft.ensure_tables([(table, node if n is None else n) for n, table in desired.items()])
            assert not any(isinstance(result, Exception) for result in results), results

        reconcile_all()
        reconcile_everything = median_seconds(reconcile_all, rounds=5)
    finally:
        for name in sorted(os.listdir(ns.NETNS_DIR), reverse=True):
            if name.startswith(prefix):
                ns.remove_netns(name)

    print(
        f"netplumb bench: {VMS} VMs in {VRFS} VRFs, {len(rules)} port mappings, "
        f"{rule_count} rules in the node table ({len(json.dumps(batch(node_table)))} bytes of nft JSON)"
    )
    print(f"  build all tables (pure)            {build * 1000:8.1f} ms")
    print(
        f"  apply node table, one transaction  {apply * 1000:8.1f} ms   raw nft -j -f {raw_apply * 1000:6.1f} ms"
        f"   ratio {apply / raw_apply:4.2f}   goal < {GOAL_APPLY * 1000:.0f} ms"
        f"   {'ok' if apply < GOAL_APPLY else 'MISSED'}"
    )
    print(
        f"  no-change reconcile (node table)   {reconcile * 1000:8.1f} ms   raw nft list  {raw_list * 1000:6.1f} ms"
        f"   ratio {reconcile / raw_list:4.2f}   goal < {GOAL_RECONCILE * 1000:.0f} ms"
        f"   {'ok' if reconcile < GOAL_RECONCILE else 'MISSED'}"
    )
    print(f"  no-change reconcile, all {len(desired)} tables {reconcile_everything * 1000:8.1f} ms"
          f"   (read through {'libnftables' if libnft.available() else 'nft -j list, side by side'})")
    print(f"  ensure {VRFS} VRFs: first {vrf_setup * 1000:.0f} ms, no-change {vrf_noop * 1000:.0f} ms")


async def timed_async(action: Callable[[], object], rounds: int = ROUNDS, before: Callable[[], object] | None = None) -> float:
    """The median wall time of an async action over several rounds; `before` runs untimed ahead of each."""
    times = []
    for _ in range(rounds):
        if before is not None:
            await before()  # type: ignore[misc]
        start = time.perf_counter()
        await action()  # type: ignore[misc]
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def host_interface(netns: str, name: str) -> None:
    """A link the port mappings name as their host interface (a bridge: nothing needs to be behind it)."""
    with open_links(netns) as links:
        links.ensure_bridge(name)


@contextlib.asynccontextmanager
async def running_netplumb(node_ns: str, **settings: Any) -> AsyncIterator[Client]:
    """The netplumb service on a NATS of its own, driving namespace `node_ns` (removed after, with its VRFs)."""
    import nats

    store = Path(tempfile.mkdtemp(prefix="edgevm-bench-np-"))
    server = start_nats_server(store / "nats", port=free_port())
    stop = asyncio.Event()
    task: asyncio.Task[None] | None = None
    nc = await nats.connect(server.url)
    try:
        ns.ensure_netns(node_ns)
        await asyncio.to_thread(host_interface, node_ns, "eth0")
        node = f"bench-{secrets.token_hex(3)}"
        config = Config(node, server.url, store, "test:///default", "127.0.0.1", 0, 0, "WARNING")
        own = Settings(netns_prefix=f"{node_ns}-", node_netns=node_ns, reconcile_interval=0, **settings)
        task = asyncio.create_task(serve("netplumb", make_setup(own), config, stop))
        client = Client(nc, node, timeout=60)
        for _ in range(200):
            try:
                await client.call("net.vrf.list")
                break
            except Exception:
                await asyncio.sleep(0.05)
        yield client
    finally:
        await nc.close()
        stop.set()
        if task is not None:
            await asyncio.wait_for(task, 60)
        server.stop()
        shutil.rmtree(store, ignore_errors=True)
        for name in sorted(os.listdir(ns.NETNS_DIR), reverse=True):
            if name.startswith(node_ns):
                ns.remove_netns(name)


async def bench_service(prefix: str, vrf_count: int) -> None:
    """The netplumb service over NATS driving namespace `<prefix>svc<n>`: activate and no-change reconcile."""
    node_ns = f"{prefix}svc{vrf_count}"
    # The other VRFs all take 10.0.0.0/22 (VRFs may overlap each other, never the default VRF).
    async with running_netplumb(node_ns, default_subnet=IPv4Network("10.200.0.0/22")) as client:
        vrfs = ["default"] + [f"v{n}" for n in range(vrf_count - 1)]
        for name in vrfs[1:]:
            await client.call("net.vrf.create", {"name": name, "subnet": "10.0.0.0/22"})
        for vm in range(VMS):
            base = 10000 + 3 * vm
            mappings = [
                {"host_interface": "eth0", "host_port": base, "vm_port": 22, "protocol": "tcp"},
                {"host_interface": "eth0", "host_port": base + 1, "vm_port": 53, "protocol": "udp"},
                {"host_interface": "eth0", "host_port": base + 2, "vm_port": 8080, "protocol": None},
            ]
            network = {"vrf": vrfs[vm % len(vrfs)], "port_mappings": mappings}
            await client.call("net.vm.prepare", {"vm": f"vm{vm}", "network": network})
            if vm < VMS - 1:
                await client.call("net.vm.activate", {"vm": f"vm{vm}"})
        last = {"vm": f"vm{VMS - 1}"}
        activate = await timed_async(lambda: client.call("net.vm.activate", last),
                                     before=lambda: client.call("net.vm.deactivate", last))
        await client.call("net.vm.activate", last)
        node_table = nft.read_table(FAMILY, TABLE, node_ns)
        assert node_table is not None
        raw_apply = raw_apply_seconds(node_table, node_ns)
        namespaces = [node_ns] + [f"{node_ns}-{name}" for name in vrfs[1:]]
        raw_list = median_seconds(
            lambda: [subprocess.run(["ip", "netns", "exec", n, "nft", "-j", "list", "table", FAMILY, TABLE],
                                    capture_output=True, check=True) for n in namespaces],
            rounds=5,
        )
        await client.call("net.reconcile")  # the raw apply above re-made the node table with new handles
        assert (await client.call("net.reconcile"))["changes"] == []
        reconcile = await timed_async(lambda: client.call("net.reconcile"), rounds=5)
        rules = sum(len(chain.rules) for chain in node_table.chains)
        print(f"netplumb service over NATS: {VMS} VMs in {len(vrfs)} VRF(s) ({rules} rules in the node table)")
        print(
            f"  net.vm.activate of the 100th VM     {activate * 1000:8.1f} ms   raw nft -j -f {raw_apply * 1000:6.1f} ms"
            f"   ratio {activate / raw_apply:4.2f}   goal < {GOAL_APPLY * 1000:.0f} ms"
            f"   {'ok' if activate < GOAL_APPLY else 'MISSED'}"
        )
        print(
            f"  net.reconcile, nothing to change    {reconcile * 1000:8.1f} ms   raw nft list of {len(namespaces)} "
            f"tables {raw_list * 1000:6.1f} ms   ratio {reconcile / raw_list:4.2f}"
            f"   goal < {GOAL_RECONCILE * 1000:.0f} ms   {'ok' if reconcile < GOAL_RECONCILE else 'MISSED'}"
        )


SCALE_VRFS = (1, 100, 500)
GOAL_VM_CHANGE_RATIO = 10.0  # prepare+activate against one raw `nft -j -f` of the VRF's table


def namespaces_looked_at() -> tuple[float, float]:
    """(converges, namespaces looked at) of commands so far, from netplumb's own metric."""
    labels = {"kind": "change"}
    return (REGISTRY.get_sample_value("edgevm_netplumb_converge_namespaces_count", labels) or 0.0,
            REGISTRY.get_sample_value("edgevm_netplumb_converge_namespaces_sum", labels) or 0.0)


async def bench_vm_change(prefix: str, vrf_count: int) -> None:
    """net.vm.prepare + net.vm.activate of a fresh VM in the last of `vrf_count` VRFs, over NATS."""
    node_ns = f"{prefix}scale{vrf_count}"
    async with running_netplumb(node_ns) as client:
        started = time.perf_counter()
        vrfs = [f"v{n}" for n in range(vrf_count)]  # besides default: the VM's is a VRF namespace at every count
        for name in vrfs:
            last_create = time.perf_counter()
            await client.call("net.vrf.create", {"name": name, "subnet": "10.0.0.0/24"})
            last_create = time.perf_counter() - last_create
        built = time.perf_counter() - started
        reconcile = time.perf_counter()
        assert (await client.call("net.reconcile"))["changes"] == []
        reconcile = time.perf_counter() - reconcile
        vrf = vrfs[-1]
        rounds = iter(range(10**6))
        looked = namespaces_looked_at()

        async def prepare_and_activate() -> None:
            n = next(rounds)  # a VM of its own each round, with a host port of its own
            mapping = {"host_interface": "eth0", "host_port": 8000 + n, "vm_port": 80, "protocol": "tcp"}
            await client.call("net.vm.prepare", {"vm": f"vm{n}", "network": {"vrf": vrf, "port_mappings": [mapping]}})
            await client.call("net.vm.activate", {"vm": f"vm{n}"})

        change = await timed_async(prepare_and_activate, rounds=9)
        after = namespaces_looked_at()
        per_command = (after[1] - looked[1]) / max(after[0] - looked[0], 1)
        await prepare_and_activate()  # the VRF's table now holds a mapping, as the change left it
        vrf_ns = f"{node_ns}-{vrf}"
        table = nft.read_table(FAMILY, TABLE, vrf_ns)
        assert table is not None
        raw_apply = raw_apply_seconds(table, vrf_ns)
        ratio = change / raw_apply
        print(f"  {vrf_count:4d} VRF(s) besides default (built in {built:5.1f} s): prepare+activate {change * 1000:7.1f} ms"
              f"   raw nft -j -f of the VRF's table {raw_apply * 1000:6.1f} ms   ratio {ratio:5.2f}"
              f"   namespaces looked at per command {per_command:4.1f}"
              f"   goal ratio < {GOAL_VM_CHANGE_RATIO:g} {'ok' if ratio < GOAL_VM_CHANGE_RATIO else 'MISSED'}",
              flush=True)
        print(f"       the last net.vrf.create {last_create * 1000:6.1f} ms; net.reconcile, nothing to change,"
              f" {reconcile * 1000:7.1f} ms (in parts: commands pass between them)", flush=True)


if __name__ == "__main__":
    main()
    bench_prefix = f"edgevm-t-bench-{secrets.token_hex(3)}-"
    for count in (1, VRFS):
        asyncio.run(bench_service(bench_prefix, count))
    print("netplumb at many VRFs: a VM's change against the node's VRF count (each part its own service)")
    for count in SCALE_VRFS:
        asyncio.run(bench_vm_change(bench_prefix, count))
