"""Stubs for roce.rc._fastrx (see _fastrx.pyx)."""
from collections.abc import Callable
from typing import Any, Self

from roce._udpio import RxRing

STOP_REASONS: tuple[str, ...]

class RequestFastPath:
    ack_sink: Callable[[str, int, int, int, int, int], object] | None
    @property
    def acks_sent(self) -> int: ...
    @property
    def taken(self) -> int: ...
    @property
    def stop(self) -> int: ...
    def __new__(cls, targets: dict[int, Any], done: Callable[[Any, int], object],
                clock: Callable[[], float] | None = ...) -> Self: ...
    def __call__(self, rx: RxRing, i: int, n: int, envs: dict) -> int: ...
