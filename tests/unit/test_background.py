"""The background tasks of one owner: cancelled and awaited when it stops, drained within a deadline, failures
logged unless someone awaits them."""

import asyncio
import logging

import pytest

from edgevm.shared.background import Background


async def test_close_cancels_every_task_and_waits_until_each_has_ended() -> None:
    owner = Background("test")
    cleaned: list[str] = []

    async def forever(name: str) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0.01)  # its clean-up takes a while: close waits for it
            cleaned.append(name)

    tasks = [owner.start(forever(n), n) for n in ("a", "b")]
    await asyncio.sleep(0)
    await owner.close()

    assert sorted(cleaned) == ["a", "b"] and all(t.cancelled() for t in tasks) and len(owner) == 0


async def test_drain_lets_tasks_finish_and_cancels_only_the_late_ones() -> None:
    owner = Background("test")
    quick = owner.start(asyncio.sleep(0.01, "done"), "quick")
    late = owner.start(asyncio.sleep(60), "late")

    await owner.drain(0.2)

    assert quick.result() == "done" and late.cancelled()


async def test_a_failure_is_logged_unless_the_task_is_awaited(caplog: pytest.LogCaptureFixture) -> None:
    owner = Background("test")

    async def fail(what: str) -> None:
        raise RuntimeError(what)

    with caplog.at_level(logging.ERROR, "edgevm.shared.background"):
        owner.start(fail("nobody hears this"), "alone")
        heard = owner.start(fail("the caller hears this"), "awaited", log_failure=False)
        with pytest.raises(RuntimeError):
            await heard
        await owner.drain(1)

    assert [r.getMessage() for r in caplog.records] == ["test: alone failed"]
    assert "nobody hears this" in caplog.text and "the caller hears this" not in caplog.text


async def test_a_cancelled_closer_is_cancelled_itself() -> None:
    owner = Background("test")
    give_up = asyncio.Event()

    async def stubborn() -> None:
        while not give_up.is_set():
            try:
                await give_up.wait()
            except asyncio.CancelledError:
                continue  # refuses to end: close waits for it

    owner.start(stubborn(), "stubborn")
    await asyncio.sleep(0)
    closer = asyncio.create_task(owner.close())
    await asyncio.sleep(0.01)
    closer.cancel()
    try:
        with pytest.raises(asyncio.CancelledError):
            await closer
    finally:
        give_up.set()
        await owner.drain(1)


async def test_close_cancels_again_a_task_that_lost_its_cancellation() -> None:
    owner = Background("test")
    cancels: list[int] = []

    async def swallows_the_first_cancel() -> None:
        # What Python 3.11's asyncio.wait_for (inside nats-py's publish) does to a cancel that arrives as
        # the wrapped call ends: the cancellation is lost and the loop goes on.
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancels.append(1)
                if len(cancels) > 1:
                    raise

    owner.start(swallows_the_first_cancel(), "stubborn")
    await asyncio.sleep(0)
    await asyncio.wait_for(owner.close(), 5)

    assert len(cancels) == 2 and len(owner) == 0
