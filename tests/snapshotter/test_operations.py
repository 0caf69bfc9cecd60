"""The snapshot operations on real image files and the real qemu-img, with libvirt's side played by fakes
that can fail, time out or finish late the way libvirtd does."""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import libvirt
import pytest

from edgevm.shared.errors import Conflict, to_edgevm_error
from edgevm.shared.libvirt.connection import HypervisorConnection as Hypervisor
from edgevm.shared.libvirt.errors import DomainNotFound, HypervisorError, HypervisorTimeout, SnapshotNotFound
from edgevm.shared.libvirt.snapshots import SnapshotInfo, oldest_first
from edgevm.shared.qemuimg import QemuImg, QemuImgError
from edgevm.snapshotter.drivers.domains import Domains, RootDisk, find_root_disk, with_root_source
from edgevm.snapshotter.layers import VmFiles
from edgevm.snapshotter.operations import SnapshotOperations
from edgevm.snapshotter.worker import describe
from tests.helpers import eventually

VM = "op"
TASK = "01TESTTASK0000000000000001"


def info(name: str, created_at: str = "2026-11-27T22:00:00.000Z", parent: str | None = None,
         overlays: tuple[str, ...] = (), external: bool = True) -> SnapshotInfo:
    return SnapshotInfo(name=name, description="", created_at=created_at, state="shutoff", external=external,
                        parent=parent, current=True, xml="", overlays=overlays)


@dataclass
class FakeDomains:
    """A stopped domain whose persistent definition has one disk, `vda`."""

    definition: str
    waited: int = 0

    async def wait_idle(self, vm: str, timeout: float = 600) -> None:
        self.waited += 1

    async def root_disk(self, vm: str, vm_dir: Path) -> RootDisk | None:
        return find_root_disk(self.definition, vm_dir)

    async def live_source(self, vm: str, target: str) -> str | None:
        return None

    async def is_running(self, vm: str) -> bool:
        return False

    async def xml(self, vm: str, *, inactive: bool = False) -> str:
        return self.definition

    async def set_root_source(self, vm: str, target: str, path: str) -> None:
        self.definition = with_root_source(self.definition, target, path)

    async def define(self, xml: str) -> None:
        self.definition = xml


@dataclass
class FakeSnapshots:
    """libvirt's snapshot list; `outcome` says what a create does: an exception to raise, and whether the
    snapshot is made anyway (libvirtd finishing after our deadline)."""

    known: dict[str, SnapshotInfo] = field(default_factory=dict)
    fail: BaseException | None = None
    made_anyway: bool = False
    domains: FakeDomains | None = None
    reverted_definition: str | None = None

    async def get(self, vm: str, name: str) -> SnapshotInfo | None:
        return self.known.get(name)

    async def list(self, vm: str) -> list[SnapshotInfo]:
        return list(self.known.values())

    async def create_external(self, vm: str, name: str, description: str, target: str, overlay: str,
                              other_disks: tuple[str, ...]) -> None:
        if self.fail is None or self.made_anyway:
            self.known[name] = info(name, overlays=(overlay,))
        if self.fail is not None:
            raise self.fail

    async def revert(self, vm: str, name: str) -> None:
        if self.reverted_definition is not None and self.domains is not None:
            self.domains.definition = self.reverted_definition  # libvirt puts back the snapshot's definition

    async def create_internal(self, vm: str, name: str, description: str) -> None:
        if self.fail is None or self.made_anyway:
            self.known[name] = info(name, created_at="2026-11-27T22:00:05.000Z", external=False)
        if self.fail is not None:
            raise self.fail


@dataclass
class Setup:
    ops: SnapshotOperations
    domains: FakeDomains
    snapshots: FakeSnapshots
    files: VmFiles
    vm_dir: Path  # as the lifecycle names it (maybe through a link)

    def layer_files(self) -> list[str]:
        return sorted(p.name for p in self.files.layers.iterdir()) if self.files.layers.exists() else []


async def noop(percent: int, message: str) -> None:
    pass


def qcow2(path: Path, backing: Path | None = None) -> None:
    args = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing is not None:
        args += ["-b", str(backing), "-F", "qcow2"]
    subprocess.run([*args, str(path), "16M"], check=True)


def make_setup(base: Path, qemu_img: QemuImg | None = None) -> Setup:
    """A stopped VM whose disk root.qcow2 is an overlay on an image, defined by the path under `base`."""
    (base / "images").mkdir(parents=True, exist_ok=True)
    image = base / "images" / "base.qcow2"
    qcow2(image)
    vm_dir = base / "lifecycle" / "vms" / VM
    vm_dir.mkdir(parents=True)
    qcow2(vm_dir / "root.qcow2", image)
    definition = (f"<domain><name>edgevm-{VM}</name><devices><disk type='file' device='disk'>"
                  f"<driver name='qemu' type='qcow2'/><source file='{vm_dir / 'root.qcow2'}'/>"
                  "<target dev='vda' bus='virtio'/></disk></devices></domain>")
    domains = FakeDomains(definition)
    snapshots = FakeSnapshots(domains=domains)
    ops = SnapshotOperations(snapshots, domains, qemu_img or QemuImg(), lambda vm: VmFiles(vm_dir))  # type: ignore[arg-type]
    return Setup(ops, domains, snapshots, VmFiles(vm_dir), vm_dir)


@pytest.fixture
def linked(tmp_path: Path) -> Iterator[Path]:
    """A state directory reached through a symbolic link, as EDGEVM_STATE_DIR may name it."""
    real = tmp_path / "disk2" / "edgevm"
    real.mkdir(parents=True)
    link = tmp_path / "state"
    link.symlink_to(real)
    yield link


async def test_external_snapshots_through_a_symlinked_state_dir_keep_the_active_image(linked: Path) -> None:
    s = make_setup(linked)
    first = await s.ops.create_external(VM, "a", "", TASK, noop)
    assert first.name == "a" and first.mode == "external"
    overlay = s.files.top(TASK)
    assert overlay.exists(), s.layer_files()  # the disk the VM now writes to was not removed
    assert os.path.realpath(s.vm_dir / "root.qcow2") == str(overlay)
    # The definition still leads to the VM's own disk: a second snapshot is not 422.
    disk = await s.ops.root_disk(VM)
    assert os.path.realpath(disk.source) == str(overlay)
    second_task = TASK[:-1] + "2"
    await s.ops.create_external(VM, "b", "", second_task, noop)
    assert s.layer_files() == ["active-" + second_task.lower() + ".qcow2", "snap-a.qcow2", "snap-b.qcow2"]
    chain = [Path(i.path).name for i in await QemuImg().chain(s.files.top(second_task))]
    assert chain == ["active-" + second_task.lower() + ".qcow2", "snap-b.qcow2", "snap-a.qcow2", "base.qcow2"]


def test_the_root_disk_is_found_by_its_real_directory(linked: Path) -> None:
    vm_dir = linked / "lifecycle" / "vms" / VM
    (vm_dir / "snapshots").mkdir(parents=True)
    real = Path(os.path.realpath(vm_dir))

    def disk(path: str) -> str:
        return f"<domain><devices><disk device='disk'><source file='{path}'/><target dev='vda'/></disk></devices></domain>"

    found = [
        find_root_disk(disk(str(vm_dir / "root.qcow2")), vm_dir),
        find_root_disk(disk(str(real / "root.qcow2")), vm_dir),
        find_root_disk(disk(str(real / "snapshots" / "active-x.qcow2")), vm_dir),
        find_root_disk(disk(str(vm_dir / "snapshots" / "active-x.qcow2")), real),
    ]
    assert all(d is not None and d.target == "vda" for d in found), found
    assert find_root_disk(disk(str(real / "seed.iso")), vm_dir) is None
    assert find_root_disk(disk("root.qcow2"), vm_dir) is None


def test_a_relative_state_dir_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert VmFiles(Path("state/lifecycle/vms/x")).root == tmp_path / "state" / "lifecycle" / "vms" / "x" / "root.qcow2"


FAILURES = [
    pytest.param(HypervisorError("unsupported configuration: nope"), id="libvirt refuses"),
    pytest.param(HypervisorTimeout("libvirt did not answer within 600 s"), id="timeout, nothing made"),
]


@pytest.mark.parametrize("failure", FAILURES)
async def test_a_create_that_libvirt_does_not_make_leaves_no_files(tmp_path: Path, failure: Exception) -> None:
    s = make_setup(tmp_path)
    s.snapshots.fail = failure
    with pytest.raises(type(failure)):
        await s.ops.create_external(VM, "a", "", TASK, noop)
    assert s.layer_files() == []
    assert (s.vm_dir / "root.qcow2").is_file() and not (s.vm_dir / "root.qcow2").is_symlink()


async def test_a_create_whose_preparation_fails_leaves_no_files(tmp_path: Path) -> None:
    s = make_setup(tmp_path, QemuImg(binary="false"))
    with pytest.raises(QemuImgError):
        await s.ops.create_external(VM, "a", "", TASK, noop)
    assert s.layer_files() == []


async def test_a_timeout_after_which_libvirt_made_the_snapshot_succeeds(tmp_path: Path) -> None:
    s = make_setup(tmp_path)
    s.snapshots.fail, s.snapshots.made_anyway = HypervisorTimeout("no answer within 600 s"), True
    made = await s.ops.create_external(VM, "a", "", TASK, noop)
    assert made.name == "a" and s.domains.waited >= 2  # it waited for libvirt's job before looking
    assert s.layer_files() == ["active-" + TASK.lower() + ".qcow2", "snap-a.qcow2"]


async def test_a_cancelled_create_keeps_its_files_for_the_resumed_run(tmp_path: Path) -> None:
    s = make_setup(tmp_path)
    s.snapshots.fail, s.snapshots.made_anyway = asyncio.CancelledError(), True
    with pytest.raises(asyncio.CancelledError):
        await s.ops.create_external(VM, "a", "", TASK, noop)
    assert s.layer_files() == ["active-" + TASK.lower() + ".qcow2", "snap-a.qcow2"]
    s.snapshots.fail = None
    # The next run of the same task finds the snapshot libvirt made into this task's overlay: its own.
    made = await s.ops.create_external(VM, "a", "", TASK, noop, resumed_since="2026-11-27T21:59:59.500Z")
    assert made.name == "a"
    # A first run, or another task, finds the name taken.
    with pytest.raises(Conflict):
        await s.ops.create_external(VM, "a", "", TASK, noop)
    with pytest.raises(Conflict):
        await s.ops.create_external(VM, "a", "", TASK[:-1] + "9", noop, resumed_since="2026-11-27T21:00:00Z")


async def test_snapshot_files_libvirt_does_not_know_are_removed(tmp_path: Path) -> None:
    s = make_setup(tmp_path)
    s.files.ensure()
    stray = s.files.frozen("ghost")
    qcow2(stray)
    await s.ops.create_external(VM, "a", "", TASK, noop)
    assert s.layer_files() == ["active-" + TASK.lower() + ".qcow2", "snap-a.qcow2"]


async def test_an_internal_create_takes_a_snapshot_only_as_its_own(tmp_path: Path) -> None:
    s = make_setup(tmp_path)
    s.snapshots.fail, s.snapshots.made_anyway = HypervisorTimeout("no answer within 600 s"), True
    made = await s.ops.create_internal(VM, "a", "", noop)
    assert made.name == "a" and made.mode == "internal"
    with pytest.raises(Conflict):  # a first run: the name is another task's
        await s.ops.create_internal(VM, "a", "", noop)
    with pytest.raises(Conflict):  # resumed, but the snapshot is older than the task
        await s.ops.create_internal(VM, "a", "", noop, resumed_since="2026-11-27T22:00:06.100Z")
    resumed = await s.ops.create_internal(VM, "a", "", noop, resumed_since="2026-11-27T22:00:05.900Z")
    assert resumed.name == "a"


async def test_a_restore_resumed_after_the_revert_puts_back_the_lifecycles_definition(tmp_path: Path) -> None:
    s = make_setup(tmp_path)
    lifecycles = s.domains.definition
    s.snapshots.known["a"] = info("a", external=False)
    s.snapshots.reverted_definition = "<domain><name>as-in-the-snapshot</name></domain>"
    # A first run was cut after libvirt reverted the definition and before it was put back.
    s.files.ensure()
    s.files.saved_definition(TASK).write_text(lifecycles)
    s.domains.definition = s.snapshots.reverted_definition
    restored = await s.ops.restore_internal(VM, "a", TASK, noop)
    assert restored.name == "a" and s.domains.definition == lifecycles
    assert not s.files.saved_definition(TASK).exists()


def test_a_domain_that_is_gone_names_the_vm_field() -> None:
    assert (to_edgevm_error(DomainNotFound("Domain not found")).field, to_edgevm_error(
        SnapshotNotFound("Domain snapshot not found")).field) == ("vm", "name")


async def test_qemu_img_cancelled_leaves_no_process_behind(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    script = tmp_path / "slow-qemu-img"
    script.write_text(f"#!/bin/sh\necho $$ > {pid_file}\nexec sleep 60\n")
    script.chmod(0o755)
    call = asyncio.create_task(QemuImg(binary=str(script)).info(tmp_path / "x.qcow2"))
    await eventually(lambda: asyncio.to_thread(lambda: pid_file.exists() and pid_file.read_text().strip()),
                     what="qemu-img started")
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_snapshots_of_one_second_list_parents_first() -> None:
    same = "2026-11-27T22:00:00.000Z"
    listed = oldest_first([info("a-child", same, "m-mid"), info("m-mid", same, "z-root"), info("b-other", same),
                           info("z-root", same), info("late", "2026-11-27T22:00:01.000Z", "a-child")])
    assert [i.name for i in listed] == ["b-other", "z-root", "m-mid", "a-child", "late"]


DESCRIBED = [TimeoutError(), OSError(), HypervisorError(""), ValueError("bad value"), KeyError("x")]


@pytest.mark.parametrize("error", DESCRIBED, ids=lambda e: type(e).__name__)
def test_a_failed_task_always_says_why(error: BaseException) -> None:
    text = describe(error)
    assert text.strip() and "Traceback" not in text


async def test_a_domain_that_does_not_stop_in_time_is_a_named_timeout() -> None:
    name = f"edgevm-wait-{uuid.uuid4().hex[:6]}"
    conn = libvirt.open("test:///default")
    domain = conn.defineXML(f"<domain type='test'><name>{name}</name><memory>1024</memory>"
                            "<os><type>hvm</type></os></domain>")
    hypervisor = Hypervisor("test:///default")
    await hypervisor.open()
    try:
        with pytest.raises(HypervisorTimeout) as raised:  # it is defined, never started
            await Domains(hypervisor).power.wait(name.removeprefix("edgevm-"), running=True, timeout=0.3)
        assert "did not start within 0.3 s" in str(raised.value)
        assert describe(raised.value).startswith(f"VM {name.removeprefix('edgevm-')} did not start")
    finally:
        await hypervisor.close()
        if domain.isActive():
            domain.destroy()
        domain.undefine()
        conn.close()

