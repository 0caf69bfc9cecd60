"""How the errors of the snapshotter's backends reply: one registration per boundary error."""

from __future__ import annotations

from edgevm.shared.errors import Conflict, Internal, NotFound, Unavailable, Unprocessable, register_translation
from edgevm.snapshotter.drivers.errors import (
    DomainNotFound,
    HypervisorError,
    HypervisorTimeout,
    HypervisorUnavailable,
    ImageToolError,
    OperationInvalid,
    SnapshotNotFound,
    Unsupported,
)


def register() -> None:
    """Register the snapshotter's backend errors with the shared error table."""
    register_translation(DomainNotFound, NotFound)
    register_translation(SnapshotNotFound, NotFound)
    register_translation(OperationInvalid, Conflict)
    register_translation(Unsupported, Unprocessable)
    register_translation(HypervisorUnavailable, Unavailable)
    register_translation(HypervisorTimeout, Unavailable)
    register_translation(ImageToolError, Internal)
    # Any other libvirt failure: its message is libvirt's sentence, the cause stays a 500.
    register_translation(HypervisorError, Internal)
