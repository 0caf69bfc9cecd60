"""The async libvirt driver against libvirt's test:///default hypervisor (and a host probe on qemu:///system)."""

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import libvirt
import pytest

from edgevm.lifecycle.drivers.host import (
    choose_domain_type,
    cpu_flags,
    detect_domain_type,
    kvm_device_usable,
    offers_kvm,
)
from edgevm.shared.libvirt.connection import HypervisorConnection
from edgevm.shared.libvirt.definitions import Definitions, DomainInfo
from edgevm.shared.libvirt.errors import (
    DomainExists,
    DomainNotFound,
    HypervisorTimeout,
    HypervisorUnavailable,
    OperationInvalid,
)
from edgevm.shared.libvirt.events import RESYNC, DomainEvent, LifecycleEvents
from edgevm.shared.libvirt.metadata import DomainMetadata
from edgevm.shared.libvirt.plan import DiskPlan, DomainPlan, Firmware
from edgevm.shared.libvirt.power import Power
from edgevm.shared.libvirt.states import DomainState, EventKind, event_from_libvirt, state_from_libvirt
from tests.helpers import eventually

EVENT_WAIT = 2.0  # seconds; the test driver delivers its events within milliseconds


def plan(vm: str, *, revision: int = 1, uuid_: str | None = None, firmware: Firmware = "bios") -> DomainPlan:
    return DomainPlan(
        name=vm,
        uuid=uuid_ or str(uuid.uuid4()),
        revision=revision,
        domain_type="qemu",
        firmware=firmware,
        vcpus=1,
        memory_bytes=256 * 1024 * 1024,
        serial_log_path=f"/var/log/edgevm/{vm}.log",
        nvram_path=f"/var/lib/edgevm/{vm}_VARS.fd" if firmware == "uefi" else None,
        disks=[DiskPlan(f"/var/lib/edgevm/{vm}.qcow2")],
    )


def _remove_edgevm_domains(conn: libvirt.virConnect) -> None:
    for domain in conn.listAllDomains():
        if domain.name().startswith("edgevm-"):
            if domain.isActive():
                domain.destroy()
            domain.undefine()


@pytest.fixture
async def connection() -> AsyncIterator[HypervisorConnection]:
    """A connection to test:///default with no edgevm domain on it, before and after the test.

    test:///default is one in-memory hypervisor per process, shared by every opening while any
    reference to it lives (a connection, a domain object, an event registration), so a test
    cannot count on a fresh one.
    """
    async with HypervisorConnection("test:///default", events=True, timeout=5.0) as conn:
        await conn.call(_remove_edgevm_domains)
        yield conn
        await conn.call(_remove_edgevm_domains)


class Domains:
    """The two capabilities the lifecycle drives, on one connection."""

    def __init__(self, connection: HypervisorConnection) -> None:
        self.power = Power(connection)
        self.definitions = Definitions(connection)


@pytest.fixture
def domains(connection: HypervisorConnection) -> Domains:
    return Domains(connection)


async def next_event(events: LifecycleEvents) -> DomainEvent:
    async with asyncio.timeout(EVENT_WAIT):
        return await anext(events)


async def test_define_start_shutdown_destroy_undefine(domains: Domains) -> None:
    vm_plan = plan("web")
    assert await domains.definitions.define(vm_plan) == vm_plan.uuid
    assert await domains.power.state("web") == DomainState.SHUTOFF
    await domains.power.start("web")
    assert await domains.power.state("web") == DomainState.RUNNING
    await domains.power.shutdown("web")  # the test driver powers off at once; QEMU would wait for the guest
    assert await domains.power.state("web") == DomainState.SHUTOFF
    await domains.power.start("web")
    await domains.power.destroy("web")
    assert await domains.power.state("web") == DomainState.SHUTOFF
    await domains.definitions.undefine("web")
    with pytest.raises(DomainNotFound):
        await domains.power.state("web")


async def test_undefine_uefi_domain(domains: Domains) -> None:
    """The NVRAM flag is refused by the test driver, so undefine falls back to the flags every driver knows."""
    await domains.definitions.define(plan("efi", firmware="uefi"))
    await domains.definitions.undefine("efi")
    assert await domains.definitions.list() == []


async def test_redefine_with_same_uuid_updates(domains: Domains) -> None:
    first = plan("web", revision=1)
    await domains.definitions.define(first)
    await domains.definitions.define(plan("web", revision=2, uuid_=first.uuid))
    [info] = await domains.definitions.list()
    assert info.metadata == DomainMetadata("web", 2)


@pytest.mark.parametrize("clash", ["name", "uuid"])
async def test_define_refuses_a_name_or_uuid_taken_by_another_domain(domains: Domains, clash: str) -> None:
    first = plan("web")
    await domains.definitions.define(first)
    second = plan("web") if clash == "name" else plan("db", uuid_=first.uuid)
    with pytest.raises(DomainExists, match=clash.upper() if clash == "uuid" else "name"):
        await domains.definitions.define(second)


async def test_define_refuses_a_domain_that_is_not_edgevms(domains: Domains) -> None:
    with pytest.raises(ValueError, match="not an edgevm domain"):
        await domains.definitions.define_xml("<domain type='test'><name>test2</name><memory>1024</memory></domain>")


async def _start_unknown(domains: Domains) -> None:
    await domains.power.start("nope")


async def _destroy_stopped(domains: Domains) -> None:
    await domains.definitions.define(plan("web"))
    await domains.power.destroy("web")


async def _undefine_unknown(domains: Domains) -> None:
    await domains.definitions.undefine("nope")


async def _xml_of_unknown(domains: Domains) -> None:
    await domains.definitions.xml("nope")


@pytest.mark.parametrize(
    ("operation", "error"),
    [
        (_start_unknown, DomainNotFound),
        (_destroy_stopped, OperationInvalid),
        (_undefine_unknown, DomainNotFound),
        (_xml_of_unknown, DomainNotFound),
    ],
)
async def test_libvirt_errors_are_translated(
    domains: Domains, operation: Callable[[Domains], Awaitable[None]], error: type[Exception]
) -> None:
    with pytest.raises(error) as raised:
        await operation(domains)
    assert not isinstance(raised.value, libvirt.libvirtError)
    assert raised.value.__suppress_context__  # raised from None: libvirt's exception adds nothing


async def test_list_holds_only_edgevm_domains_with_state_and_metadata(
    connection: HypervisorConnection, domains: Domains
) -> None:
    web, db = plan("web", revision=3), plan("db", revision=5)
    await domains.definitions.define(web)
    await domains.definitions.define(db)
    await domains.power.start("web")
    # test:///default comes with a running domain named "test": not ours, so never listed.
    assert "test" in await connection.call(lambda conn: [d.name() for d in conn.listAllDomains()])
    assert sorted(await domains.definitions.list(), key=lambda info: info.vm) == [
        DomainInfo("db", db.uuid, DomainState.SHUTOFF, DomainMetadata("db", 5)),
        DomainInfo("web", web.uuid, DomainState.RUNNING, DomainMetadata("web", 3)),
    ]


async def test_list_shows_a_domain_without_metadata(connection: HypervisorConnection, domains: Domains) -> None:
    await connection.call(
        lambda conn: conn.defineXML(
            "<domain type='test'><name>edgevm-bare</name><memory>1024</memory><os><type>hvm</type></os></domain>"
        )
    )
    [info] = await domains.definitions.list()
    assert (info.vm, info.metadata) == ("bare", None)


async def test_xml_is_the_live_or_the_inactive_definition(domains: Domains) -> None:
    await domains.definitions.define(plan("web"))
    await domains.power.start("web")
    assert "id=" in (await domains.definitions.xml("web")).split(">", 1)[0]  # a running domain's live XML has its id
    assert "id=" not in (await domains.definitions.xml("web", inactive=True)).split(">", 1)[0]


@pytest.mark.parametrize(
    ("state", "reason", "ours"),
    [
        (libvirt.VIR_DOMAIN_NOSTATE, 0, DomainState.UNKNOWN),
        (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_BOOTED, DomainState.RUNNING),
        (libvirt.VIR_DOMAIN_BLOCKED, 0, DomainState.RUNNING),
        (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_USER, DomainState.PAUSED),
        (libvirt.VIR_DOMAIN_PMSUSPENDED, 0, DomainState.PAUSED),
        (libvirt.VIR_DOMAIN_SHUTDOWN, 0, DomainState.SHUTTING_DOWN),
        (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN, DomainState.SHUTOFF),
        (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED, DomainState.SHUTOFF),
        (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_CRASHED, DomainState.CRASHED),
        (libvirt.VIR_DOMAIN_CRASHED, 0, DomainState.CRASHED),
        (99, 0, DomainState.UNKNOWN),
    ],
)
def test_state_mapping(state: int, reason: int, ours: DomainState) -> None:
    assert state_from_libvirt(state, reason) == ours


@pytest.mark.parametrize(
    ("event", "detail", "ours"),
    [
        (libvirt.VIR_DOMAIN_EVENT_DEFINED, 0, (EventKind.DEFINED, "")),
        (libvirt.VIR_DOMAIN_EVENT_UNDEFINED, 0, (EventKind.UNDEFINED, "")),
        (libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_STARTED_BOOTED, (EventKind.STARTED, "")),
        (libvirt.VIR_DOMAIN_EVENT_SUSPENDED, 0, (EventKind.PAUSED, "")),
        (libvirt.VIR_DOMAIN_EVENT_RESUMED, 0, (EventKind.RESUMED, "")),
        (libvirt.VIR_DOMAIN_EVENT_SHUTDOWN, 0, (EventKind.SHUTTING_DOWN, "")),
        (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN, (EventKind.STOPPED, "shutdown")),
        (
            libvirt.VIR_DOMAIN_EVENT_STOPPED,
            libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED,
            (EventKind.STOPPED, "destroyed"),
        ),
        (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED, (EventKind.CRASHED, "crashed")),
        (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED, (EventKind.CRASHED, "failed")),
        (libvirt.VIR_DOMAIN_EVENT_CRASHED, 0, (EventKind.CRASHED, "")),
        (99, 0, None),
    ],
)
def test_event_mapping(event: int, detail: int, ours: tuple[EventKind, str] | None) -> None:
    assert event_from_libvirt(event, detail) == ours


async def test_lifecycle_events_arrive_for_edgevm_domains_only(
    connection: HypervisorConnection, domains: Domains
) -> None:
    async with LifecycleEvents(connection) as events:
        await domains.definitions.define(plan("web"))
        await domains.power.start("web")
        await connection.call(lambda conn: conn.lookupByName("test").destroy())  # not ours: no event
        await domains.power.shutdown("web")
        await domains.power.start("web")
        await domains.power.destroy("web")
        await domains.definitions.undefine("web")
        received = [await next_event(events) for _ in range(6)]
    assert received == [
        DomainEvent("web", EventKind.DEFINED),
        DomainEvent("web", EventKind.STARTED),
        DomainEvent("web", EventKind.STOPPED, "shutdown"),  # the test driver emits no SHUTDOWN before it
        DomainEvent("web", EventKind.STARTED),
        DomainEvent("web", EventKind.STOPPED, "destroyed"),
        DomainEvent("web", EventKind.UNDEFINED),
    ]


async def test_a_consumer_that_falls_behind_gets_resync(connection: HypervisorConnection, domains: Domains) -> None:
    async with LifecycleEvents(connection, max_pending=2) as events:
        await domains.definitions.define(plan("web"))
        await domains.power.start("web")
        await domains.power.destroy("web")  # dropped: the queue holds two
        await domains.power.start("web")  # dropped
        await asyncio.sleep(0.05)  # let the test driver's dispatch timer run
        received = [await next_event(events) for _ in range(3)]
        await domains.power.destroy("web")  # caught up: delivered again
        received.append(await next_event(events))
    assert [event.kind for event in received] == [
        EventKind.DEFINED,
        EventKind.STARTED,
        EventKind.RESYNC,
        EventKind.STOPPED,
    ]


async def test_lost_connection_is_reopened_and_events_resume_with_resync(tmp_path: Path) -> None:
    # A test driver started from a file is private to its opening (unlike test:///default), so the
    # reopened connection is visibly a new one, and the dead one leaks nothing into other tests.
    (tmp_path / "node.xml").write_text("<node/>")
    async with (
        HypervisorConnection(f"test://{tmp_path}/node.xml", events=True, timeout=5.0) as connection,
        LifecycleEvents(connection) as events,
    ):
        domains = Domains(connection)
        await domains.definitions.define(plan("old"))
        assert await next_event(events) == DomainEvent("old", EventKind.DEFINED)
        # Close libvirt's connection under the driver: the next call finds it dead.
        await connection.call(lambda conn: conn.close())
        with pytest.raises(HypervisorUnavailable):
            await connection.call(lambda conn: conn.getURI())
        assert await next_event(events) == RESYNC
        assert await domains.definitions.list() == []
        await domains.definitions.define(plan("new"))
        assert await next_event(events) == DomainEvent("new", EventKind.DEFINED)


async def test_call_here_translates_errors_and_reopens_a_lost_connection(tmp_path: Path) -> None:
    (tmp_path / "node.xml").write_text("<node/>")
    async with HypervisorConnection(f"test://{tmp_path}/node.xml", timeout=5.0) as connection:
        uri = await asyncio.to_thread(connection.call_here, lambda conn: conn.getURI())
        assert uri == f"test://{tmp_path}/node.xml"
        with pytest.raises(DomainNotFound):  # libvirt's error, made ours as `call` makes it
            await asyncio.to_thread(connection.call_here, lambda conn: conn.lookupByName("nope"))
        with pytest.raises(RuntimeError, match="block the loop"):
            connection.call_here(lambda conn: conn.getURI())
        # Close libvirt's connection under the driver: a read on another thread finds it dead...
        await connection.call(lambda conn: conn.close())
        with pytest.raises(HypervisorUnavailable):
            await asyncio.to_thread(connection.call_here, lambda conn: conn.getURI())
        # ...which tells the event loop to reopen it, as a failed `call` does.
        await eventually(lambda: asyncio.to_thread(connection.call_here, lambda conn: conn.getURI()),
                         timeout=10, what="the lost connection reopened")
    with pytest.raises(HypervisorUnavailable):  # closed
        await asyncio.to_thread(connection.call_here, lambda conn: conn.getURI())


async def test_a_call_past_its_deadline_raises_timeout(connection: HypervisorConnection) -> None:
    with pytest.raises(HypervisorTimeout, match=r"0\.05 s"):
        await connection.call(lambda conn: time.sleep(0.5), timeout=0.05)


async def test_unreachable_hypervisor_is_unavailable() -> None:
    connection = HypervisorConnection("qemu+unix:///system?socket=/nonexistent/libvirt-sock", timeout=5.0)
    with pytest.raises(HypervisorUnavailable, match="cannot connect"):
        await connection.open()
    await connection.close()


@pytest.mark.parametrize(
    ("device_usable", "flags", "offered", "expected"),
    [
        (True, {"vmx", "sse2"}, True, "kvm"),
        (True, {"svm"}, True, "kvm"),
        (True, {"sse2"}, True, "qemu"),  # these machines: /dev/kvm answers, libvirt offers kvm, no VT-x
        (False, {"vmx"}, True, "qemu"),
        (True, {"vmx"}, False, "qemu"),  # e.g. the test driver, or QEMU without access to /dev/kvm
        (False, set(), False, "qemu"),
    ],
)
def test_choose_domain_type(device_usable: bool, flags: set[str], offered: bool, expected: str) -> None:
    chosen = choose_domain_type(kvm_device_usable=device_usable, cpu_flags=flags, hypervisor_offers_kvm=offered)
    assert chosen == expected


def test_host_probes(tmp_path: Path) -> None:
    assert cpu_flags("processor\t: 0\nflags\t\t: fpu vmx sse2\n\nprocessor\t: 1\n") == {"fpu", "vmx", "sse2"}
    assert cpu_flags("processor\t: 0\n") == frozenset()
    assert not kvm_device_usable(Path("/dev/null"))  # opens, but does not speak the KVM API
    assert not kvm_device_usable(tmp_path / "kvm")
    caps = "<capabilities><guest><arch name='x86_64'><domain type='qemu'/><domain type='kvm'/></arch></guest></capabilities>"
    assert offers_kvm(caps)
    assert not offers_kvm(caps.replace("x86_64", "i686"))


def _cpuinfo(tmp_path: Path, flags: str) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    return path


async def test_detect_domain_type_on_the_test_driver(connection: HypervisorConnection, tmp_path: Path) -> None:
    """The test driver offers no kvm domain type, so even a VT-x CPU with a working /dev/kvm gets qemu."""
    vt_x = _cpuinfo(tmp_path, "fpu vmx sse2")
    assert await detect_domain_type(connection, kvm_device=Path("/dev/kvm"), cpuinfo=vt_x) == "qemu"


@pytest.mark.skipif(not kvm_device_usable(Path("/dev/kvm")), reason="needs a /dev/kvm that answers")
async def test_detect_domain_type_on_qemu_system(tmp_path: Path) -> None:
    try:
        async with HypervisorConnection("qemu:///system", events=True, timeout=30.0) as connection:
            with_vt_x = await detect_domain_type(connection, cpuinfo=_cpuinfo(tmp_path, "fpu vmx sse2"))
            without = await detect_domain_type(connection, cpuinfo=_cpuinfo(tmp_path, "fpu sse2"))
            no_device = await detect_domain_type(
                connection, kvm_device=Path("/dev/null"), cpuinfo=_cpuinfo(tmp_path, "vmx")
            )
            this_host = await detect_domain_type(connection)
    except HypervisorUnavailable as error:
        pytest.skip(f"qemu:///system is not reachable: {error}")
    assert (with_vt_x, without, no_device) == ("kvm", "qemu", "qemu")
    has_vt_x = bool({"vmx", "svm"} & cpu_flags(Path("/proc/cpuinfo").read_text()))
    assert this_host == ("kvm" if has_vt_x else "qemu")
