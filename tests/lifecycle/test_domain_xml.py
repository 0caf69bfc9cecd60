"""Domain XML built from plans: its structure, disk naming, metadata, and that libvirt accepts it."""

import subprocess
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from edgevm.shared.libvirt.domain_xml import build_domain_xml, disk_targets, target_name
from edgevm.shared.libvirt.metadata import NAMESPACE, DomainMetadata, parse_metadata
from edgevm.shared.libvirt.plan import DiskBus, DiskPlan, DomainPlan, NicPlan

libvirt.registerErrorHandler(lambda _context, _error: None, None)  # errors are raised; don't print them too

MIB = 1024 * 1024

# firmware, VM device bus, machine libvirt must be asked for
VARIANTS = [
    ("bios", "virtio", "pc"),
    ("bios", "sata", "pc"),
    ("bios", "ide", "pc"),
    ("uefi", "virtio", "q35"),
    ("uefi", "sata", "q35"),
    ("uefi", "ide", "pc"),  # q35 has no ide controller; OVMF without secure boot runs on pc too
]


def make_plan(directory: Path, *, firmware: str = "bios", bus: str = "virtio", **changes: Any) -> DomainPlan:
    """A plan like the lifecycle service makes: root disk, data disk, seed cd-rom, one NIC."""
    fields: dict[str, Any] = dict(
        name="web-1",
        uuid=str(uuid.uuid4()),
        revision=7,
        domain_type="qemu",
        firmware=firmware,
        vcpus=2,
        memory_bytes=512 * MIB,
        serial_log_path=str(directory / "serial.log"),
        nvram_path=str(directory / "VARS.fd") if firmware == "uefi" else None,
        disks=[
            DiskPlan(str(directory / "root.qcow2"), bus=bus),
            DiskPlan(str(directory / "data.qcow2"), bus=bus),
            DiskPlan(str(directory / "seed.iso"), format="raw", device="cdrom", bus=bus),
        ],
        nics=[NicPlan("52:54:00:12:34:56", "edgevm-br0")],
    )
    fields.update(changes)
    return DomainPlan(**fields)


def parsed(plan: DomainPlan) -> ET.Element:
    return ET.fromstring(build_domain_xml(plan))


def find(element: ET.Element, path: str) -> ET.Element:
    found = element.find(path)
    assert found is not None, f"no {path} in {ET.tostring(element, encoding='unicode')}"
    return found


def targets_of(domain: ET.Element) -> list[tuple[str | None, str | None]]:
    return [(find(d, "target").get("dev"), find(d, "target").get("bus")) for d in domain.iterfind("devices/disk")]


@pytest.fixture
def disk_files(tmp_path: Path) -> Path:
    """Real files behind the planned disks: small qcow2 images and a raw 'iso'."""
    for name in ("root.qcow2", "data.qcow2"):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / name), "16M"], check=True)
    (tmp_path / "seed.iso").write_bytes(bytes(2048))
    return tmp_path


@pytest.mark.parametrize(("firmware", "bus", "machine"), VARIANTS)
def test_firmware_selects_machine_and_os(tmp_path: Path, firmware: str, bus: str, machine: str) -> None:
    plan = make_plan(tmp_path, firmware=firmware, bus=bus)
    os = find(parsed(plan), "os")
    assert plan.machine == machine
    assert find(os, "type").attrib == {"arch": "x86_64", "machine": machine}
    if firmware == "bios":
        assert "firmware" not in os.attrib
        assert os.find("nvram") is None and os.find("firmware") is None
    else:
        assert os.get("firmware") == "efi"
        assert os.findtext("nvram") == str(tmp_path / "VARS.fd")
        features = {f.get("name"): f.get("enabled") for f in os.iterfind("firmware/feature")}
        assert features == {"secure-boot": "no", "enrolled-keys": "no"}


@pytest.mark.parametrize(
    ("bus", "targets"),
    [
        ("virtio", [("vda", "virtio"), ("vdb", "virtio"), ("sda", "sata")]),  # cd-rom moves to sata
        ("sata", [("sda", "sata"), ("sdb", "sata"), ("sdc", "sata")]),
        ("ide", [("hda", "ide"), ("hdb", "ide"), ("hdc", "ide")]),
    ],
)
def test_disks_get_targets_per_bus_and_cdroms_never_virtio(
    tmp_path: Path, bus: str, targets: list[tuple[str, str]]
) -> None:
    domain = parsed(make_plan(tmp_path, bus=bus))
    disks = domain.findall("devices/disk")
    assert targets_of(domain) == targets
    assert [d.get("device") for d in disks] == ["disk", "disk", "cdrom"]
    assert disks[2].find("readonly") is not None


@pytest.mark.parametrize(
    ("bus", "index", "name"),
    [
        ("virtio", 0, "vda"),
        ("virtio", 25, "vdz"),
        ("virtio", 26, "vdaa"),
        ("sata", 27, "sdab"),
        ("ide", 3, "hdd"),
        ("virtio", 701, "vdzz"),
        ("virtio", 702, "vdaaa"),
    ],
)
def test_target_names_follow_libvirt(bus: DiskBus, index: int, name: str) -> None:
    assert target_name(bus, index) == name


def test_targets_are_counted_per_bus_in_plan_order(tmp_path: Path) -> None:
    disks = [
        DiskPlan(str(tmp_path / "a"), device="cdrom"),
        DiskPlan(str(tmp_path / "b")),
        DiskPlan(str(tmp_path / "c"), bus="sata"),
        DiskPlan(str(tmp_path / "d"), bus="ide"),
        DiskPlan(str(tmp_path / "e")),
    ]
    assert disk_targets(disks) == ["sda", "vda", "sdb", "hda", "vdb"]


def test_first_disk_boots_even_after_a_cdrom(tmp_path: Path) -> None:
    plan = make_plan(
        tmp_path,
        disks=[
            DiskPlan(str(tmp_path / "seed.iso"), format="raw", device="cdrom"),
            DiskPlan(str(tmp_path / "root.qcow2")),
            DiskPlan(str(tmp_path / "data.qcow2")),
        ],
    )
    booting = [
        find(d, "target").get("dev") for d in parsed(plan).iterfind("devices/disk") if d.find("boot") is not None
    ]
    assert booting == ["vda"]


@pytest.mark.parametrize(("bus", "sata_controllers"), [("virtio", 1), ("sata", 1), ("ide", 0)])
def test_sata_controller_only_when_a_device_is_on_sata(tmp_path: Path, bus: str, sata_controllers: int) -> None:
    plan = make_plan(tmp_path, bus=bus)
    assert len(parsed(plan).findall("devices/controller[@type='sata']")) == sata_controllers


def test_domain_is_headless_with_logged_serial_console_and_acpi(tmp_path: Path) -> None:
    domain = parsed(make_plan(tmp_path))
    assert domain.findtext("name") == "edgevm-web-1"
    assert domain.find("devices/graphics") is None and domain.find("devices/video") is None
    assert domain.find("features/acpi") is not None
    assert [domain.findtext(t) for t in ("on_poweroff", "on_reboot", "on_crash")] == ["destroy", "restart", "destroy"]
    assert find(domain, "devices/memballoon").get("model") == "none"
    assert find(domain, "devices/serial").get("type") == "pty"
    assert find(domain, "devices/serial/log").attrib == {"file": str(tmp_path / "serial.log"), "append": "on"}
    assert find(domain, "devices/console/target").attrib == {"type": "serial", "port": "0"}
    nic = find(domain, "devices/interface[@type='bridge']")
    assert find(nic, "mac").get("address") == "52:54:00:12:34:56"
    assert find(nic, "source").get("bridge") == "edgevm-br0"
    assert find(nic, "model").get("type") == "virtio"


def test_nic_tap_names_and_bare_taps(tmp_path: Path) -> None:
    nics = [NicPlan("52:54:00:12:34:56", "evh-red", tap="evt-web-0"), NicPlan("52:54:00:12:34:57", None, tap="evt-web-1")]
    domain = parsed(make_plan(tmp_path, nics=nics))
    bridged = find(domain, "devices/interface[@type='bridge']")
    assert find(bridged, "target").get("dev") == "evt-web-0"
    bare = find(domain, "devices/interface[@type='ethernet']")
    assert find(bare, "target").get("dev") == "evt-web-1" and bare.find("source") is None


def test_memory_is_given_in_bytes(tmp_path: Path) -> None:
    memory = find(parsed(make_plan(tmp_path, memory_bytes=512 * MIB + 1)), "memory")
    assert memory.attrib == {"unit": "b"} and memory.text == str(512 * MIB + 1)


@pytest.mark.parametrize(("secure_boot", "enabled", "smm"), [(False, "no", None), (True, "yes", "on")])
def test_secure_boot_features(tmp_path: Path, secure_boot: bool, enabled: str, smm: str | None) -> None:
    domain = parsed(make_plan(tmp_path, firmware="uefi", secure_boot=secure_boot))
    features = {f.get("name"): f.get("enabled") for f in domain.iterfind("os/firmware/feature")}
    assert features == {"secure-boot": enabled, "enrolled-keys": enabled}
    smm_element = domain.find("features/smm")
    assert (None if smm_element is None else smm_element.get("state")) == smm


def test_metadata_round_trips(tmp_path: Path) -> None:
    xml = build_domain_xml(make_plan(tmp_path, name="db", revision=42))
    assert parse_metadata(xml) == DomainMetadata(vm="db", revision=42)
    assert ET.fromstring(xml).find(f"metadata/{{{NAMESPACE}}}vm") is not None


@pytest.mark.parametrize(
    ("xml", "expected"),
    [
        ("<domain><name>x</name></domain>", None),
        ("<domain><metadata><other xmlns='urn:x'/></metadata></domain>", None),
        ("<vm><name>db</name><revision>3</revision></vm>", DomainMetadata("db", 3)),  # virDomainGetMetadata's form
    ],
)
def test_metadata_absent_or_bare(xml: str, expected: DomainMetadata | None) -> None:
    assert parse_metadata(xml) == expected


def test_malformed_metadata_is_an_error() -> None:
    with pytest.raises(ValueError, match="malformed"):
        parse_metadata(f"<domain><metadata><e:vm xmlns:e='{NAMESPACE}'><e:name>x</e:name></e:vm></metadata></domain>")


def test_user_values_are_escaped_not_formatted(tmp_path: Path) -> None:
    awkward = tmp_path / "a'b\"c<d>&e]]>f.qcow2"
    plan = make_plan(tmp_path, disks=[DiskPlan(str(awkward))], serial_log_path=str(tmp_path / "&log'<"))
    domain = parsed(plan)
    assert find(domain, "devices/disk/source").get("file") == str(awkward)
    assert find(domain, "devices/serial/log").get("file") == str(tmp_path / "&log'<")


@pytest.mark.parametrize(
    ("changes", "complaint"),
    [
        ({"name": "Web"}, "VM name"),
        ({"uuid": "not-a-uuid"}, "uuid"),
        ({"vcpus": 0}, "vcpus"),
        ({"memory_bytes": 0}, "memory_bytes"),
        ({"domain_type": "xen"}, "domain type"),
        ({"firmware": "coreboot"}, "firmware"),
        ({"firmware": "uefi", "nvram_path": None}, "nvram_path"),
        ({"nvram_path": "/x/VARS.fd"}, "uefi domains only"),
        ({"secure_boot": True}, "uefi domains only"),
        ({"serial_log_path": "relative.log"}, "absolute"),
        ({"disks": [DiskPlan("/d", bus="ide")] * 5}, "at most 4 ide"),
        ({"firmware": "uefi", "nvram_path": "/v", "secure_boot": True, "disks": [DiskPlan("/d", bus="ide")]}, "q35"),
    ],
)
def test_plan_rejects_what_cannot_be_built(tmp_path: Path, changes: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        make_plan(tmp_path, **changes)


@pytest.mark.parametrize(
    ("build", "complaint"),
    [
        (lambda: DiskPlan("relative.qcow2"), "absolute"),
        (lambda: DiskPlan("/d", format="vmdk"), "disk format"),
        (lambda: DiskPlan("/d", bus="scsi"), "disk bus"),
        (lambda: NicPlan("01:00:5e:00:00:01", "br0"), "unicast"),
        (lambda: NicPlan("52:54:00:12:34:56", "a-bridge-name-too-long"), "interface name"),
        (lambda: NicPlan("52:54:00:12:34:56", "br0", model="rtl8139"), "NIC model"),
        (lambda: NicPlan("52:54:00:12:34:56", None), "needs a tap"),
        (lambda: NicPlan("52:54:00:12:34:56", "br0", tap="a-tap-name-far-too-long"), "NIC tap"),
    ],
)
def test_devices_reject_what_cannot_be_built(build: Any, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        build()


# ---- libvirt accepts the XML -------------------------------------------------------------------------


@pytest.fixture
def test_driver() -> Iterator[libvirt.virConnect]:
    conn = libvirt.open("test:///default")  # shared in-process; the test names are its own
    yield conn
    conn.close()


@pytest.fixture(scope="module")
def qemu_system() -> Iterator[libvirt.virConnect]:
    try:
        conn = libvirt.open("qemu:///system")
    except libvirt.libvirtError as error:
        pytest.skip(f"qemu:///system is not reachable: {error}")
    yield conn
    conn.close()


ACCEPTANCE_VARIANTS = [*VARIANTS, ("uefi-secure-boot", "virtio", "q35")]


def _acceptance_plan(directory: Path, firmware: str, bus: str, name: str) -> DomainPlan:
    secure = firmware == "uefi-secure-boot"
    return make_plan(
        directory,
        firmware="uefi" if secure else firmware,
        bus=bus,
        secure_boot=secure,
        name=name,
        nics=[NicPlan("52:54:00:12:34:56", "edgevm-br0"), NicPlan("52:54:00:12:34:57", "edgevm-br1", "e1000")],
    )


def _define_validated(conn: libvirt.virConnect, plan: DomainPlan) -> ET.Element:
    """Define the plan's XML with libvirt's schema check, and return the XML libvirt made of it."""
    domain = conn.defineXMLFlags(build_domain_xml(plan), libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
    try:
        assert parse_metadata(domain.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NAMESPACE)) == DomainMetadata(
            plan.name, plan.revision
        )
        return ET.fromstring(domain.XMLDesc(0))
    finally:
        domain.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM if conn.getType() == "QEMU" else 0)


@pytest.mark.parametrize(("firmware", "bus", "machine"), ACCEPTANCE_VARIANTS)
def test_test_driver_accepts_every_variant(
    test_driver: libvirt.virConnect, disk_files: Path, firmware: str, bus: str, machine: str
) -> None:
    plan = _acceptance_plan(disk_files, firmware, bus, "web-1")
    domain = _define_validated(test_driver, plan)
    assert parse_metadata(ET.tostring(domain, encoding="unicode")) == DomainMetadata("web-1", 7)
    assert find(domain, "os/type").get("machine") == machine
    assert find(domain, "memory").attrib == {"unit": "KiB"} and domain.findtext("memory") == str(512 * 1024)
    assert [dev for dev, _bus in targets_of(domain)] == disk_targets(plan.disks)


def test_libvirt_rounds_memory_up_to_whole_kib(test_driver: libvirt.virConnect, tmp_path: Path) -> None:
    domain = _define_validated(test_driver, make_plan(tmp_path, memory_bytes=512 * MIB + 1))
    assert domain.findtext("memory") == str(512 * 1024 + 1)


@pytest.mark.parametrize(("firmware", "bus", "machine"), ACCEPTANCE_VARIANTS)
def test_qemu_system_accepts_firmware_and_bus_variants(
    qemu_system: libvirt.virConnect, disk_files: Path, firmware: str, bus: str, machine: str
) -> None:
    """Defined only, never started: real boots are the guest tests' business."""
    name = f"xmltest-{uuid.uuid4().hex[:8]}"
    plan = _acceptance_plan(disk_files, firmware, bus, name)
    domain = _define_validated(qemu_system, plan)
    expanded = {"pc": "pc-i440fx-", "q35": "pc-q35-"}[machine]
    assert domain.get("type") == "qemu"
    assert find(domain, "os/type").get("machine", "").startswith(expanded)
    assert targets_of(domain) == [
        (t, disk.effective_bus) for t, disk in zip(disk_targets(plan.disks), plan.disks, strict=True)
    ]
    if any(disk.effective_bus == "sata" for disk in plan.disks):
        assert domain.find("devices/controller[@type='sata']") is not None
    if plan.firmware == "uefi":
        assert domain.findtext("os/nvram") == plan.nvram_path
    assert domain.find("devices/graphics") is None
