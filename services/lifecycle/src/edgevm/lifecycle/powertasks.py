"""The bodies of the lifecycle's VM tasks: start, stop and delete a VM, its domain and its network."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import msgspec

from edgevm.lifecycle.network import VmNetwork
from edgevm.lifecycle.vmbuild import VmBuilder
from edgevm.lifecycle.vmstate import VmStates
from edgevm.shared.clock import now
from edgevm.shared.events import VmDeleted, VmStarted, VmStopped
from edgevm.shared.libvirt.errors import DomainNotFound, OperationInvalid
from edgevm.shared.libvirt.power import Power
from edgevm.shared.libvirt.states import DomainState
from edgevm.shared.objects import VmState
from edgevm.shared.taskrunner import Progress

log = logging.getLogger(__name__)
POLL = 0.25
OFF = (DomainState.SHUTOFF, DomainState.CRASHED)


class PowerTasks:
    """What vm.start, vm.stop, vm.restart and vm.delete do once their task runs (the VM's lease held)."""

    def __init__(self, states: VmStates, builder: VmBuilder, power: Power, network: VmNetwork) -> None:
        self.states = states
        self.records = states.records
        self.builder = builder
        self.power = power
        self.network = network

    async def start(self, name: str, progress: Progress) -> dict[str, Any] | None:
        """Start the domain, then its network; a VM whose network fails is taken down again."""
        await self.builder.repair(self.records.get(name))
        await progress(10, "starting the domain")
        failed: Exception | None = None
        async with self.states.transient(name, "starting"):
            try:
                await self.power.start(name)
            except OperationInvalid as exc:
                if await self.state_of(name) != DomainState.RUNNING:
                    failed = exc  # else it runs already
            except Exception as exc:
                failed = exc
            # libvirt's create() returns once the domain runs: no need to look again.
        if failed is not None:
            await self.states.set(self.records.get(name), "error", f"start failed: {failed}")
            raise failed
        try:
            await self.network.activate(name)
        except Exception as exc:
            # A VM whose port mappings could not be applied is not what was asked for: take it down again.
            log.warning("VM %s: network not applied, stopping it again: %s", name, exc)
            try:
                await self.power.destroy(name)
            except (OperationInvalid, DomainNotFound):
                pass
            await self.wait_off(name, 10)
            await self.states.set(self.records.get(name), "error", f"its network could not be applied: {exc}")
            raise
        await self.states.set(self.records.get(name), "running", event=VmStarted)
        return None

    async def stop(self, name: str, force: bool, progress: Progress,
                   timeout: float | None = None) -> dict[str, Any] | None:
        """ACPI shutdown, destroyed after `timeout` (the VM's stop_timeout by default; at once with `force`);
        then its network. A domain already off just ends the stop (a resumed stop may find it so)."""
        vm = self.records.get(name)
        if await self.state_of(name) in (*OFF, None):  # no domain (lost with the host's libvirt): off too
            if vm.status.state not in ("stopped", "defined", "crashed"):
                await self.states.set(vm, "stopped", event=VmStopped)
            await self.network_down(name)
            return {"forced": False}
        try:
            async with self.states.transient(name, "stopping"):
                stop_timeout = vm.spec.stop_timeout if timeout is None else timeout
                forced = await self._power_off(name, force, stop_timeout, progress)
        except Exception:
            # Whatever failed, the record must not stay `stopping`: take what libvirt says.
            with contextlib.suppress(Exception):
                real = await self.state_of(name)
                state: VmState = "running" if real in (DomainState.RUNNING, DomainState.PAUSED) else "stopped"
                if self.records.get(name).status.state != state:
                    await self.states.set(self.records.get(name), state)
            raise
        await self.states.set(self.records.get(name), "stopped", event=VmStopped)
        await self.network_down(name)
        return {"forced": forced}

    async def _power_off(self, name: str, force: bool, stop_timeout: float, progress: Progress) -> bool:
        """Power the domain off; return whether it had to be destroyed."""
        forced = force
        if not force:
            await progress(10, "ACPI shutdown sent")
            try:
                await self.power.shutdown(name)
            except OperationInvalid:
                pass  # it stopped meanwhile
            forced = not await self.wait_off(name, stop_timeout)
        if forced:
            await progress(90, "destroying the domain")
            try:
                await self.power.destroy(name)  # returns once the domain is off
            except OperationInvalid:
                await self.wait_off(name, 10)  # it was stopping by itself
        return forced

    async def delete(self, name: str, progress: Progress) -> dict[str, Any] | None:
        """Stop the VM (as vm.stop does) when running, release its network, remove domain, files, record."""
        vm = self.records.get(name)
        state = await self.state_of(name)
        if state not in (*OFF, None):
            await progress(10, "stopping the VM (ACPI, then killed after its stop_timeout)")
            await self.stop(name, False, progress)
        # Before anything is removed: a netplumb that cannot answer fails the task with the VM intact.
        await progress(50, "releasing its network")
        await self.network.release(name)
        await progress(60, "removing the domain and its files")
        try:
            await self.builder.definitions.undefine(name)
        except DomainNotFound:
            pass
        await self.builder.remove(name)
        await self.records.delete(name)
        await self.states.publisher.publish(VmDeleted(at=now(), vm=msgspec.structs.replace(
            vm, status=msgspec.structs.replace(vm.status, state="stopped", updated_at=now()))))
        return None

    async def network_down(self, name: str) -> None:
        """Take the VM's port mappings down (it is off); a failure is logged, never raised."""
        # The VM is off whatever the network says: a failure here leaves rules that netplumb removes at its
        # next reconcile (it follows edgevm_vms), so it is logged, not raised.
        try:
            await self.network.deactivate(name)
        except Exception as exc:
            log.warning("VM %s is off but its port mappings could not be removed now: %s", name, exc)

    async def wait_off(self, name: str, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the domain to be off; return whether it is."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        while await self.state_of(name) not in OFF:
            if loop.time() - start >= timeout:
                return False
            await asyncio.sleep(POLL)
        return True

    async def state_of(self, name: str) -> DomainState | None:
        """The domain's state, or None when it has no domain."""
        try:
            return await self.power.state(name)
        except DomainNotFound:
            return None
