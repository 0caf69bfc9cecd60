"""qemu-img as a process, each call with a deadline: image headers, blank disks, overlays, resizes, rebases."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgevm.shared import qcow2
from edgevm.shared.errors import BackendError


class QemuImgError(BackendError):
    """qemu-img failed or did not finish in time; the message says which command and why."""


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What an image's header says: format, size, backing file (absolute, and as recorded), data file."""

    path: str
    format: str
    virtual_size: int
    backing: str | None
    backing_format: str | None
    backing_name: str | None = None
    data_file: str | None = None


def _image_info(data: dict[str, Any], path: str) -> ImageInfo:
    return ImageInfo(
        path=data.get("filename", path), format=str(data.get("format", "")),
        virtual_size=int(data.get("virtual-size", 0)),
        backing=data.get("full-backing-filename") or data.get("backing-filename"),
        backing_format=data.get("backing-filename-format"), backing_name=data.get("backing-filename"),
        data_file=data.get("format-specific", {}).get("data", {}).get("data-file"),
    )


class QemuImg:
    """Runs qemu-img; every image is opened with force-share (-U), since QEMU may hold it."""

    def __init__(self, binary: str = "qemu-img", timeout: float = 60.0) -> None:
        self.binary = binary
        self.timeout = timeout

    async def info(self, path: Path) -> ImageInfo:
        """The header of one image (its backing chain is not opened)."""
        data = json.loads(await self._run("info", "-U", "--output=json", str(path)))
        return _image_info(data, str(path))

    async def chain(self, path: Path) -> list[ImageInfo]:
        """The backing chain of an image, top first."""
        data = json.loads(await self._run("info", "-U", "--backing-chain", "--output=json", str(path)))
        return [_image_info(d, str(path)) for d in data]

    async def create_overlay(
        self, path: Path, backing: Path, backing_format: str | None = None, size: int | None = None
    ) -> None:
        """Create the empty qcow2 overlay `path` on `backing`; never overwrites a file.

        Written in Python (see qcow2.py: forking qemu-img is most of a vm.create); the backing file is
        opened only to learn what the caller did not say (its format, its size).
        """
        backing = await asyncio.to_thread(backing.resolve, strict=True)  # recorded, so it must be absolute
        backing_format = backing_format or (await self.info(backing)).format
        # An ISO is a raw file to QEMU.
        recorded = "raw" if backing_format == "iso" else backing_format
        await asyncio.to_thread(qcow2.write_overlay, path, backing, recorded, size)

    async def create_blank(self, path: Path, size_bytes: int) -> None:
        """Create an empty qcow2 disk of `size_bytes` at `path`; never overwrites."""
        if size_bytes <= 0:
            raise ValueError(f"a disk needs a positive size, got {size_bytes}")
        # qemu-img create truncates an existing file, so create beside it and link into place (no clobber).
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        os.close(fd)
        try:
            await self._run("create", "-q", "-f", "qcow2", tmp, str(size_bytes))
            await asyncio.to_thread(os.link, tmp, path)
        finally:
            os.unlink(tmp)

    async def resize(self, path: Path, size_bytes: int) -> None:
        """Grow the qcow2 disk at `path` (not in use by a running domain) to `size_bytes`."""
        await self._run("resize", "-q", "-f", "qcow2", str(path), str(size_bytes))

    async def rebase(self, path: Path, backing: str | None, backing_format: str | None) -> None:
        """Make `path` back onto `backing` (None: onto nothing), copying in what the old chain held more."""
        args = ["rebase", "-q", "-U", "-f", "qcow2", "-b", backing or ""]
        if backing and backing_format:
            args += ["-F", backing_format]
        await self._run(*args, str(path))

    async def _run(self, *args: str) -> str:
        try:
            process = await asyncio.create_subprocess_exec(
                self.binary, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )
        except OSError as exc:
            raise QemuImgError(f"qemu-img cannot be run: {exc.strerror}") from None
        try:
            async with asyncio.timeout(self.timeout):
                out, err = await process.communicate()
        except TimeoutError:
            raise QemuImgError(f"qemu-img {args[0]} did not finish within {self.timeout:g} s") from None
        finally:
            # Timed out or cancelled (a shutdown): no qemu-img goes on writing an image behind our back.
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await asyncio.shield(process.wait())
        if process.returncode != 0:
            lines = err.decode(errors="replace").strip().splitlines()
            detail = lines[-1] if lines else f"exit status {process.returncode}"
            raise QemuImgError(f"qemu-img {args[0]} failed: {detail}")
        return out.decode()
