"""Retried snapshot requests: a client's `request_id` names one task for REQUEST_WINDOW seconds."""

from __future__ import annotations

import logging

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BadRequestError, KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

log = logging.getLogger(__name__)
BUCKET = "edgevm_snapshot_requests"
REQUEST_WINDOW = 15 * 60.0


async def open_bucket(js: JetStreamContext) -> KeyValue:
    """The snapshotter's bucket of request ids (created on first use; entries live REQUEST_WINDOW)."""
    config = KeyValueConfig(bucket=BUCKET, history=1, ttl=REQUEST_WINDOW, storage=StorageType.FILE)
    try:
        return await js.create_key_value(config)
    except BadRequestError as exc:
        if exc.err_code != 10058:  # it exists with another configuration: use it as it is
            raise
        return await js.key_value(BUCKET)


class RequestIds:
    """Which task a client's request id started, so that the same request sent again gets that task."""

    def __init__(self, kv: KeyValue, node: str) -> None:
        self._kv = kv
        self._node = node

    def _key(self, vm: str, kind: str, request_id: str) -> str:
        return f"{self._node}.{vm}.{kind}.{request_id}"

    async def reserve(self, vm: str, kind: str, request_id: str, task_id: str) -> tuple[str, int | None]:
        """Record that the request starts task `task_id`; return (task id, revision of the record), or,
        when the request came before, (the earlier task's id, None)."""
        key = self._key(vm, kind, request_id)
        try:
            return task_id, await self._kv.create(key, task_id.encode())
        except KeyWrongLastSequenceError:
            entry = await self._kv.get(key)
            if entry.value is None:
                raise
            return entry.value.decode(), None

    async def forget(self, vm: str, kind: str, request_id: str, revision: int) -> None:
        """Drop a record whose task was never written, so the request can be sent again."""
        try:
            await self._kv.delete(self._key(vm, kind, request_id), last=revision)
        except (KeyWrongLastSequenceError, KeyNotFoundError, KeyDeletedError):
            pass
        except Exception as exc:
            log.warning("request id %s of VM %s not forgotten: %s", request_id, vm, exc)
