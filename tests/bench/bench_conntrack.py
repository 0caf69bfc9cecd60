"""Benchmark of flowwatch's conntrack source: a 20,000-entry dump against `conntrack -L` and pyroute2, and events.

Run as root: `.venv/bin/python tests/bench/bench_conntrack.py`. It works in a throw-away namespace
`edgevm-t-<random>-bench` and removes it. Raw baselines (`conntrack -L`, pyroute2's `dump_entries`) are
measured in the same run on the same table. Entries are UDP flows on loopback, each from one datagram to
its own address of 127.1.0.0/16, made by a separate process so that it does not share our interpreter.
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pyroute2.conntrack import Conntrack

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from edgevm.flowwatch.drivers import ctevents, ctparse, ctsource
from edgevm.flowwatch.drivers.ctevents import CtEventStream, Overrun
from edgevm.shared.netns import write_sysctl

ENTRIES = 20_000
ROUNDS = 7
GOAL_DUMP_RATIO = 3.0  # full dump + attribution <= 3x `conntrack -L`

HOOK_RULES = """
table inet edgevm_bench {
    chain out { type filter hook output priority 0; ct state new counter; }
}
"""

# One datagram to each of count addresses: count new conntrack entries, no replies.
GENERATOR = """
import socket, sys
count = int(sys.argv[1])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for n in range(count):
    sock.sendto(b"x", (f"127.1.{n // 250}.{n % 250 + 1}", 9))
"""


def report(name: str, value: str, note: str = "") -> None:
    print(f"{name:<52} {value:>16}  {note}", flush=True)


def best_seconds(action: Callable[[], object], rounds: int = ROUNDS) -> float:
    """The best wall time of an action over several rounds (the machine may be shared: noise only adds)."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return min(times)


def in_netns(netns: str, *argv: str, stdin: str | None = None) -> None:
    subprocess.run(
        ["ip", "netns", "exec", netns, *argv],
        input=stdin,
        text=True,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def make_netns(role: str = "bench") -> str:
    """A namespace where conntrack tracks (a `ct` hook), with accounting on and long UDP timeouts."""
    name = f"edgevm-t-{secrets.token_hex(3)}-{role}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    in_netns(name, "nft", "-f", "-", stdin=HOOK_RULES)
    ctsource.enable_accounting(name)
    write_sysctl(name, "net.netfilter.nf_conntrack_udp_timeout", "600")  # outlive the whole run
    return name


async def consume(stream: CtEventStream, wanted: int, idle: float = 3.0) -> tuple[int, float, int]:
    """Read until wanted entries came or none for idle s: (entries, seconds from first to last, overruns)."""
    seen = 0
    first = last = 0.0
    try:
        while seen < wanted:
            async with asyncio.timeout(idle):
                batch = await anext(stream)
            now = time.perf_counter()
            if isinstance(batch, Overrun):
                continue
            if not seen:
                first = now
            seen += len(batch)
            last = now
    except TimeoutError:
        pass
    return seen, last - first, stream.overruns


async def live_events(netns: str) -> None:
    """NEW events while a separate process makes the flows: our rate is bounded by the sender's."""
    async with ctevents.events(netns) as stream:
        start = time.perf_counter()
        sender = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", netns, sys.executable, "-c", GENERATOR, str(ENTRIES)
        )
        seen, seconds, overruns = await consume(stream, ENTRIES)
        await sender.wait()
        sent_in = time.perf_counter() - start
    report(
        "events, live (NEW while the sender runs)",
        f"{seen / seconds:,.0f} ev/s",
        f"{seen} events in {seconds:.2f} s; sender done in {sent_in:.2f} s; overruns {overruns}",
    )


async def backlog_events(netns: str, expected: int) -> None:
    """DESTROY events of a table flush, queued while nobody reads, then drained: our own top rate."""
    async with ctevents.events(netns) as stream:
        in_netns(netns, "conntrack", "-F")
        seen, seconds, overruns = await consume(stream, expected)
    report(
        "events, backlog (DESTROY of a flush, then drained)",
        f"{seen / seconds:,.0f} ev/s",
        f"{seen} events in {seconds:.2f} s; overruns {overruns}",
    )


async def small_buffer_events(netns: str, count: int, rcvbuf: int) -> None:
    """NEW then DESTROY of count flows with a small socket buffer, read as they come: do we keep up?"""
    async with ctevents.events(netns, rcvbuf=rcvbuf) as stream:
        script = f"{sys.executable} -c '{GENERATOR}' {count} && conntrack -F >/dev/null 2>&1"
        sender = await asyncio.create_subprocess_exec("ip", "netns", "exec", netns, "sh", "-c", script)
        seen, seconds, overruns = await consume(stream, 2 * count, idle=1.0)
        await sender.wait()
    report(
        f"events, live NEW + flush DESTROY, {rcvbuf >> 10} KiB buffer",
        f"{seen:,} of {2 * count:,}",
        f"in {seconds:.2f} s; overruns {overruns}",
    )


def attribute(entries: list[ctparse.CtEntry], vms: dict[str, str]) -> int:
    """Stand-in for attribution: look each entry's addresses up in a table of VM addresses."""
    hits = 0
    for entry in entries:
        if vms.get(entry.orig.src) or vms.get(entry.orig.dst) or vms.get(entry.reply.src):
            hits += 1
    return hits


def dump_figures(netns: str) -> None:
    sock = ctsource.open_socket(netns)  # kept, as a namespace watch keeps its own: pyroute2 takes ~10 ms to make one
    entries = ctsource.dump(netns, sock=sock)
    report("entries in the table", f"{len(entries):,}")
    cli = best_seconds(lambda: in_netns(netns, "conntrack", "-L"))
    report("conntrack -L (via ip netns exec)", f"{cli * 1e3:.1f} ms", "baseline")
    overhead = best_seconds(lambda: in_netns(netns, "true"))
    report("  of which ip netns exec + process start", f"{overhead * 1e3:.1f} ms")

    ours = best_seconds(lambda: ctsource.dump(netns, sock=sock))
    raw = best_seconds(lambda: ctsource.dump_raw(netns))
    datagrams = ctsource.dump_raw(netns)
    parse = best_seconds(lambda: [ctparse.parse(d) for d in datagrams])
    vms = {f"127.1.{n}.{m}": f"vm-{n}-{m}" for n in range(0, 80, 8) for m in range(1, 250, 10)}
    full = best_seconds(lambda: attribute(ctsource.dump(netns, sock=sock), vms))
    report("ctsource.dump (recv + parse)", f"{ours * 1e3:.1f} ms", f"{ours / cli:.2f}x conntrack -L")
    report("  recv only (dump_raw)", f"{raw * 1e3:.1f} ms", f"{len(datagrams)} datagrams")
    report("  parse only", f"{parse * 1e3:.1f} ms", f"{parse / len(entries) * 1e6:.2f} us/entry")
    report(
        "ctsource.dump + address lookup (attribution)",
        f"{full * 1e3:.1f} ms",
        f"{full / cli:.2f}x conntrack -L, goal <= {GOAL_DUMP_RATIO}x: {'ok' if full / cli <= GOAL_DUMP_RATIO else 'MISSED'}",
    )

    start = time.perf_counter()
    with Conntrack(netns=netns, flags=0) as ct:
        count = sum(1 for _ in ct.dump_entries())
    theirs = time.perf_counter() - start
    sock.close()
    report(
        "pyroute2 Conntrack().dump_entries()",
        f"{theirs * 1e3:,.0f} ms",
        f"{count:,} entries, {theirs / cli:.0f}x conntrack -L, {theirs / ours:.0f}x ctsource.dump",
    )


async def main() -> None:
    netns = make_netns()
    try:
        print(f"namespace {netns}, {ENTRIES:,} UDP flows", flush=True)
        await live_events(netns)
        await asyncio.to_thread(dump_figures, netns)
        await backlog_events(netns, ENTRIES)
        for rcvbuf in (256 << 10, 4 << 20):
            await small_buffer_events(netns, ENTRIES, rcvbuf)
    finally:
        subprocess.run(["ip", "netns", "delete", netns], check=False)


if __name__ == "__main__":
    asyncio.run(main())
