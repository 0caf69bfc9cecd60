"""The errors of the snapshotter's backends: what went wrong, never libvirt's own exception type."""


class HypervisorError(Exception):
    """An operation on the hypervisor failed; the message is a sentence fit for a user."""


class DomainNotFound(HypervisorError):
    """The domain does not exist."""

    field = "vm"  # the request field that named it


class SnapshotNotFound(HypervisorError):
    """The snapshot does not exist."""

    field = "name"


class OperationInvalid(HypervisorError):
    """The operation is not possible in the domain's current state."""


class Unsupported(HypervisorError):
    """The hypervisor cannot do this here (e.g. an internal snapshot of a VM with pflash firmware)."""


class HypervisorUnavailable(HypervisorError):
    """The hypervisor cannot be reached (no connection, or the connection was lost)."""


class HypervisorTimeout(HypervisorError):
    """The hypervisor did not answer within the deadline."""


class ImageToolError(Exception):
    """qemu-img failed; the message carries its own explanation."""
