"""The endpoint adapter: nats.micro requests in, typed handlers called, replies and error codes out."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import typing
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER, Request
from nats.micro.service import Service, ServiceConfig

from edgevm.shared.errors import (
    EdgevmError,
    Internal,
    InvalidRequest,
    TooLarge,
    Unavailable,
    Unprocessable,
    invalid_from_msgspec,
    to_edgevm_error,
)
from edgevm.shared.limits import MAX_DEPTH, MAX_ERROR_FIELD, MAX_ERROR_MESSAGE, MAX_REQUEST_BYTES, clip, too_deep_at
from edgevm.shared.metrics import COMMAND_DURATION, COMMANDS
from edgevm.shared.paging import PAGING_HINT, Page, Paged

log = logging.getLogger(__name__)

Handler = Callable[[Any], Awaitable[Any]]
DEFAULT_DEADLINE = 2.0
_encoder = msgspec.json.Encoder()


class ErrorBody(msgspec.Struct):
    """The `error` object of an error reply."""

    code: str
    message: str
    field: str | None


class ErrorReply(msgspec.Struct):
    """The body of an error reply."""

    error: ErrorBody


def error_reply(error: EdgevmError) -> tuple[bytes, dict[str, str]]:
    """Return the body and the nats micro headers that report `error`."""
    # Bounded whatever raised it, so an error reply always fits in a NATS message.
    message = clip(error.message, MAX_ERROR_MESSAGE)
    field = None if error.field is None else clip(error.field, MAX_ERROR_FIELD)
    body = _encoder.encode(ErrorReply(ErrorBody(error.code, message, field)))
    # Headers are single lines: a multi-line message would break the header block.
    headers = {ERROR_CODE_HEADER: error.code, ERROR_HEADER: " ".join(message.split())}
    return body, headers


def message_size(body: bytes, headers: dict[str, str] | None) -> int:
    """Return the bytes a reply takes against the server's max_payload: the body and the header block."""
    if not headers:
        return len(body)
    # nats-py sends "NATS/1.0\r\n", then "key: value\r\n" per header, then "\r\n".
    return len(body) + 12 + sum(len(k) + len(v.encode()) + 4 for k, v in headers.items())


def decode_request(decoder: msgspec.json.Decoder[Any], root: Any, data: bytes) -> Any:
    """Decode a request body into its struct, or raise an EdgevmError (400, 413) that says what is wrong."""
    if len(data) > MAX_REQUEST_BYTES:
        raise TooLarge(f"request: the body is {len(data)} bytes; a command takes at most {MAX_REQUEST_BYTES} bytes")
    try:
        return decoder.decode(data or b"{}")
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError too
        raise invalid_from_msgspec(exc, root) from None
    except UnicodeDecodeError as exc:
        bad = exc.object[exc.start:exc.start + 1].hex()
        raise InvalidRequest(f"request: the body is not valid UTF-8 JSON (a string holds the byte 0x{bad})") from None
    except RecursionError:
        field = too_deep_at(data, MAX_DEPTH)
        where = field if field else "request"
        raise InvalidRequest(f"{where}: nests deeper than {MAX_DEPTH} levels of objects and arrays",
                             field or None) from None


def request_type_of(handler: Handler) -> type[Any]:
    """Return the type of the handler's single parameter: the request struct it takes."""
    params = list(inspect.signature(handler).parameters)
    if len(params) != 1:
        raise TypeError(f"{handler!r} must take exactly one request parameter")
    return typing.get_type_hints(handler)[params[0]]  # type: ignore[no-any-return]


class DiscoveryService(Service):
    """nats.micro's Service, whose `$SRV.PING|INFO|STATS` replies never carry the request's headers.

    nats.micro answers them with `Msg.respond`, which copies the request's headers into the reply: one
    `$SRV.PING` with 8 MB of headers made every service's reply larger than max_payload, and the server closed
    the connection of every service at once. A discovery request without a reply subject is dropped
    (nats.micro would raise, and the connection's error callback log it).
    """

    async def _handle_ping_request(self, msg: Msg) -> None:
        if _answerable(msg):
            await super()._handle_ping_request(msg)

    async def _handle_info_request(self, msg: Msg) -> None:
        if _answerable(msg):
            await super()._handle_info_request(msg)

    async def _handle_stats_request(self, msg: Msg) -> None:
        if _answerable(msg):
            await super()._handle_stats_request(msg)


def _answerable(msg: Msg) -> bool:
    """Return whether `msg` has a reply subject; drop its headers, which the reply would otherwise echo."""
    msg.headers = None
    return bool(msg.reply)


class CommandService:
    """A nats.micro service of typed command handlers, one per `edgevm.<node>.<verb>` subject.

    Listed means serving: commands answer as soon as `add` returns, but the service appears in discovery
    (`$SRV.PING|INFO|STATS`) only from `start`, which the runtime calls once set-up has added every command.
    A client that waits for the service's name and then sends any of its commands never gets "no responders".
    """

    def __init__(self, nc: NATS, name: str, version: str = "1.0.0", description: str = "") -> None:
        self._nc = nc
        self.name = name
        self._service = DiscoveryService(nc, ServiceConfig(name=name, version=version, description=description))
        self._inflight: set[asyncio.Task[None]] = set()
        self._accepting = True

    async def start(self) -> None:
        """Announce the service in discovery (PING/INFO/STATS): call it once every command is added."""
        await self._service.start()

    async def add(
        self,
        subject: str,
        handler: Handler,
        *,
        verb: str | None = None,
        deadline: float = DEFAULT_DEADLINE,
        inline: bool = False,
    ) -> None:
        """Serve `handler` on `subject`; the request type comes from the handler's annotation.

        An `inline` handler answers from memory and never waits on a backend: it runs in the subscription's
        own callback, without a task of its own or a deadline, which saves a task switch per request.
        """
        verb = verb or subject.split(".", 2)[-1]
        request_type = request_type_of(handler)
        decoder = msgspec.json.Decoder(request_type)
        serve = self._make_callback(verb, handler, decoder, None if inline else deadline, request_type)
        await self._service.add_endpoint(name=verb.replace(".", "-"), subject=subject, handler=serve)

    def _make_callback(
        self, verb: str, handler: Handler, decoder: msgspec.json.Decoder[Any], deadline: float | None, root: Any
    ) -> Callable[[Request], Awaitable[None]]:
        duration = COMMAND_DURATION.labels(self.name, verb)
        counters: dict[str, Any] = {}

        async def answer(request: Request) -> None:
            started = time.perf_counter()
            try:
                body, headers = await self._call(verb, handler, decoder, deadline, root, request.data)
            except asyncio.CancelledError:
                raise
            except Exception:  # never let an exception reach nats.micro: it would answer with its repr
                log.exception("%s failed unexpectedly", verb)
                body, headers = error_reply(Internal(f"{verb} failed because of an internal error"))
            code = headers[ERROR_CODE_HEADER] if headers else "200"
            try:
                await request.respond(body, headers=headers)
            except ValueError:  # nats.micro: the request had no reply subject (a plain publish); nobody waits
                pass
            except Exception as exc:
                log.warning("%s: the reply could not be sent (%s)", verb, exc)
            counter = counters.get(code)
            if counter is None:
                counter = counters[code] = COMMANDS.labels(self.name, verb, code)
            counter.inc()
            duration.observe(time.perf_counter() - started)

        async def serve(request: Request) -> None:
            # nats-py runs a subscription's callbacks one after the other: answer each request in its own
            # task so a slow command (a libvirt call) does not hold up the quick ones behind it.
            task = asyncio.create_task(answer(request))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

        return answer if deadline is None else serve

    async def _call(
        self,
        verb: str,
        handler: Handler,
        decoder: msgspec.json.Decoder[Any],
        deadline: float | None,
        root: Any,
        data: bytes,
    ) -> tuple[bytes, dict[str, str] | None]:
        try:
            request = decode_request(decoder, root, data)
        except EdgevmError as exc:
            return self._fitting(verb, *error_reply(exc))
        try:
            if deadline is None:
                reply = await handler(request)
            else:
                async with asyncio.timeout(deadline):
                    reply = await handler(request)
            if isinstance(reply, Page):
                body = reply.encode(self._nc.max_payload)
            else:
                body = _encoder.encode(reply if reply is not None else {})
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            log.error("%s did not finish within %.1f s", verb, deadline)
            return error_reply(Unavailable(f"{verb} did not finish within {deadline:g} s: a backend is slow"))
        except Exception as exc:
            error = to_edgevm_error(exc)
            if error is None:
                log.exception("%s failed unexpectedly", verb)
                error = Internal(f"{verb} failed because of an internal error; the node's log has the details")
            return self._fitting(verb, *error_reply(error))
        # A listing asked for whole that could have come in pages: its 422 says how.
        return self._fitting(verb, body, None, unpaged=isinstance(request, Paged) and request.limit is None)

    def _fitting(
        self, verb: str, body: bytes, headers: dict[str, str] | None, unpaged: bool = False
    ) -> tuple[bytes, dict[str, str] | None]:
        """Return the reply, or a short 422 in its place when it is over the server's max_payload.

        nats-server closes the connection of a client that publishes more than max_payload (body and
        headers); nats-py then closes for good. The reply would be lost, the caller would wait for its
        timeout, and the service would be off NATS: answer why instead.
        """
        limit = self._nc.max_payload
        size = message_size(body, headers)
        if not limit or size <= limit:
            return body, headers
        log.warning("%s: the reply is %d bytes, over the NATS max_payload of %d bytes", verb, size, limit)
        hint = f"; {PAGING_HINT}" if unpaged else ""
        return error_reply(Unprocessable(
            f"{verb}: the reply would be {size} bytes, more than the {limit} bytes NATS carries in one "
            f"message (the server's max_payload){hint}"
        ))

    async def stop(self) -> None:
        """Stop taking requests and wait for the ones in flight to be answered."""
        await self._service.stop()
        if self._inflight:
            await asyncio.wait(self._inflight, timeout=10)
