"""`edgevm fleet ...` with bad input: a clear message naming what is wrong, and fleet.json unchanged."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from edgevm.cli.fleetstate import HubState
from edgevm.cli.natsserver import free_port
from tests.e2e.test_node_up import alive, children_of
from tests.fleet.conftest import EDGEVM, Hub


def fleet(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EDGEVM, "fleet", *args, "--state-dir", str(state)], capture_output=True, text=True,
                          timeout=60)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """A hub state directory as the hub's first start leaves it (the hub not running)."""
    hub = HubState(tmp_path / "hub")
    hub.initialize()
    assert fleet(hub.root, "add-node", "edge-1", "--out", str(tmp_path / "edge-1.creds")).returncode == 0
    return hub.root


@pytest.mark.parametrize(("args", "message"), [
    (["add-node", "hub", "--out", "x.creds"], "node name 'hub' is reserved"),
    (["add-node", "gw", "--out", "x.creds"], "node name 'gw' is reserved"),
    (["add-node", "Edge_2", "--out", "x.creds"], "node name 'Edge_2' must match"),
    (["add-node", "edge-1", "--out", "x.creds"], "node 'edge-1' is already in the fleet"),
    (["rotate-node", "edge-9", "--out", "x.creds"], "node 'edge-9' is not in the fleet"),
    (["remove-node", "edge-9"], "node 'edge-9' is not in the fleet"),
    (["remove-operator", "alice"], "operator 'alice' is not in the fleet"),
    (["add-operator", "Bad!", "--out", "x.seed"], "operator name 'Bad!' must match"),
    (["add-node", "edge-2", "--out", "no-such-dir/x.creds"], "No such file or directory"),
])
def test_bad_input_is_refused_and_changes_nothing(state: Path, tmp_path: Path, args: list[str],
                                                  message: str) -> None:
    before = (state / "fleet.json").read_text()
    args = [str(tmp_path / a) if a.endswith((".creds", ".seed")) else a for a in args]
    assert not (tmp_path / "no-such-dir").exists()
    result = fleet(state, *args)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert (state / "fleet.json").read_text() == before
    assert not (tmp_path / "x.creds").exists() and not (tmp_path / "x.seed").exists()
    assert not (tmp_path / "no-such-dir").exists()


def test_a_state_directory_without_a_hub(tmp_path: Path) -> None:
    result = fleet(tmp_path / "nothing", "add-node", "edge-1", "--out", str(tmp_path / "e.creds"))
    assert result.returncode != 0 and "holds no hub: run `edgevm hub up" in result.stderr


def test_credentials_are_0600_and_the_hub_keeps_no_node_seed(state: Path, tmp_path: Path) -> None:
    creds = tmp_path / "edge-1.creds"
    assert creds.stat().st_mode & 0o777 == 0o600
    seed = json.loads(creds.read_text())["seed"]
    everything = "".join(p.read_text(errors="replace") for p in state.rglob("*") if p.is_file())
    assert seed not in everything
    for secret in ("keys/admin.seed", "keys/gateway.seed", "keys/system.seed", "ca/ca.key"):
        assert (state / secret).stat().st_mode & 0o777 == 0o600, secret
    result = fleet(state, "add-node", "edge-2", "--out", str(tmp_path / "edge-2.creds"))
    assert "the hub has not run yet" in result.stdout and seed not in result.stdout + result.stderr


def test_a_killed_hub_leaves_no_nats_server_and_starts_again(tmp_path: Path) -> None:
    hub = Hub(tmp_path / "hub", free_port(), free_port(), free_port(), tmp_path / "hub.log")
    hub.start()
    assert hub.process is not None
    servers: dict[int, str] = {}
    try:
        servers = {pid: command for pid, command in children_of(hub.process.pid).items() if "nats-server" in command}
        assert servers, hub.log.read_text()
        os.kill(hub.process.pid, signal.SIGKILL)  # the launcher alone, as the OOM killer would
        hub.process.wait(10)
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in servers):
            assert time.monotonic() < deadline, f"the hub's nats-server outlived it: {servers}"
            time.sleep(0.1)
    finally:
        for pid in servers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        hub.stop()
    hub.start()  # its ports and JetStream store are free again
    try:
        assert hub.process is not None and hub.process.poll() is None, hub.log.read_text()
    finally:
        hub.stop()
