"""Assertions on accel_core's typed errors: the exact class (not just ValueError/TypeError),
the message, and the argument and value the error names."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import pytest

_ANY = object()


@contextmanager
def raises_exactly(cls: type[BaseException], match: str | None = None, *, argument: Any = _ANY,
                   value: Any = _ANY) -> Iterator[Any]:
    """Like ``pytest.raises(cls, match=...)``, but the error must be exactly ``cls`` (a subclass
    is a different kind of bad input) and, when given, name ``argument`` and hold ``value``."""
    with pytest.raises(cls, match=match) as info:
        yield info
    err = info.value
    assert type(err) is cls, f"raised {type(err).__name__} ({err}), expected exactly {cls.__name__}"
    if argument is not _ANY:
        assert err.argument == argument, f"{cls.__name__} names {err.argument!r}, expected {argument!r}"
    if value is not _ANY:
        assert err.value == value, f"{cls.__name__} holds {err.value!r}, expected {value!r}"
