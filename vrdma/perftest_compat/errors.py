"""Errors of vrdma.perftest_compat: one base, each naming the bad value."""
from __future__ import annotations


class PerftestError(Exception):
    """Base of the package's errors; ``vrdma perftest`` exits 1 on any of them."""


class ExchangeError(PerftestError):
    """A side-channel message that does not parse, or a value that does not fit one."""


class OobError(PerftestError):
    """The TCP channel failed: refused, reset, closed early, or timed out."""


class SetupError(PerftestError):
    """Options that do not go together, or verbs resources that could not be made."""


class CompletionError(PerftestError):
    """A failed completion, or none within the timeout."""
