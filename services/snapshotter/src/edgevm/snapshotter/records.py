"""The VMs of this node as the lifecycle service records them in `edgevm_vms` (read only here)."""

from __future__ import annotations

import msgspec
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from edgevm.shared.errors import NotFound
from edgevm.shared.objects import Vm

_decoder = msgspec.json.Decoder(Vm)


class VmRecords:
    """Reads one node's VM records; the lifecycle service is their only writer."""

    def __init__(self, kv: KeyValue, node: str) -> None:
        self._kv = kv
        self._node = node

    async def get(self, vm: str, field: str = "vm") -> Vm:
        """Return the VM, or raise NotFound naming `field`."""
        try:
            entry = await self._kv.get(f"{self._node}.{vm}")
        except KeyNotFoundError:
            raise NotFound(f"VM {vm} does not exist on node {self._node}", field) from None
        if not entry.value:
            raise NotFound(f"VM {vm} does not exist on node {self._node}", field)
        return _decoder.decode(entry.value)
