"""Network namespaces: create and remove them, run commands and set sysctls inside them.

A namespace argument of None means the namespace this process runs in; that is how a whole node can
live inside `ip netns exec <node>` and still be driven the same way.

A namespace name is a bind mount on /run/netns/<name>, and mounts belong to mount namespaces. A
process started by `ip netns exec` gets a mount namespace of its own whose mounts never reach the
host: a namespace it names is seen only by it and its children, and dies with the last of them,
leaving an empty file behind. So all processes of a node that must see its VRF namespaces have to
share one mount namespace (children of one `edgevm node up`, or systemd units without
PrivateMounts=/PrivateTmp=), and a leftover file is cleared before its name is used again.
"""

import os
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager

from edgevm.netplumb.errors import KernelError
from edgevm.shared import netns as shared_netns
from edgevm.shared.netns import NETNS_DIR

COMMAND_TIMEOUT = 10.0


@contextmanager
def entered(name: str | None) -> Iterator[None]:
    """Runs the calling thread (only it) inside the named namespace, and brings it back after.

    A netlink socket or a /proc/sys/net file opened inside stays bound to that namespace. This replaces
    pyroute2's way of reaching a namespace (it forks a child, which in an asyncio process can wake the
    parent's signal handlers with the SIGTERM pyroute2 ends the child with), and costs no process. Only
    entering is translated to KernelError: what the body raises reaches the caller as it is.
    """
    with ExitStack() as stack:
        try:
            stack.enter_context(shared_netns.entered(name))
        except shared_netns.NamespaceNotFound:
            raise KernelError(f"network namespace {name} cannot be opened: it does not exist") from None
        except OSError as exc:
            raise KernelError(f"network namespace {name} cannot be entered: {exc.strerror}") from None
        yield


def command(argv: Sequence[str], netns: str | None = None) -> list[str]:
    """The argument list running `argv` inside `netns` (unchanged for the current namespace)."""
    return list(argv) if netns is None else ["ip", "netns", "exec", netns, *argv]


def run(
    argv: Sequence[str], netns: str | None = None, stdin: str | None = None, timeout: float = COMMAND_TIMEOUT
) -> str:
    """Runs a command in a namespace and returns its stdout; raises KernelError when it fails."""
    result = run_all([(argv, netns)], stdin, timeout)[0]
    if isinstance(result, KernelError):
        raise result
    return result


def run_all(
    commands: Sequence[tuple[Sequence[str], str | None]], stdin: str | None = None, timeout: float = COMMAND_TIMEOUT
) -> list[str | KernelError]:
    """Runs commands, each in its namespace, side by side; returns each one's stdout or the KernelError it met.

    They start together and are waited for in turn, so N short commands take about the time of the
    slowest, not their sum; all share one deadline of `timeout`.
    """
    started: list[subprocess.Popen[str] | KernelError] = []
    try:
        for argv, netns in commands:
            try:
                # The child starts in the namespace this thread entered, without `ip netns exec`'s extra process.
                with entered(netns):
                    started.append(
                        subprocess.Popen(
                            argv,
                            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE,
                            text=True,
                        )
                    )
            except OSError as exc:
                started.append(KernelError(f"cannot run {argv[0]}: {exc.strerror}"))
            except KernelError as exc:
                started.append(exc)
        deadline = time.monotonic() + timeout
        results: list[str | KernelError] = []
        for (argv, netns), process in zip(commands, started, strict=True):
            if isinstance(process, KernelError):
                results.append(process)
                continue
            try:
                out, err = process.communicate(stdin, timeout=max(deadline - time.monotonic(), 0.001))
            except subprocess.TimeoutExpired:
                results.append(KernelError(f"{argv[0]} did not finish within {timeout:g} s"))
                continue
            if process.returncode != 0:
                where = f" in namespace {netns}" if netns else ""
                results.append(KernelError(f"{' '.join(argv[:3])}{where} failed: {err.strip()}"))
            else:
                results.append(out)
        return results
    finally:
        for process in started:
            if isinstance(process, subprocess.Popen) and process.poll() is None:
                process.kill()
                process.wait()


def _path(name: str) -> str:
    return os.path.join(NETNS_DIR, name)


def exists(name: str) -> bool:
    """Whether a named network namespace exists, as seen from this process's mount namespace."""
    return os.path.ismount(_path(name))


def ensure_netns(name: str) -> bool:
    """Creates the named namespace with its loopback up; returns whether it had to be created."""
    if exists(name):
        return False
    if os.path.lexists(_path(name)):
        os.unlink(_path(name))  # left by a mount namespace that is gone
    run(["ip", "netns", "add", name])
    run(["ip", "-n", name, "link", "set", "lo", "up"])
    return True


def remove_netns(name: str) -> bool:
    """Removes the named namespace (and every link inside it); returns whether it existed."""
    if exists(name):
        run(["ip", "netns", "delete", name])
        return True
    if os.path.lexists(_path(name)):
        os.unlink(_path(name))
    return False


def _sysctl_path(key: str) -> str:
    return "/proc/sys/" + key.replace(".", "/")


def read_sysctls(keys: Sequence[str], netns: str | None = None) -> dict[str, str]:
    """The current values of sysctl keys (dotted names) in a namespace."""
    values: dict[str, str] = {}
    with entered(netns):
        for key in keys:
            try:
                with open(_sysctl_path(key)) as file:
                    values[key] = file.read().strip()
            except OSError as exc:
                raise KernelError(f"cannot read sysctl {key}: {exc.strerror}") from None
    return values


def ensure_sysctls(values: Mapping[str, str], netns: str | None = None) -> list[str]:
    """Sets, in order, the sysctls that differ from `values`; returns a line per change made."""
    current = read_sysctls(list(values), netns)
    changed = [(key, value) for key, value in values.items() if current[key] != value]
    if not changed:
        return []
    with entered(netns):
        for key, value in changed:
            try:
                with open(_sysctl_path(key), "w") as file:
                    file.write(value)
            except OSError as exc:
                raise KernelError(f"cannot set sysctl {key}={value}: {exc.strerror}") from None
    return [f"{netns}: set {key}={value}" if netns else f"set {key}={value}" for key, value in changed]


def l2_only_sysctls(bridge: str) -> dict[str, str]:
    """The sysctls that keep a frame-carrying bridge out of the namespace's IP stack."""
    return {f"net.ipv4.conf.{bridge}.forwarding": "0", f"net.ipv6.conf.{bridge}.disable_ipv6": "1"}
