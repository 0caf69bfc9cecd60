"""The errors of the hypervisor boundary, and the translation of libvirt's by its symbolic error numbers."""

import libvirt

from edgevm.shared.errors import (
    BackendConflict,
    BackendError,
    BackendMissing,
    BackendTimeout,
    BackendUnavailable,
    BackendUnsupported,
    BackendWrongState,
)


class HypervisorError(BackendError):
    """An operation on the hypervisor failed; the message is libvirt's sentence."""


class DomainNotFound(HypervisorError, BackendMissing):
    """The domain does not exist."""

    field = "vm"  # the request field that names the VM in the commands that reach libvirt in a reply


class SnapshotNotFound(HypervisorError, BackendMissing):
    """The snapshot does not exist."""

    field = "name"


class DomainExists(HypervisorError, BackendConflict):
    """Another domain already holds this name or UUID."""


class OperationInvalid(HypervisorError, BackendWrongState):
    """The operation is not possible in the domain's current state (e.g. destroying a stopped domain)."""


class Unsupported(HypervisorError, BackendUnsupported):
    """The hypervisor cannot do this here (an unsupported configuration, operation or flag)."""


class HypervisorUnavailable(HypervisorError, BackendUnavailable):
    """The hypervisor cannot be reached (no connection, or the connection was lost)."""


class HypervisorTimeout(HypervisorError, BackendTimeout):
    """The hypervisor did not answer within the deadline."""


_BY_CODE: dict[int, type[HypervisorError]] = {
    libvirt.VIR_ERR_NO_DOMAIN: DomainNotFound,
    libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT: SnapshotNotFound,
    libvirt.VIR_ERR_DOM_EXIST: DomainExists,
    libvirt.VIR_ERR_OPERATION_INVALID: OperationInvalid,
    libvirt.VIR_ERR_CONFIG_UNSUPPORTED: Unsupported,
    libvirt.VIR_ERR_OPERATION_UNSUPPORTED: Unsupported,
    libvirt.VIR_ERR_NO_SUPPORT: Unsupported,
    libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED: Unsupported,
    libvirt.VIR_ERR_NO_CONNECT: HypervisorUnavailable,
    libvirt.VIR_ERR_INVALID_CONN: HypervisorUnavailable,
    libvirt.VIR_ERR_AUTH_FAILED: HypervisorUnavailable,
    libvirt.VIR_ERR_AUTH_UNAVAILABLE: HypervisorUnavailable,
    libvirt.VIR_ERR_OPERATION_TIMEOUT: HypervisorTimeout,
    libvirt.VIR_ERR_AGENT_UNRESPONSIVE: HypervisorTimeout,
}


def translate(error: libvirt.libvirtError, *, connection_alive: bool) -> HypervisorError:
    """Our error for a libvirt error; any error on a connection that is no longer alive means unavailable."""
    # A lost connection surfaces under several codes (VIR_ERR_SYSTEM_ERROR "Cannot recv data",
    # VIR_ERR_INTERNAL_ERROR "client socket is closed", VIR_ERR_RPC, ...) that also mean other things,
    # hence the liveness check rather than more codes.
    message = error.get_error_message() or str(error)
    if not connection_alive:
        return HypervisorUnavailable(message)
    return _BY_CODE.get(error.get_error_code() or 0, HypervisorError)(message)
