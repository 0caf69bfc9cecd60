"""Tasks as the CLI shows them: followed live on their events until they end, then one line."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import msgspec

from edgevm.cli.output import print_json
from edgevm.shared import subjects
from edgevm.shared.client import Client
from edgevm.shared.objects import Task


async def follow_task(client: Client, task: Task, quiet: bool = False) -> Task:
    """Follow a task on its events until it ends, showing its progress live; return it.

    Subscribes first, then reads the task once, so no update falls between the two; a read every few
    seconds covers a lost event (e.g. a reconnect).
    """
    updates: asyncio.Queue[Task] = asyncio.Queue()

    async def on_event(msg: Any) -> None:
        event = msgspec.json.decode(msg.data)
        updates.put_nowait(msgspec.convert(event["task"], Task))

    sub = await client.nc.subscribe(subjects.event(client.node, f"task.{task.id}"), cb=on_event)
    try:
        task = await client.call("task.get", {"id": task.id}, Task)
        shown = ""
        live = sys.stderr.isatty()
        while True:
            line = progress_line(task)
            if line != shown and not quiet:
                print(("\r\033[K" if live else "") + line, end="" if live else "\n", file=sys.stderr, flush=True)
                shown = line
            if task.finished:
                break
            try:
                newer = await asyncio.wait_for(updates.get(), 3.0)
            except TimeoutError:
                newer = await client.call("task.get", {"id": task.id}, Task)
            if STATUS_RANK.get(newer.status, 2) >= STATUS_RANK.get(task.status, 2):  # events may predate the read
                task = newer
        if live and not quiet:
            print(file=sys.stderr)
        return task
    finally:
        await sub.unsubscribe()


STATUS_RANK = {"queued": 0, "running": 1}  # then an end


def progress_line(task: Task) -> str:
    """Return one line that shows where a task is: status, a bar, the message."""
    percent = 100 if task.status == "succeeded" else task.progress or 0
    bar = "#" * (percent // 5) + "." * (20 - percent // 5)
    return f"{task.kind} {task.id} [{bar}] {percent:3d}% {task.status}: {task.message}"


async def finish(client: Client, args: argparse.Namespace, reply: dict[str, Any]) -> int:
    """Print a `{task}` reply, following the task unless --no-wait."""
    task = msgspec.convert(reply["task"], Task)
    if not getattr(args, "no_wait", False):
        task = await follow_task(client, task, quiet=args.json)
    if args.json:
        print_json(task)
    else:
        print(f"{task.kind} {task.id}: {task.status}{' - ' + task.error if task.error else ''}")
    return 0 if task.status in ("succeeded", "queued", "running") else 1
