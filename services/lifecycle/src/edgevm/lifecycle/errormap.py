"""How the errors of the lifecycle's backends reply: one registration per boundary error."""

from __future__ import annotations

from edgevm.lifecycle.drivers.errors import (
    DomainExists,
    DomainNotFound,
    HypervisorError,
    HypervisorTimeout,
    HypervisorUnavailable,
    OperationInvalid,
    Unsupported,
)
from edgevm.lifecycle.imagestore import ImageExists, QemuImgError
from edgevm.shared.errors import (
    Conflict,
    Internal,
    NotFound,
    Unavailable,
    Unprocessable,
    register_translation,
)


def register() -> None:
    """Register the lifecycle's backend errors with the shared error table."""
    register_translation(DomainNotFound, NotFound)
    register_translation(DomainExists, Conflict)
    register_translation(OperationInvalid, Conflict)
    register_translation(Unsupported, Unprocessable)
    register_translation(HypervisorUnavailable, Unavailable)
    register_translation(HypervisorTimeout, Unavailable)
    register_translation(ImageExists, Conflict)
    register_translation(QemuImgError, Internal)
    # Any other libvirt failure: its message is libvirt's sentence, the cause stays a 500.
    register_translation(HypervisorError, Internal)
