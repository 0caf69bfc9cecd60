"""The NoCloud seed ISO a VM boots with: volume label `cidata` holding meta-data, user-data, network-config.

The instance-id is `<vm name>-<16 hex digits>`, the digits being the start of a SHA-256 over everything
else the guest reads from the seed (user-data, network-config, hostname, extra meta-data). cloud-init runs
its per-instance modules again when the instance-id changes, so a change of a VM's cloud-init data takes
effect at its next boot, with the usual effects of a new instance (e.g. new ssh host keys); an unchanged
spec keeps the instance-id across rebuilds of the seed. Proxmox derives its instance-id the same way.

The ISO is byte-for-byte reproducible: the same content gives the same bytes, every timestamp pinned to
1970-01-01T00:00:00Z, so `seed_digest` (the SHA-256 of the ISO) tells whether a seed on disk is current.
Building it is blocking (pure Python, tens of kilobytes); async callers use `asyncio.to_thread`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    import pycdlib
    from pycdlib import dates

from edgevm.shared.layout import fsync_dir

VOLUME_LABEL = "cidata"
MINIMAL_USER_DATA = "#cloud-config\n"
SEED_FILE_MODE = 0o600  # user-data may hold passwords; libvirt hands the file to QEMU's user at start

_SECTOR = 2048
# ECMA-119 8.4.26-8.4.29: creation and modification at the epoch, expiration and effective "not specified".
_VD_DATES = slice(813, 881)
_VD_EPOCH = b"1970010100000000\x00" * 2 + b"0000000000000000\x00" * 2
_DR_EPOCH = struct.pack("=BBBBBBb", 70, 1, 1, 0, 0, 0, 0)
_TF_FIELDS = (
    "creation_time",
    "access_time",
    "modification_time",
    "attribute_change_time",
    "backup_time",
    "expiration_time",
    "effective_time",
)


@dataclass(frozen=True)
class SeedContent:
    """What a VM's seed carries, as plain values; `hostname` is the VM name when the spec has none."""

    vm_name: str
    hostname: str
    user_data: str | None = None
    network_config: str | None = None
    meta_data: Mapping[str, Any] | None = None

    def files(self) -> dict[str, bytes]:
        """Return the seed's files by name: meta-data, user-data and, when given, network-config."""
        files = self._guest_data()
        # edgevm owns these two keys (userdata.validate_meta_data refuses them), so they win over extras.
        meta = {**(self.meta_data or {}), "instance-id": self.instance_id, "local-hostname": self.hostname}
        files["meta-data"] = yaml.safe_dump(meta, sort_keys=True, allow_unicode=True).encode()
        return files

    @property
    def instance_id(self) -> str:
        """Return the instance-id cloud-init sees: the VM name and a hash of everything else in the seed."""
        everything_else = {
            "hostname": self.hostname,
            "meta_data": dict(self.meta_data or {}),
            "files": {name: data.decode() for name, data in self._guest_data().items()},
        }
        digest = hashlib.sha256(json.dumps(everything_else, sort_keys=True, ensure_ascii=False).encode())
        return f"{self.vm_name}-{digest.hexdigest()[:16]}"

    def _guest_data(self) -> dict[str, bytes]:
        user_data = self.user_data if self.user_data and self.user_data.strip() else MINIMAL_USER_DATA
        files = {"user-data": user_data.encode()}
        if self.network_config:
            files["network-config"] = self.network_config.encode()
        return files


def build_seed_iso(content: SeedContent) -> bytes:
    """Return the bytes of the seed ISO (ISO9660 + Joliet + Rock Ridge, label `cidata`) for `content`."""
    import pycdlib  # only here: an idle lifecycle would hold pycdlib's 2 MB for nothing

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=2, vol_ident=VOLUME_LABEL, joliet=3, rock_ridge="1.09")
    for name, data in sorted(content.files().items()):
        iso.add_fp(
            io.BytesIO(data),
            len(data),
            iso_path="/" + name.upper().replace("-", "_") + ".;1",
            rr_name=name,
            joliet_path="/" + name,
            file_mode=0o100444,
        )
    _pin_record_dates(iso)
    out = io.BytesIO()
    iso.write_fp(out)
    iso.close()
    return _pin_volume_dates(out.getvalue())


def seed_digest(content: SeedContent) -> str:
    """Return the SHA-256 (hex) of the seed ISO `content` gives, to compare with the seed on disk."""
    return hashlib.sha256(build_seed_iso(content)).hexdigest()


def write_seed(dest: Path, content: SeedContent, durable: bool = True) -> str:
    """Write the seed ISO for `content` to `dest` atomically (temp file, rename); return its digest.

    Atomic always: a crash of any process leaves the old seed or the new one, never a part. `durable`
    also fsyncs file and directory, for power loss; lifecycle passes False, see vms.py `_make_files`.
    """
    image = build_seed_iso(content)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(image)
            f.flush()
            os.fchmod(f.fileno(), SEED_FILE_MODE)
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(dest.parent)
    return hashlib.sha256(image).hexdigest()


def _pin_record_dates(iso: pycdlib.PyCdlib) -> None:
    # pycdlib stamps every record with time.time() and has no option for a fixed time, so the dates of
    # the directory records (both trees) and their Rock Ridge TF entries are replaced here.
    records = [vd.root_dir_record for vd in (iso.pvd, iso.joliet_vd) if vd is not None]
    records += iso.list_children(iso_path="/")
    records += iso.list_children(joliet_path="/")
    for record in records:
        record.date = _dr_epoch()
        tf = record.rock_ridge.dr_entries.tf_record if record.rock_ridge is not None else None
        if tf is not None:
            for name in _TF_FIELDS:
                if getattr(tf, name, None) is not None:
                    setattr(tf, name, _dr_epoch())


def _dr_epoch() -> dates.DirectoryRecordDate:
    from pycdlib import dates

    date = dates.DirectoryRecordDate()
    date.parse(_DR_EPOCH)
    return date


def _pin_volume_dates(image: bytes) -> bytes:
    # Volume descriptors start at sector 16; pycdlib writes their modification date at write time.
    data = bytearray(image)
    sector = 16
    while (sector + 1) * _SECTOR <= len(data):
        start = sector * _SECTOR
        kind = data[start]
        if data[start + 1 : start + 6] != b"CD001" or kind == 255:
            break
        if kind in (1, 2):  # primary and supplementary (Joliet)
            data[start + _VD_DATES.start : start + _VD_DATES.stop] = _VD_EPOCH
        sector += 1
    return bytes(data)
