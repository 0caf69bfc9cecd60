"""The image store with the real qemu-img, and the confinement of user-given paths."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import subprocess
import time
from pathlib import Path

import pycdlib
import pytest

from edgevm.lifecycle.imagestore import ImageExists, ImageRejected, ImageStore
from edgevm.lifecycle.paths import PathRejected, confine, default_import_roots, is_store_path
from edgevm.shared.qemuimg import QemuImg, QemuImgError

MiB = 1024 * 1024


def qemu_img(*args: str) -> dict:
    done = subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(done.stdout) if "--output=json" in args else {}


def make_qcow2(path: Path) -> Path:
    qemu_img("create", "-q", "-f", "qcow2", str(path), str(8 * MiB))
    return path


def make_raw(path: Path) -> Path:
    # Data, then an 8 MiB hole, then data: the copy must hash the zeros and keep the hole.
    with path.open("wb") as f:
        f.write(os.urandom(MiB + 123))
        f.seek(8 * MiB, os.SEEK_CUR)
        f.write(os.urandom(4096))
    return path


def make_iso(path: Path) -> Path:
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=2, vol_ident="INSTALL", joliet=3, rock_ridge="1.09")
    data = b"hello from an iso\n"
    iso.add_fp(io.BytesIO(data), len(data), "/HELLO.TXT;1", rr_name="hello.txt", joliet_path="/hello.txt")
    iso.write(str(path))
    iso.close()
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "images")


@pytest.fixture
def import_dir(tmp_path: Path) -> Path:
    path = tmp_path / "import"
    path.mkdir()
    return path


def store_files(store: ImageStore) -> list[str]:
    return sorted(p.name for p in store.root.iterdir()) if store.root.exists() else []


@pytest.mark.parametrize(
    ("maker", "declared", "expected"),
    [
        (make_qcow2, None, "qcow2"),
        (make_qcow2, "qcow2", "qcow2"),
        (make_raw, None, "raw"),
        (make_raw, "raw", "raw"),
        (make_iso, None, "iso"),
        (make_iso, "iso", "iso"),
        (make_iso, "raw", "raw"),  # an ISO may be used as a raw disk
    ],
)
async def test_import_copies_hashes_and_detects_the_format(
    store: ImageStore, import_dir: Path, maker, declared, expected
) -> None:
    src = maker(import_dir / "src.img")
    seen: list[int] = []
    record = await store.import_image("ubuntu-24.04", src, declared, progress=seen.append)
    await asyncio.sleep(0)  # progress is delivered through the event loop
    assert record.name == "ubuntu-24.04"
    assert record.format == expected
    assert record.path == store.root / f"ubuntu-24.04.{expected}"
    assert record.size_bytes == src.stat().st_size
    assert record.sha256 == sha256(src) == sha256(record.path)
    assert record.path.read_bytes() == src.read_bytes()
    assert record.virtual_size_bytes == qemu_img("info", "--output=json", str(record.path))["virtual-size"]
    assert seen == sorted(seen) and seen[-1] == 100
    assert store_files(store) == [record.path.name]


async def test_import_keeps_a_sparse_raw_image_sparse(store: ImageStore, import_dir: Path) -> None:
    src = make_raw(import_dir / "disk.raw")
    record = await store.import_image("sparse", src)
    assert record.path.stat().st_blocks * 512 < src.stat().st_size - 6 * MiB


@pytest.mark.parametrize(
    ("maker", "declared", "field", "rule"),
    [
        (make_raw, "qcow2", "format", "is 'qcow2' but the file is a raw image"),
        (make_qcow2, "raw", "format", "is 'raw' but the file is a qcow2 image"),
        (make_raw, "iso", "format", "is 'iso' but the file is a raw image"),
    ],
)
async def test_import_refuses_a_format_that_does_not_match(
    store: ImageStore, import_dir: Path, maker, declared, field, rule
) -> None:
    with pytest.raises(ImageRejected) as caught:
        await store.import_image("x", maker(import_dir / "src"), declared)
    assert (caught.value.field, caught.value.rule) == (field, rule)
    assert store_files(store) == []


async def test_import_refuses_a_qcow2_with_a_backing_file(store: ImageStore, import_dir: Path) -> None:
    src = import_dir / "overlay.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "/etc/hostname", "-F", "raw", str(src))
    with pytest.raises(ImageRejected) as caught:
        await store.import_image("sneaky", src)
    assert caught.value.field == "path"
    assert "backing file ('/etc/hostname')" in caught.value.rule
    assert store_files(store) == []  # the copy was made, inspected and removed


async def test_import_refuses_a_qcow2_with_an_external_data_file(store: ImageStore, import_dir: Path) -> None:
    src = import_dir / "datafile.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={import_dir / 'data.raw'}", str(src), "1M")
    with pytest.raises(ImageRejected, match="external data file"):
        await store.import_image("sneaky", src)
    assert store_files(store) == []


async def test_import_refuses_other_formats(store: ImageStore, import_dir: Path) -> None:
    src = import_dir / "disk.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", str(src), "1M")
    with pytest.raises(ImageRejected, match="is a vmdk image; supported are qcow2, raw and iso"):
        await store.import_image("vm", src)
    assert store_files(store) == []


async def test_import_refuses_an_empty_file_and_a_bad_name(store: ImageStore, import_dir: Path) -> None:
    empty = import_dir / "empty"
    empty.touch()
    with pytest.raises(ImageRejected, match="is an empty file"):
        await store.import_image("empty", empty)
    for name in ("Upper", "-dash", "dot.", "a/b", "..", "x" * 64):
        with pytest.raises(ImageRejected) as caught:
            await store.import_image(name, make_raw(import_dir / "ok.raw"))
        assert caught.value.field == "name"
    assert store_files(store) == []


async def test_import_never_replaces_an_existing_image(store: ImageStore, import_dir: Path) -> None:
    first = await store.import_image("base", make_qcow2(import_dir / "a.qcow2"))
    with pytest.raises(ImageExists):
        await store.import_image("base", make_raw(import_dir / "b.raw"))
    assert sha256(first.path) == first.sha256
    assert store_files(store) == ["base.qcow2"]


async def test_import_leaves_no_partial_file_when_inspection_fails(tmp_path: Path, import_dir: Path) -> None:
    broken = ImageStore(tmp_path / "images", QemuImg(binary="false"))
    with pytest.raises(QemuImgError, match="qemu-img info failed: exit status 1"):
        await broken.import_image("x", make_raw(import_dir / "src.raw"))
    assert store_files(broken) == []


async def test_cancelling_an_import_stops_the_copy_and_removes_the_partial_file(
    store: ImageStore, import_dir: Path
) -> None:
    src = import_dir / "big.raw"
    with src.open("wb") as f:
        f.truncate(16 * 1024 * MiB)  # 16 GiB of zeros to hash: many seconds unless the copy stops
    started = asyncio.Event()
    task = asyncio.create_task(store.import_image("big", src, progress=lambda _: started.set()))
    await asyncio.wait_for(started.wait(), 30)
    cancelled_at = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - cancelled_at < 2
    assert store_files(store) == []


async def test_remove_deletes_the_image_and_remove_partials_cleans_leftovers(
    store: ImageStore, import_dir: Path
) -> None:
    await store.import_image("gone", make_raw(import_dir / "src.raw"))
    (store.root / ".other.abc.part").write_bytes(b"left by a crash")
    assert store.remove_partials() == [store.root / ".other.abc.part"]
    assert await store.remove("gone") is True
    assert await store.remove("gone") is False
    assert store_files(store) == []


async def test_overlay_is_backed_by_the_image_and_never_overwrites(store: ImageStore, import_dir: Path, tmp_path: Path):
    image = await store.import_image("base", make_raw(import_dir / "src.raw"))
    overlay = tmp_path / "vm-root.qcow2"
    await store.qemu_img.create_overlay(overlay, image.path, "raw")
    info = qemu_img("info", "--output=json", str(overlay))
    assert (info["format"], info["backing-filename"], info["backing-filename-format"]) == (
        "qcow2",
        str(image.path),
        "raw",
    )
    assert info["virtual-size"] == image.virtual_size_bytes
    with pytest.raises(FileExistsError):
        await store.qemu_img.create_overlay(overlay, image.path)
    assert qemu_img("info", "--output=json", str(overlay))["backing-filename"] == str(image.path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".part")) == []


async def test_overlay_probes_the_backing_format_when_not_given(store: ImageStore, import_dir: Path, tmp_path: Path):
    image = await store.import_image("base", make_qcow2(import_dir / "src.qcow2"))
    await store.qemu_img.create_overlay(tmp_path / "o.qcow2", image.path)
    assert qemu_img("info", "--output=json", str(tmp_path / "o.qcow2"))["backing-filename-format"] == "qcow2"


async def test_blank_disk_has_the_size_and_is_never_overwritten(tmp_path: Path) -> None:
    disk = tmp_path / "data.qcow2"
    qemu = QemuImg()
    await qemu.create_blank(disk, 10 * MiB)
    info = qemu_img("info", "--output=json", str(disk))
    assert (info["format"], info["virtual-size"]) == ("qcow2", 10 * MiB)
    with pytest.raises(FileExistsError):
        await qemu.create_blank(disk, 20 * MiB)
    assert qemu_img("info", "--output=json", str(disk))["virtual-size"] == 10 * MiB
    assert [p.name for p in tmp_path.iterdir()] == ["data.qcow2"]


async def test_qemu_img_has_a_deadline(tmp_path: Path) -> None:
    slow = tmp_path / "slow-qemu-img"
    slow.write_text("#!/bin/sh\nexec sleep 30\n")
    slow.chmod(0o755)
    with pytest.raises(QemuImgError, match=r"qemu-img create did not finish within 0\.2 s"):
        await QemuImg(binary=str(slow), timeout=0.2).create_blank(tmp_path / "d.qcow2", MiB)
    assert [p.name for p in tmp_path.iterdir()] == ["slow-qemu-img"]


# Path confinement: (what the user gives, the rule the error must state or None when accepted).
@pytest.fixture
def roots(tmp_path: Path) -> list[Path]:
    root = tmp_path / "import"
    (root / "sub").mkdir(parents=True)
    (root / "ubuntu.qcow2").write_bytes(b"x")
    (root / "sub" / "debian.raw").write_bytes(b"x")
    (root / "sub" / "dir").mkdir()
    (root / "inside-link").symlink_to(root / "sub" / "debian.raw")
    (root / "escape-link").symlink_to("/etc/hostname")
    (root / "dir-escape").symlink_to("/etc")
    (root / "loop").symlink_to(root / "loop")
    os.mkfifo(root / "fifo")
    (tmp_path / "outside.qcow2").write_bytes(b"x")
    (tmp_path / "root-alias").symlink_to(root)
    return [root]


PATH_CASES = [
    pytest.param("ubuntu.qcow2", None, id="relative"),
    pytest.param("sub/debian.raw", None, id="relative-subdir"),
    pytest.param("{root}/ubuntu.qcow2", None, id="absolute-inside"),
    pytest.param("{tmp}/root-alias/ubuntu.qcow2", "is outside", id="absolute-through-unlisted-alias"),
    pytest.param("inside-link", None, id="symlink-staying-inside"),
    pytest.param("../outside.qcow2", "must not contain '..'", id="traversal"),
    pytest.param("sub/../ubuntu.qcow2", "must not contain '..'", id="traversal-staying-inside"),
    pytest.param("{root}/../outside.qcow2", "must not contain '..'", id="absolute-traversal"),
    pytest.param("/etc/shadow", "'/etc/shadow' is outside the node's directory", id="absolute-outside"),
    pytest.param("escape-link", "leads outside the node's directory", id="symlink-escape"),
    pytest.param("dir-escape/hostname", "leads outside the node's directory", id="symlinked-dir-escape"),
    pytest.param("sub/dir", "is not a regular file", id="directory"),
    pytest.param("fifo", "is not a regular file", id="fifo"),
    pytest.param("missing.qcow2", "does not exist in the node's directory", id="missing"),
    pytest.param("loop", "symbolic link loop", id="symlink-loop"),
    pytest.param("", "must be a non-empty path", id="empty"),
    pytest.param("a\0b", "without NUL characters", id="nul"),
]


@pytest.mark.parametrize(("given", "rule"), PATH_CASES)
def test_confine_accepts_only_regular_files_inside_the_roots(
    tmp_path: Path, roots: list[Path], given: str, rule: str | None
) -> None:
    path = given.format(root=roots[0], tmp=tmp_path)
    if rule is None:
        resolved = confine(path, roots, field="path")
        assert resolved.is_file() and resolved.is_relative_to(roots[0].resolve())
        return
    with pytest.raises(PathRejected) as caught:
        confine(path, roots, field="path")
    assert caught.value.field == "path"
    assert rule in caught.value.rule
    assert str(caught.value).startswith("path: ")


def test_confine_accepts_any_of_several_roots_and_refuses_with_none(tmp_path: Path, roots: list[Path]) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "img.raw").write_bytes(b"x")
    both = [*roots, tmp_path / "root-alias", other]
    assert confine(str(other / "img.raw"), both, field="path") == (other / "img.raw").resolve()
    assert confine(str(tmp_path / "root-alias" / "ubuntu.qcow2"), both, field="path").name == "ubuntu.qcow2"
    with pytest.raises(PathRejected, match="no directories are configured"):
        confine("img.raw", [], field="path")


def test_import_roots_default_and_volume_sources() -> None:
    assert default_import_roots(Path("/var/lib/edgevm")) == [Path("/var/lib/edgevm/import")]
    assert is_store_path("vms/web-1/data.qcow2") and is_store_path("./data.qcow2")
    assert not is_store_path("ubuntu-24.04")


async def test_losing_an_import_race_to_another_process_removes_only_its_own_file(
    store: ImageStore, import_dir: Path
) -> None:
    """Another process imports x as qcow2 while this one imports x as raw: its record wins in the bucket."""
    from nats.js.errors import KeyWrongLastSequenceError

    from edgevm.lifecycle.images import ImageService
    from edgevm.shared.commands import ImportImage
    from edgevm.shared.errors import Conflict

    make_raw(import_dir / "x.raw")

    class OtherProcessWins:
        async def create(self, key: str, value: bytes) -> int:
            make_qcow2(store.root / "x.qcow2")  # the winner's file, stored after our existence check
            raise KeyWrongLastSequenceError("wrong last sequence: 1")

    results: list[BaseException | dict] = []

    class InlineRunner:
        async def submit(self, kind: str, vm: str | None, work, task_id: str | None = None):  # type: ignore[no-untyped-def]
            async def progress(percent: int, message: str) -> None:
                pass

            try:
                results.append(await work(progress))
            except Exception as exc:
                results.append(exc)
            return None

    images = ImageService(OtherProcessWins(), "n1", store, InlineRunner(), [import_dir],  # type: ignore[arg-type]
                          lambda name: [])
    await images.import_image(ImportImage("x", "x.raw"))
    assert isinstance(results[0], Conflict) and "imported meanwhile" in results[0].message
    assert store_files(store) == ["x.qcow2"]  # the winner's image is still there; ours is gone
    assert "x" not in images.images
    # the name is not left reserved in this process: a new import goes on to the store, which has an x
    await images.import_image(ImportImage("x", "x.raw"))
    assert isinstance(results[1], ImageExists)
