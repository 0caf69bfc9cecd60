"""Validation of the cloud-init data of a VmSpec (PROTOCOL.md, CloudInit) before it goes into a seed.

User-data is at most 64 KiB of UTF-8 and must be one of the forms cloud-init runs, told by its first line:
`#cloud-config` (YAML that must parse to a mapping; an empty body is fine), a script (`#!`),
`#cloud-boothook`, `#include` / `#include-once` (URLs), or a MIME multipart document (`Content-Type:
multipart/...` with a `MIME-Version` header, as `cloud-init devel make-mime` writes). Empty user-data is
accepted and means "none" (the seed then carries a bare `#cloud-config`). Other forms cloud-init knows
(`#cloud-config-archive`, `#part-handler`, jinja templates) are refused to keep the contract small.
Only syntax and shape are checked, not the keys of cloud-init modules: the guest's cloud-init version
decides those.

network-config is YAML (at most 64 KiB) that parses to a mapping with `version: 1` or `version: 2` (or
`config: disabled`), at the top or under a `network:` key (cloud-init accepts both). meta_data is extra
NoCloud meta-data (at most 64 KiB as JSON); it may not set `instance-id` or `local-hostname`, which
edgevm owns (see seed.py). YAML nests at most 32 levels and holds at most 65536 values with its aliases
expanded (no "billion laughs").
"""

from __future__ import annotations

import email
from typing import Any

import msgspec
import yaml

from edgevm.shared.errors import FieldError
from edgevm.shared.limits import MAX_DEPTH, shape_of

MAX_USER_DATA_BYTES = 64 * 1024
MAX_NETWORK_CONFIG_BYTES = 64 * 1024
MAX_META_DATA_BYTES = 64 * 1024
# The most values a YAML document may hold with its aliases expanded: more than 64 KiB of YAML holds without
# aliases (a value takes at least two bytes), far less than a "billion laughs" of aliases of aliases, which
# the guest's cloud-init would expand (it writes the combined config out as JSON) until it runs out of memory.
MAX_YAML_VALUES = 64 * 1024
RESERVED_META_DATA_KEYS = ("instance-id", "local-hostname")
ACCEPTED_FORMS = (
    "'#cloud-config' followed by YAML, a script starting with '#!', '#cloud-boothook', "
    "'#include' or a MIME multipart document"
)

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
USER_DATA_FIELD = "cloud_init.user_data"
NETWORK_CONFIG_FIELD = "cloud_init.network_config"
META_DATA_FIELD = "cloud_init.meta_data"


class CloudInitInvalid(FieldError):
    """A cloud-init field breaks a rule; `field` is its JSON path, `rule` the rule it breaks."""


def validate_user_data(user_data: str | bytes, *, field: str = USER_DATA_FIELD) -> str:
    """Return user-data as text when cloud-init can run it, else raise CloudInitInvalid."""
    text = _utf8_text(user_data, field, MAX_USER_DATA_BYTES)
    if not text.strip():
        return text
    first_line = text.split("\n", 1)[0].rstrip()
    if first_line == "#cloud-config":
        _load_yaml(text, field)
    elif first_line.startswith("#!") or first_line == "#cloud-boothook":
        pass
    elif first_line.split(" ", 1)[0] in ("#include", "#include-once"):
        pass
    elif first_line.lower().startswith("content-type: multipart/"):
        _check_multipart(text, field)
    else:
        shown = first_line if len(first_line) <= 40 else first_line[:40] + "..."
        raise CloudInitInvalid(field, f"must be {ACCEPTED_FORMS}; its first line is {shown!r}")
    return text


def validate_network_config(network_config: str | bytes, *, field: str = NETWORK_CONFIG_FIELD) -> str:
    """Return network-config as text when it is a version 1 or 2 YAML mapping, else raise CloudInitInvalid."""
    text = _utf8_text(network_config, field, MAX_NETWORK_CONFIG_BYTES)
    config = _load_yaml(text, field)
    if config is None:
        raise CloudInitInvalid(field, "must be a YAML mapping with 'version: 2' (or 1); it is empty")
    if "network" in config:  # cloud-init drops a top-level `network:` key the same way
        config = config["network"]
        if not isinstance(config, dict):
            raise CloudInitInvalid(field, "must have a mapping under 'network:'")
    if config.get("config") == "disabled":  # cloud-init's way to leave the guest's network alone
        return text
    version = config.get("version")
    if type(version) is not int or version not in (1, 2):
        raise CloudInitInvalid(field, f"must have 'version: 2' (or 1) at the top; found version {version!r}")
    return text


def validate_meta_data(meta_data: dict[str, Any], *, field: str = META_DATA_FIELD) -> dict[str, Any]:
    """Return extra meta-data when it sets none of the keys edgevm owns and is at most 64 KiB as JSON.

    Raise CloudInitInvalid otherwise. The size bound keeps the seed ISO and the VM's record (which is a
    JetStream KV value and part of every `vm.list` reply) small.
    """
    size = len(msgspec.json.encode(meta_data))
    if size > MAX_META_DATA_BYTES:
        raise CloudInitInvalid(field, f"must be at most {MAX_META_DATA_BYTES} bytes as JSON; it is {size} bytes")
    for key in RESERVED_META_DATA_KEYS:
        if key in meta_data:
            what = "set `hostname` in the VM spec" if key == "local-hostname" else "edgevm derives it"
            raise CloudInitInvalid(f"{field}.{key}", f"is set by edgevm and cannot be given ({what})")
    return meta_data


def _utf8_text(value: str | bytes, field: str, limit: int) -> str:
    if isinstance(value, bytes):
        data = value
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CloudInitInvalid(field, f"must be valid UTF-8 text; byte {exc.start} is not") from None
    else:
        text = value
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise CloudInitInvalid(field, f"must be valid UTF-8 text; character {exc.start} is not") from None
    if len(data) > limit:
        raise CloudInitInvalid(field, f"must be at most {limit} bytes of UTF-8; it is {len(data)} bytes")
    return text


def _load_yaml(text: str, field: str) -> dict[str, Any] | None:
    try:
        # libyaml: fast, and it refuses nesting past 1000 levels itself (the pure-Python parser takes a second
        # to reach its RecursionError on 60,000 '[').
        loaded = yaml.load(text, Loader=_LOADER)  # a safe loader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = exc.problem or exc.context or "cannot be parsed"
        raise CloudInitInvalid(field, f"is not valid YAML: {problem}{where}") from None
    except yaml.YAMLError as exc:
        raise CloudInitInvalid(field, f"is not valid YAML: {exc}") from None
    except RecursionError:  # PyYAML's composer recurses once per level of nesting
        raise CloudInitInvalid(field, f"nests deeper than {MAX_DEPTH} levels of mappings and lists") from None
    depth, values = shape_of(loaded, MAX_DEPTH)
    if depth > MAX_DEPTH:
        raise CloudInitInvalid(field, f"nests deeper than {MAX_DEPTH} levels of mappings and lists")
    if values > MAX_YAML_VALUES:
        raise CloudInitInvalid(field, f"holds more than {MAX_YAML_VALUES} values with its YAML aliases expanded")
    if loaded is not None and not isinstance(loaded, dict):
        raise CloudInitInvalid(field, f"must be a YAML mapping (key: value), not a {_yaml_kind(loaded)}")
    return loaded


def _yaml_kind(value: object) -> str:
    if isinstance(value, list):
        return "list"
    if isinstance(value, str):
        return "string"
    return type(value).__name__


def _check_multipart(text: str, field: str) -> None:
    # cloud-init reads user-data as MIME only when "MIME-Version:" is in its first 4096 bytes.
    if "mime-version:" not in text[:4096].lower():
        raise CloudInitInvalid(field, "is MIME without a 'MIME-Version' header; cloud-init would ignore it")
    if not email.message_from_string(text).is_multipart():
        raise CloudInitInvalid(field, "says 'Content-Type: multipart/...' but has no parts (check its boundary)")
