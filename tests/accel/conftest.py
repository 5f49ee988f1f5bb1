"""Shared by the accel_core tests: no test may leave an accelerator worker thread running."""
import threading

import pytest


def _threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("vrdma-accel-")}


@pytest.fixture(autouse=True)
def no_leaked_threads():
    before = _threads()
    yield
    leaked = _threads() - before
    assert not leaked, f"worker threads still alive: {sorted(t.name for t in leaked)}"
