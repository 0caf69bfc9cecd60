"""Benchmark of netplumb's nftables path: 100 VMs' port mappings in one transaction, no-change reconcile.

Run as root: `.venv/bin/python tests/bench/bench_netplumb.py`. It works inside a throw-away namespace
`edgevm-t-bench-<random>` and removes it. Raw baselines (nft alone on the same JSON) are measured in
the same run, so the ratios say what netplumb adds on top of nft.
"""

import json
import os
import secrets
import statistics
import subprocess
import time
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network

from edgevm.netplumb import ipam
from edgevm.netplumb.drivers import netns as ns
from edgevm.netplumb.drivers import nft
from edgevm.netplumb.drivers.vrf import ensure_vrf
from edgevm.netplumb.nftjson import batch
from edgevm.netplumb.plans import PortMappingRule, VrfPlan, plan_vrf
from edgevm.netplumb.rulesets import FAMILY, TABLE, tables

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
        vrf_noop = median_seconds(lambda: [ensure_vrf(vrf, node) for vrf in vrfs], rounds=3)

        build = median_seconds(lambda: tables(vrfs, rules, []))
        desired = tables(vrfs, rules, [])
        node_table = desired[None]
        rule_count = sum(len(chain.rules) for chain in node_table.chains)
        payload = json.dumps(batch(node_table))

        apply = median_seconds(lambda: nft.apply_table(node_table, node))
        raw_apply = median_seconds(
            lambda: subprocess.run(
                ["ip", "netns", "exec", node, "nft", "-j", "-f", "-"], input=payload, text=True, check=True
            )
        )
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
            for netns, table in desired.items():
                nft.ensure_table(table, node if netns is None else netns)

        reconcile_all()
        reconcile_everything = median_seconds(reconcile_all, rounds=5)
    finally:
        for name in sorted(os.listdir(ns.NETNS_DIR), reverse=True):
            if name.startswith(prefix):
                ns.remove_netns(name)

    print(
        f"netplumb bench: {VMS} VMs in {VRFS} VRFs, {len(rules)} port mappings, "
        f"{rule_count} rules in the node table ({len(payload)} bytes of nft JSON)"
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
    print(f"  no-change reconcile, all {len(desired)} tables {reconcile_everything * 1000:8.1f} ms")
    print(f"  ensure {VRFS} VRFs: first {vrf_setup * 1000:.0f} ms, no-change {vrf_noop * 1000:.0f} ms")


if __name__ == "__main__":
    main()
