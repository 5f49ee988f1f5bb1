"""The admin protocol: line-delimited JSON requests and responses (pure codec).

A client sends one request per line, ``{"id": N, "cmd": "NAME", "args": {...}}``,
and reads one response line per request, in order:
``{"id": N, "ok": true, "result": ...}`` or
``{"id": N, "ok": false, "error": {"type": "NAME", "message": "..."}}``.
A request line is at most :data:`MAX_REQUEST_BYTES` (newline included); a
longer one is an error and ends the connection (the rest of it is never
read). This module encodes, decodes and splits lines; it does no I/O.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

#: longest request line the daemon reads (bytes, newline included)
MAX_REQUEST_BYTES = 64 * 1024
#: longest response line a client reads (bytes, newline included)
MAX_RESPONSE_BYTES = 16 * 1024 * 1024
#: the commands the daemon answers
COMMANDS = ("health", "guests", "qps", "queues", "jobs", "peers", "cancel", "tenant_set",
            "tenant_reset", "tenants", "drain", "undrain", "status")


class AdminError(Exception):
    """Base of the admin protocol's errors; ``kind`` goes on the wire."""

    kind = "error"


class ProtocolError(AdminError):
    """A request or response that is not the protocol (bad JSON, bad field)."""

    kind = "protocol"


class TooLong(ProtocolError):
    kind = "too_long"


class UnknownCommand(AdminError):
    kind = "unknown_command"


class BadArgument(AdminError):
    kind = "bad_argument"


class NotFound(AdminError):
    kind = "not_found"


class Busy(AdminError):
    kind = "busy"


class NotSupported(AdminError):
    kind = "not_supported"


class Refused(AdminError):
    """The peer is not allowed (wrong uid) or the daemon has too many clients."""

    kind = "refused"


class RemoteError(AdminError):
    """An error the daemon answered with (client side): ``kind`` as sent."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Request:
    id: int
    cmd: str
    args: dict[str, Any] = field(default_factory=dict)


def encode_request(req: Request) -> bytes:
    doc = {"id": req.id, "cmd": req.cmd, "args": req.args}
    line = json.dumps(doc, separators=(",", ":")).encode() + b"\n"
    if len(line) > MAX_REQUEST_BYTES:
        raise TooLong(f"request {req.cmd!r} is {len(line)} bytes (at most {MAX_REQUEST_BYTES})")
    return line


def decode_request(line: bytes) -> Request:
    """One request line (without or with its newline); :class:`ProtocolError` naming what is wrong."""
    if len(line) > MAX_REQUEST_BYTES:
        raise TooLong(f"request line of {len(line)} bytes (at most {MAX_REQUEST_BYTES})")
    try:
        doc = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ProtocolError(f"request is not JSON: {str(e)[:200]}") from None
    if not isinstance(doc, dict):
        raise ProtocolError(f"request is a JSON {type(doc).__name__}, not an object")
    rid = doc.get("id", 0)
    if isinstance(rid, bool) or not isinstance(rid, int) or not 0 <= rid < 1 << 63:
        raise ProtocolError(f"request id {rid!r} is not an integer in 0..2^63-1")
    cmd = doc.get("cmd")
    if not isinstance(cmd, str):
        raise ProtocolError(f"request cmd {cmd!r} is not a string")
    if cmd not in COMMANDS:
        raise UnknownCommand(f"unknown command {cmd[:64]!r} (known: {', '.join(COMMANDS)})")
    args = doc.get("args", {})
    if not isinstance(args, dict):
        raise ProtocolError(f"request args {str(args)[:64]!r} is not an object")
    return Request(rid, cmd, args)


def request_id(line: bytes) -> int:
    """The id of a request line that failed to decode, if it has one (else 0): the error's id."""
    try:
        doc = json.loads(line)
        rid = doc.get("id", 0) if isinstance(doc, dict) else 0
        return rid if isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid < 1 << 63 else 0
    except (ValueError, UnicodeDecodeError, RecursionError):
        return 0


def encode_result(rid: int, result: Any) -> bytes:
    return json.dumps({"id": rid, "ok": True, "result": result}, separators=(",", ":"),
                      default=str).encode() + b"\n"


def encode_error(rid: int, err: AdminError) -> bytes:
    return json.dumps({"id": rid, "ok": False, "error": {"type": err.kind, "message": str(err)}},
                      separators=(",", ":")).encode() + b"\n"


def decode_response(line: bytes) -> tuple[int, Any]:
    """(id, result) of a response line; an error response raises :class:`RemoteError`."""
    if len(line) > MAX_RESPONSE_BYTES:
        raise TooLong(f"response line of {len(line)} bytes (at most {MAX_RESPONSE_BYTES})")
    try:
        doc = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ProtocolError(f"response is not JSON: {str(e)[:200]}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("ok"), bool):
        raise ProtocolError(f"response {line[:64]!r} is not an object with a boolean 'ok'")
    rid = doc.get("id")
    if not isinstance(rid, int):
        raise ProtocolError(f"response id {rid!r} is not an integer")
    if doc["ok"]:
        return rid, doc.get("result")
    err = doc.get("error")
    if not isinstance(err, dict):
        raise ProtocolError(f"error response without an error object: {line[:64]!r}")
    raise RemoteError(str(err.get("type", "error")), str(err.get("message", "")))


class LineSplitter:
    """Bytes in, complete lines out; a line longer than ``limit`` raises :class:`TooLong`."""

    def __init__(self, limit: int = MAX_REQUEST_BYTES):
        self.limit = limit
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        lines = []
        while True:
            i = self._buf.find(b"\n")
            if i < 0:
                break
            if i + 1 > self.limit:
                raise TooLong(f"line of {i + 1} bytes (at most {self.limit})")
            lines.append(bytes(self._buf[:i + 1]))
            del self._buf[:i + 1]
        if len(self._buf) >= self.limit:
            raise TooLong(f"line of more than {len(self._buf)} bytes (at most {self.limit})")
        return lines

    @property
    def pending(self) -> int:
        return len(self._buf)
