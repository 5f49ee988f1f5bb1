"""Minimal QMP client (QEMU Machine Protocol, docs/interop/qmp-spec.rst) over a unix socket.

QMP is JSON objects separated by newlines.  On connect the server sends a greeting
``{"QMP": {"version": ..., "capabilities": [...]}}``; the client must send
``{"execute": "qmp_capabilities"}`` to leave capabilities-negotiation mode.  Every
command gets exactly one ``{"return": ...}`` or ``{"error": {"class", "desc"}}``;
asynchronous ``{"event": ...}`` objects may arrive at any time and are collected in
``events``.  Synchronous, one command at a time; good enough for a test harness.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

from .errors import QmpError


class QmpClient:
    """A connected QMP session.  Use as a context manager or call ``close()``."""

    def __init__(self, path: str, *, timeout: float = 10.0, connect_timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self._buf = b""
        self._sock = self._connect(path, connect_timeout)
        try:
            self._sock.settimeout(timeout)
            greeting = self._read_message()
            if "QMP" not in greeting:
                raise QmpError(f"unexpected QMP greeting from {path}: {greeting!r}")
            self.greeting: dict[str, Any] = greeting["QMP"]
            self.execute("qmp_capabilities")
        except BaseException:
            self._sock.close()
            raise

    @staticmethod
    def _connect(path: str, connect_timeout: float) -> socket.socket:
        deadline = time.monotonic() + connect_timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(path)
                return sock
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                if time.monotonic() >= deadline:
                    raise QmpError(f"cannot connect to QMP socket {path}: {exc}") from exc
                time.sleep(0.05)

    def _read_message(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            try:
                chunk = self._sock.recv(65536)
            except socket.timeout as exc:
                raise QmpError(f"QMP read timed out after {self.timeout}s on {self.path}") from exc
            except OSError as exc:
                raise QmpError(f"QMP read failed on {self.path}: {exc}") from exc
            if not chunk:
                raise QmpError(f"QMP connection {self.path} closed by QEMU")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            msg = json.loads(line)
        except ValueError as exc:
            raise QmpError(f"QMP sent invalid JSON: {line[:200]!r}") from exc
        if not isinstance(msg, dict):
            raise QmpError(f"QMP sent a non-object: {msg!r}")
        return msg

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run ``command`` and return its ``return`` value; raise QmpError on an error reply.

        Argument names are QMP names; ``_`` in Python keywords is turned into ``-``
        (``execute("x-query-virtio-status", path=...)``).
        """
        req: dict[str, Any] = {"execute": command}
        if arguments:
            req["arguments"] = {k.replace("_", "-"): v for k, v in arguments.items()}
        try:
            self._sock.sendall(json.dumps(req).encode() + b"\n")
        except OSError as exc:
            raise QmpError(f"QMP write of {command!r} failed: {exc}") from exc
        while True:
            msg = self._read_message()
            if "event" in msg:
                self.events.append(msg)
                continue
            if "error" in msg:
                err = msg["error"]
                raise QmpError(f"QMP {command} failed: {err.get('class')}: {err.get('desc')}",
                               error_class=err.get("class"))
            if "return" in msg:
                return msg["return"]
            raise QmpError(f"unexpected QMP reply to {command}: {msg!r}")

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __enter__(self) -> "QmpClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
