"""Reconcile: the kernel checked piece by piece against `edgevm_net`, repaired, and cleared of leftovers.

Runs at start-up (after a restart the kernel may hold anything from nothing to all of it), on a timer, and
on request (`net.reconcile`, node-internal). When all is right it changes nothing: every table is read back
and compared, never re-applied blindly.

A pass over hundreds of VRFs takes seconds, so it is made in parts, each a change of its own: first the
node's own parts (leftovers, virtual networks, taps, wires, the node's table, the default VRF), then the
other VRFs a few at a time. Commands waiting meanwhile take their turn between two parts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial

from msgspec import Struct

from edgevm.netplumb import names
from edgevm.netplumb.converge import Outcome, Scope
from edgevm.netplumb.metrics import RECONCILE_CHANGES, RECONCILE_DURATION, RECONCILE_FAILURES
from edgevm.netplumb.nodenet import NodeNetwork
from edgevm.shared.commands import Empty

log = logging.getLogger(__name__)
VRFS_PER_PART = 16  # ~10 ms of verifying each: a part holds the kernel for a fraction of a command's deadline


class Reconciled(Struct):
    """Reply of `net.reconcile`: what had to change, and what could not be done."""

    changes: list[str]
    failures: list[str]


async def reconcile(net: NodeNetwork) -> Reconciled:
    """One verifying pass over every VRF, virtual network, table and wire of the node."""
    started = time.monotonic()
    try:
        outcome = await _verify_in_parts(net)
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


async def _verify_in_parts(net: NodeNetwork) -> Outcome:
    # The node's own parts go with the default VRF and the first VRFS_PER_PART others: a node of a few VRFs is
    # verified in one pass (each part reads the node's links again).
    others = [vrf.name for vrf in net.records.vrfs.all() if vrf.name != names.DEFAULT_VRF]
    node_part = Scope(vrfs=frozenset({names.DEFAULT_VRF, *others[:VRFS_PER_PART]}), node=True)
    outcome = await net.exclusive(lambda: net.converge(verify=True, scope=node_part))
    for start in range(VRFS_PER_PART, len(others), VRFS_PER_PART):
        part = Scope(vrfs=frozenset(others[start : start + VRFS_PER_PART]), node=False)
        done = await net.exclusive(partial(net.converge, verify=True, scope=part))
        outcome.changes += done.changes
        outcome.failures += done.failures
        outcome.namespaces |= done.namespaces
    return outcome


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
