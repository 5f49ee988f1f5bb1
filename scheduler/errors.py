"""The scheduler's errors: one base, :class:`SchedulerError`; each names the
bad value."""
from __future__ import annotations


class SchedulerError(Exception):
    """Base of every error :mod:`scheduler` raises."""


class UnknownPolicy(SchedulerError, ValueError):
    """A policy name that no policy has (the name is in the message and in ``name``)."""

    def __init__(self, name: str, known: tuple[str, ...]) -> None:
        super().__init__(f"unknown scheduling policy {name!r} (known: {', '.join(known)})")
        self.name = name


class BadRow(SchedulerError, ValueError):
    """A load-table row with an absurd field (negative or non-finite load, unknown kind, ...)."""


class NoCandidate(SchedulerError):
    """No host can run the job: this host has no accelerator of its kind and the table none."""
