"""How lifecycle plugs a VM into the node's network: it asks netplumb, in order, over NATS.

`net.vm.prepare` before the domain is defined (NICs and the cloud-init network-config), `net.vm.activate`
once the domain runs (port mappings, virtual IPs, virtual interfaces), `net.vm.deactivate` once it is off,
`net.vm.release` when the VM is gone. A node started with EDGEVM_NETWORK=none runs without netplumb: its
VMs get no NIC, and a spec that asks for more than the default VRF is refused with a 422.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Protocol

from edgevm.shared.client import Client
from edgevm.shared.errors import Unavailable, Unprocessable
from edgevm.shared.netstate import NetPrepare, NetPrepared, NetVmRef, NicRecord
from edgevm.shared.spec import Network, VmSpec

log = logging.getLogger(__name__)
PREPARE_TIMEOUT = 1.5


@dataclass(frozen=True)
class Attachment:
    """What the domain and the seed get from the network: the NICs and the network-config (or none)."""

    nics: list[NicRecord] = field(default_factory=list)
    network_config: str | None = None


class VmNetwork(Protocol):
    """The node's network as lifecycle sees it."""

    async def wait_ready(self) -> None: ...
    async def prepare(self, spec: VmSpec) -> Attachment: ...
    async def activate(self, vm: str) -> None: ...
    async def deactivate(self, vm: str) -> None: ...
    async def release(self, vm: str) -> None: ...


class NetplumbNetwork:
    """The node's netplumb service, asked over NATS; its errors (400/404/409/503) reach the caller as they are."""

    def __init__(self, client: Client) -> None:
        self.client = client

    async def wait_ready(self) -> None:
        """Wait until netplumb answers (it may start after lifecycle), retrying with backoff."""
        delay, waited = 0.2, 0.0
        while True:
            try:
                await self.client.call("net.vrf.list")
                return
            except Unavailable as exc:
                if waited < 30 <= waited + delay:
                    log.warning("netplumb does not answer yet (%s): lost domains and auto starts wait for it", exc)
                await asyncio.sleep(delay)
                waited += delay
                delay = min(delay * 2, 5.0)

    async def prepare(self, spec: VmSpec) -> Attachment:
        """Allocate (or keep) the VM's NICs for its network spec."""
        request = NetPrepare(vm=spec.name, network=spec.network, hostname=spec.hostname)
        try:
            # Within the 2 s a command has (vm.create, vm.update); the power tasks' calls may wait longer.
            async with asyncio.timeout(PREPARE_TIMEOUT):
                reply = await self.client.call("net.vm.prepare", request, NetPrepared)
        except TimeoutError:
            raise Unavailable(f"netplumb did not prepare VM {spec.name}'s network within {PREPARE_TIMEOUT:g} s",
                              "network") from None
        return Attachment(reply.nics, reply.network_config)

    async def activate(self, vm: str) -> None:
        """The VM runs: apply its port mappings, virtual IPs and virtual interfaces."""
        await self.client.call("net.vm.activate", NetVmRef(vm=vm))

    async def deactivate(self, vm: str) -> None:
        """The VM is off: remove what `activate` applied."""
        await self.client.call("net.vm.deactivate", NetVmRef(vm=vm))

    async def release(self, vm: str) -> None:
        """The VM is gone: free its addresses and forget it."""
        await self.client.call("net.vm.release", NetVmRef(vm=vm))


class NoNetwork:
    """A node without netplumb (EDGEVM_NETWORK=none): VMs have no NIC; anything beyond that is a 422."""

    async def wait_ready(self) -> None:
        """Nothing to wait for."""

    async def prepare(self, spec: VmSpec) -> Attachment:
        """Refuse a network this node cannot give; otherwise no NIC."""
        if spec.network != Network():
            raise Unprocessable(
                "network: this node runs without netplumb (EDGEVM_NETWORK=none), so a VM can have no VRF"
                " other than default, no port mappings, virtual networks or virtual interfaces",
                "network",
            )
        return Attachment()

    async def activate(self, vm: str) -> None:
        """Nothing to apply."""

    async def deactivate(self, vm: str) -> None:
        """Nothing to remove."""

    async def release(self, vm: str) -> None:
        """Nothing to free."""
