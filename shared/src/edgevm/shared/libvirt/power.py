"""The power capability: start, shut down and destroy edgevm's domains, read and wait for their state."""

import asyncio

import libvirt

from .connection import HypervisorConnection
from .errors import HypervisorTimeout, OperationInvalid
from .naming import domain_name
from .states import DomainState, state_from_libvirt

POLL = 0.1
# Paused counts as running here: a paused domain has a live QEMU.
LIVE_STATES = (DomainState.RUNNING, DomainState.PAUSED)


class Power:
    """The power state of edgevm's domains, addressed by VM name."""

    def __init__(self, connection: HypervisorConnection) -> None:
        self._connection = connection

    async def start(self, vm: str, *, timeout: float | None = None) -> None:
        """Start a defined domain; returns once it runs."""
        await self._connection.call(lambda conn: conn.lookupByName(domain_name(vm)).create(), timeout=timeout)

    async def shutdown(self, vm: str) -> None:
        """Ask the guest to power off, as the power button does; returns before the guest is off."""
        # Flags 0 lets the driver choose: QEMU presses the ACPI power button when the domain has no guest
        # agent channel (ours have none), and the test driver accepts no other flags.
        await self._connection.call(lambda conn: conn.lookupByName(domain_name(vm)).shutdownFlags(0))

    async def destroy(self, vm: str) -> None:
        """Power a domain off at once, like pulling the plug; returns once it is off."""
        await self._connection.call(lambda conn: conn.lookupByName(domain_name(vm)).destroy())

    async def state(self, vm: str) -> DomainState:
        """The current state of a domain."""

        def state(conn: libvirt.virConnect) -> DomainState:
            code, reason = conn.lookupByName(domain_name(vm)).state()
            return state_from_libvirt(code, reason)

        return await self._connection.call(state)

    async def is_running(self, vm: str) -> bool:
        """Whether the domain runs (paused counts as running: it has a live QEMU)."""
        return await self.state(vm) in LIVE_STATES

    async def power_on(self, vm: str, timeout: float = 60) -> None:
        """Start the domain and wait until it runs."""
        await self.start(vm, timeout=timeout)
        await self.wait(vm, running=True, timeout=timeout)

    async def power_off(self, vm: str, timeout: float = 30) -> None:
        """Destroy the domain (if it runs) and wait until it is off."""
        try:
            await self.destroy(vm)
        except OperationInvalid:
            pass  # it is off already
        await self.wait(vm, running=False, timeout=timeout)

    async def wait(self, vm: str, *, running: bool, timeout: float) -> None:
        """Wait until the domain runs (or is off); HypervisorTimeout after `timeout` seconds."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    if await self.is_running(vm) == running:
                        return
                    await asyncio.sleep(POLL)
        except TimeoutError:
            state = "start" if running else "stop"
            raise HypervisorTimeout(f"VM {vm} did not {state} within {timeout:g} s") from None
