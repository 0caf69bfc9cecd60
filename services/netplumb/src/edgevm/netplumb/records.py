"""The node's records in the `edgevm_net` bucket, with a write-through cache that serves every read.

Netplumb is the only writer of its node's keys, so the cache is the bucket's content; every write names
the revision this cache last wrote (a second writer would be answered 409, never silently overwritten).
"""

from __future__ import annotations

from typing import Generic, TypeVar

import msgspec
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from edgevm.shared.bus import current_values
from edgevm.shared.errors import Conflict
from edgevm.shared.netstate import VmNetRecord, VnetRecord, VrfRecord, vm_key, vnet_key, vrf_key

R = TypeVar("R", VrfRecord, VnetRecord, VmNetRecord)
_encoder = msgspec.json.Encoder()


class RecordSet(Generic[R]):
    """One kind of record (VRFs, virtual networks or VMs) of the node, by name."""

    def __init__(self, kv: KeyValue, node: str, kind: str, record_type: type[R]) -> None:
        self._kv = kv
        self._node = node
        self._kind = kind
        self._decoder = msgspec.json.Decoder(record_type)
        self._items: dict[str, R] = {}
        self._revisions: dict[str, int] = {}

    def key(self, name: str) -> str:
        """The bucket key of a record."""
        return f"{self._node}.{self._kind}.{name}"

    def load(self, entries: dict[str, KeyValue.Entry]) -> None:
        """Fill the cache from the node's entries read from the bucket."""
        prefix = f"{self._node}.{self._kind}."
        for key, entry in entries.items():
            if key.startswith(prefix) and entry.value:
                self._items[key[len(prefix) :]] = self._decoder.decode(entry.value)
                self._revisions[key[len(prefix) :]] = entry.revision or 0

    def get(self, name: str) -> R | None:
        """The record, or None."""
        return self._items.get(name)

    def all(self) -> list[R]:
        """Every record, ordered by name."""
        return [self._items[name] for name in sorted(self._items)]

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    async def put(self, name: str, record: R) -> None:
        """Create or update the record over the revision this cache last saw."""
        data = _encoder.encode(record)
        try:
            if name in self._revisions:
                revision = await self._kv.update(self.key(name), data, last=self._revisions[name])
            else:
                revision = await self._kv.create(self.key(name), data)
        except KeyWrongLastSequenceError:
            raise Conflict(f"{self.key(name)} was changed by another writer; retry") from None
        self._items[name] = record
        self._revisions[name] = revision

    async def delete(self, name: str) -> None:
        """Forget the record (nothing happens when there is none)."""
        if name not in self._items:
            return
        await self._kv.delete(self.key(name))
        self._items.pop(name, None)
        self._revisions.pop(name, None)


class NetRecords:
    """Every record of the node: VRFs, virtual networks and VM networks."""

    def __init__(self, kv: KeyValue, node: str) -> None:
        self._kv = kv
        self._node = node
        self.vrfs: RecordSet[VrfRecord] = RecordSet(kv, node, "vrf", VrfRecord)
        self.vnets: RecordSet[VnetRecord] = RecordSet(kv, node, "vnet", VnetRecord)
        self.vms: RecordSet[VmNetRecord] = RecordSet(kv, node, "vm", VmNetRecord)
        assert self.vrfs.key("x") == vrf_key(node, "x") and self.vnets.key("x") == vnet_key(node, "x")
        assert self.vms.key("x") == vm_key(node, "x")

    async def load(self) -> None:
        """Read every record of the node into the cache, in one pass over the bucket."""
        entries = await current_values(self._kv, f"{self._node}.>")
        for records in (self.vrfs, self.vnets, self.vms):
            records.load(entries)
