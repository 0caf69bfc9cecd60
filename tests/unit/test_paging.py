"""A page of a listing as the endpoint adapter encodes it: at most `limit` entries and `budget` bytes, never an
entry twice or left out across pages, and the whole listing as before paging when there is no limit."""

from __future__ import annotations

import json

import msgspec
import pytest

from edgevm.shared.paging import Page

ROWS = [(f"vm{i:02d}", msgspec.json.encode({"name": f"vm{i:02d}", "pad": "p" * (i * 7 % 50)})) for i in range(30)]


def pages(limit: int, budget: int) -> list[dict]:
    """Every page of ROWS, each cursor taken from the page before, as a client walks them."""
    walked = []
    after = ""
    while True:
        body = Page("vms", (row for row in ROWS if row[0] > after), limit).encode(budget)
        assert not budget or len(body) <= budget or len(json.loads(body)["vms"]) == 1, (limit, budget, len(body))
        page = json.loads(body)
        walked.append(page)
        if page["next"] is None:
            return walked
        after = page["next"]


@pytest.mark.parametrize("limit", [1, 2, 7, 30, 1000])
@pytest.mark.parametrize("budget", [0, 100, 150, 400, 1000, 10**6])  # 0: max_payload unknown, no bound
def test_pages_hold_every_entry_once_within_the_limit_and_the_budget(limit: int, budget: int) -> None:
    walked = pages(limit, budget)
    assert [vm["name"] for page in walked for vm in page["vms"]] == [key for key, _ in ROWS]
    for page in walked[:-1]:
        assert page["next"] == page["vms"][-1]["name"] and len(page["vms"]) <= limit
    assert walked[-1]["next"] is None


@pytest.mark.parametrize("budget", range(60, 400, 3))
def test_a_page_is_as_full_as_the_budget_allows(budget: int) -> None:
    body = Page("vms", iter(ROWS), 1000).encode(budget)
    page = json.loads(body)
    taken = len(page["vms"])
    assert taken < len(ROWS) and page["next"] == ROWS[taken - 1][0]
    if taken > 1:
        assert len(body) <= budget
    # One entry more, with its key as `next` in place of `null`, would not have fit.
    more = Page("vms", iter(ROWS[:taken + 1]), taken + 1).encode(10**9)
    assert len(more) - len(b"null") + len(json.dumps(ROWS[taken][0])) > budget


def test_without_a_limit_it_is_the_whole_listing_without_next() -> None:
    body = Page("vms", iter(ROWS), None).encode(100)
    assert body == msgspec.json.encode({"vms": [msgspec.Raw(row) for _, row in ROWS]})
    assert Page("vms", iter([]), None).encode(100) == b'{"vms":[]}'
    assert json.loads(Page("vms", iter([]), 5).encode(100)) == {"vms": [], "next": None}


def test_rows_are_read_only_as_far_as_the_page_goes() -> None:
    read = []

    def rows():
        for row in ROWS:
            read.append(row[0])
            yield row

    assert json.loads(Page("vms", rows(), 3).encode(10**6))["next"] == "vm02"
    assert read == ["vm00", "vm01", "vm02", "vm03"]  # one past the page, to know whether another follows
