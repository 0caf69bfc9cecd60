"""libnftables (the library the `nft` command is made of) through ctypes, for reading tables without a process.

A reconcile reads the `edgevm` table of every namespace each time; `nft -j list` costs a process (~5 ms) each,
the library call a fraction of that. The library opens its netlink socket when its context is made, so a
context made inside a namespace (`entered`) reads that namespace. Like any netlink call it has no timeout of
its own: the kernel answers a listing at once.
"""

import ctypes
import ctypes.util

from edgevm.netplumb.drivers.netns import entered
from edgevm.netplumb.errors import KernelError

_OUTPUT_JSON = 1 << 4  # NFT_CTX_OUTPUT_JSON


def _load() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("nftables") or "libnftables.so.1")
    except OSError:
        return None
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_output_get_flags.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_output_get_flags.restype = ctypes.c_uint
    lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
    for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
        getattr(lib, name).argtypes = [ctypes.c_void_p]
    for name in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
        getattr(lib, name).argtypes = [ctypes.c_void_p]
        getattr(lib, name).restype = ctypes.c_char_p
    lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
    return lib


_lib = _load()


def available() -> bool:
    """Whether libnftables could be loaded (else callers run the `nft` command)."""
    return _lib is not None


def run_json(command: str, netns: str | None = None) -> str:
    """Runs one nft command with JSON output inside a namespace; returns what it printed."""
    assert _lib is not None, "libnftables is not available"
    with entered(netns):
        ctx = _lib.nft_ctx_new(0)  # NFT_CTX_DEFAULT: opens the netlink socket here, in `netns`
    if not ctx:
        raise KernelError(f"libnftables could not start in namespace {netns}")
    try:
        _lib.nft_ctx_output_set_flags(ctx, _lib.nft_ctx_output_get_flags(ctx) | _OUTPUT_JSON)
        _lib.nft_ctx_buffer_output(ctx)
        _lib.nft_ctx_buffer_error(ctx)
        code = _lib.nft_run_cmd_from_buffer(ctx, command.encode())
        output = (_lib.nft_ctx_get_output_buffer(ctx) or b"").decode()
        if code != 0:
            where = f" in namespace {netns}" if netns else ""
            error = (_lib.nft_ctx_get_error_buffer(ctx) or b"").decode().strip()
            raise KernelError(f"nft {command}{where} failed: {error}")
        return output
    finally:
        _lib.nft_ctx_free(ctx)
