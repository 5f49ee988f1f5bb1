"""Test and benchmark utilities: the real back-end in a background thread.

:class:`BackendThread` runs a :class:`~vhost_user.server.BackendServer` on its
own uvloop event loop in a thread of the calling process, so a test can talk
to it over a real unix socket with a real front-end and still inspect the
server's state (metrics, connections) safely through :meth:`call`.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import os
import subprocess
import sys
import tempfile
import threading
import time

from vhost_user.server import BackendServer


class BackendThread:
    def __init__(self, path: str, device_factory, services=(), **server_kw):
        self.path = path
        self.device_factory = device_factory  # device_factory(ConnectionInfo)
        self.server_kw = server_kw  # BackendServer options: policy=, socket_mode=...
        self.services = list(services)  # async start()/aclose() objects run in the loop
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: BackendServer | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> BackendThread:
        self._thread = threading.Thread(target=self._run, name="vrdma-backend", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error:
            raise self._error
        return self

    def _run(self) -> None:
        import uvloop

        self.loop = loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
        self.server = server = BackendServer(self.path, self.device_factory, loop=loop, **self.server_kw)
        started: list = []

        async def close():
            await server.close()
            for svc in reversed(started):
                await svc.aclose()

        try:
            for svc in self.services:
                self.loop.run_until_complete(svc.start())
                started.append(svc)
            self.loop.run_until_complete(self.server.start())
        except BaseException as e:
            self._error = e
            self.loop.run_until_complete(close())
            self.loop.close()
            self._ready.set()
            return
        self._ready.set()
        try:
            self.loop.run_forever()
        finally:
            self.loop.run_until_complete(close())
            self.loop.close()

    def call(self, fn, *args, timeout: float = 10.0):
        """Run fn(*args) on the back-end's loop thread and return its result."""
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def run():
            try:
                fut.set_result(fn(*args))
            except BaseException as e:
                fut.set_exception(e)

        assert self.loop is not None and self.server is not None, "the back-end is not started"
        self.loop.call_soon_threadsafe(run)
        return fut.result(timeout)

    def metrics(self):
        return self.call(lambda: self.server.metrics)  # type: ignore[union-attr]  # call() checked

    def connection_count(self) -> int:
        return self.call(lambda: len(self.server.connections))  # type: ignore[union-attr]  # call() checked

    def wait_for(self, predicate, timeout: float = 30.0) -> bool:
        """Poll ``predicate(server)`` on the loop thread until true (False after ``timeout``: generous,
        since a loaded machine can stall the loop thread for seconds and success returns at once)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.call(lambda: predicate(self.server)):
                return True
            time.sleep(0.005)
        return False

    def stop(self) -> None:
        if self.loop is not None and self._thread is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class DaemonProcess:
    """``vrdma backend`` as a real process on a fresh socket path (benchmarks,
    the demo, and tests where a thread would share the GIL with the client).
    ``args`` are extra command-line arguments (``--device blk``, ``--poll-us``...).
    ``timeout`` bounds the wait for the socket: a daemon started inside a TCG guest
    (the kernel-rxe tests) takes 30 s or more to import and listen on a loaded machine;
    a daemon that exits is noticed at once whatever the bound."""

    def __init__(self, *args: str, timeout: float = 120.0):
        self._dir = tempfile.TemporaryDirectory()
        self.path = os.path.join(self._dir.name, "vrdma.sock")
        self.proc = subprocess.Popen([sys.executable, "-m", "vrdma", "backend", "--socket", self.path, *args],
                                     stdout=subprocess.DEVNULL)
        # The server renames its socket into place once it listens.
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"vrdma backend {' '.join(args)} did not start listening on {self.path}")
            time.sleep(0.02)

    def close(self) -> int | None:
        """SIGTERM; returns the exit status (0 for a clean shutdown)."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            rc = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._dir.cleanup()
        return rc

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}
