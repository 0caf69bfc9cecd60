"""Self-healing of the active set: follows lifecycle's `edgevm_vms` bucket for what lifecycle's calls missed.

A VM's network changes on one path: lifecycle's `net.vm.activate|deactivate|release`, which it needs to
answer (a start whose rules cannot be applied fails). This watch only repairs where the VM's state and its
network record disagree afterwards: a call lost while netplumb was down or slow, a lifecycle that died
between writing the state and calling. Normally it finds them agreeing and does nothing (on a stop it may
come first: lifecycle writes `stopped` before it calls); whichever comes second finds the change made, so
each change is made, and announced with `net.applied`, once. Only VMs with a network record are acted on, and each
repair is the same idempotent call lifecycle makes.

A deleted key releases only a network recorded before the deletion: a VM deleted and created again under
the same name has been prepared anew since, and a late (or, after a restart, replayed) deletion of its
predecessor must not take its new address away.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

import msgspec
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from edgevm.netplumb.vms import VmNetCommands
from edgevm.shared.netstate import NetVmRef, VmNetRecord
from edgevm.shared.objects import VmState

log = logging.getLogger(__name__)
RUNNING: frozenset[str] = frozenset({"running"})
STOPPED: frozenset[str] = frozenset({"defined", "stopped", "crashed", "error"})


class _Status(msgspec.Struct):
    state: VmState


class _Vm(msgspec.Struct):
    status: _Status


_decoder = msgspec.json.Decoder(_Vm)


def _recorded_before(record: VmNetRecord, deleted: datetime | None) -> bool:
    """Whether a network record was last written before a deletion (when the deletion's time is unknown: yes)."""
    if deleted is None:
        return True
    return datetime.fromisoformat(record.updated_at.replace("Z", "+00:00")) <= deleted


async def follow_vms(
    kv: KeyValue, node: str, vms: VmNetCommands, record_of: Callable[[str], VmNetRecord | None]
) -> None:
    """Watches `<node>.*` in edgevm_vms for ever: running but inactive -> activate, stopped but active ->
    deactivate, gone -> release."""
    watcher = await kv.watch(f"{node}.*")
    try:
        async for entry in watcher:
            if entry is None or not entry.key:
                continue
            vm = entry.key[len(node) + 1 :]
            record = record_of(vm)
            if record is None:
                continue
            try:
                if entry.operation in (KV_DEL, KV_PURGE):
                    # nats.py types `created` as int but gives the message's datetime.
                    created: object = entry.created
                    if _recorded_before(record, created if isinstance(created, datetime) else None):
                        await vms.release(NetVmRef(vm=vm))
                    else:
                        log.info("VM %s was deleted before its network was prepared again: kept", vm)
                    continue
                state = _decoder.decode(entry.value or b"").status.state
                if state in RUNNING and not record.active:
                    await vms.activate(NetVmRef(vm=vm))
                elif state in STOPPED and record.active:
                    await vms.deactivate(NetVmRef(vm=vm))
            except msgspec.DecodeError:
                log.warning("edgevm_vms entry %s is not a VM; ignored", entry.key)
            except Exception as exc:
                log.warning("following VM %s (%s) failed: %s", vm, entry.key, exc)
    finally:
        await watcher.stop()  # type: ignore[no-untyped-call]
