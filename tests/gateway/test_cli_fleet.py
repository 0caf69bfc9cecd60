"""`edgevm fleet nodes|vms|tasks|flows` and `--node` after a verb, as a user types them, and the fleet metrics."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from edgevm.cli.natsserver import NatsServer, free_port
from edgevm.shared.client import Client
from edgevm.shared.commands import GwVmList
from tests.gateway.nodes import TIMEOUT, FakeNode, equals, gateway_process, states
from tests.helpers import eventually


async def edgevm(server: NatsServer, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [str(Path(sys.executable).parent / "edgevm"), "--nats", server.url, *args]
    return await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, timeout=60)


def rows(out: str) -> list[list[str]]:
    return [re.split(r"\s{2,}", line) for line in out.splitlines()[1:]]


async def test_fleet_verbs_show_every_node_and_mark_an_unreachable_one(
    nc: NATS, nats_server: NatsServer, fleet: tuple[FakeNode, FakeNode], tmp_path: Path
) -> None:
    a, b = fleet
    tasks_a = await a.publish_objects()
    await b.publish_objects()
    b.start_beating()
    gateway = gateway_process(nats_server, tmp_path).start()
    client = Client(nc, "unused")
    try:
        await eventually(lambda: equals(states(client, a.name, b.name), {a.name: "unreachable", b.name: "up"}),
                         timeout=TIMEOUT + 10, what="a unreachable (never beat), b up")
        nodes = await edgevm(nats_server, "fleet", "nodes")
        assert nodes.returncode == 0, nodes.stderr
        assert nodes.stdout.split()[:5] == ["NODE", "STATE", "LAST", "SEEN", "VMS"]
        ours = {r[0]: r for r in rows(nodes.stdout) if r[0] in (a.name, b.name)}
        assert ours[a.name][1:4] == ["unreachable", "never", "2"] and ours[b.name][1] == "up"
        assert ours[b.name][4] == "lifecycle"

        vms = await edgevm(nats_server, "fleet", "vms", "--node", a.name)
        assert [r[:3] for r in rows(vms.stdout)] == [[f"{a.name} (unreachable)", "db", "running"],
                                                     [f"{a.name} (unreachable)", "web", "running"]]
        as_json = json.loads((await edgevm(nats_server, "fleet", "vms", "--node", b.name, "--json")).stdout)
        assert [(v["node"], v["spec"]["name"], v["node_state"]) for v in as_json["vms"]] == [
            (b.name, "db", "up"), (b.name, "web", "up")]
        none = await edgevm(nats_server, "fleet", "vms", "--node", b.name, "--status", "stopped")
        assert none.returncode == 0 and rows(none.stdout) == []

        tasks = await edgevm(nats_server, "fleet", "tasks", "--node", a.name, "--vm", "db", "--limit", "5")
        assert [(r[0], r[4], r[-1]) for r in rows(tasks.stdout)] == [(tasks_a[1].id, "failed", "boom")]
        flows = await edgevm(nats_server, "--json", "fleet", "flows", "--node", b.name, "--status", "active")
        assert [(f["node"], f["vm"], f["status"]) for f in json.loads(flows.stdout)["flows"]] == [
            (b.name, "web", "active")]

        bad = await edgevm(nats_server, "fleet", "tasks", "--limit", "0")
        assert bad.returncode == 1 and "400 [limit]" in bad.stderr, bad.stderr
    finally:
        assert gateway.stop() == 0, gateway.log()


async def test_node_option_after_a_verb_picks_the_node_subjects(nc: NATS, nats_server: NatsServer) -> None:
    asked: list[str] = []

    async def vm_list(msg: Msg) -> None:
        asked.append(msg.subject)
        await msg.respond(b'{"vms": []}')

    sub = await nc.subscribe("edgevm.elsewhere7.vm.list", cb=vm_list)
    await nc.flush()
    try:
        after = await edgevm(nats_server, "vm", "list", "--node", "elsewhere7")
        assert after.returncode == 0 and after.stdout.split()[:2] == ["NAME", "STATE"], after.stderr
        before = await edgevm(nats_server, "--node", "elsewhere7", "--json", "vm", "list")
        assert json.loads(before.stdout) == {"vms": []}
        other = await edgevm(nats_server, "--node", "nobody7", "vm", "list")
        assert other.returncode == 1 and "edgevm.nobody7.vm.list" in other.stderr
        overridden = await edgevm(nats_server, "--node", "nobody7", "vm", "list", "--node", "elsewhere7")
        assert overridden.returncode == 0, overridden.stderr
        assert asked == ["edgevm.elsewhere7.vm.list"] * 3
    finally:
        await sub.unsubscribe()


async def test_fleet_metrics_follow_node_states_tasks_and_lag(
    nc: NATS, nats_server: NatsServer, fleet: tuple[FakeNode, FakeNode], tmp_path: Path
) -> None:
    a, b = fleet
    await a.publish_objects()
    b.start_beating()
    process = gateway_process(nats_server, tmp_path)
    process.env["EDGEVM_METRICS_PORT"] = str(free_port())
    gateway = process.start()
    client = Client(nc, "unused")
    url = f"http://127.0.0.1:{process.env['EDGEVM_METRICS_PORT']}/metrics"
    try:
        await eventually(lambda: equals(states(client, a.name, b.name), {a.name: "unreachable", b.name: "up"}),
                         timeout=TIMEOUT + 10, what="a unreachable, b up")
        await b.publish_objects()  # live events, after the gateway's start
        await eventually(lambda: _count(client, b.name), what="b's VMs ingested live")
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
        assert f'edgevm_fleet_node_up{{node="{a.name}"}} 0.0' in text
        assert f'edgevm_fleet_node_up{{node="{b.name}"}} 1.0' in text
        assert f'edgevm_fleet_vms{{node="{a.name}",state="running"}} 2.0' in text
        assert f'edgevm_fleet_tasks{{node="{a.name}",status="failed"}} 1.0' in text
        assert f'edgevm_fleet_tasks{{node="{b.name}",status="succeeded"}} 1.0' in text
        assert re.search(r'edgevm_fleet_nodes\{state="unreachable"\} [1-9]', text)
        assert f'edgevm_fleet_node_last_heartbeat_timestamp_seconds{{node="{b.name}"}}' in text
        assert f'edgevm_fleet_node_last_heartbeat_timestamp_seconds{{node="{a.name}"}}' not in text
        live = re.search(r"edgevm_fleet_event_lag_seconds_count (\S+)", text)
        assert live is not None and float(live.group(1)) >= 6, "b's six object events came live"
        lag = re.search(rf'edgevm_fleet_node_event_lag_seconds{{node="{b.name}"}} (\S+)', text)
        assert lag is not None and 0 <= float(lag.group(1)) < 5
    finally:
        assert gateway.stop() == 0, gateway.log()



async def _count(client: Client, node: str) -> bool:
    return len((await client.gateway("vm.list", {"node": node}, GwVmList)).vms) == 2
