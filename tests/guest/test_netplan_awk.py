"""Checks the guest's netplan parser (netplan.awk) with the host's busybox awk, the guest's own awk."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tests.guest.build import NETPLAN_AWK

BUSYBOX = shutil.which("busybox")
pytestmark = pytest.mark.skipif(BUSYBOX is None, reason="busybox (busybox-static) is not installed")

BLOCK_STYLE = """\
version: 2
ethernets:
  primary:
    match:
      macaddress: "52:54:00:AA:BB:CC"   # upper case in the config, lower case in /sys
    set-name: eth0
    addresses:
      - 10.0.0.5/24
      - '10.0.0.6/24'
    routes:
      - to: 10.9.0.0/16
        via: 10.0.0.9
      - to: default
        via: 10.0.0.1
    nameservers:
      addresses: [1.1.1.1]
"""

FLOW_STYLE = """\
network:
  version: 2
  ethernets:
    eth0:
      match: {macaddress: "52:54:00:00:00:01"}
      addresses: [192.168.1.2/24, 192.168.1.3/24]
      gateway4: 192.168.1.1
    eth1:
      addresses: [172.16.0.2/12]
      routes: [{to: 10.0.0.0/8, via: 172.16.0.9}, {via: 172.16.0.1, to: 0.0.0.0/0}]
"""

# What PyYAML writes (the way the project's seed builder is likely to): list items at their key's indent.
PYYAML_DUMPED = yaml.safe_dump({"network": {"version": 2, "ethernets": {"nic0": {
    "match": {"macaddress": "52:54:00:12:34:56"},
    "addresses": ["10.0.2.15/24"],
    "routes": [{"to": "default", "via": "10.0.2.2"}],
    "dhcp4": False,
}}}})


@pytest.mark.parametrize(("config", "expected"), [
    (BLOCK_STYLE, ["primary 52:54:00:aa:bb:cc 10.0.0.5/24,10.0.0.6/24 10.0.0.1"]),
    (FLOW_STYLE, ["eth0 52:54:00:00:00:01 192.168.1.2/24,192.168.1.3/24 192.168.1.1",
                  "eth1 - 172.16.0.2/12 172.16.0.1"]),
    (PYYAML_DUMPED, ["nic0 52:54:00:12:34:56 10.0.2.15/24 10.0.2.2"]),
    ("version: 2\nethernets:\n  eth0:\n    dhcp4: true\n", ["eth0 - - -"]),
    ("version: 2\n", []),
], ids=["block-style", "flow-style", "pyyaml-dumped", "dhcp-only", "no-ethernets"])
def test_netplan_awk_reads_each_ethernets_mac_addresses_and_default_gateway(
        config: str, expected: list[str]) -> None:
    result = subprocess.run([str(BUSYBOX), "awk", "-f", str(NETPLAN_AWK)], input=config,
                            capture_output=True, text=True, check=True)
    assert result.stdout.splitlines() == expected
