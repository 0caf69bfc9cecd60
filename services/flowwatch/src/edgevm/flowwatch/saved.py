"""What one run of flowwatch leaves the next: its active flows (to keep their ids, or to record them completed
if they ended meanwhile) and the ids of the flows that ended lately (to answer a late terminate with 409)."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import msgspec

from edgevm.shared.objects import Flow

__all__ = ["SavedFlow", "SavedState", "load", "save"]

log = logging.getLogger(__name__)


class SavedFlow(msgspec.Struct, array_like=True):
    """An active flow as a run left it: its key in its namespace's table, its start, and its last Flow."""

    key: str
    start_ns: int
    flow: Flow


class SavedState(msgspec.Struct):
    """A run's state for the next: active flows by namespace ("" for the node's own), ended ids with VMs."""

    active: dict[str, list[SavedFlow]] = {}
    ended: list[tuple[str, str]] = []


_decoder = msgspec.json.Decoder(SavedState)


def load(path: Path | None) -> SavedState:
    """The state the last run saved at path, good for one start (the file is removed); empty if none."""
    if path is None or not path.exists():
        return SavedState()
    try:
        state = _decoder.decode(path.read_bytes())
    except (OSError, msgspec.DecodeError) as exc:
        log.warning("the last run's flows were not read from %s: %s", path, exc)
        state = SavedState()
    with contextlib.suppress(OSError):
        path.unlink()
    return state


def save(path: Path | None, state: SavedState) -> None:
    """Write the state for the next run (atomically: a crash leaves the old file or none)."""
    if path is None:
        return
    try:
        partial = path.with_suffix(".partial")
        partial.write_bytes(msgspec.json.encode(state))
        partial.replace(path)
    except OSError as exc:
        log.warning("the active flows were not saved for the next run: %s", exc)
