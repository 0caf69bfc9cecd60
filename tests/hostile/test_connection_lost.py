"""Both ends of a reply NATS cannot carry: the adapter never sends one (it counts the headers too), and a
service whose connection the server closes for good anyway exits non-zero (so it is restarted)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from edgevm.cli.natsserver import find_nats_server, free_port, wait_for_port
from edgevm.shared import subjects
from edgevm.shared.commands import VmRef
from edgevm.shared.endpoint import CommandService
from edgevm.shared.errors import Conflict
from tests.helpers import ServiceProcess, eventually


def _config(port: int, store: Path, max_payload: int) -> str:
    return f"port: {port}\nhost: 127.0.0.1\nmax_payload: {max_payload}\njetstream {{ store_dir: {str(store)!r} }}\n"


@pytest.fixture
def auth_server(tmp_path: Path) -> Iterator[tuple[int, Path, subprocess.Popen[bytes]]]:
    """A nats-server of its own whose max_payload the test can change (and reload)."""
    port = free_port()
    config = tmp_path / "nats.conf"
    config.write_text(_config(port, tmp_path / "js", 1024 * 1024))
    process = subprocess.Popen([find_nats_server(), "--config", str(config)], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_port("127.0.0.1", port, 15, process)
        yield port, config, process
    finally:
        process.terminate()
        process.wait(10)


@pytest.mark.parametrize("name", ["gateway", "lifecycle", "snapshotter"])
async def test_a_service_exits_non_zero_when_the_server_closes_its_connection_for_good(
    auth_server: tuple[int, Path, subprocess.Popen[bytes]], tmp_path: Path, name: str
) -> None:
    port, config, server = auth_server
    url = f"nats://127.0.0.1:{port}"
    env = {"EDGEVM_NATS_URL": url, "EDGEVM_NODE": "lost", "EDGEVM_STATE_DIR": str(tmp_path / "state"),
           "EDGEVM_LIBVIRT_URI": "test:///default", "EDGEVM_NETWORK": "none"}
    service = ServiceProcess(name, env, tmp_path / "service.log").start()
    try:
        nc = await nats.connect(url)
        try:
            await eventually(lambda: nc.request(f"$SRV.PING.edgevm-{name}", b"", timeout=0.5), timeout=30,
                             what=f"edgevm-{name} answers")
            # The service still believes in the max_payload it connected with; its next larger message (the
            # $SRV.INFO reply) is a violation: the server closes the connection with an error, and nats-py
            # closes for good then (the 2 MB error reply did the same).
            config.write_text(_config(port, tmp_path / "js", 128))
            os.kill(server.pid, signal.SIGHUP)
            await asyncio.sleep(0.5)
            await nc.publish(f"$SRV.INFO.edgevm-{name}", b"", reply=nc.new_inbox())
        finally:
            await nc.close()
        assert service.process is not None
        code = await asyncio.to_thread(service.process.wait, 20)
        assert code == 1, service.log()
        assert "closed for good" in service.log() and "Traceback" not in service.log(), service.log()
    finally:
        service.stop()


async def test_an_error_reply_whose_headers_pass_max_payload_is_replaced_by_a_short_422(
    auth_server: tuple[int, Path, subprocess.Popen[bytes]],
) -> None:
    port, config, server = auth_server
    config.write_text(_config(port, config.parent / "js", 1024))
    os.kill(server.pid, signal.SIGHUP)
    await asyncio.sleep(0.5)
    nc = await nats.connect(f"nats://127.0.0.1:{port}")
    try:
        assert nc.max_payload == 1024
        service = CommandService(nc, "edgevm-test")
        await service.start()

        async def busy(ref: VmRef) -> None:
            # ~650 bytes of body and as much again in the Nats-Service-Error header: the body alone fits.
            raise Conflict("the VM is busy: " + "x" * 600, "name")

        await service.add(subjects.command("n1", "vm.busy"), busy, verb="vm.busy")
        msg = await nc.request(subjects.command("n1", "vm.busy"), b'{"name": "a"}', timeout=2)
        assert msg.headers is not None and msg.headers["Nats-Service-Error-Code"] == "422", msg.data
        assert "1024 bytes" in msg.headers["Nats-Service-Error"]
        assert nc.is_connected, "the server did not close the connection"
        await service.stop()
    finally:
        await nc.close()
