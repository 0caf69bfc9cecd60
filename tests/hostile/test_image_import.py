"""image.import's copy against a source that moves under it: the file the import opens must be the file the
request's confinement checked, and a file that changes while it is copied is refused, not kept half-written."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgevm.lifecycle.imagestore import ImageRejected, ImageStore
from edgevm.lifecycle.paths import confine

MiB = 1024 * 1024


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "images")


@pytest.fixture
def import_dir(tmp_path: Path) -> Path:
    (tmp_path / "import").mkdir()
    return tmp_path / "import"


def stored(store: ImageStore) -> list[str]:
    return sorted(p.name for p in store.root.iterdir()) if store.root.exists() else []


async def test_a_directory_swapped_for_a_symlink_after_confinement_is_refused(
        store: ImageStore, import_dir: Path, tmp_path: Path) -> None:
    (import_dir / "up").mkdir()
    (import_dir / "up" / "disk.raw").write_bytes(b"mine" * 1024)
    secret = tmp_path / "outside"
    secret.mkdir()
    (secret / "disk.raw").write_bytes(b"secret" * 1024)
    source = confine("up/disk.raw", [import_dir], field="path")  # what image.import checks, then queues
    # While the import task waits its turn, the directory becomes a link out of the import root.
    (import_dir / "up").rename(import_dir / "up.old")
    (import_dir / "up").symlink_to(secret)
    with pytest.raises(ImageRejected, match="symbolic link") as info:
        await store.import_image("leak", source, "raw")
    assert info.value.field == "path"
    assert stored(store) == []


@pytest.fixture
def growing(import_dir: Path) -> Iterator[Path]:
    """A 32 MiB file that another writer keeps appending to (a download still running)."""
    path = import_dir / "growing.raw"
    path.write_bytes(os.urandom(32 * MiB))
    stop = threading.Event()

    def append() -> None:
        with path.open("ab") as f:
            while not stop.is_set():
                f.write(os.urandom(4096))
                f.flush()
                time.sleep(0.001)

    writer = threading.Thread(target=append)
    writer.start()
    try:
        yield path
    finally:
        stop.set()
        writer.join()


async def test_a_file_that_grows_while_it_is_copied_is_refused(store: ImageStore, import_dir: Path,
                                                               growing: Path) -> None:
    source = confine(growing.name, [import_dir], field="path")
    with pytest.raises(ImageRejected, match="changed while it was imported") as info:
        await store.import_image("half", source, "raw")
    assert info.value.field == "path"
    assert stored(store) == []
