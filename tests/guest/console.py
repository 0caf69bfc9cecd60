"""The test guest's serial console over a unix socket: what the guest printed, and commands to run in it."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

MARKER_PREFIX = "EDGEVM-GUEST: "
_COMMAND_DONE = re.compile(re.escape(MARKER_PREFIX) + r"cmd-done (\d+)\n")


@dataclass(frozen=True)
class CommandResult:
    """What a command run through the guest's console loop printed, and its exit status."""

    rc: int
    output: str


class GuestConsole:
    """A connected serial console (QEMU or libvirt unix socket) that records everything the guest prints."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, log_path: Path | None):
        self._reader = reader
        self._writer = writer
        self._log = log_path.open("a", encoding="utf-8") if log_path else None
        self._text = ""
        self._closed = False
        self._changed = asyncio.Condition()
        self._reading = asyncio.create_task(self._read_forever())

    @classmethod
    async def connect(cls, path: Path, *, log_path: Path | None = None,
                      timeout: float = 10.0) -> GuestConsole:
        """Connects to the console socket, waiting up to timeout seconds for it to appear."""
        async with asyncio.timeout(timeout):
            while True:
                try:
                    reader, writer = await asyncio.open_unix_connection(path)
                    return cls(reader, writer, log_path)
                except (FileNotFoundError, ConnectionRefusedError):
                    await asyncio.sleep(0.05)

    @property
    def text(self) -> str:
        """Everything the guest printed so far, with line ends as plain "\\n"."""
        return self._text

    def markers(self) -> list[str]:
        """The markers printed so far, without their "EDGEVM-GUEST: " prefix."""
        return re.findall("^" + re.escape(MARKER_PREFIX) + "(.*)$", self._text, re.MULTILINE)

    async def wait_for(self, pattern: str | re.Pattern[str], *, timeout: float,
                       since: int = 0) -> re.Match[str]:
        """Returns the first match of pattern in the text from offset since, waiting up to timeout seconds."""
        regex = re.compile(pattern, re.MULTILINE) if isinstance(pattern, str) else pattern
        found: re.Match[str] | None = None

        def seen() -> bool:
            nonlocal found
            found = regex.search(self._text, since)
            return found is not None or self._closed

        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(seen)
        except TimeoutError:
            raise TimeoutError(self._failure(f"no {regex.pattern!r} within {timeout} s")) from None
        if found is None:
            raise ConnectionError(self._failure(f"console closed before {regex.pattern!r}"))
        return found

    async def wait_for_marker(self, marker: str, *, timeout: float, since: int = 0) -> re.Match[str]:
        """Waits for the line "EDGEVM-GUEST: <marker>" (marker is a regular expression)."""
        line = "^" + re.escape(MARKER_PREFIX) + marker + "$"
        return await self.wait_for(line, timeout=timeout, since=since)

    async def send(self, line: str) -> int:
        """Writes one line to the guest and returns the text offset from which its answer will appear."""
        if "\n" in line:
            raise ValueError("one line at a time: the guest runs each line as its own command")
        since = len(self._text)
        self._writer.write(line.encode() + b"\n")
        await self._writer.drain()
        return since

    async def run(self, command: str, *, timeout: float = 30.0) -> CommandResult:
        """Runs a shell command in the guest and returns what it printed and its exit status."""
        since = await self.send(command)
        done = await self.wait_for(_COMMAND_DONE, timeout=timeout, since=since)
        return CommandResult(rc=int(done.group(1)), output=self._text[since:done.start()])

    async def close(self) -> None:
        """Stops reading and closes the connection."""
        self._reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reading
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()
        if self._log:
            self._log.close()

    async def __aenter__(self) -> GuestConsole:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def _read_forever(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        try:
            while chunk := await self._reader.read(65536):
                text = decoder.decode(chunk).replace("\r", "")
                if self._log:
                    self._log.write(text)
                    self._log.flush()
                async with self._changed:
                    self._text += text
                    self._changed.notify_all()
        except OSError:
            pass
        finally:
            async with self._changed:
                self._closed = True
                self._changed.notify_all()

    def _failure(self, what: str) -> str:
        return f"{what}; the console ends with:\n{self._text[-3000:]}"
