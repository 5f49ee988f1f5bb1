"""Stubs for roce.rc._fastrx (see _fastrx.pyx)."""
from collections.abc import Callable
from typing import Any

from roce._udpio import RxRing

STOP_REASONS: tuple[str, ...]

class RequestFastPath:
    taken: int
    stop: int
    def __init__(self, targets: dict[int, Any], done: Callable[[Any, int], object]) -> None: ...
    def __call__(self, rx: RxRing, i: int, n: int, envs: dict) -> int: ...
