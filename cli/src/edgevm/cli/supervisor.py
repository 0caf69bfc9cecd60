"""`edgevm node up`: the embedded NATS and every installed service as child processes, restarted on exit."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from edgevm.cli.natsserver import NatsServer, start_nats_server
from edgevm.cli.parentdeath import die_with_parent
from edgevm.shared.config import SERVICES

if TYPE_CHECKING:
    from edgevm.cli.uplink import Uplink

log = logging.getLogger("edgevm.node")
BACKOFF_START, BACKOFF_MAX = 0.5, 30.0
# A child that ran this long before dying is considered healthy again: its backoff starts over.
HEALTHY_AFTER = 60.0
# How long the services get to stop before they are killed: their drains (lifecycle's tasks 30 s, snapshot
# tasks 60 s, then NATS 5 s) fit in it. A second Ctrl-C kills them at once.
STOP_GRACE = 75.0
# Each stops the node as Ctrl-C does: SIGHUP too, which a terminal that closes sends.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def installed_services() -> list[str]:
    """Return the services whose package (with a __main__) is installed, in start order."""
    return [s for s in SERVICES if importlib.util.find_spec(f"edgevm.{s}.__main__") is not None]


@dataclass
class Child:
    """One supervised service process."""

    name: str
    env: dict[str, str]
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    backoff: float = BACKOFF_START
    started_at: float = field(default=0.0)

    async def spawn(self) -> None:
        """Start the service process."""
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", f"edgevm.{self.name}", env=self.env, preexec_fn=die_with_parent
        )
        self.started_at = time.monotonic()
        log.info("started edgevm-%s (pid %d)", self.name, self.process.pid)


@dataclass
class NodeOptions:
    """What `edgevm node up` was asked for."""

    node: str
    state_dir: Path
    nats_url: str | None
    nats_host: str
    nats_port: int
    metrics_base_port: int
    libvirt_uri: str | None
    hub_url: str | None = None  # join a fleet: the hub's leaf-node URL ...
    creds: Path | None = None  # ... and this node's credentials file


class Supervisor:
    """Runs the node: NATS (unless external), then the services, until stopped."""

    @property
    def label(self) -> str:
        """Return what the output calls what runs: `node <id>`."""
        return f"node {self.options.node}"

    def __init__(self, options: NodeOptions) -> None:
        self.options = options
        self.nats: NatsServer | None = None
        self.children: list[Child] = []
        self._stopping = asyncio.Event()
        self._hurry = asyncio.Event()

    def child_env(self, nats_url: str) -> dict[str, str]:
        """Return the environment every service process gets."""
        env = {
            **os.environ,
            "EDGEVM_NODE": self.options.node,
            "EDGEVM_NATS_URL": nats_url,
            "EDGEVM_STATE_DIR": str(self.options.state_dir),
            "EDGEVM_METRICS_BASE_PORT": str(self.options.metrics_base_port),
        }
        env.pop("EDGEVM_METRICS_PORT", None)
        if self.options.libvirt_uri:
            env["EDGEVM_LIBVIRT_URI"] = self.options.libvirt_uri
        return env

    async def run(self) -> None:
        """Start everything, supervise until SIGTERM/SIGINT, then stop everything."""
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._on_signal)
        self.options.state_dir.mkdir(parents=True, exist_ok=True)
        nats_url = self.options.nats_url
        link = self._uplink()
        nats_log = self.options.state_dir / "nats.log"
        logged_before = nats_log.stat().st_size if nats_log.exists() else 0  # what the uplink's watch skips
        if nats_url is None:
            # Started on this (the main) thread so that it dies with `node up` even when that is killed.
            self.nats = start_nats_server(
                self.options.state_dir / "nats",
                self.options.nats_host,
                self.options.nats_port,
                self.options.state_dir / "nats.log",
                link.config if link is not None else None,
                die_with_parent=True,
                wait=False,
            )
            await asyncio.to_thread(self.nats.wait_ready)
            nats_url = self.nats.url
        print(f"edgevm node {self.options.node}: NATS on {nats_url}"
              f"{' (embedded, JetStream in ' + str(self.options.state_dir / 'nats') + ')' if self.nats else ''}",
              flush=True)
        names = installed_services()
        env = self.child_env(nats_url)
        for index, name in enumerate(SERVICES):
            if name in names:
                print(f"  edgevm-{name}: metrics on http://127.0.0.1:{self.options.metrics_base_port + index}/metrics",
                      flush=True)
            else:
                print(f"  edgevm-{name}: not installed (not built yet), not started", flush=True)
        self.children = [Child(name, env) for name in names]
        follower = None
        if link is not None and link.config is not None and self.nats is not None:
            from edgevm.cli.uplink import follow_link

            follower = asyncio.create_task(follow_link(nats_log, link.hub_url, logged_before))
        try:
            await self.supervise()
        finally:
            if follower is not None:
                follower.cancel()
            if self.nats is not None:
                print(f"edgevm node {self.options.node}: services stopped; stopping NATS", flush=True)
                await asyncio.to_thread(self.nats.stop)
            print(f"edgevm node {self.options.node}: stopped", flush=True)

    async def supervise(self) -> None:
        """Start the children, restart each one that exits until stopped, then stop them all."""
        try:
            for child in self.children:
                await child.spawn()
            watchers = [asyncio.create_task(self._watch(child)) for child in self.children]
            await self._stopping.wait()
            for watcher in watchers:
                watcher.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
        finally:
            # Services first, so they drain (answer what is in flight, publish their last events) while
            # NATS still runs; NATS last.
            print(f"edgevm {self.label}: stopping the services", flush=True)
            await self._stop_children()

    def _uplink(self) -> Uplink | None:
        """Return the fleet uplink asked for (None: not asked), saying at once when it cannot be made."""
        if self.options.hub_url is None or self.options.creds is None:
            return None
        from edgevm.cli.uplink import Uplink, uplink  # only a node of a fleet needs nkeys
        if self.options.nats_url is not None:
            link = Uplink(self.options.hub_url, None, "--hub needs the embedded NATS: with --nats, make that "
                                                      "server a leaf node of the hub (docs/operations.md)")
        else:
            link = uplink(self.options.node, self.options.hub_url, self.options.creds,
                          self.options.state_dir / "nats")
        if link.config is None:
            print(f"edgevm node {self.options.node}: NOT joining the fleet: {link.problem}; running on its own",
                  flush=True)
        else:
            print(f"edgevm node {self.options.node}: joining the fleet at {link.hub_url} "
                  f"(JetStream domain {self.options.node})", flush=True)
        return link

    async def _watch(self, child: Child) -> None:
        """Restart `child` whenever it exits, with exponential backoff, until the node stops."""
        while True:
            assert child.process is not None
            code = await child.process.wait()
            if self._stopping.is_set():
                return
            if time.monotonic() - child.started_at > HEALTHY_AFTER:
                child.backoff = BACKOFF_START
            log.warning("edgevm-%s exited with code %s; restarting in %.1f s", child.name, code, child.backoff)
            print(f"edgevm-{child.name} exited with code {code}; restarting in {child.backoff:.1f} s", flush=True)
            await asyncio.sleep(child.backoff)
            child.backoff = min(child.backoff * 2, BACKOFF_MAX)
            child.restarts += 1
            await child.spawn()

    def _on_signal(self) -> None:
        if self._stopping.is_set():
            self._hurry.set()  # a second Ctrl-C: do not wait for the drains
        self._stopping.set()

    async def _stop_children(self, timeout: float = STOP_GRACE) -> None:
        running = [c.process for c in self.children if c.process is not None and c.process.returncode is None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
        if not running:
            return
        print(f"edgevm {self.label}: the services finish what they are doing (up to {timeout:g} s; "
              "Ctrl-C again kills them now)", flush=True)
        ended = asyncio.ensure_future(asyncio.gather(*(p.wait() for p in running)))
        hurry = asyncio.create_task(self._hurry.wait())
        await asyncio.wait({ended, hurry}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        hurry.cancel()
        if not ended.done():
            for process in running:
                if process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
            await ended
