"""Virtual interfaces: every frame of a host interface goes to a VM NIC's tap, and back, via tc.

Each side gets a clsact qdisc whose ingress hook redirects every frame (a u32 match-all filter with
`mirred egress redirect`) to the other side's egress. Unlike a bridge this forwards all frames,
including the link-local multicast a Linux bridge keeps (LLDP, LACP, 802.1X), learns no MACs, and
never lets the node's own IP stack see the interface's traffic. The tap must not sit on a bridge
(libvirt `<interface type='ethernet'>`), and the rules exist only while the VM's tap does.
"""

import json
from typing import Any

from edgevm.netplumb.drivers.links import open_links
from edgevm.netplumb.drivers.netns import run
from edgevm.netplumb.drivers.values import VirtualInterfacePlan
from edgevm.netplumb.errors import KernelError


def _tc(args: list[str], netns: str | None) -> str:
    return run(["tc", *(["-n", netns] if netns else []), *args])


def _tc_json(args: list[str], netns: str | None) -> list[dict[str, Any]]:
    out = _tc(["-j", *args], netns).strip()
    try:
        return json.loads(out) if out else []
    except json.JSONDecodeError as exc:
        raise KernelError(f"tc printed unreadable JSON: {exc}") from None


def redirect_target(dev: str, netns: str | None = None) -> str | None:
    """The device all of `dev`'s ingress is redirected to, or None when it is not redirected as a whole."""
    # u32 lists its hash table and each key as entries of their own: keep the keys (they hold actions).
    listed = _tc_json(["filter", "show", "dev", dev, "ingress"], netns)
    filters = [f for f in listed if "actions" in f.get("options", {})]
    if len(filters) != 1:
        return None
    options = filters[0]["options"]
    actions = options.get("actions", [])
    match = options.get("match", {})
    if (
        filters[0].get("kind") != "u32"
        or filters[0].get("protocol") != "all"
        or len(actions) != 1
        or (match.get("value"), match.get("mask")) != ("0", "0")
    ):
        return None
    action = actions[0]
    if (action.get("kind"), action.get("mirred_action"), action.get("direction")) != ("mirred", "redirect", "egress"):
        return None
    target: str | None = action.get("to_dev")
    return target


def _ensure_redirect(src: str, dst: str, netns: str | None, changes: list[str]) -> None:
    if redirect_target(src, netns) == dst:
        return
    _tc(["qdisc", "replace", "dev", src, "clsact"], netns)
    _tc(["filter", "del", "dev", src, "ingress"], netns)
    _tc(
        [
            "filter",
            "add",
            "dev",
            src,
            "ingress",
            "pref",
            "1",
            "protocol",
            "all",
            "u32",
            "match",
            "u32",
            "0",
            "0",
            "action",
            "mirred",
            "egress",
            "redirect",
            "dev",
            dst,
        ],
        netns,
    )
    changes.append(f"redirected ingress of {src} to {dst}")


def ensure_virtual_interface(plan: VirtualInterfacePlan, node_netns: str | None = None) -> list[str]:
    """Joins the host interface and the tap both ways; the host interface goes promiscuous."""
    with open_links(node_netns) as node:
        node.ensure_promisc(plan.host_interface, True)
        node.ensure_up(plan.host_interface)
        node.ensure_up(plan.tap)
    changes = list(node.changes)
    _ensure_redirect(plan.host_interface, plan.tap, node_netns, changes)
    _ensure_redirect(plan.tap, plan.host_interface, node_netns, changes)
    return changes


def remove_virtual_interface(plan: VirtualInterfacePlan, node_netns: str | None = None) -> list[str]:
    """Undoes the redirection on whichever side still exists and drops promiscuous mode."""
    changes: list[str] = []
    with open_links(node_netns) as node:
        for dev in (plan.host_interface, plan.tap):
            if node.index(dev) is None:
                continue
            if any(q.get("kind") == "clsact" for q in _tc_json(["qdisc", "show", "dev", dev], node_netns)):
                _tc(["qdisc", "del", "dev", dev, "clsact"], node_netns)
                changes.append(f"removed redirection from {dev}")
        if node.index(plan.host_interface) is not None:
            node.ensure_promisc(plan.host_interface, False)
    return changes + node.changes
