"""netplumb's one queue of changes under a flood: a change whose caller stopped waiting (its command's deadline,
answered 503) before it began never begins; one that has begun runs to its end (records and kernel never part
half-way). 60 concurrent `net.vrf.create` at a few hundred VRFs used to answer 503 for 28 of them and make all 28.
"""

from __future__ import annotations

import asyncio

import pytest

from edgevm.netplumb.nodenet import NodeNetwork


@pytest.fixture
def network() -> NodeNetwork:
    # Only the queue is exercised: the changes below touch no records and no kernel.
    return NodeNetwork("t", records=None, plumber=None, settings=None, publisher=None)  # type: ignore[arg-type]


async def test_a_change_whose_caller_gave_up_while_it_was_queued_never_begins(network: NodeNetwork) -> None:
    holding, release = asyncio.Event(), asyncio.Event()
    ran: list[str] = []

    async def first() -> None:
        ran.append("first")
        holding.set()
        await release.wait()

    async def queued() -> None:
        ran.append("queued")

    running = asyncio.ensure_future(network.exclusive(first))
    await holding.wait()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):  # the deadline passes while `first` holds the queue
            await network.exclusive(queued)
    release.set()
    await running
    await network.exclusive(lambda: asyncio.sleep(0))  # the queue is free again
    assert ran == ["first"]


async def test_a_change_that_has_begun_runs_to_its_end_when_its_caller_gives_up(network: NodeNetwork) -> None:
    began, release = asyncio.Event(), asyncio.Event()
    ended: list[bool] = []

    async def change() -> None:
        began.set()
        await release.wait()
        ended.append(True)

    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await network.exclusive(change)
    assert began.is_set()
    release.set()
    await network.exclusive(lambda: asyncio.sleep(0))  # queued after it: runs once it has ended
    assert ended == [True]
