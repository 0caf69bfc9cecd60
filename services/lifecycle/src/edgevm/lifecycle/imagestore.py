"""The node's image store: one file `<name>.<format>` per image in one directory.

Image names match `^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$`: lowercase like VM names, plus dots and
underscores for versions (`ubuntu-24.04`); the name is also the file name, so it can never hold a `/`.

An import copies the file into the store (a hidden `.part` file, renamed at the end, never over an existing
image) while hashing it, and only then inspects the copy with `qemu-img info`, so the file the checks saw
is the file that is kept. Formats are kept as given, never converted. Refused: qcow2 images with a backing
file or an external data file (either could point at any file on the node), formats other than qcow2/raw
(vmdk, vdi, ...: convert them first) and a `format` that does not match the content. An ISO is a raw file
with `CD001` at offset 0x8001 (qemu-img calls it raw); declaring an ISO file `raw` is allowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import stat
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from edgevm.shared.errors import BackendConflict, FieldError
from edgevm.shared.layout import fsync_dir
from edgevm.shared.qemuimg import QemuImg

ImageFormat = Literal["qcow2", "raw", "iso"]
FORMATS: tuple[ImageFormat, ...] = ("qcow2", "raw", "iso")
IMAGE_NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?\Z")

_CHUNK = 1024 * 1024
_ISO_MAGIC_OFFSET = 0x8001
_ISO_MAGIC = b"CD001"


class ImageRejected(FieldError):
    """An import request or the file it names breaks a rule; `field` is the request field at fault."""


class ImageExists(BackendConflict):
    """The store already holds an image of that name."""


class _Stopped(Exception):
    """The import was cancelled while copying."""


@dataclass(frozen=True)
class ImageRecord:
    """An image file in the store: format, file size and SHA-256 (hex), path, and the disk size it presents."""

    name: str
    format: ImageFormat
    size_bytes: int
    sha256: str
    path: Path
    virtual_size_bytes: int


class ImageStore:
    """The node's image store: a directory of `<name>.<format>` files, written only through `import_image`."""

    def __init__(self, root: Path, qemu_img: QemuImg | None = None) -> None:
        self.root = root
        self.qemu_img = qemu_img or QemuImg()

    def path_for(self, name: str, format: ImageFormat) -> Path:
        """Return where the image `name` of `format` lives in the store."""
        check_image_name(name)
        return self.root / f"{name}.{format}"

    async def import_image(
        self,
        name: str,
        src_path: Path,
        format: ImageFormat | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> ImageRecord:
        """Copy `src_path` (already confined, see paths.confine) into the store as image `name`.

        `progress` is called on the event loop with the percent done; cancelling stops the copy and
        removes the partial file before the cancellation propagates.
        """
        check_image_name(name)
        if format is not None and format not in FORMATS:
            raise ImageRejected("format", f"must be one of {', '.join(FORMATS)}, got {format!r}")
        loop = asyncio.get_running_loop()
        stop = threading.Event()

        def report(percent: int) -> None:
            if progress is not None:
                loop.call_soon_threadsafe(progress, percent)

        work = asyncio.ensure_future(self._import(name, src_path, format, report, stop))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            stop.set()
            with contextlib.suppress(Exception):
                record = await work
                record.path.unlink(missing_ok=True)  # it finished as it was cancelled: the caller sees no image
            raise

    async def remove(self, name: str) -> bool:
        """Delete the image `name` from the store; return whether there was one."""
        check_image_name(name)
        removed = False
        for format in FORMATS:
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(os.unlink, self.path_for(name, format))
                removed = True
        return removed

    def remove_partials(self) -> list[Path]:
        """Delete `.part` files an interrupted import left behind (call at start-up); return them."""
        leftovers = list(self.root.glob(".*.part"))
        for path in leftovers:
            path.unlink(missing_ok=True)
        return leftovers

    async def _import(
        self,
        name: str,
        src_path: Path,
        format: ImageFormat | None,
        report: Callable[[int], None],
        stop: threading.Event,
    ) -> ImageRecord:
        tmp, size, sha256 = await asyncio.to_thread(self._copy_in, name, src_path, report, stop)
        try:
            detected, virtual_size = await self._inspect(tmp, format)
            final = await asyncio.to_thread(self._keep, tmp, name, detected)
        finally:
            tmp.unlink(missing_ok=True)
        report(100)
        return ImageRecord(name, detected, size, sha256, final, virtual_size)

    def _copy_in(
        self, name: str, src_path: Path, report: Callable[[int], None], stop: threading.Event
    ) -> tuple[Path, int, str]:
        """Copy `src_path` into a hidden `.part` file of the store; return it, its size and SHA-256."""
        if any(self.path_for(name, f).exists() for f in FORMATS):
            raise ImageExists(f"the image store already has an image named {name!r}")
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=self.root, prefix=f".{name}.", suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                size, sha256 = _copy(src_path, out, report, stop)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp, size, sha256

    def _keep(self, tmp: Path, name: str, detected: ImageFormat) -> Path:
        """Link the inspected copy into place under its final name (never over an existing image)."""
        final = self.path_for(name, detected)
        tmp.chmod(0o644)
        try:
            os.link(tmp, final)
        except FileExistsError:
            raise ImageExists(f"the image store already has an image named {name!r}") from None
        fsync_dir(self.root)
        return final

    async def _inspect(self, path: Path, declared: ImageFormat | None) -> tuple[ImageFormat, int]:
        info = await self.qemu_img.info(path)
        found = info.format
        if found == "qcow2":
            if info.backing_name or info.backing:
                raise ImageRejected(
                    "path",
                    f"is a qcow2 image with a backing file ({info.backing_name!r}); "
                    "images must be self-contained: flatten it first (qemu-img convert -O qcow2)",
                )
            if info.data_file:
                raise ImageRejected(
                    "path",
                    "is a qcow2 image with an external data file; flatten it first (qemu-img convert -O qcow2)",
                )
            detected: ImageFormat = "qcow2"
        elif found == "raw":
            detected = "iso" if _has_iso_magic(path) else "raw"
        else:
            raise ImageRejected(
                "path", f"is a {found} image; supported are qcow2, raw and iso (convert it with qemu-img)"
            )
        if declared is not None and declared != detected:
            if declared == "raw" and detected == "iso":
                detected = "raw"  # an ISO may be used as a raw disk (hybrid ISOs boot that way)
            else:
                raise ImageRejected("format", f"is {declared!r} but the file is a {detected} image")
        return detected, info.virtual_size


def check_image_name(name: str) -> None:
    """Raise ImageRejected unless `name` is a valid image name."""
    if not IMAGE_NAME.match(name):
        raise ImageRejected(
            "name",
            "must be 1-63 lowercase letters, digits, '.', '_' or '-', starting and ending with a letter or digit",
        )


def _copy(src_path: Path, out: Any, report: Callable[[int], None], stop: threading.Event) -> tuple[int, str]:
    # O_NOFOLLOW and O_NONBLOCK: a path swapped for a symlink or a FIFO after confinement fails instead.
    try:
        fd = os.open(src_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ImageRejected("path", f"cannot be opened: {exc.strerror}") from None
    with os.fdopen(fd, "rb", buffering=0) as src:
        # O_NOFOLLOW guards the last component only: a directory on the way swapped for a symbolic link between
        # the request's confinement and this task would lead anywhere (the file it opened is what counts).
        if os.readlink(f"/proc/self/fd/{fd}") != str(src_path):
            raise ImageRejected("path", "was moved or replaced by a symbolic link while the import waited")
        info = os.fstat(src.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ImageRejected("path", "is not a regular file")
        total = info.st_size
        if total == 0:
            raise ImageRejected("path", "is an empty file")
        done, sha256 = _copy_bytes(src, out, total, report, stop)
        if done != total or _changed(info, os.fstat(src.fileno())):
            # A file still being written (or rewritten) would be kept half old, half new: refuse it.
            raise ImageRejected("path", "changed while it was imported: import it again once it is complete")
        out.truncate(done)
        out.flush()
        os.fsync(out.fileno())
        return done, sha256


def _copy_bytes(
    src: Any, out: Any, total: int, report: Callable[[int], None], stop: threading.Event
) -> tuple[int, str]:
    """Copy at most `total` bytes (a file that grows is not followed) while hashing them; keep holes sparse."""
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    zeros = bytes(_CHUNK)
    done = 0
    shown = -1
    while done < total and (n := src.readinto(view[: min(_CHUNK, total - done)])):
        if stop.is_set():
            raise _Stopped
        chunk = view[:n]
        digest.update(chunk)
        if (buffer == zeros) if n == _CHUNK else (bytes(chunk) == bytes(n)):
            out.seek(n, os.SEEK_CUR)  # keep sparse images sparse
        else:
            out.write(chunk)
        done += n
        percent = min(99, done * 100 // total)
        if percent != shown:
            report(percent)
            shown = percent
    return done, digest.hexdigest()


def _changed(before: os.stat_result, after: os.stat_result) -> bool:
    return (before.st_size, before.st_mtime_ns, before.st_ctime_ns) != (after.st_size, after.st_mtime_ns,
                                                                       after.st_ctime_ns)


def _has_iso_magic(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(_ISO_MAGIC_OFFSET)
        return f.read(len(_ISO_MAGIC)) == _ISO_MAGIC

