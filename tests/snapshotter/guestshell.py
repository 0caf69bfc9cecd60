"""A shell in a running test guest, through its serial console's pty (libvirt `<serial type='pty'>`)."""

from __future__ import annotations

import asyncio
import os
import re
import tty
import xml.etree.ElementTree as ET

import libvirt

from tests.guest.console import MARKER_PREFIX

_DONE = re.compile(re.escape(MARKER_PREFIX) + r"cmd-done (\d+)\n")


def console_pty(uri: str, vm: str) -> str:
    """The pty of the running domain's serial console."""
    conn = libvirt.open(uri)
    try:
        xml = conn.lookupByName(f"edgevm-{vm}").XMLDesc(0)
    finally:
        conn.close()
    source = ET.fromstring(xml).find("devices/serial/source")
    assert source is not None and source.get("path"), "the domain has no pty console"
    return source.get("path") or ""


class GuestShell:
    """Runs commands through the guest init's console loop, which prints `cmd-done <rc>` after each."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._text = ""
        self._changed = asyncio.Event()
        asyncio.get_running_loop().add_reader(fd, self._read)

    @classmethod
    async def open(cls, uri: str, vm: str) -> GuestShell:
        fd = os.open(console_pty(uri, vm), os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(fd)
        shell = cls(fd)
        # QEMU notices an opened pty within a second; what the guest prints before that is dropped.
        await asyncio.sleep(1.2)
        return shell

    def _read(self) -> None:
        try:
            data = os.read(self._fd, 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        self._text += data.decode(errors="replace").replace("\r", "")
        self._changed.set()

    async def run(self, command: str, timeout: float = 60) -> tuple[int, str]:
        """Run one shell command line in the guest; return its exit status and output."""
        since = len(self._text)
        os.write(self._fd, command.encode() + b"\n")
        async with asyncio.timeout(timeout):
            while True:
                found = _DONE.search(self._text, since)
                if found:
                    return int(found.group(1)), self._text[since:found.start()]
                self._changed.clear()
                await self._changed.wait()

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self._fd)
        os.close(self._fd)


async def guest_run(uri: str, vm: str, command: str) -> tuple[int, str]:
    """Open the console, run one command, close."""
    shell = await GuestShell.open(uri, vm)
    try:
        return await shell.run(command)
    finally:
        shell.close()
