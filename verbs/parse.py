"""Enumerations that parse untrusted numbers.

Every enumeration of :mod:`verbs` (and of the device ABI in
``virtio_rdma.constants``) derives from :class:`ParseIntEnum` or
:class:`ParseIntFlag`: ``Enum.parse(value)`` (or :func:`parse`) converts a
number read from a guest or a peer and raises :class:`~verbs.errors.UnknownValueError`
naming it, never ``KeyError``/``ValueError`` from the enum machinery. A flag
value with a bit outside the enumeration's members is unknown as a whole.
"""
from __future__ import annotations

import enum
from typing import Any, Self, cast

from verbs.errors import UnknownValueError

__all__ = ["ParseIntEnum", "ParseIntFlag", "parse"]


class _Parse:
    #: what enum.Enum gives the classes this mixes into: value -> member
    _value2member_map_: dict[Any, Any]

    @classmethod
    def parse(cls, value: Any) -> Self:
        # The enum's own value -> member map first: the lookup ``cls(value)``
        # starts with, without its call overhead (WQE, CQE and doorbell
        # decoding parse on every operation).
        try:
            member = cls._value2member_map_.get(value)
        except TypeError:  # unhashable: cls() says what is wrong with it
            member = None
        if member is not None:
            return member
        try:
            return cast(Any, cls)(value)  # the enum's lookup (an Enum is callable; this mixin is not)
        except ValueError:
            raise UnknownValueError(f"{value!r} is not a valid {cls.__name__}") from None


class ParseIntEnum(_Parse, enum.IntEnum):
    """An ``IntEnum`` with :meth:`parse` for untrusted numbers."""


class ParseIntFlag(_Parse, enum.IntFlag, boundary=enum.STRICT):
    """An ``IntFlag`` (STRICT: no unknown bits) with :meth:`parse` for untrusted numbers."""

    @classmethod
    def parse(cls, value: Any) -> Self:
        member: Any
        try:  # valid values only (STRICT never caches others)
            member = cls._value2member_map_.get(value)
        except TypeError:  # unhashable: int() says what is wrong with it
            member = None
        if member is not None:
            return member
        value = int(value)
        allowed = cls.all_bits()
        if value & ~allowed:
            raise UnknownValueError(
                f"{cls.__name__} value {value:#x} has unknown bits {value & ~allowed:#x}"
            )
        return cls(value)

    @classmethod
    def all_bits(cls) -> int:
        v = cls.__dict__.get("_all_bits_cache")
        if v is None:
            v = 0
            for m in cls:
                v |= m.value
            type.__setattr__(cls, "_all_bits_cache", v)
        return v


def parse(enum_cls, value):
    """Convert an untrusted number to ``enum_cls`` or raise UnknownValueError."""
    return enum_cls.parse(value)
