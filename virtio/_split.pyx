# cython: language_level=3
"""Hot path of split virtqueues (virtio spec v1.2 §2.7), both roles.

Device side (:class:`DeviceQueue`): reads the available ring, walks and
validates descriptor chains (direct and indirect), writes used elements.
Driver side (:class:`DriverQueue`): fills descriptors and the available ring,
reaps used elements.

All ring accesses go through raw host pointers obtained from the C region
table of :mod:`virtio.memory` (``_memory.RegionTable``) and cached per table
(a new table is built on every memory change). Descriptors are copied once
into a local struct and validated on the copy (no double fetch from memory
the other side can change). Ring indices are 16-bit with wraparound.

Memory ordering, the two sides being different processes on shared memory
(§2.7.13, and Linux virtio_ring / vhost):

* device: load avail->idx with acquire, then ring entries and descriptors;
  store used elements, then used->idx with release; a seq_cst fence between
  publishing used->idx and reading used_event / avail->flags (should_notify)
  and between writing avail_event / used->flags and re-reading avail->idx
  (enable_notification);
* driver: mirrored (descriptors and avail entry, release store of
  avail->idx, seq_cst fence before reading avail_event / used->flags;
  acquire load of used->idx before reading used elements).
"""
cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE
from cpython.mem cimport PyMem_Malloc, PyMem_Free
from libc.stdint cimport uint16_t, uint32_t, uint64_t, int32_t
from libc.string cimport memcpy, memset

from ._memory cimport RegionTable, vr_region

from .errors import QueueFullError, VirtqueueError


cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    #define VR_LE16(x) __builtin_bswap16(x)
    #define VR_LE32(x) __builtin_bswap32(x)
    #define VR_LE64(x) __builtin_bswap64(x)
    #else
    #define VR_LE16(x) (x)
    #define VR_LE32(x) (x)
    #define VR_LE64(x) (x)
    #endif
    typedef struct { uint64_t addr; uint32_t len; uint16_t flags; uint16_t next; } vr_desc;
    static inline uint16_t vr_ld16_acq(const char *p) {
        return VR_LE16(__atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE)); }
    static inline uint16_t vr_ld16(const char *p) {
        return VR_LE16(__atomic_load_n((const uint16_t *)p, __ATOMIC_RELAXED)); }
    static inline void vr_st16_rel(char *p, uint16_t v) {
        __atomic_store_n((uint16_t *)p, VR_LE16(v), __ATOMIC_RELEASE); }
    static inline void vr_st16(char *p, uint16_t v) {
        __atomic_store_n((uint16_t *)p, VR_LE16(v), __ATOMIC_RELAXED); }
    static inline uint32_t vr_ld32(const char *p) {
        return VR_LE32(__atomic_load_n((const uint32_t *)p, __ATOMIC_RELAXED)); }
    static inline void vr_st32(char *p, uint32_t v) {
        __atomic_store_n((uint32_t *)p, VR_LE32(v), __ATOMIC_RELAXED); }
    static inline void vr_mb(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
    static inline void vr_wmb(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }
    static inline void vr_rmb(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
    /* Copy one descriptor out of shared memory exactly once. */
    static inline void vr_read_desc(const char *p, vr_desc *d) {
        memcpy(d, p, 16);
        __asm__ __volatile__("" ::: "memory");
        d->addr = VR_LE64(d->addr); d->len = VR_LE32(d->len);
        d->flags = VR_LE16(d->flags); d->next = VR_LE16(d->next);
    }
    static inline void vr_write_desc(char *p, uint64_t addr, uint32_t len, uint16_t flags, uint16_t next) {
        vr_desc d; d.addr = VR_LE64(addr); d.len = VR_LE32(len);
        d.flags = VR_LE16(flags); d.next = VR_LE16(next);
        memcpy(p, &d, 16);
    }
    """
    ctypedef struct vr_desc:
        uint64_t addr
        uint32_t len
        uint16_t flags
        uint16_t next
    uint16_t vr_ld16_acq(const char *p) noexcept nogil
    uint16_t vr_ld16(const char *p) noexcept nogil
    void vr_st16_rel(char *p, uint16_t v) noexcept nogil
    void vr_st16(char *p, uint16_t v) noexcept nogil
    uint32_t vr_ld32(const char *p) noexcept nogil
    void vr_st32(char *p, uint32_t v) noexcept nogil
    void vr_mb() noexcept nogil
    void vr_wmb() noexcept nogil
    void vr_rmb() noexcept nogil
    void vr_read_desc(const char *p, vr_desc *d) noexcept nogil
    void vr_write_desc(char *p, uint64_t addr, uint32_t len, uint16_t flags, uint16_t next) noexcept nogil


cdef enum:
    F_NEXT = 1
    F_WRITE = 2
    F_INDIRECT = 4
    AVAIL_F_NO_INTERRUPT = 1
    USED_F_NO_NOTIFY = 1
    MAX_SIZE = 32768
    SMALL_SEGS = 4

# error codes of the nogil chain walk
cdef enum:
    E_OK = 0
    E_HEAD_RANGE
    E_NEXT_RANGE
    E_LOOP
    E_TOO_LONG
    E_INDIRECT_NOT_NEG
    E_INDIRECT_LEN
    E_INDIRECT_BIG
    E_INDIRECT_NESTED
    E_INDIRECT_NEXT
    E_INDIRECT_MEM
    E_BUF_MEM
    E_ORDER


cdef struct vr_seg:
    uint64_t gpa
    char *host
    uint32_t len
    uint16_t flags
    int32_t region


cdef struct vr_err:
    int code
    int indirect        # error inside an indirect table
    uint64_t a
    uint64_t b
    uint64_t c


cdef inline bint need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old_idx) noexcept nogil:
    # §2.7.10 vring_need_event
    return <uint16_t>(new_idx - event_idx - 1) < <uint16_t>(new_idx - old_idx)


cdef int walk_chain(RegionTable table, const char *desc_base, uint32_t size, uint16_t head,
                    uint32_t max_len, uint32_t max_indirect, bint indirect_ok,
                    vr_seg *segs, uint32_t *nseg_out, uint32_t *nread_out,
                    uint64_t *rlen_out, uint64_t *wlen_out, vr_err *err) noexcept nogil:
    """Walk and validate the chain starting at *head* into segs[0:max_len]."""
    cdef const char *tbl = desc_base
    cdef uint32_t tbl_n = size, steps = 0, nseg = 0, nread = 0, idx = head, n_ent
    cdef uint64_t rlen = 0, wlen = 0
    cdef bint in_ind = False, seen_write = False
    cdef vr_desc d
    cdef Py_ssize_t ridx
    cdef char *p
    err.indirect = 0
    err.a = 0
    err.b = 0
    err.c = 0
    if head >= size:
        err.code = E_HEAD_RANGE; err.a = head; err.b = size
        return -1
    while True:
        steps += 1
        if steps > tbl_n:
            err.code = E_LOOP; err.a = head; err.b = tbl_n; err.indirect = in_ind
            return -1
        vr_read_desc(tbl + <size_t>idx * 16, &d)
        if d.flags & F_INDIRECT:
            err.a = idx; err.indirect = in_ind
            if in_ind:
                err.code = E_INDIRECT_NESTED
                return -1
            if not indirect_ok:
                err.code = E_INDIRECT_NOT_NEG
                return -1
            if d.flags & F_NEXT:
                err.code = E_INDIRECT_NEXT
                return -1
            if d.len == 0 or d.len % 16:
                err.code = E_INDIRECT_LEN; err.b = d.len
                return -1
            n_ent = d.len // 16
            if n_ent > max_indirect:
                err.code = E_INDIRECT_BIG; err.b = d.len; err.c = max_indirect
                return -1
            p = table.translate(d.addr, d.len)
            if p == NULL:
                err.code = E_INDIRECT_MEM; err.b = d.addr; err.c = d.len
                return -1
            tbl = p
            tbl_n = n_ent
            idx = 0
            steps = 0
            in_ind = True
            continue
        if d.flags & F_WRITE:
            seen_write = True
        elif seen_write:
            err.code = E_ORDER; err.a = idx; err.indirect = in_ind
            return -1
        if nseg >= max_len:
            err.code = E_TOO_LONG; err.a = head; err.b = max_len
            return -1
        ridx = table.find(d.addr, d.len)
        if ridx < 0:
            if d.len != 0:
                err.code = E_BUF_MEM; err.a = idx; err.b = d.addr; err.c = d.len; err.indirect = in_ind
                return -1
            segs[nseg].host = NULL          # zero-length buffer outside memory: never dereferenced
        else:
            segs[nseg].host = table.regions[ridx].host + (d.addr - table.regions[ridx].first)
        segs[nseg].gpa = d.addr
        segs[nseg].len = d.len
        segs[nseg].flags = d.flags
        segs[nseg].region = <int32_t>ridx
        nseg += 1
        if d.flags & F_WRITE:
            wlen += d.len
        else:
            nread += 1
            rlen += d.len
        if not (d.flags & F_NEXT):
            break
        if d.next >= tbl_n:
            err.code = E_NEXT_RANGE; err.a = idx; err.b = d.next; err.c = tbl_n; err.indirect = in_ind
            return -1
        idx = d.next
    nseg_out[0] = nseg
    nread_out[0] = nread
    rlen_out[0] = rlen
    wlen_out[0] = wlen
    err.code = E_OK
    return 0


cdef str _walk_message(vr_err *e, uint16_t head):
    where = "indirect table" if e.indirect else "descriptor table"
    c = e.code
    if c == E_HEAD_RANGE:
        return f"avail ring head index {e.a} >= queue size {e.b}"
    if c == E_NEXT_RANGE:
        return f"chain head {head}: descriptor {e.a} of the {where} has next index {e.b} >= {e.c}"
    if c == E_LOOP:
        return f"chain head {head}: descriptor loop (more than {e.b} descriptors visited in the {where})"
    if c == E_TOO_LONG:
        return f"chain head {head}: chain longer than the maximum of {e.b} descriptors"
    if c == E_INDIRECT_NOT_NEG:
        return f"chain head {head}: descriptor {e.a} is INDIRECT but VIRTIO_F_RING_INDIRECT_DESC is not negotiated"
    if c == E_INDIRECT_LEN:
        return f"chain head {head}: indirect descriptor {e.a} has len {e.b}, not a nonzero multiple of 16"
    if c == E_INDIRECT_BIG:
        return (f"chain head {head}: indirect descriptor {e.a} len {e.b} exceeds the maximum of "
                f"{e.c} entries ({e.c * 16} bytes)")
    if c == E_INDIRECT_NESTED:
        return f"chain head {head}: nested INDIRECT descriptor {e.a} inside an indirect table"
    if c == E_INDIRECT_NEXT:
        return f"chain head {head}: descriptor {e.a} has both INDIRECT and NEXT flags"
    if c == E_INDIRECT_MEM:
        return (f"chain head {head}: indirect table of descriptor {e.a} at addr {e.b:#x} len {e.c} "
                f"is not inside guest memory")
    if c == E_BUF_MEM:
        return (f"chain head {head}: descriptor {e.a} of the {where} buffer addr {e.b:#x} len {e.c} "
                f"is not inside one guest memory region")
    if c == E_ORDER:
        return f"chain head {head}: device-readable descriptor {e.a} of the {where} follows a writable one"
    return f"chain head {head}: error {c}"


cdef object _EMPTY = memoryview(bytearray())


cdef inline RegionTable _table_of(object mem):
    if type(mem) is RegionTable:
        return <RegionTable>mem
    try:
        t = mem._table
    except AttributeError:
        t = None
    if type(t) is not RegionTable:
        raise VirtqueueError(f"expected a GuestMemory, got {type(mem).__name__}")
    return <RegionTable>t


cdef inline uint64_t _u64(object v, str what) except? 0:
    if not isinstance(v, int) or v < 0 or v >= (1 << 64):
        raise VirtqueueError(f"{what} {v!r} is not a 64-bit address")
    return <uint64_t>v


@cython.freelist(64)
@cython.final
cdef class DescriptorChain:
    """One available descriptor chain popped by a DeviceQueue.

    ``readable``/``writable`` are zero-copy views into guest memory (made on
    first access). The chain is valid until the guest memory table changes or
    the chain is pushed; later use raises VirtqueueError."""
    cdef readonly uint16_t head
    cdef readonly int queue_index
    cdef readonly uint64_t readable_len
    cdef readonly uint64_t writable_len
    cdef uint32_t nseg
    cdef uint32_t nread
    cdef vr_seg *segs
    cdef vr_seg small[SMALL_SEGS]
    cdef RegionTable table
    cdef bint pushed
    cdef object _readable
    cdef object _writable

    def __cinit__(self):
        self.segs = self.small
        self.nseg = 0

    def __dealloc__(self):
        if self.segs != self.small:
            PyMem_Free(self.segs)

    cdef int _fill(self, const vr_seg *segs, uint32_t nseg) except -1:
        if self.segs != self.small:
            PyMem_Free(self.segs)
            self.segs = self.small
        if nseg > SMALL_SEGS:
            self.segs = <vr_seg *>PyMem_Malloc(nseg * sizeof(vr_seg))
            if self.segs == NULL:
                self.segs = self.small
                raise MemoryError()
        memcpy(self.segs, segs, nseg * sizeof(vr_seg))
        self.nseg = nseg
        return 0

    cdef int _check(self) except -1:
        if self.table is None:
            raise VirtqueueError("DescriptorChain objects come from DeviceQueue.pop()")
        if self.pushed:
            raise VirtqueueError(f"chain head {self.head} was already pushed", queue=self.queue_index)
        if not self.table.valid:
            raise VirtqueueError(f"chain head {self.head} is stale: the guest memory table changed",
                                 queue=self.queue_index)
        return 0

    cdef list _views(self, uint32_t start, uint32_t stop):
        cdef list out = []
        cdef uint32_t i
        for i in range(start, stop):
            if self.segs[i].region < 0:
                out.append(_EMPTY[0:0])
            else:
                out.append(self.table.view_at(self.segs[i].region, self.segs[i].gpa, self.segs[i].len))
        return out

    @property
    def readable(self):
        """Device-readable buffers, in order (list of memoryviews)."""
        self._check()
        if self._readable is None:
            self._readable = self._views(0, self.nread)
        return self._readable

    @property
    def writable(self):
        """Device-writable buffers, in order (list of writable memoryviews)."""
        self._check()
        if self._writable is None:
            self._writable = self._views(self.nread, self.nseg)
        return self._writable

    @property
    def descriptors(self):
        """[(gpa, len, flags)] of the buffer descriptors, in chain order."""
        return [(self.segs[i].gpa, self.segs[i].len, self.segs[i].flags) for i in range(self.nseg)]

    def __len__(self):
        return self.nseg

    def read(self, Py_ssize_t n=-1):
        """Gather up to *n* (all if negative) readable bytes into a bytes object."""
        self._check()
        cdef uint64_t want = self.readable_len if n < 0 or <uint64_t>n > self.readable_len else <uint64_t>n
        out = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>want)
        self._gather(PyBytes_AS_STRING(out), want, 0)
        return out

    def read_into(self, buf, Py_ssize_t offset=0):
        """Copy readable bytes, starting at *offset*, into writable buffer *buf*; returns the count."""
        self._check()
        cdef Py_buffer pb
        if offset < 0:
            raise VirtqueueError(f"negative read offset {offset}", queue=self.queue_index)
        PyObject_GetBuffer(buf, &pb, PyBUF_WRITABLE)
        cdef uint64_t avail = self.readable_len - <uint64_t>offset if <uint64_t>offset < self.readable_len else 0
        cdef uint64_t n = <uint64_t>pb.len if <uint64_t>pb.len < avail else avail
        try:
            self._gather(<char *>pb.buf, n, <uint64_t>offset)
        finally:
            PyBuffer_Release(&pb)
        return n

    # Copies hold the GIL on purpose: another thread closing the region (which needs
    # the GIL) must not unmap it in the middle of a copy through raw pointers.
    cdef void _gather(self, char *dst, uint64_t n, uint64_t skip) noexcept:
        self._copy(0, self.nread, dst, n, skip, False)

    cdef void _copy(self, uint32_t first, uint32_t last, char *flat, uint64_t n, uint64_t skip,
                    bint into_segs) noexcept:
        """Copy n bytes between ``flat`` and segments [first, last), starting
        ``skip`` bytes into them: into the segments, or out of them."""
        cdef uint32_t i
        cdef uint64_t take, l
        for i in range(first, last):
            if n == 0:
                break
            l = self.segs[i].len
            if skip >= l:
                skip -= l
                continue
            take = l - skip
            if take > n:
                take = n
            if into_segs:
                memcpy(self.segs[i].host + skip, flat, take)
            else:
                memcpy(flat, self.segs[i].host + skip, take)
            flat += take
            n -= take
            skip = 0

    def write(self, data, Py_ssize_t offset=0):
        """Scatter *data* into the writable buffers starting at byte *offset*;
        returns len(data). Raises VirtqueueError if it does not fit."""
        self._check()
        cdef Py_buffer pb
        PyObject_GetBuffer(data, &pb, PyBUF_SIMPLE)
        cdef uint64_t n = <uint64_t>pb.len
        try:
            if offset < 0 or <uint64_t>offset + n > self.writable_len:
                raise VirtqueueError(
                    f"chain head {self.head}: writing {n} bytes at offset {offset} exceeds the "
                    f"{self.writable_len} writable bytes", queue=self.queue_index)
            self._copy(self.nread, self.nseg, <char *>pb.buf, n, <uint64_t>offset, True)
        finally:
            PyBuffer_Release(&pb)
        return pb.len

    def __repr__(self):
        return (f"DescriptorChain(queue={self.queue_index}, head={self.head}, readable={self.nread}/"
                f"{self.readable_len}B, writable={self.nseg - self.nread}/{self.writable_len}B)")


cdef class DeviceQueue:
    """Device (backend) side of one split virtqueue.

    Guest memory is passed to every call (never stored); ring pointers are
    cached per memory table. Errors caused by the guest raise VirtqueueError
    and leave ``last_avail_idx`` at the offending chain."""
    cdef readonly int index
    cdef readonly uint32_t size
    cdef readonly uint64_t desc_gpa, avail_gpa, used_gpa
    cdef readonly bint event_idx, indirect
    cdef readonly uint32_t max_chain_len
    cdef readonly bint notification_enabled
    cdef readonly unsigned long long errors     # guest protocol errors detected (metrics)
    cdef readonly unsigned long long popped     # chains popped
    cdef readonly unsigned long long pushed     # used entries published
    cdef uint16_t _last_avail
    cdef uint16_t _used
    cdef bint _used_known
    cdef uint16_t _signalled_used
    cdef bint _signalled_valid
    cdef RegionTable _table
    cdef char *_desc
    cdef char *_avail
    cdef char *_used_ring
    cdef vr_seg *_scratch

    def __cinit__(self):
        self._scratch = NULL

    def __dealloc__(self):
        PyMem_Free(self._scratch)

    def __init__(self, index, size, desc_gpa, avail_gpa, used_gpa, *, event_idx=False, indirect=True,
                 last_avail_idx=0, used_idx=None, max_chain_len=None):
        if not isinstance(index, int) or index < 0 or index > 0xFFFF:
            raise VirtqueueError(f"invalid queue index {index!r}")
        self.index = index
        if (not isinstance(size, int) or isinstance(size, bool) or size < 1 or size > MAX_SIZE
                or size & (size - 1)):
            raise VirtqueueError(f"queue size {size!r} is not a power of two in 1..{MAX_SIZE}", queue=index)
        self.size = size
        self.desc_gpa = _u64(desc_gpa, "descriptor table address")
        self.avail_gpa = _u64(avail_gpa, "avail ring address")
        self.used_gpa = _u64(used_gpa, "used ring address")
        if self.desc_gpa % 16:
            raise VirtqueueError(f"descriptor table address {desc_gpa:#x} is not 16-byte aligned", queue=index)
        if self.avail_gpa % 2:
            raise VirtqueueError(f"avail ring address {avail_gpa:#x} is not 2-byte aligned", queue=index)
        if self.used_gpa % 4:
            raise VirtqueueError(f"used ring address {used_gpa:#x} is not 4-byte aligned", queue=index)
        self.event_idx = bool(event_idx)
        self.indirect = bool(indirect)
        if max_chain_len is None:
            max_chain_len = size
        if not isinstance(max_chain_len, int) or max_chain_len < 1 or max_chain_len > MAX_SIZE:
            raise VirtqueueError(f"max_chain_len {max_chain_len!r} not in 1..{MAX_SIZE}", queue=index)
        self.max_chain_len = max_chain_len
        self.last_avail_idx = last_avail_idx
        if used_idx is None:
            self._used_known = False
        else:
            self.used_idx = used_idx
        self.notification_enabled = True
        self._signalled_valid = False
        self._table = None
        PyMem_Free(self._scratch)
        self._scratch = <vr_seg *>PyMem_Malloc(self.max_chain_len * sizeof(vr_seg))
        if self._scratch == NULL:
            raise MemoryError()

    @property
    def last_avail_idx(self):
        return self._last_avail

    @last_avail_idx.setter
    def last_avail_idx(self, v):
        if not isinstance(v, int) or v < 0 or v > 0xFFFF:
            raise VirtqueueError(f"last_avail_idx {v!r} not in 0..65535", queue=self.index)
        self._last_avail = v
        self._signalled_valid = False

    @property
    def used_idx(self):
        """Next used index to publish (None until read from the ring when constructed with used_idx=None)."""
        return self._used if self._used_known else None

    @used_idx.setter
    def used_idx(self, v):
        if not isinstance(v, int) or v < 0 or v > 0xFFFF:
            raise VirtqueueError(f"used_idx {v!r} not in 0..65535", queue=self.index)
        self._used = v
        self._used_known = True
        self._signalled_valid = False

    cdef int _map(self, object mem) except -1:
        """Cache ring host pointers for mem's current table."""
        cdef RegionTable t = _table_of(mem)
        if t is self._table and t.valid:
            return 0
        if self._scratch == NULL:
            raise VirtqueueError("DeviceQueue.__init__ was not called")
        if not t.valid:
            raise VirtqueueError("guest memory is closed", queue=self.index)
        cdef char *d = t.translate(self.desc_gpa, 16 * <uint64_t>self.size)
        cdef char *a = t.translate(self.avail_gpa, 6 + 2 * <uint64_t>self.size)
        cdef char *u = t.translate(self.used_gpa, 6 + 8 * <uint64_t>self.size)
        if d == NULL or a == NULL or u == NULL or (<size_t>a) % 2 or (<size_t>u) % 4:
            self.errors += 1
        if d == NULL:
            raise VirtqueueError(f"descriptor table at {self.desc_gpa:#x} ({16 * self.size} bytes) is not "
                                 "inside one guest memory region", queue=self.index)
        if a == NULL:
            raise VirtqueueError(f"avail ring at {self.avail_gpa:#x} ({6 + 2 * self.size} bytes) is not "
                                 "inside one guest memory region", queue=self.index)
        if u == NULL:
            raise VirtqueueError(f"used ring at {self.used_gpa:#x} ({6 + 8 * self.size} bytes) is not "
                                 "inside one guest memory region", queue=self.index)
        if (<size_t>a) % 2 or (<size_t>u) % 4:
            raise VirtqueueError("ring host mapping is misaligned", queue=self.index)
        self._desc = d
        self._avail = a
        self._used_ring = u
        self._table = t
        if not self._used_known:
            self._used = vr_ld16(u + 2)
            self._used_known = True
        return 0

    def map(self, mem):
        """Validate the ring addresses against *mem* now (otherwise done on first use)."""
        self._map(mem)

    cdef int _check_avail(self, uint16_t avail_idx) except -1:
        if <uint16_t>(avail_idx - self._last_avail) > self.size:
            self.errors += 1
            raise VirtqueueError(
                f"avail idx {avail_idx} is {<uint16_t>(avail_idx - self._last_avail)} entries ahead of "
                f"last_avail_idx {self._last_avail} (queue size {self.size})", queue=self.index)
        return 0

    cdef DescriptorChain _pop_one(self, uint16_t avail_idx):
        cdef uint16_t head = vr_ld16(self._avail + 4 + 2 * (self._last_avail & (self.size - 1)))
        cdef uint32_t nseg = 0, nread = 0
        cdef uint64_t rlen = 0, wlen = 0
        cdef vr_err err
        cdef uint32_t max_ind = self.max_chain_len
        cdef int rc
        rc = walk_chain(self._table, self._desc, self.size, head, self.max_chain_len, max_ind,
                        self.indirect, self._scratch, &nseg, &nread, &rlen, &wlen, &err)
        if rc != 0:
            self.errors += 1
            raise VirtqueueError(_walk_message(&err, head), queue=self.index)
        cdef DescriptorChain ch = DescriptorChain.__new__(DescriptorChain)
        ch._fill(self._scratch, nseg)
        ch.head = head
        ch.queue_index = self.index
        ch.nread = nread
        ch.readable_len = rlen
        ch.writable_len = wlen
        ch.table = self._table
        self._last_avail += 1
        self.popped += 1
        return ch

    cdef inline void _update_avail_event(self) noexcept nogil:
        if self.event_idx and self.notification_enabled:
            vr_st16(self._used_ring + 4 + 8 * self.size, self._last_avail)

    def pop(self, mem):
        """Next available chain, or None when the ring is empty."""
        self._map(mem)
        cdef uint16_t avail_idx = vr_ld16_acq(self._avail + 2)
        if avail_idx == self._last_avail:
            return None
        self._check_avail(avail_idx)
        ch = self._pop_one(avail_idx)
        self._update_avail_event()
        return ch

    def pop_many(self, mem, Py_ssize_t max_chains):
        """Up to *max_chains* available chains. If a malformed chain follows
        good ones, the good ones are returned and the next pop raises."""
        self._map(mem)
        cdef list out = []
        cdef uint16_t avail_idx = vr_ld16_acq(self._avail + 2)
        if avail_idx == self._last_avail or max_chains <= 0:
            return out
        self._check_avail(avail_idx)
        try:
            while avail_idx != self._last_avail and len(out) < max_chains:
                out.append(self._pop_one(avail_idx))
        except VirtqueueError:
            if not out:
                raise
        self._update_avail_event()
        return out

    def has_available(self, mem):
        """True if the driver made chains available that were not popped yet."""
        self._map(mem)
        return vr_ld16_acq(self._avail + 2) != self._last_avail

    cdef inline int _head_len(self, object item, uint16_t *head, uint32_t *length, object written) except -1:
        cdef DescriptorChain ch
        cdef object h
        if isinstance(item, DescriptorChain):
            ch = <DescriptorChain>item
            if ch.table is None or ch.queue_index != self.index:
                raise VirtqueueError(f"chain head {ch.head} was not popped from this queue", queue=self.index)
            if ch.pushed:
                raise VirtqueueError(f"chain head {ch.head} pushed twice", queue=self.index)
            if not isinstance(written, int) or written < 0 or written > ch.writable_len:
                raise VirtqueueError(f"chain head {ch.head}: written length {written!r} exceeds its "
                                     f"{ch.writable_len} writable bytes", queue=self.index)
            ch.pushed = True
            head[0] = ch.head
        else:
            if not isinstance(item, int) or item < 0 or item >= self.size:
                raise VirtqueueError(f"used head {item!r} is not a descriptor index < {self.size}",
                                     queue=self.index)
            if not isinstance(written, int) or written < 0 or written > 0xFFFFFFFF:
                raise VirtqueueError(f"written length {written!r} is not a 32-bit value", queue=self.index)
            head[0] = <uint16_t>item
        length[0] = <uint32_t>written
        return 0

    cdef inline void _put_used(self, uint16_t head, uint32_t length) noexcept nogil:
        cdef char *e = self._used_ring + 4 + 8 * (self._used & (self.size - 1))
        vr_st32(e, head)
        vr_st32(e + 4, length)
        self._used += 1

    def push(self, mem, chain_or_head, written_len):
        """Return one chain to the driver: used element, then used idx (release)."""
        self._map(mem)
        cdef uint16_t head
        cdef uint32_t length
        self._head_len(chain_or_head, &head, &length, written_len)
        self._put_used(head, length)
        vr_st16_rel(self._used_ring + 2, self._used)
        self.pushed += 1

    def push_many(self, mem, items):
        """Return many chains [(chain_or_head, written_len)] with one used idx publish."""
        self._map(mem)
        cdef uint16_t head
        cdef uint32_t length
        cdef uint16_t start = self._used
        cdef Py_ssize_t n = len(items)
        if n > self.size:
            raise VirtqueueError(f"cannot push {n} used entries at once into a queue of size {self.size}",
                                 queue=self.index)
        cdef list marked = []
        try:
            for pair in items:
                try:
                    item, written = pair
                except (TypeError, ValueError):
                    raise VirtqueueError(f"used item {pair!r} is not a (chain_or_head, len) pair",
                                         queue=self.index) from None
                self._head_len(item, &head, &length, written)
                if isinstance(item, DescriptorChain):
                    marked.append(item)
                self._put_used(head, length)
        except BaseException:
            self._used = start     # nothing published; entries written so far are invisible
            for ch in marked:
                (<DescriptorChain>ch).pushed = False
            raise
        vr_st16_rel(self._used_ring + 2, self._used)
        self.pushed += <uint16_t>(self._used - start)

    def should_notify(self, mem):
        """After push(es): does the driver want an interrupt (used buffer notification)?"""
        self._map(mem)
        cdef uint16_t old, new, ev
        cdef bint valid
        vr_mb()
        if not self.event_idx:
            return not (vr_ld16(self._avail) & AVAIL_F_NO_INTERRUPT)
        valid = self._signalled_valid
        old = self._signalled_used
        new = self._used
        self._signalled_used = new
        self._signalled_valid = True
        ev = vr_ld16(self._avail + 4 + 2 * self.size)
        return (not valid) or need_event(ev, new, old)

    def enable_notification(self, mem):
        """Ask the driver to kick on new buffers; True if buffers arrived meanwhile."""
        self._map(mem)
        self.notification_enabled = True
        if self.event_idx:
            vr_st16(self._used_ring + 4 + 8 * self.size, self._last_avail)
        else:
            vr_st16(self._used_ring, vr_ld16(self._used_ring) & ~USED_F_NO_NOTIFY)
        vr_mb()
        return vr_ld16_acq(self._avail + 2) != self._last_avail

    def disable_notification(self, mem):
        """Tell the driver kicks are not needed (a hint: it may still kick).
        With EVENT_IDX, avail_event is set one behind what was consumed, so
        the next buffer the driver adds does not cross it (vhost leaves it
        stale instead; an explicit value lets a driver ask
        ``DriverQueue.kick_suppressed`` before adding anything)."""
        self._map(mem)
        self.notification_enabled = False
        if self.event_idx:
            vr_st16(self._used_ring + 4 + 8 * self.size, <uint16_t>(self._last_avail - 1))
        else:
            vr_st16(self._used_ring, vr_ld16(self._used_ring) | USED_F_NO_NOTIFY)

    def __repr__(self):
        return (f"DeviceQueue(index={self.index}, size={self.size}, desc={self.desc_gpa:#x}, "
                f"avail={self.avail_gpa:#x}, used={self.used_gpa:#x}, last_avail_idx={self._last_avail}, "
                f"used_idx={self.used_idx}, event_idx={self.event_idx})")


cdef object _FREE = object()


cdef class DriverQueue:
    """Driver (frontend / guest) side of one split virtqueue, laid out and
    zeroed at *base_gpa* in *mem* (``split_ring_layout``).

    Driver bookkeeping (free list, tokens, chain links) lives in private
    memory, so a misbehaving device cannot corrupt it; used entries naming a
    head not in flight raise VirtqueueError."""
    cdef readonly int index
    cdef readonly uint32_t size
    cdef readonly uint64_t desc_gpa, avail_gpa, used_gpa, base_gpa, ring_bytes
    cdef readonly bint event_idx, indirect
    cdef readonly uint32_t num_free
    cdef readonly uint16_t avail_idx
    cdef readonly uint16_t last_used_idx
    cdef readonly bint callbacks_enabled
    cdef readonly uint64_t indirect_gpa
    cdef readonly uint32_t indirect_entries      # per head, 0 = no indirect area
    cdef uint16_t _kicked_avail
    cdef uint16_t _free_head
    cdef uint16_t *_next
    cdef uint16_t *_ndesc
    cdef list _tokens
    cdef object mem
    cdef RegionTable _table
    cdef char *_desc
    cdef char *_avail
    cdef char *_used_ring
    cdef char *_ind

    def __cinit__(self):
        self._next = NULL
        self._ndesc = NULL

    def __dealloc__(self):
        PyMem_Free(self._next)
        PyMem_Free(self._ndesc)

    def __init__(self, mem, index, size, base_gpa, *, event_idx=False, indirect=False, start_idx=0):
        from .constants import split_ring_layout
        if not isinstance(index, int) or index < 0 or index > 0xFFFF:
            raise VirtqueueError(f"invalid queue index {index!r}")
        self.index = index
        desc, avail, used, total = split_ring_layout(size, base_gpa)
        self.size = size
        self.base_gpa = base_gpa
        self.desc_gpa = desc
        self.avail_gpa = avail
        self.used_gpa = used
        self.ring_bytes = total
        self.event_idx = bool(event_idx)
        self.indirect = bool(indirect)
        if not isinstance(start_idx, int) or start_idx < 0 or start_idx > 0xFFFF:
            raise VirtqueueError(f"start_idx {start_idx!r} not in 0..65535", queue=index)
        self.mem = mem
        self._table = None
        PyMem_Free(self._next)
        PyMem_Free(self._ndesc)
        self._ndesc = NULL
        self._next = <uint16_t *>PyMem_Malloc(size * sizeof(uint16_t))
        self._ndesc = <uint16_t *>PyMem_Malloc(size * sizeof(uint16_t))
        if self._next == NULL or self._ndesc == NULL:
            raise MemoryError()
        cdef uint32_t i
        for i in range(size):
            self._next[i] = <uint16_t>(i + 1)
            self._ndesc[i] = 0
        self._tokens = [_FREE] * size
        self._free_head = 0
        self.num_free = size
        self.avail_idx = start_idx
        self._kicked_avail = start_idx
        self.last_used_idx = start_idx
        self.callbacks_enabled = True
        self.indirect_entries = 0
        self._map()
        memset(self._desc, 0, 16 * self.size)
        memset(self._avail, 0, 6 + 2 * self.size)
        memset(self._used_ring, 0, 6 + 8 * self.size)
        # start_idx != 0 emulates a queue resumed at that index (vhost-user SET_VRING_BASE)
        vr_st16(self._avail + 2, self.avail_idx)
        vr_st16(self._used_ring + 2, self.last_used_idx)
        if self.event_idx:
            vr_st16(self._avail + 4 + 2 * self.size, self.last_used_idx)
            vr_st16(self._used_ring + 4 + 8 * self.size, self.avail_idx)
        vr_mb()

    cdef int _map(self) except -1:
        if self._next == NULL or self._ndesc == NULL:
            raise VirtqueueError("DriverQueue.__init__ was not called")
        cdef RegionTable t = _table_of(self.mem)
        if t is self._table and t.valid:
            return 0
        if not t.valid:
            raise VirtqueueError("guest memory is closed", queue=self.index)
        cdef char *d = t.translate(self.desc_gpa, 16 * <uint64_t>self.size)
        cdef char *a = t.translate(self.avail_gpa, 6 + 2 * <uint64_t>self.size)
        cdef char *u = t.translate(self.used_gpa, 6 + 8 * <uint64_t>self.size)
        if d == NULL or a == NULL or u == NULL:
            raise VirtqueueError(f"rings at {self.base_gpa:#x} ({self.ring_bytes} bytes) are not inside "
                                 "one guest memory region", queue=self.index)
        if (<size_t>a) % 2 or (<size_t>u) % 4:
            raise VirtqueueError("ring host mapping is misaligned", queue=self.index)
        cdef char *ind = NULL
        if self.indirect_entries:
            ind = t.translate(self.indirect_gpa, <uint64_t>self.indirect_entries * 16 * self.size)
            if ind == NULL:
                raise VirtqueueError(f"indirect area at {self.indirect_gpa:#x} left guest memory",
                                     queue=self.index)
        self._desc = d
        self._avail = a
        self._used_ring = u
        self._ind = ind
        self._table = t
        return 0

    def add_indirect_area(self, gpa, nbytes):
        """Use [gpa, gpa+nbytes) for indirect tables: one slot per head of
        ``nbytes // size`` bytes (rounded down to 16). Needs ``indirect=True``."""
        if not self.indirect:
            raise VirtqueueError("indirect descriptors were not negotiated", queue=self.index)
        g = _u64(gpa, "indirect area address")
        if g % 16:
            raise VirtqueueError(f"indirect area address {gpa:#x} is not 16-byte aligned", queue=self.index)
        per = (nbytes // self.size) // 16 if isinstance(nbytes, int) and nbytes > 0 else 0
        if per < 2:
            raise VirtqueueError(f"indirect area of {nbytes!r} bytes gives fewer than 2 entries per head",
                                 queue=self.index)
        per = min(per, MAX_SIZE)
        if _table_of(self.mem).translate(g, <uint64_t>per * 16 * self.size) == NULL:
            raise VirtqueueError(f"indirect area at {gpa:#x} ({nbytes} bytes) is not inside guest memory",
                                 queue=self.index)
        self.indirect_gpa = g
        self.indirect_entries = per
        self._table = None
        self._map()

    def add(self, out_bufs, in_bufs, token):
        """Expose buffers to the device: *out_bufs* device-readable then
        *in_bufs* device-writable, each a list of (gpa, len). Returns the head.
        Raises QueueFullError when not enough descriptors are free."""
        self._map()
        cdef Py_ssize_t n_out = len(out_bufs), n_in = len(in_bufs), n = n_out + n_in, k
        cdef uint16_t head, idx, flags
        cdef char *tbl
        cdef uint64_t addr
        cdef uint32_t length
        cdef bint use_ind
        if n == 0:
            raise VirtqueueError("add() needs at least one buffer", queue=self.index)
        use_ind = self.indirect and self._ind != NULL and n > 1 and n <= self.indirect_entries
        if n > 0xFFFF or (not use_ind and n > self.num_free) or self.num_free == 0:
            raise QueueFullError(f"need {1 if use_ind else n} descriptors, {self.num_free} free",
                                 queue=self.index)
        # validate all buffers before touching the ring
        cdef list bufs = []
        for k in range(n):
            b = out_bufs[k] if k < n_out else in_bufs[k - n_out]
            try:
                g, l = b
            except (TypeError, ValueError):
                raise VirtqueueError(f"buffer {b!r} is not a (gpa, len) pair", queue=self.index) from None
            if not isinstance(l, int) or l < 0 or l > 0xFFFFFFFF:
                raise VirtqueueError(f"buffer length {l!r} is not a 32-bit value", queue=self.index)
            bufs.append((_u64(g, "buffer address"), l))
        head = self._free_head
        if use_ind:
            tbl = self._ind + <size_t>head * self.indirect_entries * 16
            for k in range(n):
                addr = bufs[k][0]
                length = bufs[k][1]
                flags = (F_WRITE if k >= n_out else 0) | (F_NEXT if k + 1 < n else 0)
                vr_write_desc(tbl + 16 * k, addr, length, flags, <uint16_t>(k + 1 if k + 1 < n else 0))
            vr_write_desc(self._desc + 16 * <size_t>head,
                          self.indirect_gpa + <uint64_t>head * self.indirect_entries * 16,
                          <uint32_t>(16 * n), F_INDIRECT, 0)
            self._free_head = self._next[head]
            self._ndesc[head] = 1
            self.num_free -= 1
        else:
            idx = head
            for k in range(n):
                addr = bufs[k][0]
                length = bufs[k][1]
                flags = (F_WRITE if k >= n_out else 0) | (F_NEXT if k + 1 < n else 0)
                vr_write_desc(self._desc + 16 * <size_t>idx, addr, length, flags,
                              self._next[idx] if k + 1 < n else 0)
                idx = self._next[idx]
            self._free_head = idx
            self._ndesc[head] = <uint16_t>n
            self.num_free -= <uint32_t>n
        self._tokens[head] = token
        vr_st16(self._avail + 4 + 2 * (self.avail_idx & (self.size - 1)), head)
        self.avail_idx += 1
        vr_st16_rel(self._avail + 2, self.avail_idx)
        return head

    def kick_needed(self):
        """After add(s): must the device be notified? (§2.7.10 / used.flags)"""
        self._map()
        cdef uint16_t old = self._kicked_avail, new = self.avail_idx
        vr_mb()
        self._kicked_avail = new
        if self.event_idx:
            return need_event(vr_ld16(self._used_ring + 4 + 8 * self.size), new, old)
        return not (vr_ld16(self._used_ring) & USED_F_NO_NOTIFY)

    def kick_suppressed(self):
        """Would one more buffer added now need no kick, i.e. is the device
        polling this queue? (seq_cst fence first: pairs with the device's
        fence between enabling notifications and re-checking its work.)"""
        self._map()
        vr_mb()
        cdef uint16_t cur = self.avail_idx
        if self.event_idx:
            return not need_event(vr_ld16(self._used_ring + 4 + 8 * self.size), <uint16_t>(cur + 1), cur)
        return bool(vr_ld16(self._used_ring) & USED_F_NO_NOTIFY)

    def get_used(self):
        """(token, written_len) of the next used chain, or None."""
        self._map()
        cdef uint16_t used_idx = vr_ld16_acq(self._used_ring + 2)
        if used_idx == self.last_used_idx:
            return None
        if <uint16_t>(used_idx - self.last_used_idx) > self.size:
            raise VirtqueueError(f"used idx {used_idx} is {<uint16_t>(used_idx - self.last_used_idx)} "
                                 f"entries ahead of last_used_idx {self.last_used_idx}", queue=self.index)
        cdef char *e = self._used_ring + 4 + 8 * (self.last_used_idx & (self.size - 1))
        cdef uint32_t hid = vr_ld32(e), length = vr_ld32(e + 4)
        if hid >= self.size or self._tokens[hid] is _FREE:
            raise VirtqueueError(f"device returned head {hid} which is not in flight", queue=self.index)
        cdef uint16_t head = <uint16_t>hid, tail = head, k
        for k in range(self._ndesc[head] - 1):
            tail = self._next[tail]
        self._next[tail] = self._free_head
        self._free_head = head
        self.num_free += self._ndesc[head]
        self._ndesc[head] = 0
        token = self._tokens[head]
        self._tokens[head] = _FREE
        self.last_used_idx += 1
        if self.event_idx and self.callbacks_enabled:
            vr_st16(self._avail + 4 + 2 * self.size, self.last_used_idx)
            vr_mb()
        return token, length

    def enable_cb(self):
        """Ask for used-buffer notifications; True if used buffers are pending."""
        self._map()
        self.callbacks_enabled = True
        if self.event_idx:
            vr_st16(self._avail + 4 + 2 * self.size, self.last_used_idx)
        else:
            vr_st16(self._avail, vr_ld16(self._avail) & ~AVAIL_F_NO_INTERRUPT)
        vr_mb()
        return vr_ld16_acq(self._used_ring + 2) != self.last_used_idx

    def disable_cb(self):
        """Suppress used-buffer notifications (a hint to the device)."""
        self._map()
        self.callbacks_enabled = False
        if self.event_idx:
            # half the index space away: no window [old, new) of at most `size` (<= 32768)
            # entries past last_used_idx can contain it
            vr_st16(self._avail + 4 + 2 * self.size, <uint16_t>(self.last_used_idx + 0x8000))
        else:
            vr_st16(self._avail, vr_ld16(self._avail) | AVAIL_F_NO_INTERRUPT)

    def has_used(self):
        self._map()
        return vr_ld16_acq(self._used_ring + 2) != self.last_used_idx

    @property
    def in_flight(self):
        return sum(1 for t in self._tokens if t is not _FREE)

    def __repr__(self):
        return (f"DriverQueue(index={self.index}, size={self.size}, base={self.base_gpa:#x}, "
                f"avail_idx={self.avail_idx}, last_used_idx={self.last_used_idx}, free={self.num_free})")
