"""The translation of libvirt's errors into ours, by libvirt's symbolic error numbers."""

import libvirt

from .errors import (
    DomainExists,
    DomainNotFound,
    HypervisorError,
    HypervisorTimeout,
    HypervisorUnavailable,
    OperationInvalid,
    Unsupported,
)

_BY_CODE: dict[int, type[HypervisorError]] = {
    libvirt.VIR_ERR_NO_DOMAIN: DomainNotFound,
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
