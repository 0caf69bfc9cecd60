"""The one error table: every backend error kind, and the drivers' errors of every service that subclass
them, reply with the protocol code of their kind, keep their message and their field, and need no
registration."""

from __future__ import annotations

import subprocess
import sys

import nats.errors
import pytest

from edgevm.flowwatch.history import HistoryTimeout
from edgevm.flowwatch.terminate import TerminateFailed
from edgevm.lifecycle.imagestore import ImageExists, ImageRejected
from edgevm.netplumb.errors import ConflictError, ExhaustedError, KernelError
from edgevm.shared.errors import (
    BackendConflict,
    BackendError,
    BackendMissing,
    BackendTimeout,
    BackendUnavailable,
    BackendUnsupported,
    BackendWrongState,
    Conflict,
    FieldError,
    to_edgevm_error,
)
from edgevm.shared.libvirt.errors import (
    DomainExists,
    DomainNotFound,
    HypervisorError,
    HypervisorTimeout,
    HypervisorUnavailable,
    OperationInvalid,
    SnapshotNotFound,
    Unsupported,
)
from edgevm.shared.qemuimg import QemuImgError
from edgevm.shared.taskrunner import LeaseLost

CASES = [
    (BackendMissing("gone"), "404", None),
    (BackendConflict("taken"), "409", None),
    (BackendWrongState("not now"), "409", None),
    (BackendUnsupported("cannot"), "422", None),
    (BackendUnavailable("down"), "503", None),
    (BackendTimeout("slow"), "503", None),
    (BackendError("broke"), "500", None),
    (DomainNotFound("Domain not found"), "404", "vm"),
    (SnapshotNotFound("Domain snapshot not found"), "404", "name"),
    (DomainExists("the name is taken"), "409", None),
    (OperationInvalid("domain is not running"), "409", None),
    (Unsupported("unsupported configuration"), "422", None),
    (HypervisorUnavailable("cannot connect"), "503", None),
    (HypervisorTimeout("no answer within 30 s"), "503", None),
    (HypervisorError("internal error"), "500", None),
    (QemuImgError("qemu-img info failed: no such file"), "500", None),
    (ImageExists("the image store already has an image named 'x'"), "409", None),
    (ImageRejected("format", "must be one of qcow2, raw, iso"), "400", "format"),
    (FieldError("cpu", "must be at least 1"), "400", "cpu"),
    (LeaseLost("the lease on VM x expired"), "409", None),
    (nats.errors.TimeoutError(), "503", None),
    (KernelError("nft: the table could not be applied"), "503", None),
    (ConflictError("port 8080 of eth0 is mapped already"), "409", None),
    (ExhaustedError("no free address left in 10.0.0.0/30"), "409", None),
    (HistoryTimeout("the flow history (JetStream) did not answer in time"), "503", None),
    (TerminateFailed("the flow could not be cut (timed out); it is still active"), "503", None),
]


@pytest.mark.parametrize(("error", "code", "field"), CASES, ids=lambda v: type(v).__name__ if isinstance(v, Exception) else None)
def test_each_error_replies_with_the_code_of_its_kind(error: Exception, code: str, field: str | None) -> None:
    reply = to_edgevm_error(error)
    assert reply is not None and (reply.code, reply.field) == (code, field)
    assert reply.message == (str(error) or reply.message)


def test_an_unexpected_error_has_no_reply_of_its_own() -> None:
    assert to_edgevm_error(KeyError("x")) is None  # the adapter logs it and answers a plain 500


def test_lease_lost_is_a_conflict_not_a_hand_set_code() -> None:
    assert isinstance(LeaseLost("x"), Conflict) and "code" not in vars(LeaseLost)


def test_the_table_is_complete_without_any_service_set_up() -> None:
    # A fresh interpreter that imports the drivers only: no service's set-up has run, nothing registered.
    code = ("from edgevm.shared.errors import to_edgevm_error;"
            "from edgevm.shared.libvirt.errors import DomainNotFound;"
            "print(to_edgevm_error(DomainNotFound('gone')).code)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "404"


def test_a_connection_without_events_leaves_libvirts_event_loop_to_another_service() -> None:
    # libvirt takes one event implementation per process: the snapshotter's connection must not take it.
    code = """
import asyncio
from edgevm.shared.libvirt import event_loop
from edgevm.shared.libvirt.connection import HypervisorConnection

async def main():
    async with HypervisorConnection("test:///default") as quiet:
        await quiet.call(lambda conn: conn.getHostname())
    print(event_loop._registered is None)
    async with HypervisorConnection("test:///default", events=True):
        pass
    print(event_loop._registered is None)

asyncio.run(main())
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert done.stdout.split() == ["True", "False"]
