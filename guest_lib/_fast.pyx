# cython: language_level=3
"""Native guest fast path: WQEs written and CQEs read in place in device memory.

guest_lib's per-operation path (docs/virtio-rdma.md 5.x.6.5 work queues,
5.x.6.6 completion queues) in C: :class:`WorkQueues` packs send and receive
WQEs straight into a QP's ring slots and publishes the producer indices in
its doorbell record (release order: the WQE bytes before the index);
:class:`CompletionRing` reads CQEs in place (owner byte with acquire order,
then the body), builds the same :class:`~guest_lib.cq.WC` objects as the
Python path, or copies the raw 32-byte entries into a caller's buffer
(:meth:`CompletionRing.poll_into`, no object per completion), and reclaims
the QPs' slots. The Python twins (guest_lib.qp.PyWorkQueues,
guest_lib.cq.PyCompletionRing) are the reference; guest_lib.cq.NATIVE
chooses between them when a QP or CQ is made, and
tests/guest_lib/test_native_rings.py checks that both give identical ring
bytes, doorbell records, completions, indices and errors.

Layouts come from their one definition, virtio_rdma.wire (field offsets
are read from its construct Structs at import), the verbs numbers from
verbs/_verbs.pxd. Everything a WR carries is converted and checked before
any byte of its slot is written, so a bad WR leaves the ring as it was; the
WRs before it in the same call are posted (as ibv_post_send's ``bad_wr``).
"""
from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from verbs._verbs cimport IBV_SEND_INLINE, IBV_SEND_SIGNALED, IBV_WC_RECV
from virtio_rdma._guestring cimport gr_ld32, gr_ld64, gr_st32, gr_st64

import errno

from guest_lib.errors import RDMAError, UserError
from virtio_rdma import wire
from virtio_rdma.constants import ACCEL_CQE_OPCODE_BASE

cdef extern from *:
    """
    #include <stdint.h>
    /* a doorbell-record word: the WQE bytes before it (release) */
    static inline void gf_st32_rel(char *p, uint32_t v) {
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        v = __builtin_bswap32(v);
    #endif
        __atomic_store_n((uint32_t *)p, v, __ATOMIC_RELEASE); }
    /* a CQE's owner byte: the body after it (acquire) */
    static inline uint8_t gf_ld8_acq(const char *p) {
        return __atomic_load_n((const uint8_t *)p, __ATOMIC_ACQUIRE); }
    static inline void gf_st16(char *p, uint16_t v) { p[0] = (char)(v & 0xff); p[1] = (char)(v >> 8); }
    static inline uint8_t gf_ld8(const char *p) { return (uint8_t)p[0]; }
    #include <sched.h>
    """
    int sched_yield() nogil
    void gf_st32_rel(char *p, uint32_t v) noexcept nogil
    uint8_t gf_ld8_acq(const char *p) noexcept nogil
    void gf_st16(char *p, uint16_t v) noexcept nogil
    uint8_t gf_ld8(const char *p) noexcept nogil


def _offsets(layout) -> dict:
    """Field name -> byte offset of a construct Struct of virtio_rdma.wire."""
    out, off = {}, 0
    for sc in layout.subcons:
        out[sc.name] = off
        off += sc.sizeof()
    out["_size"] = off
    return out


_S = _offsets(wire.SendWqeHeader)
_R = _offsets(wire.RecvWqeHeader)
_G = _offsets(wire.Sge)
_C = _offsets(wire.Cqe)

cdef Py_ssize_t S_WR_ID = _S["wr_id"], S_OPCODE = _S["opcode"], S_FLAGS = _S["send_flags"]
cdef Py_ssize_t S_NUM_SGE = _S["num_sge"], S_IMM = _S["imm_data"], S_RADDR = _S["remote_addr"]
cdef Py_ssize_t S_RKEY = _S["rkey"], S_INLINE_LEN = _S["inline_len"], S_CMP = _S["compare_add"]
cdef Py_ssize_t S_SWAP = _S["swap"], S_RSVD = _S["reserved"], S_HDR = _S["_size"]
cdef Py_ssize_t R_WR_ID = _R["wr_id"], R_NUM_SGE = _R["num_sge"], R_HDR = _R["_size"]
cdef Py_ssize_t G_ADDR = _G["addr"], G_LEN = _G["length"], G_LKEY = _G["lkey"], G_SIZE = _G["_size"]
cdef Py_ssize_t C_WR_ID = _C["wr_id"], C_STATUS = _C["status"], C_OPCODE = _C["opcode"]
cdef Py_ssize_t C_FLAGS = _C["wc_flags"], C_OWNER = _C["owner"], C_BYTE_LEN = _C["byte_len"]
cdef Py_ssize_t C_IMM = _C["imm_data"], C_QPN = _C["qp_num"], C_SRC = _C["src_qp"]
cdef Py_ssize_t C_VERR = _C["vendor_err"], C_SIZE = _C["_size"]
cdef int ACCEL_BASE = ACCEL_CQE_OPCODE_BASE
if (S_HDR, R_HDR, G_SIZE, C_SIZE, C_OWNER) != (wire.SEND_WQE_HEADER_SIZE, wire.RECV_WQE_HEADER_SIZE,
                                              wire.SGE_SIZE, wire.CQE_SIZE, wire.CQE_OWNER_OFFSET):
    raise ImportError("guest_lib._fast: virtio_rdma.wire's layouts disagree with their sizes")

cdef enum:
    SGE_CAP = 256  # the most SGEs one WR may carry here (the device's slots hold fewer)

#: the most SGEs one WR may carry, on either path (the device's slots hold fewer)
MAX_SGE = SGE_CAP


cdef struct SendHdr:
    uint64_t wr_id, remote_addr, compare_add, swap
    uint32_t imm, rkey, inline_len, num_sge
    uint8_t opcode, flags

cdef struct Seg:
    uint64_t addr
    uint32_t length, lkey


cdef Py_ssize_t _checked_len(object buf, Py_ssize_t need, str what) except -1:
    cdef Py_ssize_t n = len(buf)
    if n < need:
        raise ValueError(f"{what} of {n} bytes is smaller than its {need}-byte geometry")
    return n


cdef class WorkQueues:
    """A QP's send and receive rings and its doorbell record, written in place.

    ``sq`` / ``rq`` / ``dbrec``: writable byte views of the rings and the
    record ([sq_pi, rq_pi], le32 each); depths are powers of two, slots the
    device's WQE sizes; ``translate(uva, length)`` gives the bytes of an
    inline SGE (Context.view_of_uva)."""

    cdef unsigned char[::1] sq, rq, dbrec
    cdef uint8_t[::1] sig           # per send slot: is that WQE signaled?
    cdef object translate
    cdef readonly uint32_t qpn, sq_pi, sq_ci, rq_pi, rq_ci, sq_depth, rq_depth, sq_slot, rq_slot
    cdef readonly uint32_t max_send_sge, max_recv_sge
    cdef readonly bint sq_sig_all

    def __init__(self, int qpn, sq, rq, dbrec, uint32_t sq_depth, uint32_t rq_depth, uint32_t sq_slot,
                 uint32_t rq_slot, uint32_t max_send_sge, uint32_t max_recv_sge, bint sq_sig_all, translate):
        if not sq_depth or sq_depth & (sq_depth - 1) or not rq_depth or rq_depth & (rq_depth - 1):
            raise ValueError(f"queue depths {sq_depth}/{rq_depth} must be powers of two")
        if sq_slot < S_HDR or rq_slot < R_HDR:
            raise ValueError(f"WQE slots {sq_slot}/{rq_slot} are smaller than their headers")
        _checked_len(sq, <Py_ssize_t>sq_depth * sq_slot, "the send queue")
        _checked_len(rq, <Py_ssize_t>rq_depth * rq_slot, "the receive queue")
        _checked_len(dbrec, 8, "the doorbell record")
        self.sq, self.rq, self.dbrec = sq, rq, dbrec
        self.sig = bytearray(sq_depth)
        self.qpn, self.sq_depth, self.rq_depth, self.sq_slot, self.rq_slot = (
            qpn, sq_depth, rq_depth, sq_slot, rq_slot)
        self.max_send_sge, self.max_recv_sge, self.sq_sig_all = max_send_sge, max_recv_sge, sq_sig_all
        self.translate = translate
        self.sq_pi = self.sq_ci = self.rq_pi = self.rq_ci = 0

    def close(self) -> None:
        """Drop the views of device memory (their owner releases them next)."""
        self.sq = self.rq = self.dbrec = None
        self.translate = None

    cdef inline int _open(self) except -1:
        if self.sq is None:
            raise UserError(f"the work queues of QP {self.qpn:#x} are closed")
        return 0

    def reset(self) -> None:
        """RESET: indices to zero, and the record too (a polling device must
        not see old indices again)."""
        self.sq_pi = self.sq_ci = self.rq_pi = self.rq_ci = 0
        self._open()
        memset(&self.sig[0], 0, self.sq_depth)
        gf_st32_rel(<char *>&self.dbrec[0], 0)
        gf_st32_rel(<char *>&self.dbrec[4], 0)

    # --- send ------------------------------------------------------------
    cdef int _read_send(self, object wr, SendHdr *h, Seg *segs, list views) except -1:
        """Convert and check ``wr`` into ``h`` / ``segs`` (or ``views``, inline),
        touching no ring byte. Returns the SGE count."""
        cdef Py_ssize_t i, n, room, total = 0
        sg = wr.sg
        if wr.num_sge is not None:
            sg = sg[: wr.num_sge]
        n = len(sg)
        try:
            flags = int(wr.send_flags)
            if flags & IBV_SEND_INLINE:
                for s in sg:
                    v = self.translate(s.addr, s.length)
                    views.append(v)
                    total += len(v)
                room = self.sq_slot - S_HDR
                if total > room:
                    raise UserError(f"{total} bytes of inline data exceed the QP's {room}")
                h.num_sge, h.inline_len = 0, <uint32_t>total
            else:
                if n > self.max_send_sge or n > SGE_CAP:
                    raise UserError(f"{n} SGEs exceed max_send_sge {self.max_send_sge}")
                h.num_sge, h.inline_len = <uint32_t>n, 0
            h.flags = flags
            h.wr_id = wr.wr_id
            h.opcode = wr.opcode
            h.imm = wr.imm_data
            h.remote_addr = wr.remote_addr
            h.rkey = wr.rkey
            h.compare_add = wr.compare_add
            h.swap = wr.swap
            if not flags & IBV_SEND_INLINE:
                for i in range(n):
                    s = sg[i]
                    segs[i].addr = s.addr
                    segs[i].length = s.length
                    segs[i].lkey = s.lkey
        except (OverflowError, TypeError) as e:
            raise UserError(f"send WR {wr.wr_id!r}: a field is out of range ({e})") from None
        return <int>n

    cdef bint _write_send(self, char *p, SendHdr *h, Seg *segs, list views) except -1:
        """Write a checked WQE into the slot at ``p``; returns whether it is signaled."""
        cdef Py_buffer b
        cdef Py_ssize_t i, at
        gr_st64(p + S_WR_ID, h.wr_id)
        p[S_OPCODE] = <char>h.opcode
        p[S_FLAGS] = <char>h.flags
        gf_st16(p + S_NUM_SGE, <uint16_t>h.num_sge)
        gr_st32(p + S_IMM, h.imm)
        gr_st64(p + S_RADDR, h.remote_addr)
        gr_st32(p + S_RKEY, h.rkey)
        gr_st32(p + S_INLINE_LEN, h.inline_len)
        gr_st64(p + S_CMP, h.compare_add)
        gr_st64(p + S_SWAP, h.swap)
        memset(p + S_RSVD, 0, S_HDR - S_RSVD)
        if h.flags & IBV_SEND_INLINE:
            at = S_HDR
            for v in views:
                PyObject_GetBuffer(v, &b, PyBUF_SIMPLE)
                try:
                    memcpy(p + at, b.buf, b.len)
                    at += b.len
                finally:
                    PyBuffer_Release(&b)
        else:
            for i in range(h.num_sge):
                at = S_HDR + i * G_SIZE
                gr_st64(p + at + G_ADDR, segs[i].addr)
                gr_st32(p + at + G_LEN, segs[i].length)
                gr_st32(p + at + G_LKEY, segs[i].lkey)
        return (h.flags & IBV_SEND_SIGNALED) != 0 or self.sq_sig_all

    cdef int _pack(self, char *p, object wr) except -1:
        """Check and write one send WQE at ``p``: 1 if signaled, else 0."""
        cdef SendHdr h
        cdef Seg segs[SGE_CAP]
        views = []
        self._read_send(wr, &h, segs, views)
        return 1 if self._write_send(p, &h, segs, views) else 0

    cdef inline void _full(self, uint32_t pi, uint32_t n) except *:
        if <uint32_t>(pi - self.sq_ci) > self.sq_depth - n:
            raise RDMAError(f"send queue of QP {self.qpn:#x} is full ({self.sq_depth} WRs)", errno.ENOMEM)

    def post_send(self, wrs) -> None:
        """Write the WQEs of ``wrs`` (a SendWR or a list) and publish sq_pi;
        on an error the WRs before the bad one stay posted."""
        cdef uint32_t pi = self.sq_pi, mask = self.sq_depth - 1
        self._open()
        if not isinstance(wrs, (list, tuple)):
            wrs = (wrs,)
        try:
            for wr in wrs:
                self._full(pi, 1)
                self.sig[pi & mask] = <uint8_t>self._pack(<char *>&self.sq[(pi & mask) * self.sq_slot], wr)
                pi += 1
        finally:
            self._publish_sq(pi)

    def prepare(self, wrs) -> tuple:
        """(the WQE bytes of ``wrs``, their signaled flags), for :meth:`post_list`."""
        cdef Py_ssize_t i, n = len(wrs)
        buf = bytearray(n * self.sq_slot)
        cdef unsigned char[::1] b = buf
        sig = []
        for i in range(n):
            sig.append(bool(self._pack(<char *>&b[i * self.sq_slot], wrs[i])))
        return bytes(buf), tuple(sig)

    def post_list(self, const unsigned char[::1] wqes, tuple signaled) -> None:
        """Copy prepared WQEs into the ring (at most two copies) and publish."""
        cdef uint32_t n = len(signaled), pi = self.sq_pi, mask = self.sq_depth - 1, first, k, i
        self._open()
        if <Py_ssize_t>n * self.sq_slot != wqes.shape[0] or n > self.sq_depth or n == 0:
            raise UserError(f"a post list of {len(wqes)} bytes does not hold {n} WQEs of this QP")
        self._full(pi, n)
        first = pi & mask
        k = min(n, self.sq_depth - first) * self.sq_slot
        memcpy(&self.sq[first * self.sq_slot], &wqes[0], k)
        if k < n * self.sq_slot:
            memcpy(&self.sq[0], &wqes[k], n * self.sq_slot - k)
        for i in range(n):
            self.sig[(pi + i) & mask] = 1 if signaled[i] else 0
        self._publish_sq(pi + n)

    cdef inline void _publish_sq(self, uint32_t pi) noexcept:
        if self.sq is not None:
            self.sq_pi = pi
            gf_st32_rel(<char *>&self.dbrec[0], pi)

    # --- receive ---------------------------------------------------------
    def post_recv(self, wrs) -> None:
        """Write receive WQEs and publish rq_pi (the WRs before a bad one stay posted)."""
        cdef uint32_t pi = self.rq_pi, mask = self.rq_depth - 1
        cdef Seg segs[SGE_CAP]
        cdef Py_ssize_t i, n
        cdef uint64_t wr_id
        cdef char *p
        self._open()
        if not isinstance(wrs, (list, tuple)):
            wrs = (wrs,)
        try:
            for wr in wrs:
                if <uint32_t>(pi - self.rq_ci) >= self.rq_depth:
                    raise RDMAError(f"receive queue of QP {self.qpn:#x} is full ({self.rq_depth} WRs)",
                                    errno.ENOMEM)
                sg = wr.sg if wr.num_sge is None else wr.sg[: wr.num_sge]
                n = len(sg)
                if n > self.max_recv_sge or n > SGE_CAP:
                    raise UserError(f"{n} SGEs exceed max_recv_sge {self.max_recv_sge}")
                try:
                    wr_id = wr.wr_id
                    for i in range(n):
                        s = sg[i]
                        segs[i].addr = s.addr
                        segs[i].length = s.length
                        segs[i].lkey = s.lkey
                except (OverflowError, TypeError) as e:
                    raise UserError(f"recv WR {wr.wr_id!r}: a field is out of range ({e})") from None
                p = <char *>&self.rq[(pi & mask) * self.rq_slot]
                memset(p, 0, R_HDR)
                gr_st64(p + R_WR_ID, wr_id)
                gf_st16(p + R_NUM_SGE, <uint16_t>n)
                for i in range(n):
                    gr_st64(p + R_HDR + i * G_SIZE + G_ADDR, segs[i].addr)
                    gr_st32(p + R_HDR + i * G_SIZE + G_LEN, segs[i].length)
                    gr_st32(p + R_HDR + i * G_SIZE + G_LKEY, segs[i].lkey)
                pi += 1
        finally:
            if self.rq is not None:
                self.rq_pi = pi
                gf_st32_rel(<char *>&self.dbrec[4], pi)

    # --- completions -------------------------------------------------------
    cdef inline void completed_c(self, int opcode, int status) noexcept:
        cdef uint8_t s
        if opcode & IBV_WC_RECV:
            if self.rq_ci != self.rq_pi:  # never past what was posted, whatever the device says
                self.rq_ci += 1
            return
        while self.sq_ci != self.sq_pi:  # send WRs complete in order
            s = self.sig[self.sq_ci & (self.sq_depth - 1)]
            self.sq_ci += 1
            if s or status:
                break

    def completed(self, int opcode, int status) -> None:
        """A CQE of this QP was polled: reclaim its slots."""
        self.completed_c(opcode, status)


cdef class CompletionRing:
    """A CQ's ring of CQEs and its doorbell record (the consumer index), read in place.

    ``make_wc(wr_id, status, opcode, vendor_err, byte_len, qp_num, src_qp,
    imm_data, wc_flags)`` builds a verbs completion, ``accel_wc(wr_id,
    status, opcode, flags, byte_len, imm, qpn, src, verr)`` an accelerator
    job's; ``qps`` / ``aqs`` (polled with) map numbers to the QPs and
    accelerator queues whose slots a completion frees."""

    cdef const unsigned char[::1] ring
    cdef unsigned char[::1] dbrec
    cdef readonly uint32_t ci, cqe
    cdef uint32_t mask, shift
    cdef object make_wc, accel_wc

    def __init__(self, ring, dbrec, uint32_t cqe, make_wc, accel_wc):
        if not cqe or cqe & (cqe - 1):
            raise ValueError(f"CQ size {cqe} must be a power of two")
        _checked_len(ring, <Py_ssize_t>cqe * C_SIZE, "the CQ ring")
        _checked_len(dbrec, 4, "the CQ's doorbell record")
        self.ring, self.dbrec = ring, dbrec
        self.cqe, self.mask, self.shift = cqe, cqe - 1, 0
        while (<uint32_t>1 << self.shift) < cqe:
            self.shift += 1
        self.make_wc, self.accel_wc = make_wc, accel_wc
        self.ci = 0

    def close(self) -> None:
        self.ring = None
        self.dbrec = None

    cdef inline const char *_next(self, uint32_t ci) noexcept nogil:
        """The CQE at ``ci`` if the device has written it, else NULL."""
        cdef const char *e = <const char *>&self.ring[(ci & self.mask) * C_SIZE]
        if (gf_ld8_acq(e + C_OWNER) & 1) != (((ci >> self.shift) & 1) ^ 1):
            return NULL
        return e

    cdef inline void _reclaim(self, int op, int st, uint32_t qpn, dict qps, dict aqs) except *:
        if op >= ACCEL_BASE:
            aq = aqs.get(qpn)
            if aq is not None:
                aq._completed()
            return
        qp = qps.get(qpn)
        if qp is not None:
            wq = qp._wq
            if type(wq) is WorkQueues:
                (<WorkQueues>wq).completed_c(op, st)
            else:
                qp._completed(op, st)

    cdef inline void _consumed(self, uint32_t ci) noexcept:
        self.ci = ci
        gf_st32_rel(<char *>&self.dbrec[0], ci)

    def poll(self, int num_entries, dict qps not None, dict aqs not None) -> list:
        """Up to ``num_entries`` completions as WC / AccelWC objects."""
        cdef uint32_t ci = self.ci
        cdef const char *e
        cdef int op, st
        cdef uint32_t qpn
        out = []
        if self.ring is None:
            return out
        while len(out) < num_entries:
            e = self._next(ci)
            if e == NULL:
                break
            st, op, qpn = gf_ld8(e + C_STATUS), gf_ld8(e + C_OPCODE), gr_ld32(e + C_QPN)
            ci += 1
            if op >= ACCEL_BASE:
                out.append(self.accel_wc(gr_ld64(e + C_WR_ID), st, op, gf_ld8(e + C_FLAGS),
                                         gr_ld32(e + C_BYTE_LEN), gr_ld32(e + C_IMM), qpn,
                                         gr_ld32(e + C_SRC), gr_ld32(e + C_VERR)))
            else:
                out.append(self.make_wc(gr_ld64(e + C_WR_ID), st, op, gr_ld32(e + C_VERR),
                                        gr_ld32(e + C_BYTE_LEN), qpn, gr_ld32(e + C_SRC),
                                        gr_ld32(e + C_IMM), gf_ld8(e + C_FLAGS)))
            self._reclaim(op, st, qpn, qps, aqs)
        if out:
            self._consumed(ci)
        return out

    def poll_into(self, out, dict qps not None, dict aqs not None, Py_ssize_t num_entries=-1) -> int:
        """Copy up to ``num_entries`` (default: as many as ``out`` holds) CQEs,
        32 raw bytes each with the owner byte zeroed, into the writable
        buffer ``out`` (e.g. a numpy array of guest_lib.cq.WC_DTYPE); returns
        how many."""
        cdef Py_buffer b
        cdef uint32_t ci = self.ci
        cdef Py_ssize_t n = 0, cap
        cdef const char *e
        cdef char *d
        if self.ring is None:
            return 0
        try:
            PyObject_GetBuffer(out, &b, PyBUF_WRITABLE)
        except (BufferError, ValueError, TypeError):
            raise BufferError("poll_into needs a writable, C-contiguous buffer") from None
        try:
            cap = b.len // C_SIZE
            if num_entries >= 0 and num_entries < cap:
                cap = num_entries
            while n < cap:
                e = self._next(ci)
                if e == NULL:
                    break
                d = <char *>b.buf + n * C_SIZE
                memcpy(d, e, C_SIZE)
                d[C_OWNER] = 0
                ci += 1
                n += 1
                self._reclaim(gf_ld8(d + C_OPCODE), gf_ld8(d + C_STATUS), gr_ld32(d + C_QPN), qps, aqs)
        finally:
            PyBuffer_Release(&b)
        if n:
            self._consumed(ci)
        return n

    def poll_counts(self, int num_entries, dict qps not None, dict aqs not None) -> tuple:
        """Consume up to ``num_entries`` CQEs and count them, as perftest's
        loops need: (receive completions, other completions, errors)."""
        cdef uint32_t ci = self.ci
        cdef const char *e
        cdef int op, st, n = 0, nrecv = 0, nerr = 0
        if self.ring is None:
            return 0, 0, 0
        while n < num_entries:
            e = self._next(ci)
            if e == NULL:
                break
            st, op = gf_ld8(e + C_STATUS), gf_ld8(e + C_OPCODE)
            ci += 1
            n += 1
            if st:
                nerr += 1
            if op < ACCEL_BASE and op & IBV_WC_RECV:
                nrecv += 1
            self._reclaim(op, st, gr_ld32(e + C_QPN), qps, aqs)
        if n:
            self._consumed(ci)
        return nrecv, n - nrecv, nerr

    def wait_counts(self, int num_entries, dict qps not None, dict aqs not None, long long spin_ns,
                    long long block_ns) -> tuple:
        """:meth:`poll_counts` once a completion is there, waiting for it
        without the GIL: spin for ``spin_ns``, then sched_yield between
        looks until ``block_ns`` have passed. Returns (receives, others,
        errors, phase, waited_ns, away_ns): phase 0 found at once, 1 while
        spinning, 2 while yielding, 3 nothing within ``block_ns``; away_ns
        the longest a sched_yield kept the CPU from us."""
        cdef long long t0, now, t, away = 0
        cdef int phase = 0
        cdef uint32_t ci = self.ci
        if self.ring is None:
            return 0, 0, 0, 3, 0, 0
        if self._next(ci) == NULL:
            with nogil:
                t0 = _now()
                now = t0
                phase = 1
                while self._next(ci) == NULL:
                    if now - t0 >= spin_ns:
                        phase = 2
                        if now - t0 >= block_ns:
                            phase = 3
                            break
                        t = now
                        sched_yield()
                        now = _now()
                        if now - t > away:
                            away = now - t
                    else:
                        now = _now()
            if phase == 3:
                return 0, 0, 0, 3, now - t0, away
        else:
            t0 = now = 0
        r = self.poll_counts(num_entries, qps, aqs)
        return r[0], r[1], r[2], phase, (_now() - t0) if phase else 0, away


cdef inline long long _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec * 1000000000LL + ts.tv_nsec
