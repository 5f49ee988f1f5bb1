# cython: language_level=3
"""C-level view of guest memory, cimported by virtio._split.

``RegionTable`` is an immutable snapshot of a GuestMemory's regions sorted by
guest-physical address, with the host pointer of each. GuestMemory builds a
new table on every add/remove and invalidates the old one (``valid = 0`` and
``n = 0``), so a queue or chain that cached pointers from an old table can
detect it with one load.
"""
from libc.stdint cimport uint64_t


cdef struct vr_region:
    uint64_t first      # first guest-physical address of the region
    uint64_t last       # last guest-physical address (inclusive: gpa + size may be 2**64)
    char *host          # host virtual address of `first` in this process


cdef class Mapping:
    """One shared RW mmap() of an fd, exporting the buffer protocol."""
    cdef char *addr
    cdef size_t length
    cdef Py_ssize_t exports
    cdef bint unmapped
    cdef bint close_requested
    cdef Py_ssize_t shape[1]
    cdef Py_ssize_t strides[1]
    cdef int _unmap(self) noexcept


cdef class RegionTable:
    cdef vr_region *regions
    cdef readonly Py_ssize_t n
    cdef Py_ssize_t hint
    cdef readonly bint valid
    cdef readonly unsigned long long generation
    cdef list views      # memoryview of each region, same order as `regions`
    cdef list owners     # the MemoryRegion objects (keep them alive)

    cdef Py_ssize_t find(self, uint64_t gpa, uint64_t length) noexcept nogil
    cdef char *translate(self, uint64_t gpa, uint64_t length) noexcept nogil
    cdef object view_at(self, Py_ssize_t idx, uint64_t gpa, uint64_t length)
