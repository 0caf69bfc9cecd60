"""Validation of cloud-init user-data, network-config and meta-data, table-driven."""

from __future__ import annotations

import shutil
import subprocess
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path

import pytest

from edgevm.lifecycle.userdata import (
    MAX_META_DATA_BYTES,
    MAX_USER_DATA_BYTES,
    CloudInitInvalid,
    validate_meta_data,
    validate_network_config,
    validate_user_data,
)


def _mime() -> str:
    message = MIMEMultipart()
    message.attach(MIMEText("#cloud-config\npackages: [curl]\n", "cloud-config"))
    message.attach(MIMEText("#!/bin/sh\necho hi\n", "x-shellscript"))
    return message.as_string()


CLOUD_CONFIG = "#cloud-config\nusers:\n  - name: ops\n    sudo: ALL=(ALL) NOPASSWD:ALL\npackages: [curl]\n"
# 64 KiB exactly: the header plus a YAML comment filling the rest.
AT_LIMIT = "#cloud-config\n#" + "x" * (MAX_USER_DATA_BYTES - len("#cloud-config\n#"))

VALID_USER_DATA = [
    pytest.param(CLOUD_CONFIG, id="cloud-config"),
    pytest.param("#cloud-config\n", id="cloud-config-empty-body"),
    pytest.param("#cloud-config\r\nhostname: x\r\n", id="cloud-config-crlf"),
    pytest.param("#!/bin/bash\necho hello > /tmp/hello\n", id="script"),
    pytest.param("#cloud-boothook\n#!/bin/sh\necho boot\n", id="boothook"),
    pytest.param("#include\nhttps://example.com/a.yaml\n", id="include"),
    pytest.param("#include https://example.com/a.yaml\n", id="include-same-line"),
    pytest.param("#include-once\nhttps://example.com/a.yaml\n", id="include-once"),
    pytest.param(_mime(), id="mime-multipart"),
    pytest.param("", id="empty-means-none"),
    pytest.param(AT_LIMIT, id="exactly-64KiB"),
    pytest.param("#cloud-config\nwrite_files:\n  - content: 'héllo ✓'\n    path: /x\n", id="non-ascii"),
]

INVALID_USER_DATA = [
    pytest.param("#cloud-config\nfoo: [1\nbar: 2\n", "is not valid YAML: did not find expected ',' or ']'", id="bad-yaml"),
    pytest.param("#cloud-config\na: b: c\n", "at line 2, column 5", id="bad-yaml-position"),
    pytest.param("#cloud-config\n- a\n- b\n", "must be a YAML mapping (key: value), not a list", id="yaml-list"),
    pytest.param("#cloud-config\njust text\n", "not a string", id="yaml-scalar"),
    pytest.param("#cloud-config\na: 1\n---\nb: 2\n", "is not valid YAML", id="two-documents"),
    pytest.param(AT_LIMIT + "x", "at most 65536 bytes of UTF-8; it is 65537 bytes", id="64KiB-plus-1"),
    pytest.param(b"#cloud-config\nname: \xff\n", "must be valid UTF-8 text; byte 20 is not", id="not-utf8"),
    pytest.param("#cloud-config\nname: \udc80\n", "must be valid UTF-8 text", id="lone-surrogate"),
    pytest.param("hello: world\n", "must be '#cloud-config' followed by YAML, a script", id="no-header"),
    pytest.param(" #cloud-config\na: 1\n", "its first line is ' #cloud-config'", id="leading-space"),
    pytest.param("#cloud-config-archive\n- a\n", "must be '#cloud-config'", id="archive-not-accepted"),
    pytest.param(
        "Content-Type: multipart/mixed; boundary=x\n\n--x\n", "without a 'MIME-Version' header", id="mime-no-version"
    ),
    pytest.param(
        "Content-Type: multipart/mixed; boundary=x\nMIME-Version: 1.0\n\nhello\n", "has no parts", id="mime-no-parts"
    ),
]


@pytest.mark.parametrize("user_data", VALID_USER_DATA)
def test_valid_user_data_is_returned_as_text(user_data: str) -> None:
    assert validate_user_data(user_data) == user_data


@pytest.mark.parametrize(("user_data", "rule"), INVALID_USER_DATA)
def test_invalid_user_data_names_the_field_and_the_rule(user_data: str | bytes, rule: str) -> None:
    with pytest.raises(CloudInitInvalid) as caught:
        validate_user_data(user_data)
    assert caught.value.field == "cloud_init.user_data"
    assert rule in caught.value.rule
    assert str(caught.value) == f"cloud_init.user_data: {caught.value.rule}"


def test_user_data_error_is_a_value_error_with_the_given_field() -> None:
    with pytest.raises(ValueError, match=r"^user_data: ") as caught:
        validate_user_data("nope", field="user_data")
    assert isinstance(caught.value, CloudInitInvalid)
    assert caught.value.field == "user_data"


@pytest.mark.skipif(shutil.which("cloud-init") is None, reason="cloud-init is not installed")
@pytest.mark.parametrize(
    ("user_data", "accepted"),
    [(CLOUD_CONFIG, True), ("#cloud-config\nfoo: [1\nbar: 2\n", False), ("#cloud-config\n- a\n", False)],
    ids=["valid", "bad-yaml", "list"],
)
def test_cloud_init_agrees_on_cloud_config(tmp_path: Path, user_data: str, accepted: bool) -> None:
    path = tmp_path / "user-data"
    path.write_text(user_data)
    ours = True
    try:
        validate_user_data(user_data)
    except CloudInitInvalid:
        ours = False
    theirs = subprocess.run(["cloud-init", "schema", "-c", str(path)], capture_output=True, timeout=60)
    assert ours is accepted
    assert (theirs.returncode == 0) is accepted, theirs.stderr


VALID_NETWORK_CONFIG = [
    pytest.param("version: 2\nethernets:\n  eth0:\n    addresses: [10.0.0.5/24]\n", id="v2"),
    pytest.param("version: 1\nconfig:\n  - type: physical\n    name: eth0\n", id="v1"),
    pytest.param("network:\n  version: 2\n  ethernets: {}\n", id="v2-under-network"),
    pytest.param("network:\n  config: disabled\n", id="disabled"),
]

INVALID_NETWORK_CONFIG = [
    pytest.param("ethernets: {}\n", "found version None", id="no-version"),
    pytest.param("version: 3\n", "found version 3", id="version-3"),
    pytest.param("version: '2'\n", "found version '2'", id="version-string"),
    pytest.param("- version: 2\n", "must be a YAML mapping", id="list"),
    pytest.param("network: [version: 2]\n", "must have a mapping under 'network:'", id="network-list"),
    pytest.param("network:\n  ethernets: {}\n", "found version None", id="network-no-version"),
    pytest.param("version: [2\n", "is not valid YAML", id="bad-yaml"),
    pytest.param("", "it is empty", id="empty"),
]


@pytest.mark.parametrize("network_config", VALID_NETWORK_CONFIG)
def test_valid_network_config_is_returned(network_config: str) -> None:
    assert validate_network_config(network_config) == network_config


@pytest.mark.parametrize(("network_config", "rule"), INVALID_NETWORK_CONFIG)
def test_invalid_network_config_names_the_field_and_the_rule(network_config: str, rule: str) -> None:
    with pytest.raises(CloudInitInvalid) as caught:
        validate_network_config(network_config)
    assert caught.value.field == "cloud_init.network_config"
    assert rule in caught.value.rule


def test_meta_data_may_not_set_what_edgevm_owns() -> None:
    assert validate_meta_data({"public-keys": ["ssh-ed25519 AAAA"]}) == {"public-keys": ["ssh-ed25519 AAAA"]}
    for key in ("instance-id", "local-hostname"):
        with pytest.raises(CloudInitInvalid) as caught:
            validate_meta_data({key: "x"})
        assert caught.value.field == f"cloud_init.meta_data.{key}"
        assert "is set by edgevm" in caught.value.rule


def test_meta_data_is_at_most_64_kib_as_json() -> None:
    # {"k":"..."} is 8 bytes of JSON around the value: this one is exactly at the limit.
    at_limit = {"k": "x" * (MAX_META_DATA_BYTES - 8)}
    assert validate_meta_data(at_limit) == at_limit
    with pytest.raises(CloudInitInvalid) as caught:
        validate_meta_data({"k": "x" * (MAX_META_DATA_BYTES - 7)})
    assert caught.value.field == "cloud_init.meta_data"
    assert f"at most {MAX_META_DATA_BYTES} bytes as JSON; it is {MAX_META_DATA_BYTES + 1} bytes" in caught.value.rule
