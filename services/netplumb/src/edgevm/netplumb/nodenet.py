"""The node's network as netplumb holds it: its records, the plumber of its kernel, and the one queue every
change to them goes through."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from edgevm.netplumb.converge import EVERYTHING, Outcome, Plumber, Scope
from edgevm.netplumb.desired import Desired, PlanCache, desired
from edgevm.netplumb.errors import KernelError
from edgevm.netplumb.metrics import CONVERGE_NAMESPACES
from edgevm.netplumb.records import NetRecords
from edgevm.netplumb.settings import Settings
from edgevm.shared.background import Background
from edgevm.shared.clock import now
from edgevm.shared.events import NetApplied, NetFailed
from edgevm.shared.netstate import NetFailure
from edgevm.shared.publisher import EventPublisher

log = logging.getLogger(__name__)
T = TypeVar("T")


def _report_unawaited(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("a change went on after its caller stopped waiting, and failed: %s", task.exception())


class NodeNetwork:
    """The node's network: owns its records and kernel; changes run one at a time, each to its end once started.

    A command's deadline may end the wait for a change but never a change that has begun: it is shielded, so
    records and kernel never part half-way. Kernel work runs on a single worker thread.
    """

    def __init__(
        self, node: str, records: NetRecords, plumber: Plumber, settings: Settings, publisher: EventPublisher | None
    ) -> None:
        self.node = node
        self.records = records
        self.plumber = plumber
        self.settings = settings
        self._publisher = publisher
        self._lock = asyncio.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netplumb-kernel")
        self._changes = Background("netplumb changes")
        self.last_outcome = Outcome()
        self._plans: PlanCache = {}  # a VRF's plan is made once per record, not on every change

    async def kernel(self, work: Callable[..., T], *args: Any) -> T:
        """Runs blocking kernel work on the kernel thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, work, *args)

    async def exclusive(self, change: Callable[[], Awaitable[T]]) -> T:
        """Runs `change` alone, to its end even when the caller stops waiting once it has begun.

        A change still queued behind others when its caller stops waiting (the command's deadline: a 503) never
        begins: the 503 is then the truth, and a flood of commands leaves no backlog that runs on for minutes.
        """
        began = False

        async def locked() -> T:
            nonlocal began
            async with self._lock:
                began = True
                return await change()

        task = self._changes.start(locked(), "a change", log_failure=False)  # the caller hears
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if began:
                task.add_done_callback(_report_unawaited)  # no one is left to hear how it ended
            else:
                task.cancel()  # still waiting for the lock: nothing was changed
            raise

    def desired(self) -> Desired:
        """What the kernel must hold now, from the records."""
        return desired(
            self.records.vrfs.all(),
            self.records.vnets.all(),
            self.records.vms.all(),
            self.settings.netns_prefix,
            self.settings.vxlan_local,
            self._plans,
        )

    async def converge(self, verify: bool = False, scope: Scope = EVERYTHING) -> Outcome:
        """Brings the kernel to the records within `scope` (call it inside `exclusive`)."""
        outcome = await self.kernel(self.plumber.converge, self.desired(), verify, scope)
        CONVERGE_NAMESPACES.labels("reconcile" if verify else "change").observe(len(outcome.namespaces))
        self.last_outcome = outcome
        for change in outcome.changes:
            log.info("applied: %s", change)
        return outcome

    async def converge_or_raise(self, concerns: Callable[[NetFailure], bool], scope: Scope = EVERYTHING) -> Outcome:
        """Converges; raises KernelError naming the failed steps that `concerns` the caller."""
        outcome = await self.converge(scope=scope)
        failures = [failure for failure in outcome.failures if concerns(failure)]
        if failures:
            raise KernelError("; ".join(map(str, failures)))
        return outcome

    async def published(self, vm: str, detail: Any, failed: bool = False) -> None:
        """Publishes net.applied (or net.failed) for a VM; a bus failure is logged, not raised."""
        if self._publisher is None:
            return
        event = (NetFailed if failed else NetApplied)(at=now(), vm=vm, detail=detail)
        try:
            await self._publisher.publish(event)
        except Exception as exc:
            log.warning("could not publish %s for %s: %s", type(event).__name__, vm, exc)

    async def close(self) -> None:
        """Lets the changes in flight end (for up to 30 s), then stops the kernel thread."""
        await self._changes.drain(30)
        self._executor.shutdown(wait=True)
