"""The VMs of a node in the `edgevm_vms` bucket: their keys, their encoding, and reading them.

The lifecycle service is the only writer of its node's keys (lifecycle/records.py keeps them cached);
every other reader goes through `VmRecordReader`.
"""

from __future__ import annotations

import msgspec
from nats.js.errors import KeyDeletedError, KeyNotFoundError
from nats.js.kv import KeyValue

from edgevm.shared.bus import current_values
from edgevm.shared.errors import NotFound
from edgevm.shared.objects import Vm

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Vm)


def vm_record_key(node: str, vm: str) -> str:
    """The bucket key of VM `vm` of `node`."""
    return f"{node}.{vm}"


def encode_vm(vm: Vm) -> bytes:
    """A VM record as stored in the bucket."""
    return _encoder.encode(vm)


def decode_vm(data: bytes) -> Vm:
    """A VM record from the bucket."""
    return _decoder.decode(data)


class VmRecordReader:
    """Reads one node's VM records from the bucket."""

    def __init__(self, kv: KeyValue, node: str) -> None:
        self._kv = kv
        self._node = node

    async def get(self, vm: str, field: str = "vm") -> Vm:
        """Return the VM, or raise NotFound naming `field`."""
        try:
            entry = await self._kv.get(vm_record_key(self._node, vm))
        except (KeyNotFoundError, KeyDeletedError):
            raise NotFound(f"VM {vm} does not exist on node {self._node}", field) from None
        if not entry.value:
            raise NotFound(f"VM {vm} does not exist on node {self._node}", field)
        return decode_vm(entry.value)

    async def all(self) -> dict[str, tuple[Vm, int]]:
        """Every VM of the node with the bucket revision it is at, by name."""
        found = {}
        for entry in (await current_values(self._kv, f"{self._node}.>")).values():
            assert entry.value is not None
            vm = decode_vm(entry.value)
            found[vm.spec.name] = (vm, entry.revision or 0)
        return found
