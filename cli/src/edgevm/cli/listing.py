"""Listings the CLI reads page by page (`vm list`, `fleet vms`), so none is ever too large for one reply."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from edgevm.shared.errors import RemoteError

PAGE = 200  # VMs per request; the node makes a page smaller when they would not fit in one NATS message

Send = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


async def every_vm(send: Send, body: dict[str, Any]) -> list[dict[str, Any]]:
    """Return every VM of a listing, asking `send` for one page after another.

    A node of a version before paging refuses `limit` as an unknown field: its whole list is asked for then.
    """
    vms: list[dict[str, Any]] = []
    after: str | None = None
    while True:
        try:
            reply = await send({**body, "limit": PAGE, **({"after": after} if after is not None else {})})
        except RemoteError as exc:
            if after is None and exc.code == "400" and exc.field == "limit":
                return list((await send(body))["vms"])
            raise
        vms += reply["vms"]
        after = reply.get("next")
        if after is None:
            return vms
