"""Applies, reads back and removes the `edgevm` nftables table of a namespace, atomically via `nft -j`."""

import json
from collections.abc import Sequence
from typing import Any

import msgspec

from edgevm.netplumb.drivers import libnft
from edgevm.netplumb.drivers.netns import run, run_all
from edgevm.netplumb.errors import KernelError
from edgevm.netplumb.nftjson import Table, batch, delete_batch, parse_listing

NFT_TIMEOUT = 10.0


def apply_table(table: Table, netns: str | None = None) -> None:
    """Replaces the whole table in one nft transaction: all of it applies, or none of it."""
    run(["nft", "-j", "-f", "-"], netns, stdin=json.dumps(batch(table)), timeout=NFT_TIMEOUT)


def _parsed(output: str) -> dict[str, Any]:
    try:
        listing: dict[str, Any] = msgspec.json.decode(output)  # a listing of 100 VMs' rules is ~150 kB
    except msgspec.DecodeError as exc:
        raise KernelError(f"nft printed unreadable JSON: {exc}") from None
    return listing


def _listing(argv: list[str], netns: str | None) -> dict[str, Any]:
    return _parsed(run(argv, netns, timeout=NFT_TIMEOUT))


def _missing_or_raise(error: KernelError, family: str, name: str, netns: str | None) -> None:
    # nft fails the same way for a missing table and a real error: tell them apart.
    if libnft.available():
        tables = _parsed(libnft.run_json(f"list tables {family}", netns))
    else:
        tables = _listing(["nft", "-j", "list", "tables", family], netns)
    if parse_listing(tables, family, name) is not None:
        raise error


def read_table(family: str, name: str, netns: str | None = None) -> Table | None:
    """The table as the kernel holds it (counters zeroed), or None when it does not exist."""
    found = read_tables(family, name, [netns])[0]
    if isinstance(found, KernelError):
        raise found
    return found


def read_tables(family: str, name: str, namespaces: Sequence[str | None]) -> list[Table | KernelError | None]:
    """The table in each namespace (None where it does not exist, or the KernelError met reading it).

    Read through libnftables in this process; without it the `nft -j list` of every namespace runs side by
    side. A reconcile reads all of them each time.
    """
    outputs: list[str | KernelError]
    if libnft.available():
        outputs = []
        for netns in namespaces:
            try:
                outputs.append(libnft.run_json(f"list table {family} {name}", netns))
            except KernelError as exc:
                outputs.append(exc)
    else:
        argv = ["nft", "-j", "list", "table", family, name]
        outputs = run_all([(argv, netns) for netns in namespaces], timeout=NFT_TIMEOUT)
    found: list[Table | KernelError | None] = []
    for netns, output in zip(namespaces, outputs, strict=True):
        try:
            if isinstance(output, KernelError):
                _missing_or_raise(output, family, name, netns)
                found.append(None)
            else:
                found.append(parse_listing(_parsed(output), family, name))
        except KernelError as exc:
            found.append(exc)
    return found


def ensure_table(table: Table, netns: str | None = None) -> bool:
    """Applies the table only when the kernel's differs; returns whether it applied."""
    applied = ensure_tables([(table, netns)])[0]
    if isinstance(applied, KernelError):
        raise applied
    return applied


def ensure_tables(tables: Sequence[tuple[Table, str | None]]) -> list[bool | KernelError]:
    """Reads every table back at once, then applies, in the order given, those the kernel holds otherwise.

    Returns for each whether it was applied, or the KernelError that kept it from being read or applied.
    """
    results: list[bool | KernelError] = []
    by_name: dict[tuple[str, str], list[int]] = {}
    for i, (table, _) in enumerate(tables):
        by_name.setdefault((table.family, table.name), []).append(i)
    held: dict[int, Table | KernelError | None] = {}
    for (family, name), indexes in by_name.items():
        read = read_tables(family, name, [tables[i][1] for i in indexes])
        held.update(zip(indexes, read, strict=True))
    for i, (table, netns) in enumerate(tables):
        current = held[i]
        if isinstance(current, KernelError):
            results.append(current)
            continue
        if current == table:
            results.append(False)
            continue
        try:
            apply_table(table, netns)
        except KernelError as exc:
            results.append(exc)
            continue
        results.append(True)
    return results


def remove_table(family: str, name: str, netns: str | None = None) -> bool:
    """Deletes the table; returns whether it existed."""
    if read_table(family, name, netns) is None:
        return False
    run(["nft", "-j", "-f", "-"], netns, stdin=json.dumps(delete_batch(family, name)), timeout=NFT_TIMEOUT)
    return True
