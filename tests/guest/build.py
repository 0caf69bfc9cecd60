"""Builder of the tiny real test guest: a BIOS and a UEFI disk image made from Debian packages.

Both boot the generic Debian kernel with an initramfs (busybox, the needed modules, `init.sh` as init:
see it for the serial markers). Images are cached under a hash of all inputs.
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

GUEST_DIR = Path(__file__).resolve().parent
INIT_SCRIPT = GUEST_DIR / "init.sh"
NETPLAN_AWK = GUEST_DIR / "netplan.awk"

KERNEL_META_PACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"
MBR_BIN = Path("/usr/lib/syslinux/mbr/mbr.bin")
EFI_STUB = Path("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")
EXTLINUX = Path("/usr/bin/extlinux")
APT_LISTS = Path("/var/lib/apt/lists")

# The guest loads these in this order, each after its dependencies (softdeps included).
GUEST_MODULES = (
    "button", "evdev",
    "virtio_pci", "virtio_blk", "virtio_scsi", "virtio_net",
    "sd_mod", "sr_mod", "ata_piix", "ahci",
    "ext4", "isofs", "vfat", "nls_cp437", "nls_ascii",
    "e1000", "e1000e", "8139cp",
)
KERNEL_CMDLINE = "console=ttyS0,115200 quiet"
DATA_LABEL = "edgevm-data"

MIB = 1024 * 1024
SECTOR = 512
DISK_SIZE = 128 * MIB
PARTITION_START = 1 * MIB
ESP_SIZE = 48 * MIB
# Where the ext2 data filesystem starts in each disk, for reading it offline (debugfs "DISK?offset=N").
BIOS_DATA_OFFSET = PARTITION_START
UEFI_DATA_OFFSET = PARTITION_START + ESP_SIZE
# GPT keeps a backup table in the last sectors; the data partition stops 1 MiB short of the end.
UEFI_DATA_SIZE = DISK_SIZE - UEFI_DATA_OFFSET - 1 * MIB


class GuestBuildError(RuntimeError):
    """A step of building the test guest failed."""


@dataclass(frozen=True)
class GuestImages:
    """The built test guest disk images (qcow2, read-only: put overlays on them)."""

    bios: Path
    uefi: Path


@dataclass(frozen=True)
class DebPackage:
    """A Debian binary package at an exact version."""

    name: str
    version: str

    @property
    def file_name(self) -> str:
        return f"{self.name}_{self.version.replace(':', '%3a')}_amd64.deb"


@dataclass(frozen=True)
class GuestPackages:
    """The Debian packages the guest is made of."""

    kernel: DebPackage
    busybox: DebPackage


def default_cache_dir() -> Path:
    """The cache directory: $EDGEVM_GUEST_CACHE, else /var/cache/edgevm/test-guest."""
    return Path(os.environ.get("EDGEVM_GUEST_CACHE", "/var/cache/edgevm/test-guest"))


def build_images(cache_dir: Path | None = None) -> GuestImages:
    """Returns the test guest images, building them into cache_dir unless built from the same inputs."""
    cache_dir = Path(cache_dir or default_cache_dir())
    cache_dir.mkdir(parents=True, exist_ok=True)
    packages = resolve_packages(cache_dir)
    key = cache_key(packages)
    images_dir = cache_dir / f"images-{key[:16]}"
    images = GuestImages(bios=images_dir / "bios.qcow2", uefi=images_dir / "uefi.qcow2")
    if images_dir.is_dir():
        return images
    with _exclusive_lock(cache_dir / "build.lock"):
        if images_dir.is_dir():
            return images
        with tempfile.TemporaryDirectory(prefix="build-", dir=cache_dir) as work_name:
            work = Path(work_name)
            output = work / "images"
            debs_dir = cache_dir / "debs"
            kernel_deb, busybox_deb = download(debs_dir, packages.kernel), download(debs_dir, packages.busybox)
            _build_into(output, work, kernel_deb, busybox_deb)
            manifest = {"key": key, **asdict(packages)}
            (output / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            # Readable by all: libvirt's QEMU runs as its own user and opens these as backing files.
            output.chmod(0o755)
            output.rename(images_dir)
        _remove_stale(cache_dir, keep={images_dir.name, "debs", "build.lock", "packages.json"})
    return images


def resolve_packages(cache_dir: Path) -> GuestPackages:
    """Returns the candidate packages, asking apt only when its package lists changed since last time."""
    memo = cache_dir / "packages.json"
    lists = _apt_lists_fingerprint()
    try:
        saved = json.loads(memo.read_text())
        if saved["apt_lists"] == lists:
            return GuestPackages(DebPackage(**saved["kernel"]), DebPackage(**saved["busybox"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    packages = _ask_apt_for_packages()
    memo.write_text(json.dumps({"apt_lists": lists, **asdict(packages)}))
    return packages


def cache_key(packages: GuestPackages) -> str:
    """Returns the hash of every input of the images: guest files, this builder, packages, host files."""
    digest = hashlib.sha256()
    for path in (Path(__file__).resolve(), INIT_SCRIPT, NETPLAN_AWK, MBR_BIN, EFI_STUB, EXTLINUX):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    for package in (packages.kernel, packages.busybox):
        digest.update(f"{package.name}={package.version}\0".encode())
    return digest.hexdigest()


def download(debs_dir: Path, package: DebPackage) -> Path:
    """Returns the package's .deb file, downloading it with apt-get unless it is already there."""
    deb = debs_dir / package.file_name
    if not deb.exists():
        debs_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="download-", dir=debs_dir) as download_dir:
            _run("apt-get", "download", "-q", f"{package.name}={package.version}", cwd=download_dir)
            Path(download_dir, package.file_name).rename(deb)
    return deb


def _build_into(output: Path, work: Path, kernel_deb: Path, busybox_deb: Path) -> None:
    kernel_root = work / "kernel"
    busybox_root = work / "busybox"
    _run("dpkg", "-x", str(kernel_deb), str(kernel_root))
    _run("dpkg", "-x", str(busybox_deb), str(busybox_root))
    (kernel_version,) = [p.name for p in (kernel_root / "lib/modules").iterdir()]
    vmlinuz = kernel_root / f"boot/vmlinuz-{kernel_version}"
    initrd = work / "initrd.img"
    initrd.write_bytes(make_initramfs(kernel_root, kernel_version, busybox_root / "bin/busybox"))
    output.mkdir()
    make_bios_image(output / "bios.qcow2", work / "bios", vmlinuz, initrd)
    make_uefi_image(output / "uefi.qcow2", work / "uefi", vmlinuz, initrd)


def resolve_modules(kernel_root: Path, kernel_version: str, modules: tuple[str, ...]) -> list[str]:
    """Returns the module files (relative to lib/modules/VERSION) to load, dependencies first."""
    _run("depmod", "-b", str(kernel_root), kernel_version)
    modules_dir = kernel_root / "lib/modules" / kernel_version
    out = _run("modprobe", "-d", str(kernel_root), "-S", kernel_version, "--show-depends", "-a", *modules)
    ordered: list[str] = []
    for line in out.splitlines():
        words = line.split()
        if words and words[0] == "insmod":
            relative = str(Path(words[1]).relative_to(modules_dir))
            if relative not in ordered:
                ordered.append(relative)
    return ordered


def make_initramfs(kernel_root: Path, kernel_version: str, busybox: Path) -> bytes:
    """Returns the gzipped newc cpio archive of the guest's root: busybox, modules, init."""
    archive = CpioArchive()
    for directory in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "run", "tmp",
                      "data", "etc", "etc/edgevm", "var", "lib", "lib/modules"):
        archive.add_directory(directory)
    archive.add_device("dev/console", major=5, minor=1)
    archive.add_file("init", INIT_SCRIPT.read_bytes(), mode=0o755)
    archive.add_file("etc/edgevm/netplan.awk", NETPLAN_AWK.read_bytes())
    archive.add_file("bin/busybox", busybox.read_bytes(), mode=0o755)
    for applet in _run(str(busybox), "--list-full").split():
        if applet != "bin/busybox":
            archive.add_symlink(applet, "/bin/busybox")

    modules = resolve_modules(kernel_root, kernel_version, GUEST_MODULES)
    modules_dir = kernel_root / "lib/modules" / kernel_version
    for module in modules:
        parts = Path("lib/modules", kernel_version, module).parts
        for depth in range(3, len(parts)):
            archive.add_directory("/".join(parts[:depth]))
        archive.add_file("/".join(parts), (modules_dir / module).read_bytes())
    archive.add_file("etc/edgevm/modules", "".join(f"{m}\n" for m in modules).encode())
    return gzip.compress(archive.finish(), compresslevel=6, mtime=0)


class CpioArchive:
    """An in-memory cpio archive in the "newc" format the kernel unpacks as initramfs."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._names: set[str] = set()

    def add_directory(self, name: str) -> None:
        if name not in self._names:
            self._add(name, 0o040755)

    def add_file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._add(name, 0o100000 | mode, data)

    def add_symlink(self, name: str, target: str) -> None:
        self._add(name, 0o120777, target.encode())

    def add_device(self, name: str, major: int, minor: int) -> None:
        self._add(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._add("TRAILER!!!", 0)
        return b"".join(self._chunks)

    def _add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        self._names.add(name)
        encoded_name = name.encode() + b"\0"
        fields = (len(self._chunks) + 1, mode, 0, 0, 1, 0, len(data), 0, 0, *rdev, len(encoded_name), 0)
        header = b"070701" + b"".join(b"%08x" % field for field in fields)
        self._chunks.append(_pad4(header + encoded_name) + _pad4(data))


def _pad4(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def make_bios_image(image: Path, work: Path, vmlinuz: Path, initrd: Path) -> None:
    """Writes a qcow2 disk: MBR, one bootable ext2 partition (the data fs) holding extlinux and the kernel."""
    root = work / "root"
    (root / "boot/extlinux").mkdir(parents=True)
    shutil.copyfile(vmlinuz, root / "boot/vmlinuz")
    shutil.copyfile(initrd, root / "boot/initrd.img")
    (root / "boot/extlinux/extlinux.conf").write_text(
        "DEFAULT edgevm\nPROMPT 0\nTIMEOUT 0\n"
        f"LABEL edgevm\n  LINUX /boot/vmlinuz\n  INITRD /boot/initrd.img\n  APPEND {KERNEL_CMDLINE}\n"
    )
    raw = work / "disk.raw"
    _create_sparse(raw, DISK_SIZE)
    _partition(raw, f"label: dos\nstart={PARTITION_START // SECTOR}, type=83, bootable\n")
    _make_ext2(raw, BIOS_DATA_OFFSET, DISK_SIZE - BIOS_DATA_OFFSET, contents=root)
    # extlinux must patch the sectors of ldlinux.sys in place, so it needs the fs mounted.
    mountpoint = work / "mnt"
    mountpoint.mkdir()
    _run("mount", "-t", "ext2", "-o", f"loop,offset={PARTITION_START}", str(raw), str(mountpoint))
    try:
        _run("extlinux", "--install", str(mountpoint / "boot/extlinux"))
    finally:
        _run("umount", str(mountpoint))
    with raw.open("r+b") as disk:
        disk.write(MBR_BIN.read_bytes()[:440])
    _convert_to_qcow2(raw, image)


def make_uefi_image(image: Path, work: Path, vmlinuz: Path, initrd: Path) -> None:
    """Writes a qcow2 disk: GPT, a FAT EFI system partition with a unified kernel image, an ext2 data fs."""
    work.mkdir()
    uki = work / "BOOTX64.EFI"
    make_unified_kernel_image(uki, work, vmlinuz, initrd)
    raw = work / "disk.raw"
    _create_sparse(raw, DISK_SIZE)
    _partition(raw, "label: gpt\n"
               f"start={PARTITION_START // SECTOR}, size={ESP_SIZE // SECTOR}, type=U, name=ESP\n"
               f"start={UEFI_DATA_OFFSET // SECTOR}, size={UEFI_DATA_SIZE // SECTOR}, type=L, name=data\n")
    _run("mkfs.fat", f"--offset={PARTITION_START // SECTOR}", "-n", "ESP", str(raw), str(ESP_SIZE // 1024))
    esp = f"{raw}@@{PARTITION_START}"
    mtools_env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    _run("mmd", "-i", esp, "::/EFI", "::/EFI/BOOT", env=mtools_env)
    _run("mcopy", "-i", esp, str(uki), "::/EFI/BOOT/BOOTX64.EFI", env=mtools_env)
    _make_ext2(raw, UEFI_DATA_OFFSET, UEFI_DATA_SIZE, contents=None)
    _convert_to_qcow2(raw, image)


def make_unified_kernel_image(uki: Path, work: Path, vmlinuz: Path, initrd: Path) -> None:
    """Writes an EFI executable: systemd's stub with the os-release, command line, kernel and initrd."""
    os_release = work / "os-release"
    os_release.write_text('NAME="edgevm test guest"\nID=edgevm-test-guest\n')
    cmdline = work / "cmdline"
    cmdline.write_text(KERNEL_CMDLINE + "\0")
    sections = {".osrel": os_release, ".cmdline": cmdline, ".linux": vmlinuz, ".initrd": initrd}
    address = _end_of_sections(EFI_STUB)
    args = []
    for name, path in sections.items():
        address = _align(address, 4096)
        args += ["--add-section", f"{name}={path}", "--change-section-vma", f"{name}={address:#x}"]
        address += path.stat().st_size
    _run("objcopy", *args, str(EFI_STUB), str(uki))


def _end_of_sections(pe_file: Path) -> int:
    end = 0
    for line in _run("objdump", "-h", str(pe_file)).splitlines():
        words = line.split()
        # Section rows read: Idx Name Size VMA LMA File-off Algn.
        if len(words) == 7 and words[0].isdigit():
            end = max(end, int(words[3], 16) + int(words[2], 16))
    return end


def _align(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def _create_sparse(path: Path, size: int) -> None:
    with path.open("wb") as file:
        file.truncate(size)


def _partition(raw: Path, script: str) -> None:
    _run("sfdisk", "--quiet", str(raw), input=script)


def _make_ext2(raw: Path, offset: int, size: int, contents: Path | None) -> None:
    args = ["mke2fs", "-q", "-F", "-t", "ext2", "-L", DATA_LABEL, "-E", f"offset={offset}"]
    if contents is not None:
        args += ["-d", str(contents)]
    _run(*args, str(raw), f"{size // 1024}k")


def _convert_to_qcow2(raw: Path, image: Path) -> None:
    _run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(image))


def _ask_apt_for_packages() -> GuestPackages:
    meta, busybox = _apt_show(KERNEL_META_PACKAGE, BUSYBOX_PACKAGE)
    # linux-image-amd64 depends on exactly one versioned image, e.g. "linux-image-6.1.0-56-amd64 (= ...)".
    dependency = next(d.strip() for d in meta["Depends"].split(",") if d.strip().startswith("linux-image-"))
    kernel_name, _, pinned = dependency.partition(" ")
    if pinned.startswith("(= "):
        kernel = DebPackage(kernel_name, pinned.removeprefix("(= ").rstrip(")"))
    else:
        (stanza,) = _apt_show(kernel_name)
        kernel = DebPackage(kernel_name, stanza["Version"])
    return GuestPackages(kernel=kernel, busybox=DebPackage(busybox["Package"], busybox["Version"]))


def _apt_show(*names: str) -> list[dict[str, str]]:
    out = _run("apt-cache", "show", "--no-all-versions", *names)
    stanzas = []
    for block in out.strip().split("\n\n"):
        fields = {}
        for line in block.splitlines():
            if line and not line[0].isspace() and ":" in line:
                field, _, value = line.partition(":")
                fields[field] = value.strip()
        stanzas.append(fields)
    if len(stanzas) != len(names):
        raise GuestBuildError(f"apt-cache show {' '.join(names)} gave {len(stanzas)} packages")
    return stanzas


def _apt_lists_fingerprint() -> list[list[object]]:
    return sorted([p.name, s.st_size, s.st_mtime_ns] for p in APT_LISTS.iterdir()
                  if p.is_file() and (s := p.stat()))


def _remove_stale(cache_dir: Path, keep: set[str]) -> None:
    for entry in cache_dir.iterdir():
        if entry.name not in keep and entry.name.startswith(("images-", "build-")):
            shutil.rmtree(entry, ignore_errors=True)


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _run(*args: str, cwd: Path | str | None = None, env: dict[str, str] | None = None,
         input: str | None = None) -> str:
    try:
        result = subprocess.run(args, cwd=cwd, env=env, input=input, capture_output=True, text=True,
                                check=True, timeout=300)
    except FileNotFoundError:
        raise GuestBuildError(f"{args[0]} is not installed") from None
    except subprocess.CalledProcessError as error:
        command = " ".join(args)
        raise GuestBuildError(f"{command} failed ({error.returncode}): {error.stderr.strip()}") from None
    return result.stdout


def main() -> None:
    """Builds the images (or finds them cached) and prints where they are."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=default_cache_dir(), help="cache directory")
    started = time.monotonic()
    try:
        images = build_images(parser.parse_args().cache)
    except GuestBuildError as error:
        sys.exit(f"error: {error}")
    print(f"bios: {images.bios}\nuefi: {images.uefi}\n({time.monotonic() - started:.2f} s)")


if __name__ == "__main__":
    main()
