# cython: language_level=3
"""Cython core of virtio.memory: shared mappings and the GPA region table.

* :class:`Mapping` owns one ``mmap(MAP_SHARED, PROT_READ|PROT_WRITE)`` of an
  fd and exports it through the buffer protocol, counting exports. ``close()``
  unmaps immediately when nothing is exported; otherwise the unmap is deferred
  until the last exported view is released (never a dangling view). A
  module-level counter tracks live mappings (:func:`live_mappings`).
* :class:`RegionTable` is the sorted region table used by the split virtqueue
  hot path (see ``_memory.pxd``): ``translate()`` is a nogil binary search.
"""
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_WRITABLE, PyBUF_SIMPLE
from cpython.mem cimport PyMem_Malloc, PyMem_Free
from libc.errno cimport errno
from libc.stdint cimport uint64_t
from posix.mman cimport mmap, munmap, PROT_READ, PROT_WRITE, MAP_SHARED, MAP_FAILED, MAP_NORESERVE

import os

from .errors import GuestMemoryError

#: mmap flag for Mapping(extra_flags=...): reserve no swap for the mapping
NORESERVE = MAP_NORESERVE

cdef Py_ssize_t _live = 0
cdef Py_ssize_t _deferred = 0


def live_mappings():
    """Number of mappings made by :class:`Mapping` that are still mapped."""
    return _live


def deferred_unmaps():
    """Closed mappings still mapped because views of them are still held."""
    return _deferred


def buffer_address(obj, bint writable=True):
    """Address of the first byte of a C-contiguous buffer (released at once)."""
    cdef Py_buffer buf
    PyObject_GetBuffer(obj, &buf, (PyBUF_WRITABLE if writable else PyBUF_SIMPLE))
    cdef size_t addr = <size_t>buf.buf
    PyBuffer_Release(&buf)
    return addr


cdef class Mapping:
    def __cinit__(self, int fd, size_t length, int extra_flags=0):
        global _live
        self.addr = NULL
        self.unmapped = True
        if length == 0:
            raise ValueError("cannot map 0 bytes")
        cdef void *p = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_SHARED | extra_flags, fd, 0)
        if p == MAP_FAILED:
            e = errno
            raise OSError(e, os.strerror(e))
        self.addr = <char *>p
        self.length = length
        self.unmapped = False
        self.close_requested = False
        self.exports = 0
        _live += 1

    @property
    def address(self):
        return <size_t>self.addr

    @property
    def size(self):
        return self.length

    @property
    def closed(self):
        return self.unmapped

    @property
    def exported(self):
        return self.exports

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        if self.unmapped or self.close_requested:
            raise ValueError("mapping is closed")
        self.shape[0] = <Py_ssize_t>self.length
        self.strides[0] = 1
        buffer.buf = self.addr
        buffer.obj = self
        buffer.len = <Py_ssize_t>self.length
        buffer.readonly = 0
        buffer.itemsize = 1
        buffer.format = b"B"
        buffer.ndim = 1
        buffer.shape = self.shape
        buffer.strides = self.strides
        buffer.suboffsets = NULL
        buffer.internal = NULL
        self.exports += 1

    def __releasebuffer__(self, Py_buffer *buffer):
        self.exports -= 1
        if self.exports == 0 and self.close_requested:
            self._unmap()

    cdef int _unmap(self) noexcept:
        global _live, _deferred
        if self.unmapped:
            return 0
        munmap(self.addr, self.length)
        self.unmapped = True
        if self.close_requested:
            _deferred -= 1
        _live -= 1
        return 0

    def close(self):
        """Unmap now and return True, or - if buffers are still exported -
        defer the unmap to the release of the last one and return False."""
        global _deferred
        if self.unmapped:
            return True
        if self.exports:
            if not self.close_requested:
                self.close_requested = True
                _deferred += 1
            return False
        self._unmap()
        return True

    def __dealloc__(self):
        # Only reachable with exports == 0 (every exported view holds a reference).
        if not self.unmapped and self.addr != NULL:
            self._unmap()


cdef class RegionTable:
    """Immutable sorted snapshot of regions: ``RegionTable(gen, [(first, size, host, view, owner), ...])``."""

    def __cinit__(self):
        self.regions = NULL
        self.n = 0
        self.hint = 0
        self.valid = False

    def __init__(self, unsigned long long generation, entries):
        entries = sorted(entries, key=lambda e: e[0])
        cdef Py_ssize_t n = len(entries), i
        self.generation = generation
        self.views = []
        self.owners = []
        if n:
            self.regions = <vr_region *>PyMem_Malloc(n * sizeof(vr_region))
            if self.regions == NULL:
                raise MemoryError()
        for i in range(n):
            first, size, host, view, owner = entries[i]
            self.regions[i].first = <uint64_t>first
            self.regions[i].last = <uint64_t>(first + size - 1)
            self.regions[i].host = <char *><size_t>host
            self.views.append(view)
            self.owners.append(owner)
        self.n = n
        self.valid = True

    def __dealloc__(self):
        PyMem_Free(self.regions)

    def invalidate(self):
        """Forget every region: later lookups fail, cached pointers are stale."""
        self.valid = False
        self.n = 0
        self.views = []
        self.owners = []

    cdef Py_ssize_t find(self, uint64_t gpa, uint64_t length) noexcept nogil:
        """Index of the one region holding [gpa, gpa+length), or -1. A zero
        length succeeds when gpa itself is inside a region."""
        cdef Py_ssize_t lo, hi, mid, i = self.hint
        cdef vr_region *r
        if self.n == 0:
            return -1
        if i >= self.n or not (self.regions[i].first <= gpa <= self.regions[i].last):
            lo = 0
            hi = self.n - 1
            i = -1
            while lo <= hi:
                mid = (lo + hi) >> 1
                if self.regions[mid].first <= gpa:
                    i = mid
                    lo = mid + 1
                else:
                    hi = mid - 1
            if i < 0 or gpa > self.regions[i].last:
                return -1
            self.hint = i
        r = &self.regions[i]
        if length != 0 and length - 1 > r.last - gpa:
            return -1
        return i

    cdef char *translate(self, uint64_t gpa, uint64_t length) noexcept nogil:
        cdef Py_ssize_t i = self.find(gpa, length)
        if i < 0:
            return NULL
        return self.regions[i].host + (gpa - self.regions[i].first)

    cdef object view_at(self, Py_ssize_t idx, uint64_t gpa, uint64_t length):
        cdef Py_ssize_t off = <Py_ssize_t>(gpa - self.regions[idx].first)
        return self.views[idx][off:off + <Py_ssize_t>length]

    def lookup(self, gpa, length):
        """(region index, offset) of [gpa, gpa+length) or None."""
        if gpa < 0 or length < 0 or gpa >= 1 << 64 or length >= 1 << 64:
            return None
        cdef Py_ssize_t i = self.find(<uint64_t>gpa, <uint64_t>length)
        if i < 0:
            return None
        return i, gpa - self.regions[i].first

    def view(self, gpa, length):
        """Writable memoryview of [gpa, gpa+length) or GuestMemoryError."""
        hit = self.lookup(gpa, length)
        if hit is None:
            raise GuestMemoryError(
                f"guest range gpa={gpa:#x} length={length:#x} is not inside one memory region")
        i, off = hit
        return self.views[i][off:off + length]

    def host_address(self, gpa, length):
        """Host virtual address of gpa (range checked) as an int."""
        hit = self.lookup(gpa, length)
        if hit is None:
            raise GuestMemoryError(
                f"guest range gpa={gpa:#x} length={length:#x} is not inside one memory region")
        i, off = hit
        return <size_t>self.regions[<Py_ssize_t>i].host + off
