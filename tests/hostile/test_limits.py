"""The limits as plain functions: excerpts, depth, sizes, whole-string name patterns, usable subnets."""

from __future__ import annotations

import importlib
import re
from ipaddress import IPv4Network
from typing import Any

import msgspec
import msgspec.inspect
import pytest

from edgevm.netplumb.errors import ExhaustedError
from edgevm.netplumb.ipam import DEFAULT_UPLINK_POOL, allocate_uplink, unusable_because
from edgevm.shared.limits import depth_of, excerpt, shape_of, too_deep_at
from edgevm.shared.spec import TEXT_PATTERN  # free text (descriptions): newlines belong there
from edgevm.shared.units import parse_size


def test_an_excerpt_is_the_value_when_short_and_its_start_and_length_when_long() -> None:
    assert excerpt("abc") == "'abc'"
    assert excerpt("x" * 1_000_000) == repr("x" * 64) + "... (1000000 characters)"


@pytest.mark.parametrize(("value", "depth"), [(1, 0), ({}, 1), ({"a": [1, {"b": []}]}, 4), ([[[[]]]], 4)])
def test_depth_of_counts_objects_and_arrays(value: Any, depth: int) -> None:
    assert depth_of(value) == depth


def test_depth_of_stops_counting_past_the_limit() -> None:
    deep: Any = []
    for _ in range(10_000):
        deep = [deep]
    assert depth_of(deep, 32) == 33


def test_shape_of_counts_shared_values_once_per_reference_without_walking_the_expansion() -> None:
    leaf = ["lol"] * 9
    level: Any = leaf
    for _ in range(29):
        level = [level] * 9  # one list, referenced 9 times: what a YAML alias of an alias builds
    assert shape_of({"a": level}) == (31, 1 + sum(9**i for i in range(31)))


def test_shape_of_stops_at_a_value_that_holds_itself() -> None:
    loop: list[Any] = []
    loop.append(loop)
    assert shape_of(loop, 32)[0] == 33


@pytest.mark.parametrize(("data", "limit", "path"), [
    (b'{"a": [1, 2, {"b": [[[]]]}]}', 4, "a[2].b[0]"),
    (b'{"a": [1, 2, {"b": [[[]]]}]}', 6, None),
    (b'{"s": "[[[[[[", "t": {}}', 2, None),  # brackets inside strings are not nesting
    (b"[" * 100, 3, "[0][0][0]"),
])
def test_too_deep_at_names_where_nesting_passes_the_limit(data: bytes, limit: int, path: str | None) -> None:
    assert too_deep_at(data, limit) == path


@pytest.mark.parametrize(("value", "rule"), [
    ("9" * 400 + "GB", "at most 1024TiB"),
    (10**30, "at most 1024TiB"),
    ("1025TiB", "at most 1024TiB"),
    ("1.0000000000000000000000000000001KB", "not a whole number"),
    ("1" + " " * 100_000 + "!", "got '1 "),
    ("\u0661\u0662\u0668MB", "got '\u0661"),  # Arabic-Indic digits: int() reads them, the protocol does not
    ("\uff11\uff12\uff18MB", "got '\uff11"),  # fullwidth digits
    ("128\u2003MB", "got '128"),  # an em space between number and unit
])
def test_sizes_past_the_maximum_or_malformed_are_refused(value: int | str, rule: str) -> None:
    with pytest.raises(ValueError, match=re.escape(rule)):
        parse_size(value)


def test_sizes_up_to_the_maximum_are_exact() -> None:
    assert parse_size("1024TiB") == 1024**5 and parse_size("1.5 KiB") == 1536 and parse_size(" 2G ") == 2 * 1024**3


REQUEST_MODULES = ("edgevm.shared.spec", "edgevm.shared.commands", "edgevm.shared.netstate",
                   "edgevm.snapshotter.commands")


def _patterns() -> list[tuple[str, str]]:
    found: dict[str, str] = {}

    def walk(info: Any, where: str, seen: set[int]) -> None:
        if isinstance(info, msgspec.inspect.StrType) and info.pattern and info.pattern != TEXT_PATTERN:
            found[info.pattern] = where
        elif isinstance(info, msgspec.inspect.StructType):
            if id(info.cls) in seen:
                return
            seen.add(id(info.cls))
            for field in info.fields:
                walk(field.type, f"{info.cls.__name__}.{field.name}", seen)
        for attr in ("types", "item_type", "key_type", "value_type"):
            inner = getattr(info, attr, None)
            for item in inner if isinstance(inner, tuple) else [inner] if inner is not None else []:
                walk(item, where, seen)

    for module in map(importlib.import_module, REQUEST_MODULES):
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, msgspec.Struct):
                walk(msgspec.inspect.type_info(value), value.__name__, set())
    return sorted(found.items())


def test_the_request_structs_have_name_patterns() -> None:
    assert len(_patterns()) >= 5  # the walk finds them: Name, ImageName, TaskId, InterfaceName, RequestId


@pytest.mark.parametrize(("pattern", "where"), _patterns(), ids=[w for _, w in _patterns()])
def test_every_name_pattern_refuses_a_final_newline(pattern: str, where: str) -> None:
    samples = ["a", "web", "eth0", "0" * 26, "A" * 26, "abc-1", "r1", "n1/web"]
    matching = [s for s in samples if re.search(pattern, s)]
    assert matching, f"no sample matches {pattern} ({where})"
    for sample in matching:
        assert re.search(pattern, sample + "\n") is None, f"{where}: {sample!r} + newline passes {pattern}"


@pytest.mark.parametrize(("net", "reason"), [
    ("0.0.0.0/0", "whole IPv4 space"),
    ("0.0.0.0/8", "'this network'"),
    ("127.0.0.0/8", "loopback"),
    ("224.0.0.0/24", "multicast"),
    ("169.254.64.0/24", "link-local"),
    ("240.0.0.0/24", "reserved"),
    ("128.0.0.0/1", "link-local"),
    ("10.77.0.0/25", "default VRF"),
])
def test_unusable_subnets_say_why(net: str, reason: str) -> None:
    own = [(IPv4Network("10.77.0.0/24"), "the node's default VRF 10.77.0.0/24")]
    assert reason in (unusable_because(IPv4Network(net), own) or "")


@pytest.mark.parametrize("net", ["10.0.0.0/8", "172.16.0.0/12", "192.168.1.0/24", "100.64.0.0/10", "8.8.8.0/24"])
def test_ordinary_subnets_are_usable(net: str) -> None:
    assert unusable_because(IPv4Network(net)) is None


@pytest.mark.parametrize(("taken", "expected"), [
    ([], "169.254.64.0/31"),
    (["169.254.64.2/31", "169.254.64.0/31"], "169.254.64.4/31"),  # in any order
    (["169.254.64.0/30", "169.254.64.6/31"], "169.254.64.4/31"),  # wider networks block every /31 they cover
    (["169.254.0.0/16"], None),  # a network around the whole pool
    (["10.0.0.0/8", "169.254.64.2/31"], "169.254.64.0/31"),  # networks outside the pool block nothing
    (["169.254.64.0/29"], None),
])
def test_allocate_uplink_takes_the_first_31_no_taken_network_overlaps(taken: list[str], expected: str | None) -> None:
    pool = IPv4Network("169.254.64.0/29")
    nets = [IPv4Network(net) for net in taken]
    if expected is None:
        with pytest.raises(ExhaustedError):
            allocate_uplink(pool, nets)
    else:
        assert allocate_uplink(pool, nets) == IPv4Network(expected)


@pytest.mark.timeout(20)  # the quadratic search took minutes here: 8,191 taken uplinks of the default pool
def test_the_last_free_uplink_of_a_nearly_full_pool_is_found_at_once() -> None:
    slots = list(DEFAULT_UPLINK_POOL.subnets(new_prefix=31))
    taken = slots[:-1][::-1]
    for _ in range(20):  # as 20 VRFs created one after the other would ask
        assert allocate_uplink(DEFAULT_UPLINK_POOL, taken) == slots[-1]
