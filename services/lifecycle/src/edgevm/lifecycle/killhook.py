"""A kill point for crash tests: the process SIGKILLs itself at a chosen step of a chosen task kind.

Only tests set EDGEVM_TEST_KILL_AT, to `<kind>:<step>`: the step is a progress message of the task
(`vm.stop:ACPI shutdown sent`) or `begin`, the moment its work starts. Unset, tasks run untouched.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from edgevm.shared.taskrunner import Progress, Work

KILL_HOOK = "EDGEVM_TEST_KILL_AT"
BEGIN = "begin"


def with_kill_hook(kind: str, work: Work) -> Work:
    """`work`, killing this process at the step EDGEVM_TEST_KILL_AT names for tasks of `kind`."""
    wanted_kind, _, step = os.environ.get(KILL_HOOK, "").partition(":")
    if wanted_kind != kind or not step:
        return work

    async def hooked(progress: Progress) -> dict[str, Any] | None:
        async def report(percent: int, message: str) -> None:
            await progress(percent, message)
            if message == step:
                os.kill(os.getpid(), signal.SIGKILL)

        if step == BEGIN:
            os.kill(os.getpid(), signal.SIGKILL)
        return await work(report)

    return hooked
