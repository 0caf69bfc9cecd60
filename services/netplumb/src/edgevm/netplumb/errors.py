"""Errors raised by netplumb's domain code and kernel drivers, each of a backend kind of the shared error
table (shared.errors), which says how it replies."""

from edgevm.shared.errors import BackendConflict, BackendError, BackendUnavailable


class NetplumbError(BackendError):
    """The root of every error netplumb raises on purpose."""


class KernelError(NetplumbError, BackendUnavailable):
    """A kernel operation (netlink, nft, tc, sysctl) failed or did not answer in time."""


class ConflictError(NetplumbError, BackendConflict):
    """A request collides with what is already planned (a port mapped twice, an address taken)."""


class ExhaustedError(NetplumbError, BackendConflict):
    """A pool (subnet addresses, uplink networks) has no free member left."""
