"""Errors of the single-application guest image and its launcher (:mod:`vrdma.image`).

One base, :class:`ImageError`; :class:`ToolMissing` says the machine lacks something
(a tool, an apt candidate, the QEMU 11.1 root), so a test skips and says which;
:class:`BuildError` is a failed build step; :class:`LaunchError` a VM that could not be
started or did not report its application's status.
"""
from __future__ import annotations


class ImageError(Exception):
    """Base of every error raised by vrdma.image."""


class ToolMissing(ImageError):
    """The machine lacks a capability the build or the launch needs (names it)."""


class BuildError(ImageError):
    """A build step failed (the message names the step and its output)."""


class LaunchError(ImageError):
    """QEMU could not be started, or the guest ended without an application status."""
