"""A state directory QEMU's user cannot reach: lifecycle opens its own directory, refuses a blocked parent."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from nats.aio.client import Client as NATS

from edgevm.cli.natsserver import NatsServer
from edgevm.lifecycle.drivers.host import guest_process_ids
from edgevm.lifecycle.reach import blocking_directory
from tests.helpers import ServiceProcess
from tests.lifecycle.conftest import start_node

URI = "qemu:///system"
pytestmark = pytest.mark.root  # chown, setpriv and libvirt's system daemon


def qemu_user() -> tuple[int, int]:
    """The uid and gid libvirt runs TCG guests as on this host (libvirt-qemu on Debian)."""
    connection = libvirt.open(URI)
    try:
        ids = guest_process_ids(connection.getCapabilities(), "qemu")
    finally:
        connection.close()
    assert ids is not None and ids[0] != 0, "this test needs QEMU to run as a user of its own"
    return ids


@pytest.fixture
def parent() -> Iterator[Path]:
    """A fresh directory in /tmp (which QEMU's user can enter), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="edgevm-t-reach-"))
    path.chmod(0o755)  # mkdtemp makes it 0700
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def enters_as(uid: int, gid: int, directory: Path) -> bool:
    """Whether a process of `uid` (with that user's groups) can enter `directory`, asked of the kernel."""
    done = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--init-groups", "test", "-x",
                           str(directory)], capture_output=True)
    return done.returncode == 0


@pytest.mark.parametrize(("mode", "owner", "group", "blocked"), [
    (0o700, 0, 0, True),  # a `mktemp -d`, a home directory
    (0o711, 0, 0, False),
    (0o750, 0, "qemu", False),  # QEMU's group may enter
    (0o705, 0, "qemu", True),  # its group may not, whatever others may
    (0o700, "qemu", 0, False),  # its own directory
])
def test_which_directory_stops_qemus_user(parent: Path, mode: int, owner: object, group: object,
                                          blocked: bool) -> None:
    uid, gid = qemu_user()
    below = parent / "gate" / "state"
    below.mkdir(parents=True)
    gate = parent / "gate"
    os.chown(gate, uid if owner == "qemu" else 0, gid if group == "qemu" else 0)
    gate.chmod(mode)
    found = blocking_directory(below, uid, {gid})
    assert found == (gate if blocked else None)
    assert enters_as(uid, gid, below) is not blocked  # the kernel agrees


def test_lifecycle_refuses_a_state_dir_under_a_directory_qemu_cannot_enter(
    parent: Path, nats_server: NatsServer
) -> None:
    parent.chmod(0o700)  # as `mktemp -d` makes it
    state = parent / "state"
    service = ServiceProcess("lifecycle", {
        "EDGEVM_NATS_URL": nats_server.url, "EDGEVM_NODE": f"n{uuid.uuid4().hex[:8]}", "EDGEVM_STATE_DIR": str(state),
        "EDGEVM_LIBVIRT_URI": URI, "EDGEVM_NETWORK": "none",
    }, parent.with_name(parent.name + ".log")).start()
    try:
        assert service.process is not None
        code = service.process.wait(60)
        log = service.log()
    finally:
        service.stop()
        parent.with_name(parent.name + ".log").unlink(missing_ok=True)
    assert code == 1, log
    [last] = log.strip().splitlines()[-1:]
    assert last.startswith("edgevm-lifecycle: QEMU runs guests as libvirt-qemu"), log
    assert f"cannot enter {parent} (mode 0700" in last and f"`chmod o+x {parent}`" in last, last
    assert "EDGEVM_STATE_DIR" in last and "Traceback" not in log, log


async def test_lifecycle_opens_its_own_state_dir_to_qemu(parent: Path, nats_server: NatsServer, nc: NATS) -> None:
    uid, gid = qemu_user()
    state = parent / "state"
    state.mkdir(mode=0o700)
    assert not enters_as(uid, gid, state)
    node = await start_node(nats_server, nc, uri=URI, state=state)
    try:
        assert stat.S_IMODE(state.stat().st_mode) == 0o701  # enter, not list
        assert enters_as(uid, gid, state / "lifecycle" / "vms")
    finally:
        await node.shutdown()
