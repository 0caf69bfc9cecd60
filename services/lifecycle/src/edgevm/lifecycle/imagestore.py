"""The node's image store: one file `<name>.<format>` per image in one directory, and qemu-img disk helpers.

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
import json
import os
import re
import stat
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from edgevm.lifecycle import qcow2
from edgevm.lifecycle.layout import fsync_dir
from edgevm.shared.errors import FieldError

ImageFormat = Literal["qcow2", "raw", "iso"]
FORMATS: tuple[ImageFormat, ...] = ("qcow2", "raw", "iso")
IMAGE_NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?\Z")

_CHUNK = 1024 * 1024
_ISO_MAGIC_OFFSET = 0x8001
_ISO_MAGIC = b"CD001"


class ImageRejected(FieldError):
    """An import request or the file it names breaks a rule; `field` is the request field at fault."""


class ImageExists(Exception):
    """The store already holds an image of that name."""


class QemuImgError(Exception):
    """qemu-img failed or did not finish in time; the message says which command and why."""


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


class QemuImg:
    """qemu-img, run with an argument list and a deadline on every call."""

    def __init__(self, binary: str = "qemu-img", timeout: float = 60.0) -> None:
        self.binary = binary
        self.timeout = timeout

    def info(self, path: Path) -> dict[str, Any]:
        """Return `qemu-img info` of `path` as a dict (blocking); the backing chain is not opened."""
        info: dict[str, Any] = json.loads(self._run("info", "--output=json", str(path)))
        return info

    async def create_overlay(self, image_path: Path, overlay_path: Path, backing_format: str | None = None) -> None:
        """Create the qcow2 overlay `overlay_path` backed by `image_path`; never overwrites a file."""
        await asyncio.to_thread(self._create_overlay, image_path, overlay_path, backing_format)

    async def create_blank_disk(self, path: Path, size_bytes: int) -> None:
        """Create an empty qcow2 disk of `size_bytes` at `path`; never overwrites."""
        if size_bytes <= 0:
            raise ValueError(f"a disk needs a positive size, got {size_bytes}")
        await asyncio.to_thread(self._create_new, path, ["-f", "qcow2"], str(size_bytes))

    async def resize(self, path: Path, size_bytes: int) -> None:
        """Grow the qcow2 disk at `path` (not in use by a running domain) to `size_bytes`."""
        await asyncio.to_thread(self._run, "resize", "-q", "-f", "qcow2", str(path), str(size_bytes))

    def _create_overlay(self, image_path: Path, overlay_path: Path, backing_format: str | None) -> None:
        backing = image_path.resolve(strict=True)  # the overlay records this path, so it must be absolute
        backing_format = backing_format or self.info(backing)["format"]
        # The bytes qemu-img would write, without forking it (most of a vm.create's time otherwise).
        qcow2.write_overlay(overlay_path, backing, "raw" if backing_format == "iso" else backing_format)

    def _create_new(self, path: Path, options: list[str], *size: str) -> None:
        # qemu-img create truncates an existing file, so create beside it and link into place (no clobber).
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        os.close(fd)
        try:
            self._run("create", "-q", *options, tmp, *size)
            os.link(tmp, path)
        finally:
            os.unlink(tmp)

    def _run(self, *args: str) -> str:
        command = [self.binary, *args]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=self.timeout, check=False)
        except subprocess.TimeoutExpired:
            raise QemuImgError(f"qemu-img {args[0]} did not finish within {self.timeout:g} s") from None
        except OSError as exc:
            raise QemuImgError(f"qemu-img cannot be run: {exc.strerror}") from None
        if done.returncode != 0:
            detail = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
            raise QemuImgError(f"qemu-img {args[0]} failed: {detail[0]}")
        return done.stdout


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

        work = asyncio.ensure_future(asyncio.to_thread(self._import, name, src_path, format, report, stop))
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

    def _import(
        self,
        name: str,
        src_path: Path,
        format: ImageFormat | None,
        report: Callable[[int], None],
        stop: threading.Event,
    ) -> ImageRecord:
        if any(self.path_for(name, f).exists() for f in FORMATS):
            raise ImageExists(f"the image store already has an image named {name!r}")
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=self.root, prefix=f".{name}.", suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                size, sha256 = _copy(src_path, out, report, stop)
            detected, virtual_size = self._inspect(tmp, format)
            final = self.path_for(name, detected)
            tmp.chmod(0o644)
            try:
                os.link(tmp, final)
            except FileExistsError:
                raise ImageExists(f"the image store already has an image named {name!r}") from None
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(self.root)
        report(100)
        return ImageRecord(name, detected, size, sha256, final, virtual_size)

    def _inspect(self, path: Path, declared: ImageFormat | None) -> tuple[ImageFormat, int]:
        info = self.qemu_img.info(path)
        found = info.get("format")
        if found == "qcow2":
            if info.get("backing-filename") or info.get("full-backing-filename"):
                raise ImageRejected(
                    "path",
                    f"is a qcow2 image with a backing file ({info.get('backing-filename')!r}); "
                    "images must be self-contained: flatten it first (qemu-img convert -O qcow2)",
                )
            if info.get("format-specific", {}).get("data", {}).get("data-file"):
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
        return detected, int(info.get("virtual-size", 0))


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

