"""The VMs of this node in the `edgevm_vms` bucket, with a write-through cache that serves reads."""

from __future__ import annotations

import asyncio
import bisect

from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from edgevm.shared.errors import Conflict, NotFound
from edgevm.shared.objects import Vm
from edgevm.shared.records import VmRecordReader, encode_vm, vm_record_key


class VmRecords:
    """Desired state of the node's VMs; every write checks the bucket revision it last saw.

    The lifecycle service is the only writer of its node's keys, so the cache is the bucket's content;
    `vm.get` and `vm.list` never touch JetStream or libvirt.
    """

    def __init__(self, kv: KeyValue, node: str) -> None:
        self._kv = kv
        self._node = node
        self._vms: dict[str, Vm] = {}
        self._revisions: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def _key(self, name: str) -> str:
        return vm_record_key(self._node, name)

    async def load(self) -> None:
        """Read every VM of this node from the bucket into the cache."""
        found = await VmRecordReader(self._kv, self._node).all()
        self._vms = {name: vm for name, (vm, _) in found.items()}
        self._revisions = {name: revision for name, (_, revision) in found.items()}

    def get(self, name: str) -> Vm:
        """Return the VM, or raise NotFound."""
        vm = self._vms.get(name)
        if vm is None:
            raise NotFound(f"VM {name} does not exist", "name")
        return vm

    def find(self, name: str) -> Vm | None:
        """Return the VM or None."""
        return self._vms.get(name)

    def all(self) -> list[Vm]:
        """Return every VM, ordered by name."""
        return self.after(None)

    def after(self, name: str | None) -> list[Vm]:
        """Return the VMs whose names sort after `name` (whether or not a VM of that name exists), by name."""
        names = sorted(self._vms)
        start = 0 if name is None else bisect.bisect_right(names, name)
        return [self._vms[n] for n in names[start:]]

    async def create(self, vm: Vm) -> None:
        """Store a new VM; Conflict when the name is taken."""
        try:
            revision = await self._kv.create(self._key(vm.spec.name), encode_vm(vm))
        except KeyWrongLastSequenceError:
            raise Conflict(f"a VM named {vm.spec.name} exists already", "name") from None
        self._vms[vm.spec.name] = vm
        self._revisions[vm.spec.name] = revision

    async def save(self, vm: Vm) -> None:
        """Store a changed VM over the revision this cache last wrote; writes of one VM go one at a time."""
        name = vm.spec.name
        async with self._locks.setdefault(name, asyncio.Lock()):
            try:
                revision = await self._kv.update(self._key(name), encode_vm(vm), last=self._revisions[name])
            except KeyWrongLastSequenceError:
                raise Conflict(f"VM {name} was changed by someone else meanwhile: read it again", "name") from None
            self._vms[name] = vm
            self._revisions[name] = revision

    async def delete(self, name: str) -> None:
        """Forget a VM."""
        await self._kv.delete(self._key(name))
        self._vms.pop(name, None)
        self._revisions.pop(name, None)
        self._locks.pop(name, None)
