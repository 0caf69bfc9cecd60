"""Listings in pages (`vm.list`, `gw.vm.list`): the request fields, and a page a handler returns.

A paged request gives `limit` (and `after`, the `next` of the page before): its reply is `{<field>: [...], next}`,
`next` the cursor of the last entry when more follow, else null. Without `limit` the reply is the whole listing
as before paging existed, with no `next`. A page holds at most `limit` entries and never more than fit in one
NATS message (the server's max_payload): the endpoint adapter encodes it knowing that size, so a paged listing
never fails for its size (unless one entry alone is larger than max_payload).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated

import msgspec
from msgspec import Meta

from edgevm.shared.limits import MAX_PAGE
from edgevm.shared.spec import Spec

PageLimit = Annotated[int, Meta(ge=1, le=MAX_PAGE)]
PAGING_HINT = f"list it in pages instead: give `limit` (1..{MAX_PAGE}) and `after` (the `next` of the page before)"
_encoder = msgspec.json.Encoder()


class Paged(Spec):
    """A request for a listing that comes in pages: `limit` entries at most (null or absent: all of them).

    Each subclass adds `after`, the cursor its listing's order takes (a VM name, `<node>/<vm>`).
    """

    limit: PageLimit | None = None


class Page:
    """A listing's entries in its order, each with its cursor and its JSON, as a handler returns them.

    Rows are read only as far as the page goes: an iterator of rows is never read to its end.
    """

    def __init__(self, field: str, rows: Iterable[tuple[str, bytes]], limit: int | None) -> None:
        self._head = b'{"' + field.encode() + b'":['
        self._rows = rows
        self._limit = limit

    def encode(self, budget: int) -> bytes:
        """Return the reply: the whole listing without a limit, else one page of at most `budget` bytes.

        A page holds at least one entry, so a listing always moves on (one entry over `budget` is the caller's
        422, as any reply over max_payload is).
        """
        if self._limit is None:
            return self._head + b",".join(row for _, row in self._rows) + b"]}"
        taken: list[bytes] = []
        size = len(self._head) + len(b'],"next":}')
        last: str | None = None
        more = False
        for key, row in self._rows:
            cost = len(row) + (1 if taken else 0)  # with the comma before it
            # The page closes with this entry's cursor as `next` at most (or `null`, 4 bytes).
            closing = max(len(_encoder.encode(key)), 4)
            if len(taken) == self._limit or (taken and budget and size + cost + closing > budget):
                more = True
                break
            taken.append(row)
            size += cost
            last = key
        return self._head + b",".join(taken) + b'],"next":' + _encoder.encode(last if more else None) + b"}"
