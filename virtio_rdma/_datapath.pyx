# cython: language_level=3
"""Native fast path of the RC data path (:mod:`virtio_rdma.datapath`).

One call, :func:`run_sq`, starts the posted send WQEs of a QP whose peer
is a QP of the same daemon (a :class:`~fabric.local.LocalFabric`
delivers synchronously) and carries each through to its completions: SQ WQE
decode, lkey/rkey/PD/access/bounds checks, the copy between the two guests'
memory (``memmove`` from host pointer to host pointer, no staging), receive
WQE consumption, and the CQE writes (owner byte last, arm/notify decision).
It covers SEND, SEND_WITH_IMM, RDMA_WRITE, RDMA_WRITE_WITH_IMM and RDMA_READ,
inline or with SGEs.

Rule: every WQE is checked completely *before* anything is changed. A WQE
that is not the plain success case (any error, RNR, PSN mismatch, an
atomic, a CQ that is full, in error or unreachable, too many segments, an
asynchronous fabric, a QP with a wire engine...) is left untouched and
:func:`run_sq` returns; the Python engine then handles that WQE, with the
same state, so both paths give identical guest memory, CQEs, counters and
events. tests/virtio_rdma/test_fastpath.py runs random WQE mixes through
both and compares.

The state a batch changes (ring indices, PSNs, CQ producer counts, metrics)
is kept in C during the batch and written back before any Python code can
observe it (at the end, or before queueing a completion event).
"""
cimport cython
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memmove

from virtio._memory cimport RegionTable
from roce._codec cimport Envelope
from roce._udpio cimport TxRing
from verbs._verbs cimport (
    IBV_ACCESS_LOCAL_WRITE, IBV_ACCESS_REMOTE_ATOMIC, IBV_ACCESS_REMOTE_READ, IBV_ACCESS_REMOTE_WRITE,
    IBV_SEND_FENCE, IBV_SEND_INLINE, IBV_SEND_IP_CSUM, IBV_SEND_SIGNALED, IBV_SEND_SOLICITED,
    IBV_WC_RDMA_READ, IBV_WC_RDMA_WRITE, IBV_WC_RECV, IBV_WC_RECV_RDMA_WITH_IMM, IBV_WC_SEND,
    IBV_WC_WITH_IMM, IBV_WR_RDMA_READ, IBV_WR_RDMA_WRITE, IBV_WR_RDMA_WRITE_WITH_IMM, IBV_WR_SEND,
    IBV_WR_SEND_WITH_IMM, IBV_WR_SEND_WITH_INV, IBV_MTU_256, IBV_MTU_4096, PSN_MASK, ibv_mtu_bytes,
)

from cpython.bytes cimport PyBytes_FromStringAndSize

from verbs import QpState, WcStatus, WrOpcode, ack_timeout_seconds
from virtio_rdma import rings as _rings
from roce.packet import PacketRun
from roce.rc import config as _rc_config
from roce.rc.requester import Wqe as RcWqe, WqeState, _SEND_OPS
from roce.rc.sgl import SgList
from roce.rc.verbs import SendWR
from virtio_rdma.constants import OBJ_NUM_MASK as _OBJ_NUM_MASK, DoorbellKind, EventKind
from virtio_rdma.cq import Arm, CqState
from fabric.local import LocalFabric
from virtio_rdma.qp import QueuePair
from virtio_rdma.wire import Event

from virtio_rdma._guestring cimport (
    gr_ld16, gr_ld32, gr_ld32_acq, gr_ld64, gr_snapshot, gr_write_cqe,
)


cdef enum:
    MAX_SEGS = 64          # per side of one WQE; more -> Python path
    MR_CACHE = 8
    REMOTE_RIGHTS = IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ | IBV_ACCESS_REMOTE_ATOMIC
    SEND_HDR = 64
    RECV_HDR = 16
    SGE_SZ = 16
    CQE_SZ = 32
    # short names for the verbs numbers this file uses (values: verbs/_verbs.pxd)
    OP_WRITE = IBV_WR_RDMA_WRITE
    OP_WRITE_IMM = IBV_WR_RDMA_WRITE_WITH_IMM
    OP_SEND = IBV_WR_SEND
    OP_SEND_IMM = IBV_WR_SEND_WITH_IMM
    OP_READ = IBV_WR_RDMA_READ
    WC_SEND = IBV_WC_SEND
    WC_RDMA_WRITE = IBV_WC_RDMA_WRITE
    WC_RDMA_READ = IBV_WC_RDMA_READ
    WC_RECV = IBV_WC_RECV
    WC_RECV_RDMA_WITH_IMM = IBV_WC_RECV_RDMA_WITH_IMM
    WC_WITH_IMM = IBV_WC_WITH_IMM
    F_SIGNALED = IBV_SEND_SIGNALED
    F_SOLICITED = IBV_SEND_SOLICITED
    F_INLINE = IBV_SEND_INLINE
    F_KNOWN = IBV_SEND_FENCE | IBV_SEND_SIGNALED | IBV_SEND_SOLICITED | IBV_SEND_INLINE | IBV_SEND_IP_CSUM
    A_LOCAL_WRITE = IBV_ACCESS_LOCAL_WRITE
    A_REMOTE_WRITE = IBV_ACCESS_REMOTE_WRITE
    A_REMOTE_READ = IBV_ACCESS_REMOTE_READ


cdef object _RTS = QpState.RTS
cdef object _SQD = QpState.SQD
cdef tuple _RECV_STATES = (QpState.RTR, QpState.RTS, QpState.SQD, QpState.SQE)
cdef object _ACTIVE = CqState.ACTIVE
cdef object _ARM_NONE = Arm.NONE
cdef object _ARM_NEXT = Arm.NEXT
cdef object _ARM_SOLICITED = Arm.SOLICITED
cdef object _EV_COMPLETION = EventKind.COMPLETION

#: module switch (tests run both engines; ``datapath.use_fast_path``)
enabled = True
#: WQEs completed here since import (tests check the native path really ran)
completed = 0


cdef struct Seg:
    char *p
    uint64_t n


cdef struct MrEnt:
    uint32_t key
    uint32_t rights     # bit 0: key is the MR's lkey; bit 1: its rkey
    uint32_t pdn
    uint32_t access
    uint64_t iova
    uint64_t length
    char *host          # host address of iova: the MR is one chunk inside one region; else NULL
    uint64_t gpa        # guest physical address of iova when host is set


@cython.final
cdef class _Dev:
    """One device seen by a batch: its memory table, MR table (with a small
    lookup cache; MRs cannot change during a call) and metric deltas."""
    cdef object dev
    cdef RegionTable table
    cdef dict by_key
    cdef MrEnt cache[MR_CACHE]
    cdef int ncache
    cdef uint64_t max_msg_sz
    cdef uint64_t requests_sent, responses_received, sends_completed, bytes_received, bytes_sent
    cdef uint64_t completions
    cdef list events     # CQNs whose arm fired, queued as events after the batch

    cdef int init(self, object dev) except -1:
        mem = dev.mem
        t = getattr(mem, "_table", None)
        if type(t) is not RegionTable:
            return 0
        self.dev = dev
        self.table = <RegionTable>t
        self.by_key = dev.mrs._by_key
        self.ncache = 0
        self.max_msg_sz = dev.limits.max_msg_sz
        self.events = []
        return 1

    cdef void flush_metrics(self):
        if self.dev is None:
            return
        m = self.dev.metrics
        if self.requests_sent:
            m.requests_sent += self.requests_sent
        if self.responses_received:
            m.responses_received += self.responses_received
        if self.sends_completed:
            m.sends_completed += self.sends_completed
        if self.bytes_received:
            m.bytes_received += self.bytes_received
        if self.bytes_sent:
            m.bytes_sent += self.bytes_sent
        if self.completions:
            m.completions += self.completions
        self.requests_sent = self.responses_received = self.sends_completed = 0
        self.bytes_received = self.bytes_sent = self.completions = 0
        if self.events:
            events, self.events = self.events, []
            m.completion_events += len(events)
            for cqn in events:
                self.dev.queue_event(Event(_EV_COMPLETION, 0, cqn))

    cdef MrEnt *lookup(self, uint32_t key):
        """The MR of ``key`` (None: no such MR) as a cache entry; NULL if none."""
        cdef int i
        cdef MrEnt *e
        for i in range(self.ncache):
            if self.cache[i].key == key:
                return &self.cache[i]
        mr = self.by_key.get(key)
        if mr is None:
            return NULL
        i = self.ncache if self.ncache < MR_CACHE else MR_CACHE - 1
        if self.ncache < MR_CACHE:
            self.ncache += 1
        e = &self.cache[i]
        e.key = key
        e.rights = (1 if mr.lkey == key else 0) | (2 if mr.rkey == key else 0)
        e.pdn = mr.pdn
        e.access = int(mr.access)
        e.iova = mr.iova
        e.length = mr.length
        e.host = NULL
        e.gpa = 0
        chunks = mr.chunks
        if len(chunks) == 1:
            gpa, n = chunks[0]
            if n > 0:
                e.host = self.table.translate(gpa, n)
                e.gpa = gpa
        return e

    cdef int resolve(self, uint32_t key, uint32_t pdn, uint32_t need, uint64_t va, uint64_t length,
                     Seg *segs, int nseg) except -2:
        """Append the host segments of [va, va+length) under ``key`` to
        ``segs``: MrTable.check + MemoryRegion.views. -1: not the success
        case (the Python engine decides what it is)."""
        cdef MrEnt *e = self.lookup(key)
        cdef uint64_t off, inner, take, g, n
        cdef char *p
        cdef Py_ssize_t i
        if e == NULL or e.pdn != pdn or (need & ~e.access):
            return -1
        if not (e.rights & (2 if need & REMOTE_RIGHTS else 1)):
            return -1  # an lkey used remotely or an rkey used locally
        if va > 0xFFFFFFFFFFFFFFFF - length:
            return -1  # would reach or pass 2**64
        if va < e.iova or va + length > e.iova + e.length or e.iova + e.length < e.iova:
            return -1
        if length == 0:
            return nseg
        off = va - e.iova
        if e.host != NULL:
            if nseg >= MAX_SEGS:
                return -1
            segs[nseg].p = e.host + off
            segs[nseg].n = length
            return nseg + 1
        # several chunks (or one spanning regions): walk them as MemoryRegion.views does
        mr = self.by_key[key]
        chunks = mr.chunks
        offsets = mr.offsets
        i = 0
        while i + 1 < len(offsets) and <uint64_t>offsets[i + 1] <= off:
            i += 1
        while length:
            if i >= len(chunks) or nseg >= MAX_SEGS:
                return -1
            g, n = chunks[i]
            inner = off - <uint64_t>offsets[i]
            take = n - inner if n - inner < length else length
            p = self.table.translate(g + inner, take)
            if p == NULL:
                return -1
            segs[nseg].p = p
            segs[nseg].n = take
            nseg += 1
            length -= take
            off += take
            i += 1
        return nseg


@cython.final
cdef class _Cq:
    """A completion queue during a batch: producer count kept in C."""
    cdef object cq
    cdef _Dev dev
    cdef uint32_t cqn, depth, pc, written
    cdef uint64_t ring_gpa, dbrec_gpa
    cdef bint armed      # arm is not NONE: pushes go through notify()

    cdef int init(self, object cq, _Dev dev) except -1:
        if cq.state is not _ACTIVE:
            return 0
        self.cq = cq
        self.dev = dev
        self.cqn = cq.cqn
        self.depth = cq.depth
        self.pc = cq.pc
        self.written = 0
        self.ring_gpa = cq.ring_gpa
        self.dbrec_gpa = cq.dbrec_gpa
        self.armed = cq.arm is not _ARM_NONE
        return 1

    cdef bint room(self, uint32_t n):
        """Can ``n`` more CQEs be written now (ring and doorbell record reachable)?"""
        cdef char *db = self.dev.table.translate(self.dbrec_gpa, 4)
        cdef uint32_t ci, k
        if db == NULL:
            return False
        ci = gr_ld32_acq(db)
        if <uint32_t>(self.pc - ci) + n > self.depth or <uint32_t>(self.pc - ci) >= self.depth:
            return False
        for k in range(n):
            if self.dev.table.translate(self.ring_gpa + ((self.pc + k) & (self.depth - 1)) * CQE_SZ,
                                        CQE_SZ) == NULL:
                return False
        return True

    cdef void flush(self):
        if self.cq is not None and self.written:
            self.cq.pc = self.pc
            self.cq.written += self.written
            self.written = 0

    cdef int push(self, uint64_t wr_id, uint8_t opcode, uint8_t flags, uint32_t byte_len,
                  uint32_t imm, uint32_t qpn, uint32_t src_qp, bint solicited) except -1:
        """CompletionQueue.push of a SUCCESS completion after room() said yes."""
        cdef char *e = self.dev.table.translate(
            self.ring_gpa + (self.pc & (self.depth - 1)) * CQE_SZ, CQE_SZ)
        cdef uint8_t owner = ((self.pc // self.depth) & 1) ^ 1
        gr_write_cqe(e, wr_id, 0, opcode, flags, byte_len, imm, qpn, src_qp, 0, owner)
        self.pc += 1
        self.written += 1
        self.dev.completions += 1
        if self.armed:
            arm = self.cq.arm
            if arm is _ARM_NEXT or (arm is _ARM_SOLICITED and solicited):
                self.cq.arm = _ARM_NONE
                self.armed = False
                self.dev.events.append(self.cqn)
        return 0


cdef inline uint32_t _npkts(uint64_t length, uint64_t mtu) noexcept nogil:
    if length <= mtu:
        return 1
    return <uint32_t>((length + mtu - 1) // mtu)


cdef uint64_t _copy(Seg *dst, int nd, Seg *src, int ns) noexcept nogil:
    """mr.sg_copy: the concatenation of src into dst, pairwise, memmove."""
    cdef int di = 0, si = 0
    cdef uint64_t doff = 0, soff = 0, n, copied = 0
    while di < nd and si < ns:
        n = dst[di].n - doff
        if src[si].n - soff < n:
            n = src[si].n - soff
        if n:
            memmove(dst[di].p + doff, src[si].p + soff, n)
            copied += n
            doff += n
            soff += n
        if doff == dst[di].n:
            di += 1
            doff = 0
        if soff == src[si].n:
            si += 1
            soff = 0
    return copied


def run_sq(dev, qp, double now):
    """Start and complete the posted send WQEs of ``qp`` that take the plain
    local success path. Returns how many WQEs it completed; 0 means the next
    WQE (if any) is for the Python engine."""
    global completed
    if not enabled or qp.net is not None or qp.destroyed or qp.state is not _RTS:
        return 0
    if qp.rnr_until is not None or qp.inflight or qp.sq_ci != qp.sq_next:
        return 0
    cdef uint32_t sq_next = qp.sq_next, sq_pi = qp.sq_pi
    if sq_next == sq_pi:
        return 0
    fabric = dev.fabric
    if not isinstance(fabric, LocalFabric) or not fabric.direct:
        return 0
    attr = qp.attr
    if bytes(attr.dgid) != fabric.gid:
        return 0
    peer = fabric.endpoint(attr.dest_qp_num)
    if type(peer) is not QueuePair:
        return 0
    if peer.net is not None or peer.destroyed or peer.state not in _RECV_STATES:
        return 0
    pattr = peer.attr
    if pattr.dest_qp_num != qp.qpn or pattr.dgid != fabric.gid:
        return 0  # not the peer's connected QP: datapath.on_request drops and counts it
    cdef _Dev L = _Dev.__new__(_Dev)
    cdef _Dev R
    if not L.init(dev):
        return 0
    pdev = peer.dev
    if pdev is dev:
        R = L
    else:
        R = _Dev.__new__(_Dev)
        if not R.init(pdev):
            return 0
    # requester geometry and attributes
    lay = qp.layout
    cdef uint64_t sq_gpa = qp.sq_gpa
    cdef uint32_t sq_mask = lay.sq_depth - 1, sq_shift = lay.sq_wqe_shift
    cdef uint32_t slot_size = 1 << sq_shift
    cdef uint32_t room_sge = (slot_size - SEND_HDR) // SGE_SZ
    cdef uint32_t max_sge = lay.max_send_sge
    cdef uint32_t max_inline = lay.max_inline_data
    cdef uint32_t pdn = qp.pdn, qpn = qp.qpn
    cdef bint sig_all = qp.sq_sig_all
    cdef uint32_t sq_psn = qp.sq_psn
    cdef uint64_t mtu
    path_mtu = attr.path_mtu
    mtu = ibv_mtu_bytes(path_mtu) if IBV_MTU_256 <= path_mtu <= IBV_MTU_4096 else 1024
    # responder geometry
    play = peer.layout
    cdef uint64_t rq_gpa = peer.rq_gpa
    cdef uint32_t rq_mask = play.rq_depth - 1, rq_shift = play.rq_wqe_shift
    cdef uint32_t rslot_size = 1 << rq_shift
    cdef uint32_t rroom = (rslot_size - RECV_HDR) // SGE_SZ
    cdef uint32_t rmax_sge = play.max_recv_sge
    if rmax_sge < rroom:
        rroom = rmax_sge
    if max_sge < room_sge:
        room_sge = max_sge
    cdef uint32_t ppdn = peer.pdn, pqpn = peer.qpn
    cdef uint32_t paccess = int(peer.access)
    cdef uint32_t epsn = peer.epsn
    cdef uint32_t rq_ci = peer.rq_ci, rq_pi = peer.rq_pi
    # completion queues
    cdef _Cq scq = _Cq.__new__(_Cq)
    cdef _Cq rcq
    if not scq.init(qp.send_cq, L):
        return 0
    if peer.recv_cq is qp.send_cq:
        rcq = scq
    else:
        rcq = _Cq.__new__(_Cq)
        if not rcq.init(peer.recv_cq, R):
            return 0

    cdef unsigned char hdr[SEND_HDR]
    cdef unsigned char rhdr[RECV_HDR]
    cdef unsigned char sge[SGE_SZ]
    cdef Seg src[MAX_SEGS]
    cdef Seg dst[MAX_SEGS]
    cdef int ns, nd, k
    cdef char *slot
    cdef char *rslot
    cdef uint64_t wr_id, raddr, length, rlen, n, rwr_id
    cdef uint32_t imm, rkey, inline_len, num_sge, npkts, rnum
    cdef uint8_t op, flags
    cdef bint signaled, recv, has_imm
    cdef int done = 0
    cdef uint32_t need_s, need_r
    cdef uint64_t a
    cdef uint32_t ln, lk
    cdef bint ok

    try:
        while sq_next != sq_pi:
            # ---------- requester: the WQE (Python: progress_sq/_build_request)
            slot = L.table.translate(sq_gpa + ((sq_next & sq_mask) << sq_shift), slot_size)
            if slot == NULL:
                break
            gr_snapshot(hdr, slot, SEND_HDR)
            op = hdr[8]
            flags = hdr[9]
            if op > OP_READ or flags & ~F_KNOWN:
                break
            ok = True
            for k in range(48, 64):
                if hdr[k]:
                    ok = False
            if not ok:
                break
            wr_id = gr_ld64(<char *>hdr)
            num_sge = gr_ld16(<char *>hdr + 10)
            imm = gr_ld32(<char *>hdr + 12)
            raddr = gr_ld64(<char *>hdr + 16)
            rkey = gr_ld32(<char *>hdr + 24)
            inline_len = gr_ld32(<char *>hdr + 28)
            ns = 0
            if flags & F_INLINE:
                if num_sge != 0 or inline_len > slot_size - SEND_HDR or inline_len > max_inline:
                    break
                if op == OP_READ:
                    break
                length = inline_len
                if length:
                    src[0].p = slot + SEND_HDR
                    src[0].n = length
                    ns = 1
            else:
                if inline_len != 0 or num_sge > room_sge:
                    break
                length = 0
                for k in range(<int>num_sge):
                    gr_snapshot(sge, slot + SEND_HDR + k * SGE_SZ, SGE_SZ)
                    a = gr_ld64(<char *>sge)
                    ln = gr_ld32(<char *>sge + 8)
                    lk = gr_ld32(<char *>sge + 12)
                    length += ln
                    ns = L.resolve(lk, pdn, A_LOCAL_WRITE if op == OP_READ else 0, a, ln, src, ns)
                    if ns < 0:
                        break
                if ns < 0:
                    break
            if length > L.max_msg_sz or length > R.max_msg_sz:
                break
            npkts = _npkts(length, mtu)
            signaled = sig_all or (flags & F_SIGNALED) != 0
            # ---------- responder (Python: on_request and _execute_*)
            if epsn != sq_psn:
                break
            recv = op == OP_SEND or op == OP_SEND_IMM or op == OP_WRITE_IMM
            has_imm = op == OP_SEND_IMM or op == OP_WRITE_IMM
            nd = 0
            rwr_id = 0
            if recv:
                if rq_ci == rq_pi:
                    break
                rslot = R.table.translate(rq_gpa + ((rq_ci & rq_mask) << rq_shift), rslot_size)
                if rslot == NULL:
                    break
                gr_snapshot(rhdr, rslot, RECV_HDR)
                rwr_id = gr_ld64(<char *>rhdr)
                rnum = gr_ld16(<char *>rhdr + 8)
                if gr_ld16(<char *>rhdr + 10) or gr_ld32(<char *>rhdr + 12) or rnum > rroom:
                    break
                if op != OP_WRITE_IMM:
                    rlen = 0
                    for k in range(<int>rnum):
                        gr_snapshot(sge, rslot + RECV_HDR + k * SGE_SZ, SGE_SZ)
                        rlen += gr_ld32(<char *>sge + 8)
                    if rlen < length:
                        break
                    for k in range(<int>rnum):
                        gr_snapshot(sge, rslot + RECV_HDR + k * SGE_SZ, SGE_SZ)
                        nd = R.resolve(gr_ld32(<char *>sge + 12), ppdn, A_LOCAL_WRITE,
                                       gr_ld64(<char *>sge), gr_ld32(<char *>sge + 8), dst, nd)
                        if nd < 0:
                            break
                    if nd < 0:
                        break
            if op == OP_WRITE or op == OP_WRITE_IMM:
                if not paccess & A_REMOTE_WRITE:
                    break
                nd = R.resolve(rkey, ppdn, A_REMOTE_WRITE, raddr, length, dst, 0)
                if nd < 0:
                    break
            elif op == OP_READ:
                if not paccess & A_REMOTE_READ:
                    break
                # the data flows responder -> requester
                nd = ns
                for k in range(ns):
                    dst[k] = src[k]
                ns = R.resolve(rkey, ppdn, A_REMOTE_READ, raddr, length, src, 0)
                if ns < 0:
                    break
            # ---------- both CQs must take their CQEs
            need_s = 1 if signaled else 0
            need_r = 1 if recv else 0
            if rcq is scq:
                if need_s + need_r and not scq.room(need_s + need_r):
                    break
            else:
                if need_s and not scq.room(1):
                    break
                if need_r and not rcq.room(1):
                    break
            # ---------- commit: nothing below can fail
            sq_next += 1
            sq_psn = (sq_psn + npkts) & PSN_MASK
            L.requests_sent += 1
            if length >= 65536:
                with nogil:
                    n = _copy(dst, nd, src, ns)
            else:
                n = _copy(dst, nd, src, ns)
            epsn = (epsn + npkts) & PSN_MASK
            if op == OP_READ:
                R.bytes_sent += length
            else:
                R.bytes_received += n
            if recv:
                rq_ci += 1
                rcq.push(rwr_id, WC_RECV_RDMA_WITH_IMM if op == OP_WRITE_IMM else WC_RECV,
                         WC_WITH_IMM if has_imm else 0, n, imm if has_imm else 0, pqpn, qpn,
                         (flags & F_SOLICITED) != 0)
            L.responses_received += 1
            if op == OP_READ:
                L.bytes_received += n
            else:  # SEND / WRITE: the requester's bytes out (the responder's in: above)
                L.bytes_sent += length
            if signaled:
                scq.push(wr_id, WC_SEND if op >= OP_SEND and op != OP_READ else
                         (WC_RDMA_READ if op == OP_READ else WC_RDMA_WRITE),
                         0, n if op == OP_READ else length, 0, qpn, 0, False)
            L.sends_completed += 1
            done += 1
    finally:
        if done:
            completed += done
            fabric.delivered += done
            peer.nak_seq_sent = False
            qp.sq_next = sq_next
            qp.sq_ci = sq_next
            qp.sq_psn = sq_psn
            qp.retry_left = attr.retry_cnt
            qp.rnr_left = attr.rnr_retry
            peer.epsn = epsn
            peer.rq_ci = rq_ci
        scq.flush()
        if rcq is not scq:
            rcq.flush()
        L.flush_metrics()
        if R is not L:
            R.flush_metrics()
    return done


@cython.final
cdef class DbrecScanner:
    """Change detector over the QP doorbell records of one device
    (VIRTIO_RDMA_F_DBREC_POLL, spec 5.x.6.3): one pass over a C array of
    record addresses, comparing each 8-byte record with the value seen last
    time. It only says *which* QPs to look at; the core then reads the
    record again and applies it like a doorbell."""
    cdef list qps
    cdef uint64_t *gpas
    cdef uint64_t *seen
    cdef Py_ssize_t n
    cdef public object key

    def __dealloc__(self):
        PyMem_Free(self.gpas)
        PyMem_Free(self.seen)

    def rebuild(self, qps, key):
        """Track the records of ``qps`` (each reported once by the next scan)."""
        cdef Py_ssize_t i, n = len(qps)
        PyMem_Free(self.gpas)
        PyMem_Free(self.seen)
        self.gpas = self.seen = NULL
        self.n = 0
        if n:
            self.gpas = <uint64_t *>PyMem_Malloc(n * sizeof(uint64_t))
            self.seen = <uint64_t *>PyMem_Malloc(n * sizeof(uint64_t))
            if self.gpas == NULL or self.seen == NULL:
                raise MemoryError()
        self.qps = list(qps)
        for i in range(n):
            self.gpas[i] = self.qps[i].dbrec_gpa
            self.seen[i] = 0xFFFFFFFFFFFFFFFF  # never a record value pair we saw
        self.n = n
        self.key = key

    def scan(self, mem):
        """QPs whose doorbell record changed since the last scan."""
        tbl = getattr(mem, "_table", None)
        if type(tbl) is not RegionTable:
            return []
        cdef RegionTable t = <RegionTable>tbl
        cdef Py_ssize_t i
        cdef char *p
        cdef uint64_t v
        cdef list out = None
        for i in range(self.n):
            p = t.translate(self.gpas[i], 8)
            if p == NULL:
                continue
            v = <uint64_t>gr_ld32_acq(p) | (<uint64_t>gr_ld32_acq(p + 4) << 32)
            if v != self.seen[i]:
                self.seen[i] = v
                if out is None:
                    out = []
                out.append(self.qps[i])
        return out if out is not None else []


# --------------------------------------------------------------------------
# A kick of the doorbellq under DBREC_POLL (the blocking daemon's common case)
# --------------------------------------------------------------------------
#: the native doorbellq kick is taken (tests compare it with the generic path)
kick_enabled = True
#: doorbellq kicks served by kick_doorbellq since import
kicks_served = 0
cdef uint32_t _OBJ_MASK = _OBJ_NUM_MASK
cdef uint32_t _KIND_SQ = DoorbellKind.SQ
cdef uint32_t _KIND_RQ = DoorbellKind.RQ


cdef bint _stale_one(core, bytes buf):
    """``doorbells._stale`` for a buffer of one SQ/RQ record: an index the
    device already has, nothing for the engine to start (False: decode it)."""
    if len(buf) != 8:
        return False
    cdef const char *p = buf
    cdef uint32_t word = gr_ld32(p), value = gr_ld32(p + 4)
    cdef uint32_t kind = word >> 24
    if kind != _KIND_SQ and kind != _KIND_RQ:
        return False
    qp = core.qps.get(word & _OBJ_MASK)
    if qp is None:
        return False
    st = qp.state
    if st is _RESET or st is _ERR or qp.net is not None:
        return False
    if kind == _KIND_RQ:
        return value == <uint32_t>qp.rq_pi
    return (value == <uint32_t>qp.sq_pi and value == <uint32_t>qp.sq_next and not qp.inflight
            and qp.rnr_until is None)


cdef int _records(core, mem, double now, apply_changed) except -1:
    """``doorbells.poll`` with the scan in C: nothing changed, no Python;
    changed records go to ``apply_changed`` (``doorbells.apply_changed``:
    apply_records, then run_sq). Accelerator queues or a scanner to rebuild: the Python path."""
    scanner = core.dbrec_scanner
    if (type(scanner) is not DbrecScanner or core.aqs
            or (<DbrecScanner>scanner).key != (len(core.qps), core.qp_epoch)):
        core.poll(now)
        return 0
    qps = (<DbrecScanner>scanner).scan(mem)
    if qps:
        apply_changed(core, qps, now)
    return 0


def kick_doorbellq(core, q, mem, vring, double now, int budget, apply_changed):
    """One kick of a device's doorbellq with DBREC_POLL negotiated, as
    ``vhost_user.backend.BackendConnection.kick`` and
    ``RdmaDevice.process_queue`` serve it, without Python between the kick
    and ``run_sq`` (virtio_rdma.device.RdmaDevice.fast_kick calls it):
    notifications off; pop up to ``budget`` buffers, apply the changed
    doorbell records (the driver writes a record before its doorbell), then
    each buffer: one stale SQ/RQ record is counted (``doorbells``,
    ``doorbells_stale``) and dropped, anything else goes to
    ``core.doorbell``; the buffers go back used, the driver is notified if
    it asked; then notifications on and the records scanned once more
    after that fence (a driver that saw notifications off wrote only its
    record). Returns 1 if the budget ran out with buffers left
    (notifications stay off: the caller kicks again later), else 0.
    ``apply_changed`` is ``doorbells.apply_changed``. Ring errors (a
    malformed chain) raise, as in the generic path."""
    global kicks_served
    cdef Py_ssize_t n
    cdef list chains
    kicks_served += 1
    metrics = core.metrics
    q.disable_notification(mem)
    while True:
        chains = q.pop_many(mem, budget)
        n = len(chains)
        if n == 0:
            q.enable_notification(mem)
            _records(core, mem, now, apply_changed)
            return 0
        _records(core, mem, now, apply_changed)
        for ch in chains:
            buf = ch.read()
            if type(buf) is bytes and _stale_one(core, <bytes>buf):
                metrics.doorbells += 1
                metrics.doorbells_stale += 1
            else:
                core.doorbell(buf, now)
        q.push_many(mem, [(ch, 0) for ch in chains])
        vring.notify(mem)
        if n == budget and q.has_available(mem):
            return 1
        if not q.enable_notification(mem):
            _records(core, mem, now, apply_changed)
            return 0
        q.disable_notification(mem)


# --------------------------------------------------------------------------
# Wire QPs: send WQEs straight into request packets (fabric.roce_qp.NetworkQp)
# --------------------------------------------------------------------------
cdef object _WR_OPS = {int(o): o for o in WrOpcode}
cdef object _PENDING = WqeState.PENDING
cdef object _PACKET_RUN = PacketRun
cdef object _SGLIST = SgList
cdef object _SEND_WR = SendWR
cdef object _RC_WQE = RcWqe
cdef object _OPS_OF = {int(k): v for k, v in _SEND_OPS.items()}
cdef uint64_t _MAX_MSG = _rc_config.MAX_MSG_SIZE
cdef uint32_t _UNACKED = _rc_config.MAX_UNACKED_PSNS
cdef object _ACK_EVERY = _rc_config.MAX_PKT_PER_ACK
cdef uint32_t _ACK_EVERY_C = _rc_config.MAX_PKT_PER_ACK
#: the BTH opcodes (FIRST, MIDDLE, LAST, ONLY) of each plain WR opcode (0..OP_SEND_IMM),
#: from the requester's table
cdef int _OPC[4][4]
for _k, _v in _SEND_OPS.items():
    if int(_k) < 4:
        for _x in range(4):
            _OPC[int(_k)][_x] = int(_v[_x])
#: the wire path's own switch (tests compare it with the Python engine)
wire_enabled = True
#: encode the packets of the WQEs it starts straight into the fabric's TX ring
#: (``RoceFabric.tx_route``) instead of handing PacketRuns to ``fabric.transmit``
#: (tests compare the two)
wire_direct = True
#: send WQEs the wire path started since import (tests check it really ran)
wire_started = 0
#: of those, the ones whose packets it encoded into a TX ring itself
wire_direct_msgs = 0


cdef enum:
    SEND_EARLY = 8     # packets gathered before the wire path hands them over mid-batch


cdef int _commit_wire(req, qp, rm, sq, uint32_t psn, uint32_t sq_next, uint64_t tx_packets, to,
                      double now) except -1:
    """Write the requester state of the WQEs started so far back (before any
    packet of theirs leaves: a transmit may deliver synchronously)."""
    req.psn = req.psn_hi = psn
    req.noack_pkts = 0
    req.send_idx = len(sq)
    rm.tx_packets += tx_packets
    if req.retrans_deadline is None and to is not None:
        req.retrans_deadline = now + to
    qp.sq_next = sq_next
    qp.sq_psn = psn
    return 0


cdef inline uint32_t _bswap32(uint32_t v) noexcept nogil:
    return ((v & 0xFF) << 24) | ((v & 0xFF00) << 8) | ((v >> 8) & 0xFF00) | (v >> 24)


cdef object _table_view(RegionTable t, mem, uint64_t gpa, uint64_t length):
    """``mem.translate(gpa, length)`` (GuestMemory over the table ``t``)
    without the Python call: the same view of the one region that holds the
    range; a range outside every region goes to ``mem.translate``, which
    raises as before."""
    cdef Py_ssize_t i = t.find(gpa, length)
    if i < 0:
        return mem.translate(gpa, length)
    return t.view_at(i, gpa, length)


cdef object _sglist(list views):
    """``SgList(views)`` for byte memoryviews made here (1-D, format B,
    contiguous: what ``SgList.__init__`` checks): its entries, empty ones
    left out as it leaves them out, and their offsets, without the checks."""
    cdef list kept = [], starts = []
    cdef Py_ssize_t total = 0, n
    for v in views:
        n = len(v)
        if n:
            kept.append(v)
            starts.append(total)
            total += n
    sgl = _SGLIST.__new__(_SGLIST)
    sgl.views = kept
    sgl.starts = starts
    sgl.total = total
    return sgl


def run_wire_sq(dev, qp, net, double now):
    """Start the posted send WQEs of ``qp``, a QP run by the RoCE RC engine
    of ``net`` (a :class:`fabric.roce_qp.NetworkQp`), that take the plain
    path: SEND, SEND_WITH_IMM, RDMA_WRITE and RDMA_WRITE_WITH_IMM, inline or
    with SGEs in single-chunk MRs, whose packets all fit the window now.
    Each is decoded and checked here and posted to the engine as
    ``NetworkQp.start_send`` + ``Requester.post`` + ``Requester.fill`` would
    (the same SendWR, SgList, Wqe and PacketRun, the same PSNs, counters
    and deadline); their packets go to ``net.fabric.transmit`` in one call,
    or, where the fabric gives a route into its UDP endpoint's TX ring
    (``RoceFabric.tx_route``, a :class:`fabric.roce.TxRoute`), are encoded
    there as each WQE starts (``TxRing.add_msg``: the bytes ``add_run`` makes
    of that PacketRun, which is then never built) and counted and flushed as
    ``fabric.transmit`` would (``TxRoute.done``).
    Returns how many WQEs it started; the first WQE it leaves (any error, a
    READ or atomic, a fence, a full window, an engine that is retrying,
    stalled or has output or completions pending) is for the Python path,
    with the same state, except a message the window cannot take now but an
    empty one could: it stays in the ring with ``net.held`` set (the rule of
    ``Requester.window_full``, which the Python path applies too) and
    ``NetworkQp.pump`` starts it after an ACK."""
    return _run_wire_sq(dev, qp, net, now)


cdef int _run_wire_sq(dev, qp, net, double now) except -1:
    global wire_started, wire_direct_msgs
    if not enabled or not wire_enabled or qp.destroyed or qp.state is not _RTS or net.closed:
        return 0
    cdef uint32_t sq_next = qp.sq_next, sq_pi = qp.sq_pi
    if sq_next == sq_pi:
        return 0
    rc = net.rc
    if rc.state is not _RTS or rc._send_cq or rc._recv_cq:
        return 0
    req = rc.requester
    resp = rc.responder
    sq = req.sq
    if (req.dead or req.rnr_deadline is not None or req.send_idx != len(sq) or req.out
            or resp.out or req.completions or resp.completions or req.noack_pkts):
        return 0
    cdef uint32_t psn = req.psn
    if psn != <uint32_t>req.psn_hi:
        return 0
    cdef uint32_t comp_psn = req.comp_psn
    cdef bint rd_outstanding = req.rd_atomic_outstanding != 0
    cdef _Dev L = _Dev.__new__(_Dev)
    if not L.init(dev):
        return 0
    cfg = rc.cfg
    cdef uint64_t mtu = cfg.path_mtu
    if mtu == 0:
        return 0
    dest_qp = cfg.dest_qp_num
    pkey = cfg.pkey
    to = ack_timeout_seconds(cfg.timeout)
    lay = qp.layout
    mem = dev.mem
    cdef uint64_t sq_gpa = qp.sq_gpa
    cdef uint32_t sq_mask = lay.sq_depth - 1, sq_shift = lay.sq_wqe_shift
    cdef uint32_t slot_size = 1 << sq_shift
    cdef uint32_t room_sge = (slot_size - SEND_HDR) // SGE_SZ
    cdef uint32_t max_sge = lay.max_send_sge
    cdef uint32_t max_inline = lay.max_inline_data
    cdef uint32_t pdn = qp.pdn
    cdef bint sig_all = qp.sq_sig_all
    if max_sge < room_sge:
        room_sge = max_sge
    cdef unsigned char hdr[SEND_HDR]
    cdef unsigned char sge[SGE_SZ]
    cdef Seg segs[MAX_SEGS]
    cdef char *slot
    cdef MrEnt *e
    cdef uint64_t wr_id, raddr, length, a, cmp_add, swap
    cdef uint32_t imm, rkey, inline_len, num_sge, npkts, ln, lk, room, k
    cdef uint8_t op, flags
    cdef bint ok, write, with_imm
    cdef int ns
    cdef int done = 0
    cdef list runs = []
    rm = req.metrics
    posted = net.posted
    cdef uint64_t tx_packets = 0
    cdef uint32_t pending = 0
    # the fabric's TX ring, when it gives one for this peer
    cdef TxRing ring = None
    cdef Envelope env = None
    cdef bint seal = False
    cdef int j
    cdef uint32_t msg_psn, direct = 0
    cdef uint32_t dqp = dest_qp, pk = pkey
    route = None
    if wire_direct:
        tx_route = getattr(net.fabric, "tx_route", None)
        if tx_route is not None:
            route = tx_route(net.peer)
            if route is not None:
                ring = <TxRing?>route.ring
                env = <Envelope?>route.env
                seal = route.seal
    try:
        while sq_next != sq_pi:
            slot = L.table.translate(sq_gpa + ((sq_next & sq_mask) << sq_shift), slot_size)
            if slot == NULL:
                break
            gr_snapshot(hdr, slot, SEND_HDR)
            op = hdr[8]
            flags = hdr[9]
            if op > OP_SEND_IMM or flags & ~F_KNOWN:
                break
            if (flags & IBV_SEND_FENCE) and rd_outstanding:
                break
            ok = True
            for k in range(48, 64):
                if hdr[k]:
                    ok = False
            if not ok:
                break
            wr_id = gr_ld64(<char *>hdr)
            num_sge = gr_ld16(<char *>hdr + 10)
            imm = gr_ld32(<char *>hdr + 12)
            raddr = gr_ld64(<char *>hdr + 16)
            rkey = gr_ld32(<char *>hdr + 24)
            inline_len = gr_ld32(<char *>hdr + 28)
            cmp_add = gr_ld64(<char *>hdr + 32)
            swap = gr_ld64(<char *>hdr + 40)
            views = []
            if flags & F_INLINE:
                if num_sge != 0 or inline_len > slot_size - SEND_HDR or inline_len > max_inline:
                    break
                length = inline_len
                views.append(memoryview(PyBytes_FromStringAndSize(slot + SEND_HDR, inline_len)))
            else:
                if inline_len != 0 or num_sge > room_sge:
                    break
                length = 0
                ns = 0
                for k in range(num_sge):
                    gr_snapshot(sge, slot + SEND_HDR + k * SGE_SZ, SGE_SZ)
                    a = gr_ld64(<char *>sge)
                    ln = gr_ld32(<char *>sge + 8)
                    lk = gr_ld32(<char *>sge + 12)
                    ns = L.resolve(lk, pdn, 0, a, ln, segs, 0)
                    if ns < 0:
                        break
                    length += ln
                    if ln:
                        e = L.lookup(lk)
                        if e.host == NULL:
                            ns = -1     # an MR of several chunks: the Python path
                            break
                        views.append(_table_view(L.table, mem, e.gpa + (a - e.iova), ln))
                if ns < 0:
                    break
            if length > L.max_msg_sz or length > _MAX_MSG:
                break
            npkts = _npkts(length, mtu)
            room = _UNACKED - ((psn - comp_psn) & PSN_MASK)
            if ((psn - comp_psn) & PSN_MASK) >= 0x800000 or room < npkts:
                # psn_diff negative or the window cannot take the whole message: one that
                # an empty window could take stays in the ring until an ACK makes room
                # (Requester.window_full: NetworkQp.pump starts it), else Python posts it
                if npkts <= _UNACKED and ((psn - comp_psn) & PSN_MASK) < 0x800000:
                    net.held = comp_psn
                    net.window_holds += 1
                break
            # ---------- commit: what start_send, Requester.post and fill do
            write = op == OP_WRITE or op == OP_WRITE_IMM
            with_imm = op == OP_WRITE_IMM or op == OP_SEND_IMM
            wrop = _WR_OPS[op]
            wr = _SEND_WR(wr_id, wrop, views, raddr, rkey, _bswap32(imm) if with_imm else 0, 0,
                          cmp_add, swap, True, (flags & F_SOLICITED) != 0,
                          (flags & IBV_SEND_FENCE) != 0)
            sgl = _sglist(views)
            w = _RC_WQE(wr, sgl, length, npkts, False, _PENDING, psn, npkts)
            sq.append(w)
            posted.append((sq_next, op, sig_all or (flags & F_SIGNALED) != 0))
            if ring is None:
                runs.append(_PACKET_RUN(_OPS_OF[op], npkts, 0, npkts, psn, dest_qp, pkey, mtu,
                                        length, sgl, (raddr, rkey) if write else None,
                                        wr.imm_data if with_imm else None, None, wr.solicited, 0,
                                        _ACK_EVERY))
            msg_psn = psn
            tx_packets += npkts
            psn = (psn + npkts) & PSN_MASK
            sq_next = (sq_next + 1) & 0xFFFFFFFF
            L.requests_sent += 1
            done += 1
            pending += npkts
            if ring is not None:
                # the PacketRun above, encoded without building it; a ring that fills
                # up mid-message is sent (state written back first) and refilled
                j = 0
                while True:
                    j = ring.add_msg(_OPC[op][0], _OPC[op][1], _OPC[op][2], _OPC[op][3], npkts,
                                     0, npkts, msg_psn, dqp, pk, mtu, length, sgl.views,
                                     sgl.starts, write, raddr, rkey, with_imm,
                                     _bswap32(imm), False, 0, (flags & F_SOLICITED) != 0, 0,
                                     _ACK_EVERY_C, env, j, seal)
                    if <uint32_t>j == npkts:
                        break
                    _commit_wire(req, qp, rm, sq, psn, sq_next, tx_packets, to, now)
                    tx_packets = 0
                    route.full()
                direct += 1
            if pending >= SEND_EARLY:
                # a message of several packets leaves now, as pump() after each WQE
                # sends it: the peer works on it while the next WQE is read
                _commit_wire(req, qp, rm, sq, psn, sq_next, tx_packets, to, now)
                tx_packets = 0
                if ring is not None:
                    _route_done(route, ring, pending, seal)
                else:
                    runs_out, runs = runs, []
                    net.fabric.transmit(runs_out, net.peer)
                pending = 0
    finally:
        if done:
            wire_started += done
            wire_direct_msgs += direct
            _commit_wire(req, qp, rm, sq, psn, sq_next, tx_packets, to, now)
        L.flush_metrics()
        if runs:    # what pump() after each WQE would have sent, in one call
            net.fabric.transmit(runs, net.peer)
        elif ring is not None and pending:
            _route_done(route, ring, pending, seal)
    return done


cdef inline int _route_done(route, TxRing ring, uint32_t n, bint seal) except -1:
    """``route.done(n)`` (fabric.roce.TxRoute): natively when the endpoint
    allows (``TxRing.flush_direct``), the same counters either way."""
    if ring.flush_direct(n, seal):
        route.fabric.metrics.tx_packets += n
    else:
        route.done(n)
    return 0


cdef object _RECV_ENGINE_STATES = (QpState.INIT, QpState.RTR, QpState.RTS, QpState.SQD)
#: receive WQEs the wire path handed to an engine since import
wire_recvs = 0


def run_wire_rq(dev, qp, net):
    """Hand the RC engine of ``net`` the receive WQEs the guest posted since
    ``net.rq_posted``, as ``rings.drive_rq`` + ``NetworkQp.post_recv`` +
    ``RcQp.post_recv`` would (the same ``(wr_id, SgList)`` on the
    responder's queue), while each is plain: a readable slot, zero reserved
    fields, SGEs within the slot and ``max_recv_sge`` whose lkeys grant
    LOCAL_WRITE in single-chunk MRs. Returns how many it handed over; the
    first WQE it leaves is for the Python path."""
    return _run_wire_rq(dev, qp, net)


cdef int _run_wire_rq(dev, qp, net) except -1:
    global wire_recvs
    if not enabled or not wire_enabled or qp.destroyed or net.closed:
        return 0
    cdef uint32_t idx = net.rq_posted, rq_pi = qp.rq_pi
    if idx == rq_pi:
        return 0
    rc = net.rc
    if rc.state not in _RECV_ENGINE_STATES:
        return 0
    resp = rc.responder
    if resp.dead:
        return 0
    cdef _Dev L = _Dev.__new__(_Dev)
    if not L.init(dev):
        return 0
    lay = qp.layout
    mem = dev.mem
    rq = resp.rq
    cdef uint64_t rq_gpa = qp.rq_gpa
    cdef uint32_t rq_mask = lay.rq_depth - 1, rq_shift = lay.rq_wqe_shift
    cdef uint32_t rslot_size = 1 << rq_shift
    cdef uint32_t rroom = (rslot_size - RECV_HDR) // SGE_SZ
    cdef uint32_t rmax = lay.max_recv_sge
    cdef uint32_t pdn = qp.pdn
    if rmax < rroom:
        rroom = rmax
    cdef unsigned char rhdr[RECV_HDR]
    cdef unsigned char sge[SGE_SZ]
    cdef Seg segs[MAX_SEGS]
    cdef char *rslot
    cdef MrEnt *e
    cdef uint64_t a
    cdef uint32_t rnum, ln, lk, k
    cdef int ns
    cdef int done = 0
    try:
        while idx != rq_pi:
            rslot = L.table.translate(rq_gpa + ((idx & rq_mask) << rq_shift), rslot_size)
            if rslot == NULL:
                break
            gr_snapshot(rhdr, rslot, RECV_HDR)
            rnum = gr_ld16(<char *>rhdr + 8)
            if gr_ld16(<char *>rhdr + 10) or gr_ld32(<char *>rhdr + 12) or rnum > rroom:
                break
            views = []
            ns = 0
            for k in range(rnum):
                gr_snapshot(sge, rslot + RECV_HDR + k * SGE_SZ, SGE_SZ)
                a = gr_ld64(<char *>sge)
                ln = gr_ld32(<char *>sge + 8)
                lk = gr_ld32(<char *>sge + 12)
                ns = L.resolve(lk, pdn, A_LOCAL_WRITE, a, ln, segs, 0)
                if ns < 0:
                    break
                if ln:
                    e = L.lookup(lk)
                    if e.host == NULL:
                        ns = -1
                        break
                    views.append(_table_view(L.table, mem, e.gpa + (a - e.iova), ln))
            if ns < 0:
                break
            rq.append((gr_ld64(<char *>rhdr), _sglist(views)))
            idx = (idx + 1) & 0xFFFFFFFF
            done += 1
    finally:
        if done:
            net.rq_posted = idx
            wire_recvs += done
    return done


cdef int _SUCCESS = WcStatus.SUCCESS
cdef int _OP_READ_WR = IBV_WR_RDMA_READ
cdef object _WC_OF = {int(k): int(v) for k, v in _rings.WC_OF_WR.items()}
#: completions the wire path wrote as CQEs since import
wire_cqes_written = 0


cpdef tuple wire_cqes(dev, qp, net, list sends, list recvs):
    """:func:`_wire_cqes`, taking what it can."""
    return _wire_cqes(dev, qp, net, sends, recvs, False)


cdef tuple _wire_cqes(dev, qp, net, list sends, list recvs, bint whole):
    """Write the CQEs of RC engine completions of ``qp`` (run by ``net``, a
    :class:`fabric.roce_qp.NetworkQp`) as ``NetworkQp._send_done`` and
    ``_recv_done`` would (slot retired, CQE if signaled, counters, the
    completion event of an armed CQ), sends first: every successful
    completion while its CQ is active and has room. Returns ``(i, j)``: the
    sends and receives taken; the rest (from the first error completion,
    full or broken CQ, ...) are for the Python path, in order (``j`` is 0
    unless every send was taken). With ``whole``, all or nothing: ``(-1,
    -1)``, nothing written, unless every completion is a success and both CQs
    have room for all of them."""
    global wire_cqes_written
    cdef Py_ssize_t i = 0, j = 0, nsig = 0, k
    if not enabled or not wire_enabled or qp.destroyed:
        return (-1, -1) if whole else (0, 0)
    cdef _Dev L = _Dev.__new__(_Dev)
    if not L.init(dev):
        return (-1, -1) if whole else (0, 0)
    cdef _Cq scq = _Cq.__new__(_Cq)
    cdef _Cq rcq
    if not scq.init(qp.send_cq, L):
        return (-1, -1) if whole else (0, 0)
    if qp.recv_cq is qp.send_cq:
        rcq = scq
    else:
        rcq = _Cq.__new__(_Cq)
        if not rcq.init(qp.recv_cq, L):
            rcq = None
    cdef uint32_t qpn = qp.qpn
    cdef uint32_t sq_ci = qp.sq_ci, rq_ci = qp.rq_ci
    cdef uint32_t idx, imm
    cdef int opcode
    cdef bint signaled, moved_sq = False
    posted = net.posted
    if whole:
        if len(sends) > len(posted) or (recvs and rcq is None):
            return -1, -1
        for k in range(len(sends)):
            if int(sends[k].status) != _SUCCESS:
                return -1, -1
            if posted[k][2]:
                nsig += 1
        for c in recvs:
            if int(c.status) != _SUCCESS:
                return -1, -1
        if rcq is scq:
            if (nsig or recvs) and not scq.room(nsig + len(recvs)):
                return -1, -1
        elif (nsig and not scq.room(nsig)) or (recvs and not rcq.room(len(recvs))):
            return -1, -1
    try:
        for c in sends:
            if int(c.status) != _SUCCESS or not posted:
                break
            idx, opcode, signaled = posted[0]
            if signaled and not scq.room(1):
                break
            posted.popleft()
            sq_ci = (idx + 1) & 0xFFFFFFFF
            moved_sq = True
            if signaled:
                scq.push(c.wr_id, _WC_OF.get(opcode, WC_SEND), 0, c.byte_len, 0, qpn, 0, False)
            L.sends_completed += 1
            if opcode == _OP_READ_WR:
                L.bytes_received += c.byte_len
            elif (opcode == OP_SEND or opcode == OP_SEND_IMM or opcode == OP_WRITE or opcode == OP_WRITE_IMM
                  or opcode == IBV_WR_SEND_WITH_INV):  # as rings.send_done: the requester's bytes sent
                L.bytes_sent += c.byte_len
            i += 1
        if i == len(sends) and rcq is not None:
            for c in recvs:
                if int(c.status) != _SUCCESS or not rcq.room(1):
                    break
                rq_ci = (rq_ci + 1) & 0xFFFFFFFF
                L.bytes_received += c.byte_len
                if c.imm_data is not None:
                    imm = c.imm_data
                    rcq.push(c.wr_id, int(c.opcode), WC_WITH_IMM, c.byte_len, _bswap32(imm), qpn,
                             c.src_qp, False)
                else:
                    rcq.push(c.wr_id, int(c.opcode), 0, c.byte_len, 0, qpn, c.src_qp, False)
                j += 1
    finally:
        if moved_sq:
            qp.sq_ci = sq_ci
        if j:
            qp.rq_ci = rq_ci
        if i or j:
            wire_cqes_written += i + j
        scq.flush()
        if rcq is not None and rcq is not scq:
            rcq.flush()
        L.flush_metrics()
    return i, j


cdef object _idle_engine(qp, net):
    """``net``'s RC engine if its pump has nothing new to start, else None: the
    native paths on, the QP alive, no WQE held in the ring (``net.held``), not
    in error, and nothing for ``Requester.fill`` (not RTS, or a requester that
    is dead, stalled by an RNR NAK or has sent every WQE). The one gate of
    :func:`wire_pump` and :func:`wire_settle`."""
    if not enabled or not wire_enabled or qp.destroyed or net.held is not None:
        return None
    rc = net.rc
    st = rc.state
    if st is _ERR:
        return None
    req = rc.requester
    if st is _RTS and not (req.dead or req.rnr_deadline is not None or req.send_idx == len(req.sq)):
        return None                     # Requester.fill may start packets: the Python pump
    return rc


#: NetworkQp.pump bodies run here since import
wire_pumps = 0


def wire_pump(dev, qp, net, double now):
    """The body of ``NetworkQp.pump`` (``net``, the wire engine of ``qp``)
    for the common case: an engine with no requests to start (``RcQp.transmit_raw``'s
    ``Requester.fill`` has nothing to do: not RTS, a requester that is dead,
    stalled by an RNR NAK or has sent every WQE), with no WQE kept in the ring
    (``net.held``) and not in error. Its packets (the responder's first, as
    ``transmit_raw`` orders them) go to ``net.fabric.transmit`` in one call,
    its completions become CQEs through :func:`wire_cqes` and, for what that
    leaves (errors, a full CQ), ``net._send_done`` / ``net._recv_done`` in
    order, exactly as the pump's body. Returns False, having changed nothing,
    in any other case: the Python pump runs. The pump's tail (PSNs mirrored to
    the QP, a held WQE started, ERR followed) stays with the caller."""
    global wire_pumps
    rc = _idle_engine(qp, net)
    if rc is None:
        return False
    req = rc.requester
    resp = rc.responder
    cdef list out = resp.out, qout = req.out
    if out:
        resp.out = []
        if qout:
            out += qout
            req.out = []
    elif qout:
        out = qout
        req.out = []
    if req.completions or resp.completions:
        rc._collect()
    if out:
        net.fabric.transmit(out, net.peer)
    cdef list sends = rc._send_cq, recvs = rc._recv_cq
    cdef Py_ssize_t i = 0, j = 0, k
    if sends or recvs:
        rc._send_cq = []
        rc._recv_cq = []
        i, j = wire_cqes(dev, qp, net, sends, recvs)
        for k in range(i, len(sends)):
            net._send_done(sends[k])
        for k in range(j, len(recvs)):
            net._recv_done(recvs[k])
    wire_pumps += 1
    return True


#: fast-path packets whose QP was settled at once (wire_settle) since import
wire_settled = 0


def wire_settle(dev, qp, net):
    """After the receive fast path (:mod:`roce.rc._fastrx`) gave ``net``'s
    engine packets, do at once what the QP's deferred pump would do at the
    end of the batch, when doing it now cannot differ: nothing to send (the
    fast path holds its ACKs itself), nothing for ``Requester.fill`` to start,
    no WQE held in the ring, not in error, every completion a success with
    room for all of them in their CQs (:func:`_wire_cqes` all or nothing), and
    no receive completion while send WQEs are outstanding (an ACK later in
    the batch could complete them, and the pump writes send CQEs before
    receive CQEs). Then the CQEs are written, the PSNs mirrored to the QP
    (the pump's tail, which has nothing else to do then) and True returned;
    else False, nothing changed: the caller defers the pump."""
    global wire_settled
    if net.closed:
        return False
    rc = _idle_engine(qp, net)
    if rc is None:
        return False
    req = rc.requester
    resp = rc.responder
    if resp.out or req.out or req.completions or resp.completions:
        return False
    cdef list sends = rc._send_cq, recvs = rc._recv_cq
    if recvs and req.sq:
        return False
    if sends or recvs:
        if _wire_cqes(dev, qp, net, sends, recvs, True)[0] < 0:
            return False
        rc._send_cq = []
        rc._recv_cq = []
    qp.sq_psn = req.psn
    qp.epsn = resp.psn
    wire_settled += 1
    return True


# --------------------------------------------------------------------------
# Doorbell records (DBREC_POLL): a changed record straight to the engines
# --------------------------------------------------------------------------
cdef object _RESET = QpState.RESET
cdef object _ERR = QpState.ERR
#: doorbell record changes applied here since import
records_applied = 0


cdef inline int _advance_kind(uint32_t pi, uint32_t ci, uint32_t old, uint32_t depth) noexcept:
    """doorbells._advance under DBREC_POLL: 0 no news (same or stale), 1 apply, -1 absurd."""
    if pi == old:
        return 0
    if <uint32_t>(old - pi) < 0x80000000:
        return 0
    if <uint32_t>(pi - ci) > depth or <uint32_t>(pi - old) > depth:
        return -1
    return 1


cdef int _wire_progress(dev, qp, net, double now) except -1:
    """``NetworkQp.progress(now)`` (a QP of the RoCE engine whose SQ
    producer index moved), its common case without Python: ``run_wire_sq``,
    and the rest of ``_progress_sq`` (``NetworkQp.progress_rest``) only if
    a WQE is left that it could start; then the receives posted meanwhile
    (``run_wire_rq``, and ``drive_rq`` only for what it left)."""
    net.held = None
    if qp.state is not _RTS:
        net.pump(now)
    else:
        _run_wire_sq(dev, qp, net, now)
        if not (qp.sq_next == qp.sq_pi or qp.state is not _RTS or net.held is not None):
            net.progress_rest(now)
    if not net.closed and net.rq_posted != qp.rq_pi and qp.state in _RECV_STATES:
        _run_wire_rq(dev, qp, net)
        if net.rq_posted != qp.rq_pi:
            _rings.drive_rq(dev, qp, net, lenient=True)
    return 0


def apply_records(core, list qps, double now, progress_sq):
    """Apply the doorbell records of ``qps`` (the QPs the scanner found
    changed) as ``doorbells.poll_records`` would, without Python per record:
    each record read once, stale values ignored, a new RQ producer index
    stored, a new SQ producer index stored and the QP's send engine run (the
    native :func:`run_sq` first for a local QP, ``NetworkQp.progress`` for a
    wire QP; ``progress_sq`` is ``datapath.progress_sq``, for what ``run_sq``
    leaves), the QP put on the timer list as ``doorbells.ring`` does.
    Returns ``(left, applied)``: the QPs from the first one that is not the
    plain case (an absurd index, a QP in ERR, a wire engine other than
    NetworkQp) on, for the Python path, and the changes applied here. A
    NetworkQp's ``progress`` runs as :func:`_wire_progress`."""
    global records_applied
    if not enabled or not qps:
        return qps, 0
    tbl = getattr(core.mem, "_table", None)
    if type(tbl) is not RegionTable:
        return qps, 0
    cdef RegionTable t = <RegionTable>tbl
    cdef Py_ssize_t i = 0, n = len(qps)
    cdef int applied = 0, rq_kind, sq_kind
    cdef char *p
    cdef uint32_t sq_pi, rq_pi
    by_qpn = core.qps
    try:
        while i < n:
            qp = qps[i]
            if qp.state is _RESET or qp.destroyed:
                i += 1
                continue
            p = t.translate(qp.dbrec_gpa, 8)
            if p == NULL:
                i += 1
                continue
            sq_pi = gr_ld32_acq(p)
            rq_pi = gr_ld32_acq(p + 4)
            net = qp.net
            if qp.state is _ERR or (net is not None and not getattr(net, "native_records", False)):
                break
            lay = qp.layout
            rq_kind = _advance_kind(rq_pi, qp.rq_ci, qp.rq_pi, lay.rq_depth)
            sq_kind = _advance_kind(sq_pi, qp.sq_ci, qp.sq_pi, lay.sq_depth) \
                if qp.qpn in by_qpn else 0
            if rq_kind < 0 or sq_kind < 0:
                break
            if rq_pi != <uint32_t>qp.rq_pi:
                applied += 1
                if rq_kind:
                    qp.rq_pi = rq_pi    # NetworkQp.rq_rung does nothing: receives go later
            if sq_pi != <uint32_t>qp.sq_pi and qp.qpn in by_qpn:
                applied += 1
                if sq_kind:
                    qp.sq_pi = sq_pi
                    if net is None:
                        run_sq(core, qp, now)
                        if qp.sq_next != qp.sq_pi:
                            progress_sq(core, qp, now)
                    elif getattr(net, "native_progress", False):
                        _wire_progress(core, qp, net, now)
                    else:
                        net.progress(now)
                    if qp.inflight or qp.rnr_until is not None or qp.net is not None:
                        core.timer_qps.add(qp.qpn)
            i += 1
    finally:
        records_applied += applied
    return (qps[i:] if i else qps), applied

