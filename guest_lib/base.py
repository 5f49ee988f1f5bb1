"""Ownership rules shared by every verbs object (as pyverbs does them).

A child holds its parent; a parent keeps a weak set of its children and
closes them first. ``close()`` is idempotent; objects are context managers.
"""
from __future__ import annotations

import weakref

from guest_lib.errors import UserError


class VerbsObject:
    #: children close in ascending rank: QPs before the MRs, PDs and CQs they use
    _close_rank = 9

    def __init__(self, parent: VerbsObject | None = None):
        self._children: weakref.WeakSet = weakref.WeakSet()
        self._closed = False
        self.parent = parent
        if parent is not None:
            parent._check_open()
            parent._children.add(self)

    def _check_open(self) -> None:
        if self._closed:
            raise UserError(f"{type(self).__name__} is closed")

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        for child in sorted(self._children, key=lambda c: c._close_rank):
            child.close()
        try:
            self._release()
        finally:
            self._closed = True
            if self.parent is not None:
                self.parent._children.discard(self)

    def _abandon(self) -> None:
        """A constructor failed after joining its parent: forget this object
        (it already gave back what it had taken)."""
        self._closed = True
        if self.parent is not None:
            self.parent._children.discard(self)

    def _release(self) -> None:
        """Free what this object holds on the device; children are closed."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):  # best effort, like pyverbs' dealloc
        try:
            if not self._closed:
                self.close()
        except Exception:
            pass
