"""A hub and two nodes on loopback: commands through the hub, events sourced across domains through cuts and
a hub restart, each node's credentials confined to its own subjects, a removed node refused."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time

import nats
import pytest
from nats.aio.client import Client as NATS

from edgevm.shared.client import Client
from edgevm.shared.errors import EdgevmError
from tests.fleet.conftest import EDGEVM, Fleet, prepare_image, vm_name, wait_task
from tests.helpers import eventually

pytestmark = pytest.mark.timeout(600)


async def stream_events(nc: NATS, node: str) -> list[tuple[int, str, bytes]]:
    """Return (source sequence, subject, data) of node `node`'s events in the hub's EDGEVM_EVENTS, in order."""
    js = nc.jetstream(timeout=10)
    info = await js.stream_info("EDGEVM_EVENTS")
    found: list[tuple[int, str, bytes]] = []
    if info.state.messages == 0:
        return found
    sub = await js.subscribe(f"edgevm.evt.{node}.>", stream="EDGEVM_EVENTS", ordered_consumer=True)
    try:
        pending = (await sub.consumer_info()).num_pending
        for _ in range(pending):
            msg = await sub.next_msg(timeout=5)
            # Nats-Stream-Source: "<stream>:<hash> <source sequence> ...": where the hub got the message from.
            source_seq = int((msg.headers or {})["Nats-Stream-Source"].split()[1])
            found.append((source_seq, msg.subject, msg.data))
    finally:
        await sub.unsubscribe()
    return found


async def node_events(url: str) -> list[tuple[int, str, bytes]]:
    """Return (sequence, subject, data) of every event in a node's own EDGEVM_EVENTS."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream(timeout=10)
        last = (await js.stream_info("EDGEVM_EVENTS")).state.last_seq
        found = []
        for seq in range(1, last + 1):
            msg = await js.get_msg("EDGEVM_EVENTS", seq)
            found.append((seq, msg.subject, msg.data))
        return found
    finally:
        await nc.close()


async def caught_up(fleet: Fleet, node: str) -> list[tuple[int, str, bytes]]:
    """Wait until the hub holds every event node `node` has; return the hub's copy."""
    mine = await node_events(fleet.nodes[node].url)
    admin = await fleet.admin()
    try:
        async def complete() -> list[tuple[int, str, bytes]] | None:
            theirs = await stream_events(admin, node)
            return theirs if len(theirs) >= len(mine) else None

        theirs = await eventually(complete, timeout=90, what=f"the hub holds all {len(mine)} events of {node}")
    finally:
        await admin.close()
    # The node goes on publishing (heartbeats): the hub may hold more than was read from the node before.
    assert [seq for seq, _, _ in theirs] == list(range(1, len(theirs) + 1)), "in order, none missing, none twice"
    assert theirs[:len(mine)] == mine, "the hub holds the node's events as the node stored them"
    return theirs


async def test_a_client_of_the_hub_creates_and_starts_a_vm_on_each_node(fleet: Fleet) -> None:
    nc = await fleet.operator()
    try:
        for node in ("a", "b"):
            client = Client(nc, node, timeout=15)
            await eventually(lambda client=client: client.call("vm.list"), timeout=60,
                             what=f"node {node} answers through the hub")
            await prepare_image(client, fleet.nodes[node].state)
            vm = await client.call("vm.create", {"name": vm_name(f"web-{node}"), "image": "base"})
            assert vm["status"]["state"] == "defined"
            await wait_task(client, (await client.call("vm.start", {"name": vm_name(f"web-{node}")}))["task"]["id"])
            assert (await client.call("vm.get", {"name": vm_name(f"web-{node}")}))["status"]["state"] == "running"

        async def both_listed() -> bool:
            reply = await Client(nc, "a", timeout=5).gateway("vm.list")
            names = {(v.get("node"), v["spec"]["name"]) for v in reply["vms"]}
            return {("a", vm_name("web-a")), ("b", vm_name("web-b"))} <= names

        for node in ("a", "b"):
            await caught_up(fleet, node)
        await eventually(both_listed, timeout=30, what="gw.vm.list at the hub shows both nodes' VMs")
    finally:
        await nc.close()

    # The same through the `edgevm` command with the operator's seed, connected only to the hub.
    def edgevm(*args: str) -> dict:
        done = subprocess.run([EDGEVM, "--nats", fleet.hub.url, "--creds", str(fleet.operator_seed), "--json", *args],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    nodes = await asyncio.to_thread(edgevm, "fleet", "nodes")
    assert {n["node"]: n["state"] for n in nodes["nodes"]} == {"a": "up", "b": "up"}
    vm = await asyncio.to_thread(edgevm, "--node", "b", "vm", "get", vm_name("web-b"))
    assert vm["status"]["state"] == "running"


async def test_a_nodes_credentials_reach_only_its_own_subjects(fleet: Fleet) -> None:
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    creds = json.loads((fleet.tmp / "a.creds").read_text())
    as_a = await nats.connect(fleet.hub.url, nkeys_seed_str=creds["seed"], error_cb=on_error)
    operator = await fleet.operator()
    try:
        b = Client(operator, "b", timeout=10)
        before = await b.call("vm.get", {"name": vm_name("web-b")})
        assert before["status"]["state"] == "running"
        body = json.dumps({"name": vm_name("web-b"), "force": True}).encode()
        await as_a.publish("edgevm.b.vm.stop", body, reply="_INBOX.x")
        await as_a.subscribe("edgevm.evt.b.>")
        await as_a.subscribe("$JS.b.API.>")
        await as_a.flush()
        await eventually(lambda: asyncio.sleep(0, len(errors) >= 3), timeout=5, what="three refusals")
        assert any('permissions violation for publish to "edgevm.b.vm.stop"' in e for e in errors), errors
        assert any('permissions violation for subscription to "edgevm.evt.b.>"' in e for e in errors), errors
        assert any('permissions violation for subscription to "$js.b.api.>"' in e.lower() for e in errors), errors
        await asyncio.sleep(1)
        after = await b.call("vm.get", {"name": vm_name("web-b")})
        assert after["status"]["state"] == "running" and after["status"]["revision"] == before["status"]["revision"]

        # On node a's own NATS, b's commands lead nowhere either: the leaf link does not carry them.
        local = await nats.connect(fleet.nodes["a"].url)
        try:
            with pytest.raises(EdgevmError):
                await Client(local, "b", timeout=2).call("vm.stop", {"name": vm_name("web-b"), "force": True})
        finally:
            await local.close()
        assert (await b.call("vm.get", {"name": vm_name("web-b")}))["status"]["state"] == "running"

        # The operator may do all of it.
        seen = await operator.subscribe("edgevm.evt.b.>")
        js_api = await operator.subscribe("$JS.b.API.>")
        await operator.flush()
        assert operator.last_error is None
        await seen.unsubscribe()
        await js_api.unsubscribe()
        stopped = await b.call("vm.stop", {"name": vm_name("web-b"), "force": True})
        await wait_task(b, stopped["task"]["id"])
        assert (await b.call("vm.get", {"name": vm_name("web-b")}))["status"]["state"] == "stopped"
    finally:
        await as_a.close()
        await operator.close()


async def test_a_cut_node_works_alone_and_the_hub_catches_up_in_order(fleet: Fleet) -> None:
    a = fleet.nodes["a"]
    assert a.relay is not None
    operator = await fleet.operator()
    try:
        through_hub = Client(operator, "a", timeout=2)
        await through_hub.call("vm.get", {"name": vm_name("web-a")})
        await a.relay.cut()
        cut_at = time.monotonic()
        with pytest.raises(EdgevmError):
            await through_hub.call("vm.get", {"name": vm_name("web-a")})

        local = await nats.connect(a.url)
        try:
            alone = Client(local, "a", timeout=15)
            await alone.call("vm.create", {"name": vm_name("cut-a"), "image": "base"})
            await wait_task(alone, (await alone.call("vm.start", {"name": vm_name("cut-a")}))["task"]["id"])
            await wait_task(alone, (await alone.call("vm.stop", {"name": vm_name("cut-a"), "force": True}))["task"]["id"])
            snap = await alone.call("snapshot.create", {"vm": vm_name("cut-a"), "name": "s1"})
            await wait_task(alone, snap["task"]["id"])
            assert (await alone.call("vm.get", {"name": vm_name("cut-a")}))["status"]["state"] == "stopped"
        finally:
            await local.close()

        async def unreachable() -> bool:
            nodes = (await Client(operator, "a", timeout=5).gateway("node.list"))["nodes"]
            return any(n["node"] == "a" and n["state"] == "unreachable" for n in nodes)

        await eventually(unreachable, timeout=max(1.0, 40 - (time.monotonic() - cut_at)),
                         what="gw.node.list marks a unreachable within 40 s of the cut")

        await a.relay.open()
        reopened = time.monotonic()
        await eventually(lambda: through_hub.call("vm.get", {"name": vm_name("cut-a")}), timeout=30,
                         what="a answers through the hub again")
        await caught_up(fleet, "a")
        print(f"caught up {time.monotonic() - reopened:.1f} s after the link returned")

        async def new_state_shown() -> bool:
            vms = (await Client(operator, "a", timeout=5).gateway("vm.list", {"node": "a"}))["vms"]
            return any(v["spec"]["name"] == vm_name("cut-a") and v["status"]["state"] == "stopped" for v in vms)

        await eventually(new_state_shown, timeout=30, what="gw.vm.list shows what a did while cut off")
    finally:
        await operator.close()
        await a.relay.open()  # whatever failed, the next tests get the link back


async def test_a_hub_restarted_during_a_cut_still_catches_up(fleet: Fleet) -> None:
    a = fleet.nodes["a"]
    assert a.relay is not None
    await caught_up(fleet, "a")
    await a.relay.cut()
    await asyncio.to_thread(fleet.hub.stop)
    await asyncio.to_thread(fleet.hub.start)
    local = await nats.connect(a.url)
    try:
        alone = Client(local, "a", timeout=15)
        await alone.call("vm.create", {"name": vm_name("late-a"), "image": "base"})
        await asyncio.sleep(15)  # the restarted hub tries its source while the node is away
    finally:
        await local.close()
    await a.relay.open()
    reopened = time.monotonic()
    await caught_up(fleet, "a")
    print(f"after a hub restart: caught up {time.monotonic() - reopened:.1f} s after the link returned")


async def test_a_rotated_node_is_refused_until_it_has_its_new_key(fleet: Fleet) -> None:
    b = fleet.nodes["b"]
    assert b.creds is not None
    old_seed = json.loads(b.creds.read_text())["seed"]
    new_creds = fleet.tmp / "b-new.creds"
    rotated = await asyncio.to_thread(fleet.hub.fleet, "rotate-node", "b", "--out", str(new_creds))
    assert rotated.returncode == 0, rotated.stderr
    assert "leaf link(s) closed" in rotated.stdout
    assert json.loads(new_creds.read_text())["seed"] != old_seed
    operator = await fleet.operator()
    try:
        through_hub = Client(operator, "b", timeout=1)
        # a keeps its link (it logs in again at once); b is refused with its old key.
        await eventually(lambda: Client(operator, "a", timeout=2).call("vm.list"), timeout=30,
                         what="a answers through the hub after the links were closed")
        await eventually(lambda: asyncio.sleep(0, "hub link refused by the hub" in b.output()), timeout=30,
                         what="b is refused with its old key")
        with pytest.raises(EdgevmError):
            await through_hub.call("vm.list")
        # b restarted with its new key: back in the fleet.
        await asyncio.to_thread(b.stop)
        b.creds = new_creds
        await asyncio.to_thread(b.start)
        await eventually(lambda: Client(operator, "b", timeout=2).call("vm.list"), timeout=60,
                         what="b answers through the hub with its new key")
    finally:
        await operator.close()
    await caught_up(fleet, "b")


async def test_a_removed_node_is_refused_and_keeps_working_alone(fleet: Fleet) -> None:
    b = fleet.nodes["b"]
    removed = await asyncio.to_thread(fleet.hub.fleet, "remove-node", "b")
    assert removed.returncode == 0, removed.stderr
    assert "applied to the running hub" in removed.stdout
    operator = await fleet.operator()
    try:
        async def unreachable_through_hub() -> bool:
            try:
                await Client(operator, "b", timeout=1).call("vm.list")
            except EdgevmError:
                return True
            return False

        await eventually(unreachable_through_hub, timeout=20, what="b no longer reachable through the hub")
    finally:
        await operator.close()
    await eventually(lambda: asyncio.sleep(0, "refused by the hub" in b.output()), timeout=30,
                     what="node b says the hub refuses its credentials")
    assert "Leafnode connection closed: Authentication Failure" in (fleet.hub.state / "nats.log").read_text()
    local = await nats.connect(b.url)
    try:
        assert (await Client(local, "b", timeout=5).call("vm.get", {"name": vm_name("web-b")}))["spec"]
    finally:
        await local.close()
