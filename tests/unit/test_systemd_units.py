"""The systemd units in deploy/systemd pass `systemd-analyze verify` (which runs without systemd as PID 1)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNITS = sorted((ROOT / "deploy" / "systemd").glob("*.service"))


def test_there_are_a_node_and_a_hub_unit() -> None:
    assert {u.name for u in UNITS} == {"edgevm-node.service", "edgevm-hub.service"}


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_unit_verifies(unit: Path, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: deploy/bootstrap.sh installs the systemd package"
    # The units run edgevm from a checkout at /opt/edgevm; verify checks the binary exists, so point it at this one.
    text = unit.read_text()
    assert "/opt/edgevm/.venv/bin/edgevm" in text
    copy = tmp_path / unit.name
    copy.write_text(text.replace("/opt/edgevm", str(ROOT)))
    assert verify_problems(copy) == []


def verify_problems(unit: Path) -> list[str]:
    """Return what `systemd-analyze verify` finds wrong with `unit` (its exit code, the lines naming it)."""
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # verify also reports on *other* units it loads (the host's): only the lines about this one count.
    problems = [line for line in (result.stdout + result.stderr).splitlines() if unit.name in line]
    if result.returncode != 0:
        problems.append(f"exit code {result.returncode}")
    return problems


def test_a_broken_unit_is_caught(tmp_path: Path) -> None:
    # The check above can fail: a key in the wrong section, a missing binary.
    broken = tmp_path / "edgevm-broken.service"
    broken.write_text("[Service]\nExecStart=/nonexistent/edgevm node up\nStartLimitIntervalSec=0\n")
    problems = verify_problems(broken)
    assert any("StartLimitIntervalSec" in p for p in problems), problems


def test_the_node_unit_stops_services_before_nats_and_runs_after_libvirt() -> None:
    node = (ROOT / "deploy" / "systemd" / "edgevm-node.service").read_text()
    assert "KillMode=mixed" in node and "Restart=always" in node
    assert "After=network-online.target libvirtd.service" in node
