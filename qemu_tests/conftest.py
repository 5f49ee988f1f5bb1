"""Shared fixtures for the QEMU harness tests: skip cleanly when a binary is missing."""

from __future__ import annotations

import shutil

import pytest


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed")
    return path


@pytest.fixture
def qemu_system() -> str:
    return require_binary("qemu-system-x86_64")


@pytest.fixture
def qemu_storage_daemon() -> str:
    require_binary("qemu-img")
    return require_binary("qemu-storage-daemon")
