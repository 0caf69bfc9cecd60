"""The block jobs capability: resize and pull the disks of running edgevm domains, wait for their jobs."""

import asyncio

import libvirt

from .connection import HypervisorConnection
from .errors import HypervisorTimeout, OperationInvalid, Unsupported
from .naming import domain_name

POLL = 0.1


class BlockJobs:
    """Online disk operations on edgevm's domains, addressed by VM name and disk target (`vda`)."""

    def __init__(self, connection: HypervisorConnection) -> None:
        self._connection = connection

    async def resize(self, vm: str, path: str, size_bytes: int) -> None:
        """Grow the disk `path` of a running domain to `size_bytes` (the guest sees the new size at once)."""
        await self._connection.call(
            lambda conn: conn.lookupByName(domain_name(vm)).blockResize(
                path, size_bytes, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES
            )
        )

    async def pull(self, vm: str, target: str, base: str | None, timeout: float = 600) -> None:
        """Pull the data above `base` into the active image of `target` (online) and wait for the job."""
        await self._connection.call(lambda conn: conn.lookupByName(domain_name(vm)).blockRebase(target, base, 0, 0))
        await self.wait_job(vm, target, timeout)

    async def wait_job(self, vm: str, target: str, timeout: float = 600) -> None:
        """Wait until disk `target` has no block job."""

        def job(conn: libvirt.virConnect) -> bool:
            return bool(conn.lookupByName(domain_name(vm)).blockJobInfo(target, 0))

        try:
            async with asyncio.timeout(timeout):
                while True:
                    if not await self._connection.call(job):
                        return
                    await asyncio.sleep(POLL)
        except TimeoutError:
            raise HypervisorTimeout(f"the block job on {target} of VM {vm} did not end within {timeout:g} s") from None

    async def wait_idle(self, vm: str, timeout: float = 600) -> None:
        """Wait until no job runs on the domain (a snapshot libvirtd still takes for a dead caller)."""

        def job(conn: libvirt.virConnect) -> int:
            return int(conn.lookupByName(domain_name(vm)).jobInfo()[0])

        try:
            async with asyncio.timeout(timeout):
                while True:
                    if await self._connection.call(job) == libvirt.VIR_DOMAIN_JOB_NONE:
                        return
                    await asyncio.sleep(POLL)
        except Unsupported:
            return  # the driver keeps no jobs (libvirt's test driver)
        except OperationInvalid:
            return  # the domain is not running: no job can run on it
        except TimeoutError:
            raise HypervisorTimeout(f"a job on VM {vm} did not end within {timeout:g} s") from None
