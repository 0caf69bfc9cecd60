"""Applies, reads back and removes the `edgevm` nftables table of a namespace, atomically via `nft -j`."""

import json
from typing import Any

from edgevm.netplumb.drivers.netns import run
from edgevm.netplumb.errors import KernelError
from edgevm.netplumb.nftjson import Table, batch, delete_batch, parse_listing

NFT_TIMEOUT = 10.0


def apply_table(table: Table, netns: str | None = None) -> None:
    """Replaces the whole table in one nft transaction: all of it applies, or none of it."""
    run(["nft", "-j", "-f", "-"], netns, stdin=json.dumps(batch(table)), timeout=NFT_TIMEOUT)


def _listing(argv: list[str], netns: str | None) -> dict[str, Any]:
    try:
        listing: dict[str, Any] = json.loads(run(argv, netns, timeout=NFT_TIMEOUT))
    except json.JSONDecodeError as exc:
        raise KernelError(f"nft printed unreadable JSON: {exc}") from None
    return listing


def read_table(family: str, name: str, netns: str | None = None) -> Table | None:
    """The table as the kernel holds it (counters zeroed), or None when it does not exist."""
    try:
        return parse_listing(_listing(["nft", "-j", "list", "table", family, name], netns), family, name)
    except KernelError:
        # nft fails the same way for a missing table and a real error: tell them apart.
        if parse_listing(_listing(["nft", "-j", "list", "tables", family], netns), family, name) is None:
            return None
        raise


def ensure_table(table: Table, netns: str | None = None) -> bool:
    """Applies the table only when the kernel's differs; returns whether it applied."""
    if read_table(table.family, table.name, netns) == table:
        return False
    apply_table(table, netns)
    return True


def remove_table(family: str, name: str, netns: str | None = None) -> bool:
    """Deletes the table; returns whether it existed."""
    if read_table(family, name, netns) is None:
        return False
    run(["nft", "-j", "-f", "-"], netns, stdin=json.dumps(delete_batch(family, name)), timeout=NFT_TIMEOUT)
    return True
