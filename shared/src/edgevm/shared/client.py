"""A client of the protocol: send a command, get the typed reply or a RemoteError with its code."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER

from edgevm.shared import subjects
from edgevm.shared.errors import RemoteError, Unavailable

T = TypeVar("T")
_encoder = msgspec.json.Encoder()


class Client:
    """Sends commands to one node (or to the gateway) over an open NATS connection."""

    def __init__(self, nc: NATS, node: str, timeout: float = 5.0) -> None:
        self.nc = nc
        self.node = node
        self.timeout = timeout

    async def call(self, verb: str, request: Any = None, reply_type: type[T] = Any) -> T:  # type: ignore[assignment]
        """Send command `verb` (e.g. "vm.get") to the node and decode the reply as `reply_type`."""
        return await self.request(subjects.command(self.node, verb), request, reply_type)

    async def gateway(self, verb: str, request: Any = None, reply_type: type[T] = Any) -> T:  # type: ignore[assignment]
        """Send query `verb` (e.g. "vm.list") to the gateway."""
        return await self.request(subjects.gateway(verb), request, reply_type)

    async def request(self, subject: str, request: Any, reply_type: type[T]) -> T:
        """Send `request` on `subject`; raise RemoteError for an error reply, Unavailable for no answer."""
        body = b"{}" if request is None else _encoder.encode(request)
        try:
            msg = await self.nc.request(subject, body, timeout=self.timeout)
        except NoRespondersError:
            raise Unavailable(f"nothing serves {subject}: is the service running?") from None
        except NatsTimeout:
            raise Unavailable(f"{subject} did not answer within {self.timeout:g} s") from None
        headers = msg.headers or {}
        if ERROR_CODE_HEADER in headers:
            raise remote_error(headers, msg.data)
        return msgspec.json.decode(msg.data, type=reply_type)


def remote_error(headers: dict[str, str], data: bytes) -> RemoteError:
    """Build the RemoteError an error reply stands for."""
    try:
        error = msgspec.json.decode(data)["error"]
        return RemoteError(str(error["code"]), str(error["message"]), error.get("field"))
    except Exception:
        return RemoteError(headers[ERROR_CODE_HEADER], headers.get(ERROR_HEADER, ""), None)
