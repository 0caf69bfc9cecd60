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
from collections.abc import Mapping, Sequence

from edgevm.netplumb.errors import KernelError

NETNS_DIR = "/run/netns"
COMMAND_TIMEOUT = 10.0


def command(argv: Sequence[str], netns: str | None = None) -> list[str]:
    """The argument list running `argv` inside `netns` (unchanged for the current namespace)."""
    return list(argv) if netns is None else ["ip", "netns", "exec", netns, *argv]


def run(
    argv: Sequence[str], netns: str | None = None, stdin: str | None = None, timeout: float = COMMAND_TIMEOUT
) -> str:
    """Runs a command in a namespace and returns its stdout; raises KernelError when it fails."""
    full = command(argv, netns)
    try:
        done = subprocess.run(full, input=stdin, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise KernelError(f"{argv[0]} did not finish within {timeout:g} s") from None
    except OSError as exc:
        raise KernelError(f"cannot run {argv[0]}: {exc.strerror}") from None
    if done.returncode != 0:
        where = f" in namespace {netns}" if netns else ""
        raise KernelError(f"{' '.join(argv[:3])}{where} failed: {done.stderr.strip()}")
    return done.stdout


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


def read_sysctls(keys: Sequence[str], netns: str | None = None) -> dict[str, str]:
    """The current values of sysctl keys (dotted names) in a namespace."""
    if not keys:
        return {}
    values = run(["sysctl", "-n", *keys], netns).splitlines()
    return dict(zip(keys, (value.strip() for value in values), strict=True))


def ensure_sysctls(values: Mapping[str, str], netns: str | None = None) -> list[str]:
    """Sets, in order, the sysctls that differ from `values`; returns a line per change made."""
    current = read_sysctls(list(values), netns)
    changed = [f"{key}={value}" for key, value in values.items() if current[key] != value]
    if changed:
        run(["sysctl", "-q", "-w", *changed], netns)
    return [f"{netns}: set {item}" if netns else f"set {item}" for item in changed]


def l2_only_sysctls(bridge: str) -> dict[str, str]:
    """The sysctls that keep a frame-carrying bridge out of the namespace's IP stack."""
    return {f"net.ipv4.conf.{bridge}.forwarding": "0", f"net.ipv6.conf.{bridge}.disable_ipv6": "1"}
