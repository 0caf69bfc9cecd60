"""qemu-img as a process: overlays, rebases and image headers, each call with a deadline."""

import asyncio
import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import ImageToolError

TIMEOUT = 600.0


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What an image's header says: its size and its backing file (absolute, or None)."""

    path: str
    virtual_size: int
    backing: str | None
    backing_format: str | None


class QemuImg:
    """Runs qemu-img; every image is opened with force-share (-U) where QEMU may hold it."""

    def __init__(self, binary: str = "qemu-img", timeout: float = TIMEOUT) -> None:
        self._binary = binary
        self._timeout = timeout

    async def _run(self, *args: str) -> str:
        process = await asyncio.create_subprocess_exec(
            self._binary, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        try:
            async with asyncio.timeout(self._timeout):
                out, err = await process.communicate()
        except TimeoutError:
            raise ImageToolError(f"qemu-img {args[0]} did not finish within {self._timeout:g} s") from None
        finally:
            # Timed out or cancelled (a shutdown): no qemu-img goes on writing an image behind our back.
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await asyncio.shield(process.wait())
        if process.returncode != 0:
            raise ImageToolError(f"qemu-img {args[0]} failed: {err.decode(errors='replace').strip()}")
        return out.decode()

    async def info(self, path: Path) -> ImageInfo:
        """The header of one image."""
        data = json.loads(await self._run("info", "-U", "--output=json", str(path)))
        return ImageInfo(str(path), int(data["virtual-size"]), data.get("full-backing-filename"),
                         data.get("backing-filename-format"))

    async def chain(self, path: Path) -> list[ImageInfo]:
        """The backing chain of an image, top first."""
        data = json.loads(await self._run("info", "-U", "--backing-chain", "--output=json", str(path)))
        return [ImageInfo(d["filename"], int(d["virtual-size"]), d.get("full-backing-filename"),
                          d.get("backing-filename-format")) for d in data]

    async def create_overlay(self, path: Path, backing: Path, size: int) -> None:
        """A new qcow2 image on `backing`, without opening the backing file (QEMU may hold it)."""
        await self._run("create", "-q", "-f", "qcow2", "-u", "-b", str(backing), "-F", "qcow2", str(path), str(size))

    async def rebase(self, path: Path, backing: str | None, backing_format: str | None) -> None:
        """Make `path` back onto `backing` (None: onto nothing), copying in what the old chain held more."""
        args = ["rebase", "-q", "-U", "-f", "qcow2", "-b", backing or ""]
        if backing and backing_format:
            args += ["-F", backing_format]
        await self._run(*args, str(path))
