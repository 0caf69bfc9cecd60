"""The translation of libvirt's errors into the snapshotter's, by libvirt's symbolic error numbers."""

import libvirt

from .errors import (
    DomainNotFound,
    HypervisorError,
    HypervisorTimeout,
    HypervisorUnavailable,
    OperationInvalid,
    SnapshotNotFound,
    Unsupported,
)

_BY_CODE: dict[int, type[HypervisorError]] = {
    libvirt.VIR_ERR_NO_DOMAIN: DomainNotFound,
    libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT: SnapshotNotFound,
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
}


def translate(error: libvirt.libvirtError, *, connection_alive: bool) -> HypervisorError:
    """Our error for a libvirt error; any error on a connection that is no longer alive means unavailable."""
    message = error.get_error_message() or str(error)
    if not connection_alive:
        return HypervisorUnavailable(message)
    return _BY_CODE.get(error.get_error_code() or 0, HypervisorError)(message)
