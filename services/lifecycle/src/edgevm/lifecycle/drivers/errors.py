"""The errors of the hypervisor boundary: what went wrong, never libvirt's own exception type."""


class HypervisorError(Exception):
    """An operation on the hypervisor failed; the message is a sentence fit for a user."""


class DomainNotFound(HypervisorError):
    """The domain does not exist."""


class DomainExists(HypervisorError):
    """Another domain already holds this name or UUID."""


class OperationInvalid(HypervisorError):
    """The operation is not possible in the domain's current state (e.g. destroying a stopped domain)."""


class Unsupported(HypervisorError):
    """The hypervisor cannot do this here (an unsupported configuration, operation or flag)."""


class HypervisorUnavailable(HypervisorError):
    """The hypervisor cannot be reached (no connection, or the connection was lost)."""


class HypervisorTimeout(HypervisorError):
    """The hypervisor did not answer within the deadline."""
