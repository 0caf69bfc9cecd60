"""Helpers for tests: run a service as its own process, wait for conditions, collect events."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from nats.aio.client import Client as NATS

from edgevm.shared.events import AnyEvent, decode_event

T = TypeVar("T")


class ServiceProcess:
    """A service started the way `edgevm node up` starts it: `python -m edgevm.<name>`, its own process."""

    def __init__(self, name: str, env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.env = {**os.environ, "EDGEVM_METRICS_PORT": "0", **env}
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProcess:
        """Start the process, its output appended to the log file."""
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", f"edgevm.{self.name}"], env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        """Send `sig` and wait for the process to end; return its exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def log(self) -> str:
        """Return what the process printed so far."""
        return self.log_path.read_text(errors="replace")


async def eventually(check: Callable[[], Awaitable[T]], timeout: float = 10, what: str = "condition") -> T:
    """Call `check` until it returns a truthy value without raising; return that value."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = await check()
            if value:
                return value
        except Exception as exc:
            last = exc
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what} not reached within {timeout:g} s (last error: {last!r})")


class EventCollector:
    """Collects the events published on a subject, decoded."""

    def __init__(self) -> None:
        self.events: list[tuple[str, AnyEvent]] = []
        self._sub: Any = None

    async def start(self, nc: NATS, subject: str) -> EventCollector:
        """Subscribe (core NATS: live events only)."""

        async def on_msg(msg: Any) -> None:
            self.events.append((msg.subject, decode_event(msg.data)))

        self._sub = await nc.subscribe(subject, cb=on_msg)
        return self

    async def stop(self) -> None:
        """Unsubscribe."""
        await self._sub.unsubscribe()

    def of_type(self, type_: str) -> list[AnyEvent]:
        """Return the events whose `type` is `type_`, in arrival order."""
        return [e for _, e in self.events if e.__struct_config__.tag == type_]


def mark_needing_root(items: list[pytest.Item], folder: Path) -> None:
    """Mark the collected tests under `folder` `root`: tests/conftest.py refuses a non-root run that selects them."""
    for item in items:
        if item.path.is_relative_to(folder):
            item.add_marker(pytest.mark.root)
