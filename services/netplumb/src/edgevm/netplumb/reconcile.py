"""Reconcile: the kernel checked piece by piece against `edgevm_net`, repaired, and cleared of leftovers.

Runs at start-up (after a restart the kernel may hold anything from nothing to all of it), on a timer, and
on request (`net.reconcile`, node-internal). When all is right it changes nothing: every table is read back
and compared, never re-applied blindly.
"""

from __future__ import annotations

import asyncio
import logging
import time

from msgspec import Struct

from edgevm.netplumb.metrics import RECONCILE_CHANGES, RECONCILE_DURATION, RECONCILE_FAILURES
from edgevm.netplumb.nodenet import NodeNetwork
from edgevm.shared.commands import Empty

log = logging.getLogger(__name__)


class Reconciled(Struct):
    """Reply of `net.reconcile`: what had to change, and what could not be done."""

    changes: list[str]
    failures: list[str]


async def reconcile(net: NodeNetwork) -> Reconciled:
    """One verifying pass over every VRF, virtual network, table and wire of the node."""
    started = time.monotonic()
    try:
        outcome = await net.exclusive(lambda: net.converge(verify=True))
    except Exception:
        RECONCILE_FAILURES.inc()
        raise
    finally:
        RECONCILE_DURATION.observe(time.monotonic() - started)
    RECONCILE_CHANGES.inc(len(outcome.changes))
    RECONCILE_FAILURES.inc(len(outcome.failures))
    for failure in outcome.failures:
        log.error("reconcile: %s", failure)
    return Reconciled(changes=outcome.changes, failures=[str(failure) for failure in outcome.failures])


class ReconcileCommand:
    """Handler of `net.reconcile`."""

    def __init__(self, net: NodeNetwork) -> None:
        self._net = net

    async def reconcile(self, _: Empty) -> Reconciled:
        """net.reconcile: reconcile now."""
        return await reconcile(self._net)


async def reconcile_forever(net: NodeNetwork, interval: float) -> None:
    """Reconciles every `interval` seconds for the life of the service."""
    while True:
        await asyncio.sleep(interval)
        try:
            await reconcile(net)
        except Exception:
            log.exception("periodic reconcile failed")
