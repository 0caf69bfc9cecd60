"""Domain states and lifecycle event kinds as edgevm sees them, mapped from libvirt's numbers."""

from enum import StrEnum

import libvirt


class DomainState(StrEnum):
    """The state of a domain."""

    RUNNING = "running"
    PAUSED = "paused"
    SHUTTING_DOWN = "shutting_down"
    SHUTOFF = "shutoff"
    CRASHED = "crashed"
    UNKNOWN = "unknown"


class EventKind(StrEnum):
    """What a lifecycle event says happened to a domain."""

    DEFINED = "defined"
    UNDEFINED = "undefined"
    STARTED = "started"
    PAUSED = "paused"
    RESUMED = "resumed"
    SHUTTING_DOWN = "shutting_down"
    STOPPED = "stopped"
    CRASHED = "crashed"
    # Not from libvirt: events may have been lost (reconnect, overflow); re-read every domain's state.
    RESYNC = "resync"


# Where this loses detail: BLOCKED (waiting on a resource) is still running to us; PMSUSPENDED (the guest
# put itself to sleep) is paused; SHUTOFF keeps only one reason: CRASHED (with on_crash=destroy a crashed
# guest ends shut off with reason "crashed"), every other reason (shutdown, destroyed, saved, ...) is shutoff.
_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: DomainState.UNKNOWN,
    libvirt.VIR_DOMAIN_RUNNING: DomainState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: DomainState.RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: DomainState.PAUSED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: DomainState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: DomainState.SHUTTING_DOWN,
    libvirt.VIR_DOMAIN_SHUTOFF: DomainState.SHUTOFF,
    libvirt.VIR_DOMAIN_CRASHED: DomainState.CRASHED,
}


def state_from_libvirt(state: int, reason: int) -> DomainState:
    """Our state for libvirt's (state, reason) pair, as returned by virDomainGetState."""
    if state == libvirt.VIR_DOMAIN_SHUTOFF and reason == libvirt.VIR_DOMAIN_SHUTOFF_CRASHED:
        return DomainState.CRASHED
    return _STATES.get(state, DomainState.UNKNOWN)


_EVENTS = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: EventKind.DEFINED,
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: EventKind.UNDEFINED,
    libvirt.VIR_DOMAIN_EVENT_STARTED: EventKind.STARTED,
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: EventKind.PAUSED,
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: EventKind.PAUSED,
    libvirt.VIR_DOMAIN_EVENT_RESUMED: EventKind.RESUMED,
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: EventKind.SHUTTING_DOWN,
    libvirt.VIR_DOMAIN_EVENT_STOPPED: EventKind.STOPPED,
    libvirt.VIR_DOMAIN_EVENT_CRASHED: EventKind.CRASHED,
}

_STOPPED_DETAILS = {
    libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED: "destroyed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_MIGRATED: "migrated",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_SAVED: "saved",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED: "failed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_FROM_SNAPSHOT: "from_snapshot",
}


def event_from_libvirt(event: int, detail: int) -> tuple[EventKind, str] | None:
    """Our event kind and a detail word for a libvirt lifecycle event; None for events we do not know."""
    kind = _EVENTS.get(event)
    if kind is None:
        return None
    if kind is EventKind.STOPPED:
        word = _STOPPED_DETAILS.get(detail, "")
        # A guest that crashed or whose QEMU died ("failed") did not stop because anyone asked it to.
        if word in ("crashed", "failed"):
            return EventKind.CRASHED, word
        return kind, word
    return kind, ""
