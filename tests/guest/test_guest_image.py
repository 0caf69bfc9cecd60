"""Boots the test guest images under QEMU/TCG and checks what the guest promises on its serial console."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pycdlib
import pytest

from tests.guest.build import (
    BIOS_DATA_OFFSET,
    UEFI_DATA_OFFSET,
    GuestImages,
    build_images,
    default_cache_dir,
)
from tests.guest.console import GuestConsole

pytestmark = pytest.mark.guest

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
BOOT_TIMEOUT = 90.0
GUEST_MAC = "52:54:00:12:34:56"
# QEMU user networking forwards host ports to 10.0.2.15, so the seed gives the guest that address.
GUEST_ADDRESS = "10.0.2.15/24"
NETWORK_CONFIG = f"""\
version: 2
ethernets:
  primary:
    match:
      macaddress: "{GUEST_MAC}"
    addresses:
      - {GUEST_ADDRESS}
    routes:
      - to: default
        via: 10.0.2.2
"""

Bus = Literal["virtio", "ide", "sata"]


@dataclass
class RunningGuest:
    """A test guest running in QEMU: its process, console, QMP socket and disk overlay."""

    process: asyncio.subprocess.Process
    console: GuestConsole
    qmp_socket: Path
    disk: Path

    async def qmp(self, command: str) -> object:
        """Runs one QMP command and returns its result."""
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_unix_connection(self.qmp_socket)
            try:
                await reader.readline()
                for execute in ("qmp_capabilities", command):
                    writer.write(json.dumps({"execute": execute}).encode() + b"\n")
                    reply = json.loads(await reader.readline())
                    while "event" in reply:
                        reply = json.loads(await reader.readline())
                    assert "return" in reply, f"QMP {execute}: {reply}"
                return reply["return"]
            finally:
                writer.close()

    async def exited_within(self, seconds: float) -> bool:
        """Whether QEMU exits (the guest powered off) within the given seconds."""
        try:
            await asyncio.wait_for(self.process.wait(), seconds)
        except TimeoutError:
            return False
        return True


def make_seed_iso(path: Path, *, hostname: str, user_data: str = "#cloud-config\n",
                  network_config: str | None = None) -> Path:
    """Writes a NoCloud seed ISO (label cidata, Joliet and Rock Ridge) and returns its path."""
    files = {"meta-data": f"instance-id: {hostname}-1\nlocal-hostname: {hostname}\n", "user-data": user_data}
    if network_config is not None:
        files["network-config"] = network_config
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata")
    for name, text in files.items():
        data = text.encode()
        iso_name = "/" + name.upper().replace("-", "_") + ".;1"
        iso.add_fp(io.BytesIO(data), len(data), iso_name, rr_name=name, joliet_path="/" + name)
    iso.write(str(path))
    iso.close()
    return path


async def run_tool(*args: str) -> str:
    """Runs a command line tool to completion and returns its output; fails the test if it fails."""
    process = await asyncio.create_subprocess_exec(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, f"{' '.join(args)}: {stderr.decode()}"
    return stdout.decode()


def free_tcp_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_prefix(machine: str, bus: Bus) -> str:
    """The name QEMU gives the ports of an IDE or SATA bus (q35's built-in AHCI ports are named ide.N)."""
    return "sata" if bus == "sata" and machine == "pc" else "ide"


def storage_args(machine: str, bus: Bus, disk: Path, seed: Path | None) -> list[str]:
    """Returns QEMU arguments attaching the disk (boot device) and the seed cd-rom like libvirt would."""
    # libvirt puts the cd-rom of a virtio VM on SATA; IDE and SATA VMs get it on their own bus.
    cdrom_bus: Bus = "sata" if bus == "virtio" else bus
    args = ["-drive", f"file={disk},format=qcow2,if=none,id=disk0"]
    if machine == "pc" and "sata" in (bus, cdrom_bus):
        args += ["-device", "ahci,id=sata"]
    if bus == "virtio":
        args += ["-device", "virtio-blk-pci,drive=disk0,bootindex=1"]
    else:
        args += ["-device", f"ide-hd,drive=disk0,bus={port_prefix(machine, bus)}.0,bootindex=1"]
    if seed is not None:
        # On a pc machine's IDE, port ide.1 is the secondary master: hdc in the old naming.
        args += ["-drive", f"file={seed},format=raw,if=none,id=seed0,media=cdrom,readonly=on",
                 "-device", f"ide-cd,drive=seed0,bus={port_prefix(machine, cdrom_bus)}.1"]
    return args


@asynccontextmanager
async def boot(tmp_path: Path, image: Path, *, firmware: Literal["bios", "uefi"] = "bios",
               bus: Bus = "virtio", seed: Path | None = None,
               forwards: dict[int, int] | None = None) -> AsyncIterator[RunningGuest]:
    """Boots image (through a fresh overlay) in QEMU/TCG; forwards maps host TCP ports to guest ports."""
    disk = tmp_path / "disk.qcow2"
    await run_tool("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image), "-F", "qcow2", str(disk))
    machine = "q35" if firmware == "uefi" else "pc"
    console_socket, qmp_socket = tmp_path / "console.sock", tmp_path / "qmp.sock"
    # -nodefaults like libvirt: no default NIC, empty cd-rom drive or monitor.
    args = ["qemu-system-x86_64", "-accel", "tcg", "-machine", machine, "-m", "256",
            "-nographic", "-nodefaults",
            "-chardev", f"socket,id=console,path={console_socket},server=on,wait=off",
            "-serial", "chardev:console", "-qmp", f"unix:{qmp_socket},server=on,wait=off",
            *storage_args(machine, bus, disk, seed)]
    if firmware == "uefi":
        variables = tmp_path / "OVMF_VARS.fd"
        shutil.copyfile(OVMF_VARS, variables)
        args += ["-drive", f"if=pflash,format=raw,unit=0,file={OVMF_CODE},readonly=on",
                 "-drive", f"if=pflash,format=raw,unit=1,file={variables}"]
    if forwards is not None:
        rules = "".join(f",hostfwd=tcp:127.0.0.1:{host}-:{guest}" for host, guest in forwards.items())
        args += ["-nic", f"user,model=virtio-net-pci,mac={GUEST_MAC}{rules}"]
    qemu_log = tmp_path / "qemu.log"
    with qemu_log.open("wb") as log:
        process = await asyncio.create_subprocess_exec(*args, stdin=subprocess.DEVNULL,
                                                       stdout=log, stderr=log)
    try:
        try:
            console = await GuestConsole.connect(console_socket, log_path=tmp_path / "console.log")
        except TimeoutError:
            pytest.fail(f"QEMU did not open its console socket: {qemu_log.read_text()}")
        async with console:
            yield RunningGuest(process, console, qmp_socket, disk)
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def exchange(port: int, request: bytes) -> bytes:
    """Sends request to a guest service through a forwarded host port and returns all it answers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        writer.write_eof()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def read_ext2_file(disk: Path, offset: int, path: str, tmp_path: Path) -> str:
    """Returns a file's contents from the ext2 at offset in a qcow2 disk, read offline with debugfs."""
    raw = tmp_path / "disk.raw"
    await run_tool("qemu-img", "convert", "-O", "raw", str(disk), str(raw))
    return await run_tool("debugfs", "-R", f"cat {path}", f"{raw}?offset={offset}")


async def test_bios_guest_on_virtio_applies_its_seed_serves_and_keeps_written_data(
        guest_images: GuestImages, tmp_path: Path) -> None:
    echo_port, http_port = free_tcp_port(), free_tcp_port()
    seed = make_seed_iso(tmp_path / "seed.iso", hostname="bios-virtio", network_config=NETWORK_CONFIG)

    async with boot(tmp_path, guest_images.bios, seed=seed, forwards={echo_port: 7, http_port: 80}) as guest:
        await guest.console.wait_for_marker("ready", timeout=BOOT_TIMEOUT)
        markers = guest.console.markers()
        assert "data mounted /dev/vda1" in markers
        assert "hostname=bios-virtio" in markers
        assert f"ip={GUEST_ADDRESS}" in markers

        requests = [f"echo {n} through port 7\n".encode() for n in range(3)]
        assert await asyncio.gather(*(exchange(echo_port, request) for request in requests)) == requests
        page = await exchange(http_port, b"GET / HTTP/1.0\r\n\r\n")
        assert b"200 OK" in page and b"bios-virtio" in page

        written = await guest.console.run("echo written-by-test > /data/marker && sync")
        assert written.rc == 0
        failed = await guest.console.run("cat /data/no-such-file")
        assert failed.rc != 0 and "No such file" in failed.output

        await guest.console.send("poweroff -f")
        assert await guest.exited_within(30)

    assert await read_ext2_file(guest.disk, BIOS_DATA_OFFSET, "/marker", tmp_path) == "written-by-test\n"


async def test_uefi_guest_on_sata_boots_with_ovmf_reads_its_seed_and_keeps_written_data(
        guest_images: GuestImages, tmp_path: Path) -> None:
    seed = make_seed_iso(tmp_path / "seed.iso", hostname="uefi-sata")

    async with boot(tmp_path, guest_images.uefi, firmware="uefi", bus="sata", seed=seed) as guest:
        await guest.console.wait_for_marker("ready", timeout=BOOT_TIMEOUT)
        markers = guest.console.markers()
        assert "data mounted /dev/sda2" in markers
        assert "hostname=uefi-sata" in markers
        assert (await guest.console.run("echo on-the-data-partition > /data/marker")).rc == 0
        await guest.console.send("edgevm-poweroff")
        assert await guest.exited_within(30)

    marker = await read_ext2_file(guest.disk, UEFI_DATA_OFFSET, "/marker", tmp_path)
    assert marker == "on-the-data-partition\n"


async def test_bios_guest_on_ide_boots_and_reads_its_seed_from_the_ide_cdrom(
        guest_images: GuestImages, tmp_path: Path) -> None:
    seed = make_seed_iso(tmp_path / "seed.iso", hostname="bios-ide")

    async with boot(tmp_path, guest_images.bios, bus="ide", seed=seed) as guest:
        await guest.console.wait_for_marker("ready", timeout=BOOT_TIMEOUT)
        markers = guest.console.markers()
        assert "data mounted /dev/sda1" in markers
        assert "hostname=bios-ide" in markers


async def test_guest_without_seed_says_so_and_gets_ready(guest_images: GuestImages, tmp_path: Path) -> None:
    async with boot(tmp_path, guest_images.bios) as guest:
        await guest.console.wait_for_marker("ready", timeout=BOOT_TIMEOUT)
        assert "no-seed" in guest.console.markers()


async def test_acpi_power_button_powers_the_guest_off(guest_images: GuestImages, tmp_path: Path) -> None:
    seed = make_seed_iso(tmp_path / "seed.iso", hostname="acpi")

    async with boot(tmp_path, guest_images.bios, seed=seed) as guest:
        await guest.console.wait_for_marker("ready", timeout=BOOT_TIMEOUT)
        await guest.qmp("system_powerdown")
        assert await guest.exited_within(10)
        assert "poweroff" in guest.console.markers()


async def test_guest_told_to_ignore_acpi_keeps_running_after_the_power_button(
        guest_images: GuestImages, tmp_path: Path) -> None:
    seed = make_seed_iso(tmp_path / "seed.iso", hostname="stubborn",
                         user_data="#cloud-config\n#edgevm-test: ignore-acpi\n")

    async with boot(tmp_path, guest_images.bios, seed=seed) as guest:
        await guest.console.wait_for_marker("ready", timeout=BOOT_TIMEOUT)
        assert "acpi ignored" in guest.console.markers()
        await guest.qmp("system_powerdown")
        # The power button powers a listening guest off in well under a second.
        assert not await guest.exited_within(5)
        assert (await guest.console.run("true")).rc == 0


async def test_guest_told_to_power_off_after_a_delay_does(guest_images: GuestImages, tmp_path: Path) -> None:
    seed = make_seed_iso(tmp_path / "seed.iso", hostname="short-lived",
                         user_data="#cloud-config\n#edgevm-test: poweroff-after 3\n")

    async with boot(tmp_path, guest_images.bios, seed=seed) as guest:
        await guest.console.wait_for_marker("ready", timeout=BOOT_TIMEOUT)
        assert await guest.exited_within(30)
        assert "poweroff" in guest.console.markers()


def test_second_build_reuses_the_cached_images(guest_images: GuestImages) -> None:
    started = time.monotonic()
    again = build_images(default_cache_dir())
    assert again == guest_images
    assert time.monotonic() - started < 1.0
