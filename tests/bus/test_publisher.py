"""The event publisher's background ack check: a late ack is not reported as a lost event."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from edgevm.shared.clock import now
from edgevm.shared.events import Heartbeat
from edgevm.shared.metrics import EVENTS_UNACKED
from edgevm.shared.publisher import EventPublisher


class SilentJetStream:
    """publish_async whose ack never comes, or fails at once with `error`."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error

    async def publish_async(self, subject: str, payload: bytes, wait_stall: float) -> asyncio.Future[Any]:
        ack: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.error is not None:
            ack.set_exception(self.error)
        return ack


def unacked(service: str) -> float:
    return EVENTS_UNACKED.labels(service, "node.heartbeat")._value.get()  # type: ignore[no-any-return]


@pytest.mark.parametrize(("error", "said"), [
    (None, ": JetStream did not acknowledge it within 0.05 s (whether it is stored is unknown)"),
    (RuntimeError("stream not found"), " refused by JetStream: stream not found"),
])
async def test_a_late_or_negative_ack_is_logged_as_such_and_counted(
    caplog: pytest.LogCaptureFixture, error: Exception | None, said: str
) -> None:
    service = f"test-{'late' if error is None else 'refused'}"
    publisher = EventPublisher(SilentJetStream(error), "n1", service, timeout=0.05)  # type: ignore[arg-type]
    before = unacked(service)
    with caplog.at_level(logging.WARNING, logger="edgevm.shared.publisher"):
        await publisher.publish(Heartbeat(at=now(), node="n1", services=["x"], cpus=1, memory_bytes=1))
        await publisher.flush()
        await asyncio.sleep(0)  # the done callback runs after the future ends
    assert unacked(service) == before + 1
    assert [r.getMessage() for r in caplog.records] == [f"event node.heartbeat on edgevm.evt.n1.node.heartbeat{said}"]
    assert "not stored" not in caplog.text
