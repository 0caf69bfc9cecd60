"""Keeping VM records true to libvirt: at start-up (reconcile, recover) and after every domain event."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from edgevm.lifecycle.powertasks import PowerTasks
from edgevm.shared.errors import Unavailable
from edgevm.shared.events import VmCrashed, VmStarted, VmStopped
from edgevm.shared.libvirt.events import LifecycleEvents
from edgevm.shared.libvirt.states import DomainState, EventKind
from edgevm.shared.locks import VmLocks
from edgevm.shared.objects import VmState
from edgevm.shared.taskrunner import TaskRunner

log = logging.getLogger(__name__)
LEASE_RECHECK = 0.5
# The record's state for a domain's real state at start-up (a shut-off domain is handled on its own).
_RECORDED: dict[DomainState, VmState] = {
    DomainState.RUNNING: "running",
    DomainState.PAUSED: "running",
    DomainState.CRASHED: "crashed",
}


class Reconciler:
    """Brings recorded VM states in line with their domains; owns the re-checks it schedules."""

    def __init__(self, node: str, tasks: PowerTasks, runner: TaskRunner, locks: VmLocks,
                 start: Callable[[str], Awaitable[Any]]) -> None:
        self.node = node
        self.tasks = tasks
        self.records = tasks.records
        self.states = tasks.states
        self.runner = runner
        self.locks = locks
        self._start = start  # vm.start as a command: a task under the VM's lease
        self.strays: set[str] = set()  # record-less edgevm domains found at reconcile
        self._rechecks: dict[str, asyncio.Task[None]] = {}
        self._missing: list[str] = []  # from reconcile, for recover
        self._restart: list[str] = []

    async def follow(self, events: LifecycleEvents) -> None:
        """Keep VM states true to libvirt's lifecycle events (a guest that powers itself off is `stopped`)."""
        async for event in events:
            try:
                if event.kind == EventKind.RESYNC or event.vm is None:
                    for vm in self.records.all():
                        await self.on_domain_event(vm.spec.name)
                elif event.kind in (EventKind.STARTED, EventKind.STOPPED, EventKind.CRASHED, EventKind.RESUMED):
                    await self.on_domain_event(event.vm)
            except Exception:
                log.exception("libvirt event %s of %s not applied", event.kind, event.vm)

    async def on_domain_event(self, name: str) -> None:
        """A libvirt lifecycle event for `name`: look at the domain unless one of our tasks is at work on it."""
        if self.runner.holds(name):
            await self.observe(name, None)  # schedules the look for when the task ends
            return
        await self.observe(name, await self.tasks.state_of(name))

    async def observe(self, name: str, state: DomainState | None) -> None:
        """Bring a VM's recorded state in line with its domain's real state (from an event or a resync)."""
        if self.records.find(name) is None:
            return
        if self.runner.holds(name) or await self.locks.holder(name) is not None:
            # An operation (ours or another service's) holds the VM: look again once it lets go, since a
            # snapshotter's lease records nothing of the VM's power state.
            if name not in self._rechecks:
                self._rechecks[name] = asyncio.create_task(self._observe_after_lease(name))
            return
        vm = self.records.find(name)  # again: the awaits above may have let another write in
        if vm is None:
            return
        if state == DomainState.RUNNING and vm.status.state != "running":
            await self.states.set(vm, "running", event=VmStarted)
        elif state == DomainState.SHUTOFF and vm.status.state in ("running", "starting", "stopping"):
            await self.states.set(vm, "stopped", event=VmStopped)
            await self.tasks.network_down(name)
        elif state == DomainState.CRASHED and vm.status.state != "crashed":
            await self.states.set(vm, "crashed", event=VmCrashed)
            await self.tasks.network_down(name)

    async def _observe_after_lease(self, name: str) -> None:
        # Leases live in JetStream KV, so there is nothing local to wait on: poll until it is released.
        try:
            while True:
                try:
                    if not self.runner.holds(name) and await self.locks.holder(name) is None:
                        break
                except Unavailable as exc:
                    log.warning("VM %s: its lease cannot be read now (%s); looking again", name, exc)
                await asyncio.sleep(LEASE_RECHECK)
        finally:
            # Gone from the table before looking: a lease taken meanwhile schedules a new look.
            self._rechecks.pop(name, None)
        await self.observe(name, await self.tasks.state_of(name))

    async def close(self) -> None:
        """Cancel the pending re-checks and wait for them (at shutdown)."""
        jobs = list(self._rechecks.values())
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)

    async def reconcile(self) -> list[str]:
        """At start-up, before commands: take real states, report stray domains; return the strays.

        What needs the network (defining a lost domain again, starting auto_start VMs) is left to `recover`,
        which waits for netplumb: it may start after this service.
        """
        domains = {d.vm: d for d in await self.tasks.builder.definitions.list()}
        self._missing, self._restart = [], []
        for vm in self.records.all():
            name = vm.spec.name
            # `stopping` was on its way down: a VM someone was stopping is not started again.
            was_up = vm.status.state in ("running", "starting")
            if name not in domains:
                log.warning("VM %s has no domain: it will be defined again from its spec", name)
                self._missing.append(name)
                if vm.status.state in ("running", "starting", "stopping"):
                    await self.states.set(vm, "stopped", event=VmStopped)
                if was_up and vm.spec.auto_start:
                    self._restart.append(name)
                continue
            real = domains[name].state
            wanted = _RECORDED.get(real)
            if wanted is None and real == DomainState.SHUTOFF and vm.status.state not in ("defined", "stopped"):
                wanted = "stopped"
                if was_up and vm.spec.auto_start:
                    self._restart.append(name)
            if wanted is not None and wanted != vm.status.state:
                await self.states.set(vm, wanted)
        self.strays = set(domains) - {vm.spec.name for vm in self.records.all()}
        for stray in sorted(self.strays):
            log.warning("domain edgevm-%s has no VM record on node %s: left alone, remove it by hand", stray,
                        self.node)
        return sorted(self.strays)

    def keep_off(self, name: str) -> None:
        """Do not start `name` again in `recover`: a stop or delete of it was cut by the restart (resumed)."""
        with contextlib.suppress(ValueError):
            self._restart.remove(name)

    async def recover(self) -> None:
        """After `reconcile`, once the network answers: define lost domains again, start auto_start VMs.

        A VM with `auto_start` that was running when the node went down (its record says so, its domain is
        off now: the host rebooted or libvirt lost it) is started again, as Proxmox' "start at boot" does.
        A VM someone stopped stays stopped.
        """
        builder = self.tasks.builder
        await self.tasks.network.wait_ready()
        for name in self._missing:
            vm = self.records.find(name)
            if vm is None:
                continue
            try:
                await builder.define(vm.spec, vm.status.revision, builder.check_spec(vm.spec))
            except Exception as exc:
                log.error("VM %s could not be defined again: %s", name, exc)
                await self.states.set(vm, "error", f"its domain was missing and could not be defined: {exc}")
                with contextlib.suppress(ValueError):
                    self._restart.remove(name)
        for name in self._restart:
            log.info("VM %s (auto_start) was running before the node went down: starting it again", name)
            try:
                await self._start(name)
            except Exception as exc:
                log.error("VM %s could not be started again: %s", name, exc)
        self._missing, self._restart = [], []
