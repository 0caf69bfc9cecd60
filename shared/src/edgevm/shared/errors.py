"""The errors a command can end with, and the one table that maps them to protocol codes."""

from __future__ import annotations

import re
from typing import Any

import msgspec
import msgspec.inspect
import nats.errors

from edgevm.shared.limits import EXCERPT_CHARS, MAX_ERROR_FIELD, clip, excerpt


class EdgevmError(Exception):
    """An error a command reports to its caller: a code from PROTOCOL.md, a sentence, and maybe a field."""

    code = "500"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidRequest(EdgevmError):
    """The request breaks a rule; the message names the field and the rule."""

    code = "400"


class NotFound(EdgevmError):
    """The object the request names does not exist."""

    code = "404"


class Conflict(EdgevmError):
    """The request conflicts with the current state: a taken name, a stale revision, a busy VM."""

    code = "409"


class TooLarge(EdgevmError):
    """The request body is larger than a command takes (docs/protocol.md, Limits)."""

    code = "413"


class Unprocessable(EdgevmError):
    """The request is valid but not possible here (e.g. an internal snapshot of a UEFI VM)."""

    code = "422"


class Internal(EdgevmError):
    """Something went wrong inside edgevm; the message is a plain sentence, never a traceback."""

    code = "500"


class Unavailable(EdgevmError):
    """A backend (libvirt, the kernel, JetStream) is unavailable or did not answer in time."""

    code = "503"


class RemoteError(EdgevmError):
    """An error reply received from another edgevm endpoint, carrying its code unchanged."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message, field)
        self.code = code


class BackendError(Exception):
    """A backend (libvirt, qemu-img, the kernel, a store) failed; the message is a sentence fit for a user.

    Drivers raise subclasses of the kinds below, never their library's own exceptions; `field` names the
    request field at fault when the driver knows it. The table `_REPLY_AS` says how each kind replies.
    """

    field: str | None = None


class BackendUnavailable(BackendError):
    """The backend cannot be reached (no connection, or the connection was lost)."""


class BackendTimeout(BackendError):
    """The backend did not answer within the deadline."""


class BackendMissing(BackendError):
    """The object the backend was asked about does not exist there."""


class BackendWrongState(BackendError):
    """The operation is not possible in the object's current state."""


class BackendUnsupported(BackendError):
    """The backend cannot do this here (an unsupported configuration, operation or flag)."""


class BackendConflict(BackendError):
    """Another object already holds the name, address or resource the operation needs."""


class FieldError(ValueError):
    """A rule broken by one field, raised while validating a struct; msgspec adds where the struct sits."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


# The one table from an error that is not an EdgevmError to the protocol error it replies as: the first
# class of the error's MRO found here wins, so a driver's error replies as the kind it subclasses.
_REPLY_AS: dict[type[BaseException], type[EdgevmError]] = {
    FieldError: InvalidRequest,
    BackendMissing: NotFound,
    BackendConflict: Conflict,
    BackendWrongState: Conflict,
    BackendUnsupported: Unprocessable,
    BackendUnavailable: Unavailable,
    BackendTimeout: Unavailable,
    # Any other backend failure: its message is the backend's sentence, the cause stays a 500.
    BackendError: Internal,
    # A NATS or JetStream failure that reaches a handler: the bus is the unavailable backend.
    nats.errors.Error: Unavailable,
}


def to_edgevm_error(error: BaseException) -> EdgevmError | None:
    """Return `error` as the EdgevmError it replies as (see `_REPLY_AS`), or None for an unexpected error."""
    if isinstance(error, EdgevmError):
        return error
    for cls in type(error).__mro__:
        target = _REPLY_AS.get(cls)
        if target is not None:
            return target(str(error) or target.__doc__ or cls.__name__, getattr(error, "field", None))
    return None


_AT = re.compile(r"^(?P<rule>.*?)(?: - at `(?P<path>\$[^`]*)`)?$", re.S)
_NAMED_FIELD = re.compile(r"^(?:Object (?:missing required|contains unknown) field `(?P<key>[^`]+)`)$")
_ENUM_VALUE = re.compile(r"^Invalid enum value '(?P<value>.*)'$", re.S)
_KEY = r"[a-z_][a-z0-9_]*(?:\[\d+\])?"
_FIELD_PREFIX = re.compile(rf"^(?P<key>{_KEY}(?:\.{_KEY})*): (?P<rule>.+)$", re.S)


def invalid_from_msgspec(
    error: msgspec.ValidationError | msgspec.DecodeError, root: Any = None
) -> InvalidRequest:
    """Turn a msgspec decoding error into a 400 whose field is a dotted path like `volumes[0].size`.

    With `root`, the type that was decoded, an invalid enum value is answered with the values allowed.
    """
    if isinstance(error, msgspec.DecodeError) and not isinstance(error, msgspec.ValidationError):
        return InvalidRequest(f"the request body is not valid JSON: {error}", None)
    match = _AT.match(str(error))
    assert match is not None  # the pattern matches every string
    rule, path = match.group("rule"), match.group("path") or "$"
    parts = [path[2:]] if path.startswith("$.") else []
    if named := _NAMED_FIELD.match(rule):
        parts.append(named.group("key"))
        rule = "is required" if "missing" in rule else "is not a known field"
    elif enum := _ENUM_VALUE.match(rule):
        rule = f"invalid enum value {excerpt(enum.group('value'))}"
    elif prefixed := _FIELD_PREFIX.match(rule):
        parts.append(prefixed.group("key"))
        rule = prefixed.group("rule")
    else:
        rule = rule[0].lower() + rule[1:] if rule else "is invalid"
    if "matching regex '" in rule:  # msgspec quotes the pattern with repr(): show it as written
        rule = rule.replace("\\\\", "\\")
    field = ".".join(p for p in parts if p).replace(".[", "[") or None
    if root is not None and field is not None and rule.startswith("invalid enum value"):
        allowed = _literal_values(root, field)
        if allowed:
            rule += ": must be one of " + ", ".join(repr(v) for v in allowed)
    if field is None:
        return InvalidRequest(f"request: {rule}", None)
    # An unknown field's name is the caller's text: quote a long one as an excerpt.
    shown = field if len(field) <= EXCERPT_CHARS else excerpt(field)
    return InvalidRequest(f"{shown}: {rule}", clip(field, MAX_ERROR_FIELD))


def _literal_values(root: Any, field: str) -> list[Any]:
    """Return the values a Literal field at dotted path `field` of type `root` allows (or [])."""
    info: Any = msgspec.inspect.type_info(root)
    for part in re.findall(r"[a-z_][a-z0-9_]*|\[\d+\]", field):
        info = _unwrap(info, part)
        if info is None:
            return []
    options = info.types if isinstance(info, msgspec.inspect.UnionType) else (info,)
    values: list[Any] = []
    for option in options:
        if isinstance(option, msgspec.inspect.LiteralType):
            values.extend(option.values)
    return values


def _unwrap(info: Any, part: str) -> Any:
    options = info.types if isinstance(info, msgspec.inspect.UnionType) else (info,)
    for option in options:
        if part.startswith("[") and isinstance(option, msgspec.inspect.ListType):
            return option.item_type
        if isinstance(option, msgspec.inspect.StructType):
            for f in option.fields:
                if f.encode_name == part:
                    return f.type
    return None


