"""Errors of the QEMU test harness (qemu_tests): one base, one subclass per failure kind.

Every error names the bad value or the process that failed and, where a child process
was involved, carries the tail of its stderr so a failed test explains itself.
"""

from __future__ import annotations


class QemuHarnessError(Exception):
    """Base of every error raised by qemu_tests."""


class QemuStartError(QemuHarnessError):
    """A QEMU / qemu-storage-daemon process could not be started or died while starting."""

    def __init__(self, message: str, *, stderr: str = "") -> None:
        self.stderr = stderr
        if stderr:
            message = f"{message}\n--- stderr (tail) ---\n{stderr[-4000:]}"
        super().__init__(message)


class QemuExitedError(QemuHarnessError):
    """The process exited while we were waiting for something from it."""

    def __init__(self, message: str, *, returncode: int | None, stderr: str = "") -> None:
        self.returncode = returncode
        self.stderr = stderr
        if stderr:
            message = f"{message}\n--- stderr (tail) ---\n{stderr[-4000:]}"
        super().__init__(message)


class SerialTimeout(QemuHarnessError, TimeoutError):
    """The expected marker did not appear on the guest serial port in time."""

    def __init__(self, marker: bytes, timeout: float, output: bytes) -> None:
        self.marker = marker
        self.timeout = timeout
        self.output = output
        tail = output[-2000:].decode("utf-8", "replace")
        super().__init__(f"marker {marker!r} not seen on serial within {timeout:.1f}s; "
                         f"serial tail:\n{tail}")


class QmpError(QemuHarnessError):
    """QMP transport failure or a QMP command that returned an error object."""

    def __init__(self, message: str, *, error_class: str | None = None) -> None:
        self.error_class = error_class
        super().__init__(message)


class GuestImageError(QemuHarnessError):
    """The rxe guest image could not be built (package download, extraction, kernel format)."""


class CapabilityMissing(QemuHarnessError):
    """A host capability the harness needs is absent (binary, apt, root, netns); tests skip on it."""
