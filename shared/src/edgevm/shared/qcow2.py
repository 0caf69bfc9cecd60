"""Writing an empty qcow2 overlay directly: the bytes `qemu-img create -f qcow2 -b B -F F` writes.

A VM's disk is an overlay on its image, made at every vm.create. Forking qemu-img costs ~10 ms (most of a
create); the empty overlay itself is four clusters of fixed structure, so it is written here instead
(format: qemu's docs/interop/qcow2.txt). Layout, with 64 KiB clusters and 16-bit refcounts, exactly as
qemu-img lays it out:

    cluster 0  header (v3, 112 bytes), header extensions (backing format), the backing file name
    cluster 1  refcount table: one entry -> cluster 2
    cluster 2  refcount block: clusters 0..2 and the L1 table's clusters used once
    cluster 3  L1 table, all zero (nothing allocated: every read falls through to the backing file);
               one entry per 512 MiB of disk, so above 4 TiB it spans more clusters (3, 4, ...)

The file ends where the L1 table does (qemu-img does not pad it to a whole cluster).

The tests check the result with `qemu-img check`, `qemu-img info` and writes through `qemu-io`.
"""

from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path

MAGIC = b"QFI\xfb"
VERSION = 3
CLUSTER_BITS = 16
CLUSTER = 1 << CLUSTER_BITS
HEADER_LENGTH = 112  # v3 header with the compression type byte, padded to a multiple of 8
REFCOUNT_ORDER = 4  # 16-bit refcounts
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_END = 0
MAX_BACKING_NAME = 1023  # qemu's limit
L2_ENTRIES = CLUSTER // 8
MIN_OVERLAY_SIZE = 3 * CLUSTER + 8  # header, refcount table and block, and at least one L1 entry
MAX_L1_BYTES = 32 * 1024 * 1024  # qemu's QCOW_MAX_L1_SIZE: 2 PiB of disk with 64 KiB clusters


def virtual_size(path: Path, fmt: str) -> int:
    """Return the disk size a qcow2 or raw file presents (a qcow2's from its header)."""
    if fmt == "qcow2":
        with open(path, "rb") as f:
            head = f.read(32)
        if head[:4] != MAGIC or len(head) < 32:
            raise ValueError(f"{path} is not a qcow2 file")
        return int(struct.unpack(">Q", head[24:32])[0])
    return path.stat().st_size


def _extension(kind: int, data: bytes) -> bytes:
    padded = data + b"\0" * (-len(data) % 8)
    return struct.pack(">II", kind, len(data)) + padded


def overlay_bytes(backing: str, backing_format: str, size: int) -> bytes:
    """Return the whole file of an empty qcow2 overlay of `size` bytes on `backing` (a path, in `backing_format`)."""
    name = backing.encode()
    if not 0 < len(name) <= MAX_BACKING_NAME:
        raise ValueError(f"a backing file name must have 1..{MAX_BACKING_NAME} bytes")
    if size <= 0 or size % 512:
        raise ValueError(f"a qcow2 size must be a positive multiple of 512, not {size}")
    l1_size = -(-size // (CLUSTER * L2_ENTRIES))
    if l1_size * 8 > MAX_L1_BYTES:
        raise ValueError(f"{size} bytes are too large for a qcow2 disk with {CLUSTER} byte clusters")
    l1_clusters = -(-l1_size * 8 // CLUSTER)
    extensions = _extension(EXT_BACKING_FORMAT, backing_format.encode()) + _extension(EXT_END, b"")
    backing_offset = HEADER_LENGTH + len(extensions)
    if backing_offset + len(name) > CLUSTER:
        raise ValueError("the header does not fit in one cluster")
    header = struct.pack(
        ">4sIQIIQIIQQIIQQQQII",
        MAGIC,
        VERSION,
        backing_offset,  # backing_file_offset
        len(name),  # backing_file_size
        CLUSTER_BITS,
        size,
        0,  # crypt_method
        l1_size,
        3 * CLUSTER,  # l1_table_offset
        1 * CLUSTER,  # refcount_table_offset
        1,  # refcount_table_clusters
        0,  # nb_snapshots
        0,  # snapshots_offset
        0,  # incompatible_features
        0,  # compatible_features
        0,  # autoclear_features
        REFCOUNT_ORDER,
        HEADER_LENGTH,
    )
    header += b"\0" * (HEADER_LENGTH - len(header))  # compression type 0 (zlib) and padding
    cluster0 = header + extensions + name
    cluster0 += b"\0" * (CLUSTER - len(cluster0))
    refcount_table = struct.pack(">Q", 2 * CLUSTER) + b"\0" * (CLUSTER - 8)
    # Clusters 0..2 and the L1 table's, once each; 515 clusters at most, far below a block's 32768 entries.
    used = 3 + l1_clusters
    refcount_block = struct.pack(f">{used}H", *([1] * used)) + b"\0" * (CLUSTER - 2 * used)
    return cluster0 + refcount_table + refcount_block + b"\0" * (8 * l1_size)


def write_overlay(
    path: Path, backing: Path, backing_format: str, size: int | None = None, durable: bool = False
) -> None:
    """Create the empty overlay `path` on `backing` (absolute path recorded); never overwrites a file.

    Atomic (written beside it, linked into place); `durable` also fsyncs it, as qemu-img does not.
    """
    if not backing.is_absolute():
        raise ValueError(f"the backing file must be an absolute path, not {backing}")
    if size is None:
        size = -(-virtual_size(backing, backing_format) // 512) * 512  # qemu-img rounds up to whole sectors
    data = overlay_bytes(str(backing), backing_format, size)
    # Written beside it and linked into place: a crash never leaves a short overlay under the real name.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            os.fchmod(f.fileno(), 0o644)
            if durable:
                os.fsync(f.fileno())
        os.link(tmp, path)
    finally:
        os.unlink(tmp)
