"""`edgevm snapshot ...`: snapshot commands, each sent with a request id, and the snapshot tree."""

from __future__ import annotations

import argparse
import asyncio
import uuid
from typing import Any

from edgevm.cli.output import print_json, print_table
from edgevm.cli.tasks import finish
from edgevm.shared.client import Client
from edgevm.shared.errors import RemoteError, Unavailable

SEND_ATTEMPTS = 3
RETRY_PAUSE = 0.5


async def snapshot_verb(client: Client, args: argparse.Namespace) -> int:
    """edgevm snapshot create|list|restore|delete."""
    if args.verb == "list":
        reply = await client.call("snapshot.list", {"vm": args.vm})
        if args.json:
            print_json(reply)
            return 0
        rows = []
        for depth, snap in snapshot_tree(reply["snapshots"]):
            rows.append(["  " * depth + snap["name"] + (" *" if snap["current"] else ""), snap["mode"],
                         snap["vm_state"], snap["created_at"], snap["description"]])
        print_table(["name (* current)", "mode", "vm state", "created", "description"], rows)
        return 0
    body: dict[str, Any] = {"vm": args.vm, "name": args.name, "request_id": args.request_id or uuid.uuid4().hex}
    if args.verb == "create" and args.description:
        body["description"] = args.description
    return await finish(client, args, await send_once(client, f"snapshot.{args.verb}", body))


async def send_once(client: Client, verb: str, body: dict[str, Any], attempts: int = SEND_ATTEMPTS) -> Any:
    """Send a snapshot command, again when no reply came: its `request_id` makes a retry answer the same task.

    A lost reply does not mean a lost request: without the id, sending again could take a second snapshot.
    """
    request_id = body["request_id"]
    for attempt in range(1, attempts + 1):
        try:
            return await client.call(verb, body)
        except Unavailable as exc:  # no reply: the snapshotter may have started the task all the same
            if attempt == attempts:
                raise Unavailable(f"{exc.message} ({attempts} tries); ask again for the same task with "
                                  f"--request-id {request_id}") from None
        except RemoteError as exc:
            if not (exc.code == "409" and exc.field == "request_id" and "being submitted" in exc.message):
                raise
            if attempt == attempts:  # the first try is still being submitted
                raise
        await asyncio.sleep(RETRY_PAUSE)
    raise AssertionError("not reached")


def snapshot_tree(snapshots: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """Return snapshots depth-first from the roots, each with its depth in the tree."""
    children: dict[str | None, list[dict[str, Any]]] = {}
    names = {s["name"] for s in snapshots}
    for snap in sorted(snapshots, key=lambda s: s["created_at"]):
        parent = snap["parent"] if snap["parent"] in names else None
        children.setdefault(parent, []).append(snap)
    out: list[tuple[int, dict[str, Any]]] = []

    def walk(parent: str | None, depth: int) -> None:
        for snap in children.get(parent, []):
            out.append((depth, snap))
            walk(snap["name"], depth + 1)

    walk(None, 0)
    return out
