"""The nftables JSON vocabulary netplumb uses, and a table model that round-trips through `nft -j`.

Expressions are written in the exact form `nft -j list` prints them, so a table read back from the
kernel compares equal to the one that was applied.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

Expr = dict[str, Any]
Rule = tuple[Expr, ...]

ACCEPT: Expr = {"accept": None}
DROP: Expr = {"drop": None}
NOTRACK: Expr = {"notrack": None}
MASQUERADE: Expr = {"masquerade": None}
COUNTER: Expr = {"counter": {"packets": 0, "bytes": 0}}


@dataclass(frozen=True)
class Chain:
    """A base chain: its hook, priority and ordered rules."""

    name: str
    type: str  # filter | nat
    hook: str
    prio: int
    rules: tuple[Rule, ...]
    policy: str = "accept"


@dataclass(frozen=True)
class Table:
    """A whole nftables table, compared by chains (order-free) and rules (ordered)."""

    family: str
    name: str
    chains: tuple[Chain, ...]

    def by_name(self) -> dict[str, Chain]:
        """The chains keyed by name."""
        return {chain.name: chain for chain in self.chains}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Table):
            return NotImplemented
        return (self.family, self.name, self.by_name()) == (other.family, other.name, other.by_name())

    __hash__ = None  # type: ignore[assignment]


def _value(value: IPv4Address | IPv4Network | str | int) -> Any:
    if isinstance(value, IPv4Network):
        if value.prefixlen == 32:
            return str(value.network_address)
        return {"prefix": {"addr": str(value.network_address), "len": value.prefixlen}}
    if isinstance(value, IPv4Address):
        return str(value)
    return value


def match(left: Expr, right: Any, op: str = "==") -> Expr:
    """A relational match; a collection on the right becomes an anonymous set, sorted like nft prints it."""
    if isinstance(right, list | tuple | set | frozenset):
        values = [_value(v) for v in sorted(right)]
        right = values[0] if len(values) == 1 else {"set": values}
    else:
        right = _value(right)
    return {"match": {"op": op, "left": left, "right": right}}


def meta(key: str) -> Expr:
    """A meta expression: iifname, oifname, l4proto, ..."""
    return {"meta": {"key": key}}


def payload(protocol: str, field: str) -> Expr:
    """A header field: ("ip", "daddr"), ("tcp", "dport"), ("th", "dport") for any transport header."""
    return {"payload": {"protocol": protocol, "field": field}}


def ct_in(key: str, values: Sequence[str]) -> Expr:
    """A conntrack bitmask match: `ct state established,related`, `ct status dnat`."""
    right: Any = values[0] if len(values) == 1 else list(values)
    return {"match": {"op": "in", "left": {"ct": {"key": key}}, "right": right}}


def fib_daddr_local() -> Expr:
    """Matches packets addressed to this namespace itself (`fib daddr type local`)."""
    return match({"fib": {"result": "type", "flags": ["daddr"]}}, "local")


def dnat(address: IPv4Address, port: int | None = None) -> Expr:
    """Destination NAT to an IPv4 address, and port when given."""
    body: Expr = {"family": "ip", "addr": str(address)}
    if port is not None:
        body["port"] = port
    return {"dnat": body}


def snat(address: IPv4Address) -> Expr:
    """Source NAT to an IPv4 address."""
    return {"snat": {"family": "ip", "addr": str(address)}}


def batch(table: Table) -> dict[str, Any]:
    """One nft transaction that replaces the whole table: add, delete, add again, then chains and rules."""
    ident = {"family": table.family, "name": table.name}
    commands: list[dict[str, Any]] = [
        {"add": {"table": dict(ident)}},
        {"delete": {"table": dict(ident)}},
        {"add": {"table": dict(ident)}},
    ]
    owner = {"family": table.family, "table": table.name}
    for chain in table.chains:
        spec = {"name": chain.name, "type": chain.type, "hook": chain.hook, "prio": chain.prio, "policy": chain.policy}
        commands.append({"add": {"chain": {**owner, **spec}}})
    for chain in table.chains:
        for rule in chain.rules:
            commands.append({"add": {"rule": {**owner, "chain": chain.name, "expr": list(rule)}}})
    return {"nftables": commands}


def delete_batch(family: str, name: str) -> dict[str, Any]:
    """One nft transaction that removes the table whether or not it exists."""
    ident = {"family": family, "name": name}
    return {"nftables": [{"add": {"table": dict(ident)}}, {"delete": {"table": dict(ident)}}]}


def _normalized(expr: Any) -> Any:
    """Zeroes counter values so a table with traffic still equals its desired form."""
    if isinstance(expr, dict):
        if "counter" in expr and isinstance(expr["counter"], dict):
            return COUNTER
        return {key: _normalized(value) for key, value in expr.items()}
    if isinstance(expr, list):
        return [_normalized(value) for value in expr]
    return expr


def parse_listing(listing: dict[str, Any], family: str, name: str) -> Table | None:
    """The Table found in `nft -j list ...` output, or None when the listing does not hold it."""
    found = False
    chains: dict[str, dict[str, Any]] = {}
    rules: dict[str, list[Rule]] = {}
    for item in listing.get("nftables", []):
        if "table" in item:
            found = found or (item["table"]["family"], item["table"]["name"]) == (family, name)
        elif "chain" in item and (item["chain"]["family"], item["chain"]["table"]) == (family, name):
            chains[item["chain"]["name"]] = item["chain"]
            rules.setdefault(item["chain"]["name"], [])
        elif "rule" in item and (item["rule"]["family"], item["rule"]["table"]) == (family, name):
            rules.setdefault(item["rule"]["chain"], []).append(tuple(_normalized(item["rule"]["expr"])))
    if not found:
        return None
    return Table(
        family,
        name,
        tuple(
            Chain(
                name=chain_name,
                type=spec.get("type", ""),
                hook=spec.get("hook", ""),
                prio=spec.get("prio", 0),
                rules=tuple(rules.get(chain_name, [])),
                policy=spec.get("policy", ""),
            )
            for chain_name, spec in chains.items()
        ),
    )
