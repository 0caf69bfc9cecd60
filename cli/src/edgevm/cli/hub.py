"""`edgevm hub up`: the fleet's hub in the foreground: its nats-server (leaf-node listener, JetStream domain
`hub`), the stream that sources every node's events, and the gateway, until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgevm.cli.fleetca import hub_names, issue_hub_cert
from edgevm.cli.fleetconfig import HubListen, write_hub_config
from edgevm.cli.fleetstate import HUB_DOMAIN, HubState
from edgevm.cli.natsserver import launch_nats_server
from edgevm.cli.sourcewatch import watch_sources
from edgevm.cli.sourcing import ensure_hub_streams
from edgevm.cli.supervisor import STOP_SIGNALS, Child, NodeOptions, Supervisor
from edgevm.shared.bus import connect
from edgevm.shared.config import DEFAULT_METRICS_BASE, SERVICES

log = logging.getLogger("edgevm.hub")


@dataclass
class HubOptions:
    """What `edgevm hub up` was asked for."""

    state_dir: Path
    listen: str = "0.0.0.0"
    nats_port: int = 4222
    leaf_port: int = 7422
    tls: bool = True
    names: list[str] = field(default_factory=list)  # extra names (DNS or IP) for the leaf certificate
    metrics_port: int = DEFAULT_METRICS_BASE + SERVICES.index("gateway")
    gateway: bool = True
    source_watch: bool = True  # restart a source left idle while its node answers (see sourcewatch)


def client_host(listen: str) -> str:
    """Return the address a local client uses to reach a server listening on `listen`."""
    return "127.0.0.1" if listen in ("0.0.0.0", "", "::") else listen


def prepare(options: HubOptions) -> HubState:
    """Make the fleet's identities and CA on the first start, a fresh leaf certificate, and the config."""
    state = HubState(options.state_dir)
    listen = HubListen(options.listen, options.nats_port, options.leaf_port, options.tls)
    with state.locked():
        first = not state.is_initialized()
        state.initialize()
        if options.tls:
            issue_hub_cert(state.ca_dir, state.tls_dir, hub_names(options.listen, options.names))
        state.nats_dir.mkdir(parents=True, exist_ok=True)
        write_hub_config(state, listen)
        info = {**asdict(listen), "client_url": f"nats://{client_host(options.listen)}:{options.nats_port}"}
        state.hub_info_path.write_text(json.dumps(info, indent=2) + "\n")
    if first:
        print(f"edgevm hub: made the fleet's identities and CA in {state.root}", flush=True)
    return state


class HubSupervisor(Supervisor):
    """Runs the hub: its nats-server and streams, then the gateway, until stopped."""

    @property
    def label(self) -> str:
        """Return what the output calls what runs."""
        return "hub"

    def __init__(self, options: HubOptions) -> None:
        super().__init__(NodeOptions(HUB_DOMAIN, options.state_dir, None, client_host(options.listen),
                                     options.nats_port, options.metrics_port, None))
        self.hub = options
        self.stack = contextlib.AsyncExitStack()

    async def run(self) -> None:
        """Start everything, supervise until SIGTERM/SIGINT, then stop everything."""
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._on_signal)
        state = await asyncio.to_thread(prepare, self.hub)
        # Started on this (the main) thread so that it dies with `hub up` even when that is killed.
        self.nats = launch_nats_server(state.nats_config, self.options.nats_host, self.hub.nats_port,
                                       state.root / "nats.log", state.nats_dir, die_with_parent=True, wait=False)
        await asyncio.to_thread(self.nats.wait_ready)
        try:
            nodes = sorted(state.load().nodes)
            admin = await connect(self.nats.url, "edgevm-hub", seed_file=str(state.seed_path("admin")))
            self.stack.push_async_callback(admin.close)
            await ensure_hub_streams(admin.jetstream(timeout=10), nodes)
            if self.hub.source_watch:
                watch = asyncio.create_task(watch_sources(admin), name="watch-sources")
                self.stack.push_async_callback(_cancelled, watch)
            tls = f"TLS, fleet CA {state.ca_dir / 'ca.pem'}" if self.hub.tls else "no TLS"
            print(f"edgevm hub: NATS on {self.nats.url} (JetStream domain {HUB_DOMAIN}); leaf nodes on "
                  f"nats-leaf://{self.hub.listen}:{self.hub.leaf_port} ({tls}); {len(nodes)} node(s): "
                  f"{', '.join(nodes) or '-'}", flush=True)
            if self.hub.gateway:
                self.children = [Child("gateway", gateway_env(state, self.nats.url, self.hub))]
                print(f"  edgevm-gateway: metrics on http://127.0.0.1:{self.hub.metrics_port}/metrics", flush=True)
            await self.supervise()
        finally:
            await self.stack.aclose()
            await asyncio.to_thread(self.nats.stop)
            print("edgevm hub: stopped", flush=True)


def gateway_env(state: HubState, url: str, options: HubOptions) -> dict[str, str]:
    """Return the environment of the hub's gateway: the hub's NATS, logged in as the gateway."""
    return {
        **os.environ,
        "EDGEVM_NODE": HUB_DOMAIN,  # its own heartbeats go to EDGEVM_HUB_EVENTS, not among the nodes'
        "EDGEVM_NATS_URL": url,
        "EDGEVM_NATS_SEED": str(state.seed_path("gateway")),
        "EDGEVM_STATE_DIR": str(state.root / "services"),
        "EDGEVM_METRICS_PORT": str(options.metrics_port),
    }


async def _cancelled(task: asyncio.Task[None]) -> None:
    """Cancel `task` and wait until it has ended."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def main(args: argparse.Namespace) -> int:
    """Run `edgevm hub up` in the foreground."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    options = HubOptions(args.state_dir, args.listen, args.nats_port, args.leaf_port, args.tls, args.tls_name,
                         args.metrics_port, args.gateway, args.source_watch)
    asyncio.run(HubSupervisor(options).run())
    return 0
