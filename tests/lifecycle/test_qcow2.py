"""The overlay written in Python is a qcow2 that qemu-img and qemu-io accept as theirs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from edgevm.shared import qcow2


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def reads(path: Path, pattern: int, where: str) -> bool:
    """Whether qemu-io reads `pattern` at `where` ("offset length"); it says "verification failed" if not."""
    done = subprocess.run(["qemu-io", "-c", f"read -P {pattern:#x} {where}", str(path)], capture_output=True, text=True)
    return done.returncode == 0 and "failed" not in done.stdout + done.stderr


def info(path: Path) -> dict:
    return json.loads(run("qemu-img", "info", "--output=json", str(path)))


@pytest.mark.parametrize(
    ("fmt", "size"),
    [("qcow2", "64M"), ("qcow2", "3G"), ("raw", "1000"), ("qcow2", "2T"), ("qcow2", "4T"), ("qcow2", "5T"),
     ("qcow2", "8T"), ("qcow2", "64T")],
)
def test_overlay_matches_what_qemu_img_makes(tmp_path: Path, fmt: str, size: str) -> None:
    base = tmp_path / f"base.{fmt}"
    if fmt == "raw":
        base.write_bytes(b"\x11" * int(size))
    else:
        run("qemu-img", "create", "-q", "-f", fmt, str(base), size)
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    qcow2.write_overlay(ours, base, fmt)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", fmt, str(theirs))
    a, b = info(ours), info(theirs)
    for key in ("virtual-size", "cluster-size", "backing-filename", "backing-filename-format", "format"):
        assert a[key] == b[key], key
    assert a["format-specific"]["data"]["compat"] == "1.1"
    assert a["format-specific"]["data"]["refcount-bits"] == 16
    assert ours.stat().st_size == theirs.stat().st_size
    # Past the header cluster (qemu-img adds a feature-name table there), the refcount table and block and
    # the L1 table, which spans several clusters above 4 TiB, are byte for byte qemu-img's.
    assert ours.read_bytes()[qcow2.CLUSTER:] == theirs.read_bytes()[qcow2.CLUSTER:]
    run("qemu-img", "check", str(ours))  # raises on any leak or corruption
    run("qemu-img", "compare", str(ours), str(base))  # reads fall through to the image


def test_writes_land_in_the_overlay_and_leave_the_image_alone(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M")
    run("qemu-io", "-c", "write -P 0x5a 0 128k", str(base))
    overlay = tmp_path / "o.qcow2"
    qcow2.write_overlay(overlay, base, "qcow2")
    run("qemu-io", "-c", "write -P 0xa5 64k 1M", str(overlay))
    run("qemu-img", "check", str(overlay))
    assert reads(overlay, 0x5A, "0 64k")  # still from the image
    assert reads(overlay, 0xA5, "64k 1M")
    assert reads(base, 0x5A, "64k 64k")  # the image is untouched
    assert not reads(overlay, 0x5A, "64k 64k")  # the check can fail


def test_never_overwrites_and_refuses_what_it_cannot_write(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\0" * 4096)
    overlay = tmp_path / "o.qcow2"
    overlay.write_text("keep")
    with pytest.raises(FileExistsError):
        qcow2.write_overlay(overlay, base, "raw")
    assert overlay.read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.raw", "o.qcow2"]
    with pytest.raises(ValueError, match="absolute"):
        qcow2.write_overlay(tmp_path / "x.qcow2", Path("base.raw"), "raw")
    with pytest.raises(ValueError, match="not a qcow2"):
        qcow2.write_overlay(tmp_path / "x.qcow2", base, "qcow2")


def test_an_overlay_over_4_tib_takes_writes_through_its_second_l1_cluster(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(base), "8T")
    overlay = tmp_path / "o.qcow2"
    qcow2.write_overlay(overlay, base, "qcow2")
    run("qemu-io", "-c", "write -P 0xa5 6T 1M", "-c", "write -P 0x5a 0 64k", str(overlay))  # L1 clusters 2, 1
    run("qemu-img", "check", str(overlay))
    assert reads(overlay, 0xA5, "6T 1M") and reads(overlay, 0x5A, "0 64k")
    assert reads(overlay, 0, "5T 64k")  # unwritten: from the (empty) image


def test_refuses_a_disk_larger_than_qcow2_can_address(tmp_path: Path) -> None:
    assert len(qcow2.overlay_bytes("/b", "raw", 2 * 1024**5)) == 3 * qcow2.CLUSTER + qcow2.MAX_L1_BYTES  # 2 PiB
    with pytest.raises(ValueError, match="too large"):
        qcow2.overlay_bytes("/b", "raw", 2 * 1024**5 + 512)
