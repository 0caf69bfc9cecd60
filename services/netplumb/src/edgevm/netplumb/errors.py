"""Errors raised by netplumb's domain code and kernel drivers."""


class NetplumbError(Exception):
    """The root of every error netplumb raises on purpose."""


class KernelError(NetplumbError):
    """A kernel operation (netlink, nft, tc, sysctl) failed or did not answer in time."""


class ConflictError(NetplumbError):
    """A request collides with what is already planned (a port mapped twice, an address taken)."""


class ExhaustedError(NetplumbError):
    """A pool (subnet addresses, uplink networks) has no free member left."""
