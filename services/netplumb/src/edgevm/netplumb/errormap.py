"""How netplumb's own errors reply: one registration per boundary error."""

from __future__ import annotations

from edgevm.netplumb.errors import ConflictError, ExhaustedError, KernelError
from edgevm.shared.errors import Conflict, Unavailable, register_translation


def register() -> None:
    """Register netplumb's errors with the shared error table."""
    register_translation(KernelError, Unavailable)
    register_translation(ConflictError, Conflict)
    register_translation(ExhaustedError, Conflict)
