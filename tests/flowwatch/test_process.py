"""`python -m edgevm.flowwatch` as the node supervisor starts it, before netplumb has written anything."""

from __future__ import annotations

import asyncio
import secrets
import signal
import subprocess
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from edgevm.cli.natsserver import NatsServer
from edgevm.shared.client import Client
from edgevm.shared.errors import RemoteError

from ..helpers import ServiceProcess, eventually
from .conftest import make_netns, remove_netns

pytestmark = pytest.mark.root


async def test_the_process_serves_with_no_network_records_and_stops_on_sigterm(
    nats_server: NatsServer, nc: NATS, tmp_path: Path
) -> None:
    node_ns = make_netns("fwnode")  # its "node namespace", so the host's own stays untouched
    node = f"p{secrets.token_hex(3)}"
    process = ServiceProcess(
        "flowwatch",
        {
            "EDGEVM_NODE": node,
            "EDGEVM_NATS_URL": nats_server.url,
            "EDGEVM_STATE_DIR": str(tmp_path),
            "EDGEVM_NODE_NETNS": node_ns,
        },
        tmp_path / "flowwatch.log",
    ).start()
    try:
        client = Client(nc, node, timeout=2)

        async def answers_404() -> bool:
            try:
                await client.call("flow.list", {"vm": "web"})
            except RemoteError as exc:
                return exc.code == "404"
            return False

        assert await eventually(answers_404, 20, "flow.list answered")
        listed = await asyncio.to_thread(
            subprocess.run, ["ip", "netns", "exec", node_ns, "nft", "list", "tables"], capture_output=True, text=True
        )
        tables = listed.stdout
        assert "inet edgevm_flows" in tables  # the node namespace is watched (and hooked) from the start
        assert process.stop(signal.SIGTERM) == 0, process.log()
        assert "Traceback" not in process.log()
        listed = await asyncio.to_thread(
            subprocess.run, ["ip", "netns", "exec", node_ns, "nft", "list", "tables"], capture_output=True, text=True
        )
        assert "edgevm_flows" not in listed.stdout  # no cut pending: a clean stop leaves nothing behind
    finally:
        process.stop(signal.SIGKILL)
        remove_netns(node_ns)
