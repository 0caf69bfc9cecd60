"""The NoCloud seed ISO: label, files under every name scheme, reproducible bytes, instance-id, atomic write."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pycdlib
import pytest
import yaml

from edgevm.lifecycle.seed import MINIMAL_USER_DATA, SeedContent, build_seed_iso, seed_digest, write_seed

USER_DATA = "#cloud-config\npackages: [curl]\nruncmd:\n  - echo 'héllo' > /tmp/hello\n"
NETWORK_CONFIG = "version: 2\nethernets:\n  eth0:\n    addresses: [10.1.0.5/24]\n"
CONTENT = SeedContent(
    vm_name="web-1",
    hostname="web-1.example",
    user_data=USER_DATA,
    network_config=NETWORK_CONFIG,
    meta_data={"public-keys": ["ssh-ed25519 AAAA test"]},
)


def _open(image: bytes) -> pycdlib.PyCdlib:
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(image))
    return iso


def _read(iso: pycdlib.PyCdlib, **where: str) -> bytes:
    out = io.BytesIO()
    iso.get_file_from_iso_fp(out, **where)
    return out.getvalue()


def _rock_ridge_names(iso: pycdlib.PyCdlib) -> set[str]:
    return {
        rec.rock_ridge.name().decode()
        for rec in iso.list_children(rr_path="/")
        if not (rec.is_dot() or rec.is_dotdot())
    }


def test_seed_has_label_cidata_and_the_files_under_joliet_and_rock_ridge_names() -> None:
    iso = _open(build_seed_iso(CONTENT))
    assert iso.pvd.volume_identifier.decode().strip() == "cidata"
    assert iso.has_joliet() and iso.has_rock_ridge()
    assert _rock_ridge_names(iso) == {"meta-data", "user-data", "network-config"}
    for name, expected in CONTENT.files().items():
        assert _read(iso, joliet_path=f"/{name}") == expected
        assert _read(iso, rr_path=f"/{name}") == expected
    assert _read(iso, rr_path="/user-data").decode() == USER_DATA
    assert _read(iso, rr_path="/network-config").decode() == NETWORK_CONFIG
    meta = yaml.safe_load(_read(iso, rr_path="/meta-data"))
    assert meta == {
        "instance-id": CONTENT.instance_id,
        "local-hostname": "web-1.example",
        "public-keys": ["ssh-ed25519 AAAA test"],
    }
    iso.close()


@pytest.mark.parametrize("user_data", [None, "", "  \n"], ids=["none", "empty", "blank"])
def test_without_user_data_the_seed_carries_a_bare_cloud_config(user_data: str | None) -> None:
    iso = _open(build_seed_iso(SeedContent(vm_name="a", hostname="a", user_data=user_data)))
    assert _read(iso, rr_path="/user-data").decode() == MINIMAL_USER_DATA
    assert _rock_ridge_names(iso) == {"meta-data", "user-data"}  # network-config only when given
    iso.close()


def test_same_content_gives_the_same_bytes_at_another_time_and_time_zone() -> None:
    first = build_seed_iso(CONTENT)
    time.sleep(1.1)  # pycdlib stamps records with the current second
    assert build_seed_iso(CONTENT) == first
    code = (
        "import sys; from edgevm.lifecycle.seed import SeedContent, seed_digest; "
        "print(seed_digest(SeedContent('web-1', 'web-1.example', sys.argv[1], sys.argv[2], "
        "{'public-keys': ['ssh-ed25519 AAAA test']})))"
    )
    other_zone = subprocess.run(
        [sys.executable, "-c", code, USER_DATA, NETWORK_CONFIG],
        env={**os.environ, "TZ": "Pacific/Auckland"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert other_zone.stdout.strip() == hashlib.sha256(first).hexdigest() == seed_digest(CONTENT)


@pytest.mark.parametrize(
    "changed",
    [
        SeedContent("web-1", "web-1.example", USER_DATA + "# more\n", NETWORK_CONFIG, CONTENT.meta_data),
        SeedContent("web-1", "web-1.example", USER_DATA, None, CONTENT.meta_data),
        SeedContent("web-1", "web-2.example", USER_DATA, NETWORK_CONFIG, CONTENT.meta_data),
        SeedContent("web-1", "web-1.example", USER_DATA, NETWORK_CONFIG, {"public-keys": []}),
        SeedContent("web-2", "web-1.example", USER_DATA, NETWORK_CONFIG, CONTENT.meta_data),
    ],
    ids=["user-data", "network-config", "hostname", "meta-data", "vm-name"],
)
def test_instance_id_changes_exactly_when_the_content_does(changed: SeedContent) -> None:
    same = SeedContent("web-1", "web-1.example", USER_DATA, NETWORK_CONFIG, dict(CONTENT.meta_data or {}))
    assert same.instance_id == CONTENT.instance_id
    assert changed.instance_id != CONTENT.instance_id
    assert seed_digest(changed) != seed_digest(CONTENT)
    assert changed.instance_id.startswith(changed.vm_name + "-")


def test_meta_data_cannot_override_instance_id_or_hostname() -> None:
    content = SeedContent("a", "a-host", meta_data={"instance-id": "mine", "local-hostname": "other"})
    meta = yaml.safe_load(content.files()["meta-data"])
    assert meta == {"instance-id": content.instance_id, "local-hostname": "a-host"}


def test_write_seed_replaces_the_file_atomically_and_returns_its_digest(tmp_path: Path) -> None:
    dest = tmp_path / "web-1-seed.iso"
    dest.write_bytes(b"old seed")
    digest = write_seed(dest, CONTENT)
    assert digest == hashlib.sha256(dest.read_bytes()).hexdigest() == seed_digest(CONTENT)
    assert dest.stat().st_mode & 0o777 == 0o600  # user-data may carry secrets
    assert sorted(p.name for p in tmp_path.iterdir()) == ["web-1-seed.iso"]


def test_write_seed_leaves_no_partial_file_when_it_fails(tmp_path: Path) -> None:
    dest = tmp_path / "seed.iso"
    dest.mkdir()  # the final rename onto a directory fails after the data was written
    with pytest.raises(IsADirectoryError):
        write_seed(dest, CONTENT)
    assert [p.name for p in tmp_path.iterdir()] == ["seed.iso"]


NOCLOUD_READER = """
import json, sys
from cloudinit.helpers import Paths
from cloudinit.sources.DataSourceNoCloud import DataSourceNoCloud
root = sys.argv[1]
paths = Paths({"cloud_dir": root + "/cloud", "run_dir": root + "/run"})
ds = DataSourceNoCloud({"datasource": {"NoCloud": {"fs_label": None}}}, None, paths)
assert ds.get_data(), "NoCloud found no seed"
print(json.dumps({"instance_id": ds.get_instance_id(), "hostname": ds.get_hostname().hostname,
                  "user_data": ds.userdata_raw.decode() if isinstance(ds.userdata_raw, bytes) else ds.userdata_raw,
                  "network_config": ds.network_config, "user_data_parts": len(list(ds.get_userdata().walk()))}))
"""


def _system_cloud_init() -> bool:
    try:
        return subprocess.run(["/usr/bin/python3", "-c", "import cloudinit"], timeout=60).returncode == 0
    except OSError:
        return False


@pytest.mark.skipif(not _system_cloud_init(), reason="cloud-init is not installed in the system python")
def test_cloud_init_nocloud_datasource_reads_the_seed(tmp_path: Path) -> None:
    # The files are taken out of the ISO by their Rock Ridge names (what a Linux guest's mount shows) and
    # laid out as NoCloud's seed directory, so cloud-init's own reader parses them without a mount.
    seed_dir = tmp_path / "cloud" / "seed" / "nocloud"
    seed_dir.mkdir(parents=True)
    iso = _open(build_seed_iso(CONTENT))
    for name in _rock_ridge_names(iso):
        (seed_dir / name).write_bytes(_read(iso, rr_path=f"/{name}"))
    iso.close()
    done = subprocess.run(
        ["/usr/bin/python3", "-c", NOCLOUD_READER, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["instance_id"] == CONTENT.instance_id
    assert seen["hostname"] == "web-1"  # cloud-init's get_hostname gives the short name
    assert seen["user_data"] == USER_DATA
    assert seen["network_config"] == yaml.safe_load(NETWORK_CONFIG)
    assert seen["user_data_parts"] >= 2  # the MIME container and the cloud-config part
