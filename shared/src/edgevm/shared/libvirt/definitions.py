"""The definitions capability: define, undefine, read and list edgevm's domains by VM name."""

import logging
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass

import libvirt

from .connection import HypervisorConnection
from .domain_xml import build_domain_xml
from .errors import DomainExists
from .metadata import NAMESPACE, DomainMetadata, parse_metadata
from .naming import domain_name, vm_name
from .plan import DomainPlan
from .states import DomainState, state_from_libvirt

log = logging.getLogger(__name__)

# Undefining also removes what libvirt keeps beside the definition: the UEFI variables file, a managed
# save image, snapshot and checkpoint metadata (libvirt refuses to undefine while any of them exists).
UNDEFINE_FLAGS = (
    libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
    | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
    | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
)
# The flags every driver knows; the test driver rejects NVRAM and CHECKPOINTS_METADATA as unsupported.
UNDEFINE_FLAGS_COMMON = libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA


@dataclass(frozen=True, slots=True)
class DomainInfo:
    """One edgevm domain as listed: its VM, UUID, state and edgevm metadata (None when missing)."""

    vm: str
    uuid: str
    state: DomainState
    metadata: DomainMetadata | None


class Definitions:
    """The definitions of edgevm's domains; other domains on the host are never touched."""

    def __init__(self, connection: HypervisorConnection) -> None:
        self._connection = connection

    async def define(self, plan: DomainPlan) -> str:
        """Define (or redefine, same name and UUID) the domain of `plan`; returns its UUID."""
        return await self.define_xml(build_domain_xml(plan))

    async def define_xml(self, xml: str) -> str:
        """Define (or redefine) a domain from its XML: one read from libvirt and edited (the snapshotter
        points a disk at another image), or built from a plan; returns its UUID."""
        root = ET.fromstring(xml)
        name, uuid = root.findtext("name") or "", root.findtext("uuid")
        if vm_name(name) is None:
            raise ValueError(f"domain name {name!r} is not an edgevm domain name")

        def define(conn: libvirt.virConnect) -> str:
            try:
                return str(conn.defineXML(xml).UUIDString())
            except libvirt.libvirtError as error:
                if error.get_error_code() in (libvirt.VIR_ERR_OPERATION_FAILED, libvirt.VIR_ERR_DOM_EXIST):
                    # libvirt says "domain 'x' already exists with uuid ..." as a plain OPERATION_FAILED.
                    _raise_if_taken(conn, name, uuid)
                raise

        return await self._connection.call(define)

    async def undefine(self, vm: str) -> None:
        """Remove a domain's definition with its NVRAM and snapshot metadata; a running one becomes transient."""

        def undefine(conn: libvirt.virConnect) -> None:
            domain = conn.lookupByName(domain_name(vm))
            try:
                domain.undefineFlags(UNDEFINE_FLAGS)
            except libvirt.libvirtError as error:
                if error.get_error_code() != libvirt.VIR_ERR_INVALID_ARG:
                    raise
                domain.undefineFlags(UNDEFINE_FLAGS_COMMON)

        await self._connection.call(undefine)

    async def xml(self, vm: str, *, inactive: bool = False) -> str:
        """A domain's XML: the live one, or with inactive=True the definition used at next start (with its
        secrets, so that it can be defined again as it is)."""
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE if inactive else 0
        return await self._connection.call(lambda conn: str(conn.lookupByName(domain_name(vm)).XMLDesc(flags)))

    async def list(self) -> list[DomainInfo]:
        """Every edgevm domain with its state and metadata, read in one pass (one stats call for states)."""
        return await self._connection.call(_list_domains)


def _list_domains(conn: libvirt.virConnect) -> list[DomainInfo]:
    found = []
    for domain, stats in conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_STATE):
        vm = vm_name(domain.name())
        if vm is None:
            continue
        try:
            raw = domain.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NAMESPACE)
            metadata = parse_metadata(raw)
        except libvirt.libvirtError as error:
            if error.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                continue  # undefined since the stats were read
            if error.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                raise
            metadata = None
        except ValueError as error:
            log.warning("domain %s: %s", domain.name(), error)
            metadata = None
        state = state_from_libvirt(stats.get("state.state", -1), stats.get("state.reason", 0))
        found.append(DomainInfo(vm=vm, uuid=domain.UUIDString(), state=state, metadata=metadata))
    return found


def _raise_if_taken(conn: libvirt.virConnect, name: str, uuid: str | None) -> None:
    """Raise DomainExists when the name or the UUID belongs to another domain."""
    by_name = _lookup(conn.lookupByName, name)
    if by_name is not None and (uuid is None or by_name.UUIDString() != uuid.lower()):
        raise DomainExists(f"the name {name} is taken by the domain with UUID {by_name.UUIDString()}")
    by_uuid = _lookup(conn.lookupByUUIDString, uuid) if uuid else None
    if by_uuid is not None and by_uuid.name() != name:
        raise DomainExists(f"the UUID {uuid} is taken by the domain {by_uuid.name()}")


def _lookup(lookup: Callable[[str], libvirt.virDomain], key: str) -> libvirt.virDomain | None:
    try:
        return lookup(key)
    except libvirt.libvirtError as error:
        if error.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise
