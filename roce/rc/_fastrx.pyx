# cython: language_level=3
"""Native fast path of the RC responder (:mod:`roce.rc.responder`) for the
common requests:

* an RDMA WRITE: its FIRST (or ONLY, without immediate data) packet is
  checked as ``Responder._do_write`` checks it (R_Key, rights and bounds
  through the QP's :class:`~roce.rc.memory.RemoteMemory`, which must give one
  contiguous buffer) and starts the message; its in-sequence WRITE MIDDLE
  and WRITE LAST packets go from the receive ring
  (:class:`roce._udpio.RxRing`) straight into the target memory of the
  WRITE in progress (IBTA 9.7.4: the responder of a message already
  validated by its FIRST packet);
* a one-packet SEND (SEND ONLY, with or without immediate data), the
  request-reply message: its payload goes into the next receive WQE, whose
  completion and ACK are queued as ``Responder._do_send`` queues them.
* on the requester's side, an ACK (given a ``clock``): the PENDING SEND and
  WRITE WQEs it acknowledges complete, in order (coalesced ACKs complete
  several), as ``Requester.on_response`` / ``_ack`` complete them, with the
  retry counters and the retransmission deadline reset as ``_progress``
  resets them (its ``now`` is ``clock()``).

Rule (as in :mod:`virtio_rdma._datapath`): every check the Python engine
makes is made *before* anything changes; a datagram that is not the plain
case (any other opcode, a malformed packet or an ICRC that needs the IPv4 ID
solved, an unknown QPN or a stranger's address or source port, a PSN other than the
expected one, a length that is not exactly what the message still needs, a
QP not in RTR/RTS/SQD or without REMOTE_WRITE, a WRITE target that is not
one contiguous buffer, a SEND with no receive posted or too long for it, a
message in progress, receives the guest posted that the engine has not
taken yet, ...) ends the run untouched, and the Python engine
takes it with the same state. So both paths give the same memory, PSNs,
MSN, ACKs and counters; tests/roce/test_native.py runs packet streams
through both and compares.

A run for one QP ("session") loads the responder's state once, works on C
copies and writes them back when it ends (another QP, a packet for Python,
the message's last packet, the end of the batch), before any Python code can
look, queues the ACK the last AckReq asked for (as ``Responder._ack``
would have, packet by packet: queued ACKs coalesce), then calls
``done(target, packets)`` for the caller to count the packets and pump the
QP (or settle it at once: ``fabric.roce.RoceFabric.fast_received``).

ACKs: with an ``ack_sink`` (the UDP service sets one), an ACK of a QP whose
responder has nothing in ``out`` is held here with its MSN (a newer one
replaces it, as ``_ack`` coalesces; the responder's ``tx_packets`` counted
as ``_ack`` counts) and, if the call took the whole batch, handed to
``ack_sink`` at its end (the service encodes it straight into the TX ring:
``TxRing.add_ack``); if the call stops at a packet for the Python engine,
held ACKs go to the responders' ``out`` as ``_ack`` would have put them,
before the engine sees that packet.
"""
from cpython.buffer cimport PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.dict cimport PyDict_GetItem
from cpython.ref cimport PyObject
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

from roce._codec cimport Envelope, OpDesc, PARSE_OK, Parsed, opdesc, parse_verify
from roce._udpio cimport RxRing
from verbs._verbs cimport MSN_MASK, PSN_MASK

import builtins

from roce.errors import RemoteAccessError
from roce.opcodes import Kind, Opcode
from roce.rc import config as _rc_config
from roce.rc.requester import WqeState
from roce.rc.responder import _ACK_SYNDROME, _WriteCtx
from roce.rc.verbs import Completion, wc_opcode_of
from verbs import Access, QpState, WcOpcode, WcStatus, ack_timeout_seconds

cdef int _WRITE_FIRST = Opcode.RC_RDMA_WRITE_FIRST
cdef int _WRITE_ONLY = Opcode.RC_RDMA_WRITE_ONLY
cdef int _WRITE_MIDDLE = Opcode.RC_RDMA_WRITE_MIDDLE
cdef int _WRITE_LAST = Opcode.RC_RDMA_WRITE_LAST
cdef int _SEND_ONLY = Opcode.RC_SEND_ONLY
cdef int _SEND_ONLY_IMM = Opcode.RC_SEND_ONLY_WITH_IMMEDIATE
cdef int _ACKNOWLEDGE = Opcode.RC_ACKNOWLEDGE
cdef object _PENDING = WqeState.PENDING
cdef object _WC_OPCODE_OF = wc_opcode_of
cdef object _ACK_TIMEOUT = ack_timeout_seconds
cdef enum:
    MAX_ACKED = 64              # WQEs one ACK may complete here (coalesced ACKs)
cdef object _COMPLETION = Completion
cdef object _WC_SUCCESS = WcStatus.SUCCESS, _WC_RECV = WcOpcode.RECV
cdef enum:
    MAX_SEND_VIEWS = 8          # receive SGEs a fast SEND scatters into
cdef object _RTR = QpState.RTR, _RTS = QpState.RTS, _SQD = QpState.SQD
cdef object _KIND_WRITE = Kind.WRITE
cdef object _WRITE_CTX = _WriteCtx
cdef object _MEMORYVIEW = builtins.memoryview   # not Cython's own memoryview type
cdef long _REMOTE_WRITE = Access.REMOTE_WRITE
cdef object _ACCESS_REMOTE_WRITE = Access.REMOTE_WRITE
cdef uint64_t _MAX_MSG_SIZE = _rc_config.MAX_MSG_SIZE
cdef object _REMOTE_ACCESS_ERROR = RemoteAccessError
cdef uint32_t _SYNDROME_ACK = _ACK_SYNDROME


#: ``RequestFastPath.stop`` values
STOP_REASONS = ("end of batch", "new peer", "not a valid packet for ID 0",
                "not WRITE FIRST/MIDDLE/LAST/ONLY, SEND ONLY or ACK", "QP not eligible", "P_Key",
                "PSN", "length", "SEND not the plain case", "ACK not the plain case",
                "WRITE FIRST/ONLY not the plain case")


cdef inline int _collect(rc) except -1:
    """``RcQp._collect`` without its Python frame: the engine's completions
    to the QP's send and receive CQ lists, in order."""
    cdef list done = rc.requester.completions
    if done:
        rc._send_cq.extend(done)
        done.clear()
    done = rc.responder.completions
    if done:
        rc._recv_cq.extend(done)
        done.clear()
    return 0


cdef inline int32_t _psn_diff(uint32_t a, uint32_t b) noexcept nogil:
    """verbs.psn_diff: a - b as a signed 24-bit distance."""
    cdef uint32_t d = (a - b) & PSN_MASK
    return <int32_t>d - 0x1000000 if d >= 0x800000 else <int32_t>d


cdef inline uint32_t _be24(const uint8_t *p) noexcept nogil:
    return (<uint32_t>p[0] << 16) | (<uint32_t>p[1] << 8) | p[2]


cdef inline uint32_t _be32(const uint8_t *p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef class RequestFastPath:
    """``fast(ring, i, n, envelopes) -> j``: take the ring's slots ``i ..
    j - 1`` (all fast-path packets), stop at the first slot the Python
    engine must see. ``targets`` maps a QPN to an object with ``rc`` (its
    :class:`~roce.rc.qp.RcQp`), ``peer`` (the only source address
    accepted), ``sports`` (the source ports accepted, None for any), and ``rq_posted`` and ``qp.rq_pi`` (the receive ring index up
    to which the engine has the guest's receives, and the ring's producer
    index: a SEND is taken only when they are equal, as the Python path
    would hand the engine the rest first); ``envelopes`` maps a ring peer
    key to the :class:`~roce._codec.Envelope` of that peer."""

    cdef dict targets
    cdef object done
    cdef object clock
    #: ``ack_sink(peer, dest_qp, pkey, psn, syndrome, msn)``: queue an ACK for the
    #: wire (the TX ring) now; None: every ACK goes to the responder's ``out``
    cdef public object ack_sink
    cdef dict pend                      # target -> (psn, msn) of its ACK held here
    cdef readonly unsigned long long acks_sent   # ACKs this path handed to ack_sink
    # the session
    cdef bint active
    cdef object t, rc, resp, cur
    cdef Envelope env
    cdef uint32_t qpn, psn, msn, pkey, mtu
    cdef uint64_t offset, length
    cdef Py_buffer view
    cdef bint have_view, ended
    cdef int packets
    cdef int64_t ack_psn
    cdef readonly unsigned long long taken     # packets taken since creation
    #: why the last call stopped (an index into STOP_REASONS)
    cdef readonly int stop

    def __cinit__(self, dict targets, done, clock=None):
        self.targets = targets
        self.done = done
        self.clock = clock              # None: ACKs are left to Python
        self.pend = {}

    def __dealloc__(self):
        if self.have_view:
            PyBuffer_Release(&self.view)

    cdef object _target(self, uint32_t qpn, Envelope env):
        """The target of ``qpn`` if ``env``'s sender is its peer (address and,
        unless ``sports`` is None, a UDP source port in ``sports``) and its QP
        takes requests (RTR, RTS, SQD), else None (RoceFabric.receive's and
        RcQp.receive's checks)."""
        cdef PyObject *o = PyDict_GetItem(self.targets, qpn)
        if o == NULL:
            return None
        t = <object>o
        if t.peer != env.src:
            return None
        sports = t.sports
        if sports is not None and env.sport not in sports:
            return None                 # RoceFabric.receive counts it (rx_port_mismatch)
        rc = t.rc
        st = rc.state
        if (st is not _RTS and st is not _RTR and st is not _SQD) or rc.cfg.qp_num != qpn:
            return None
        return t

    cdef object _checked(self, uint32_t qpn, const uint8_t *p, Envelope env):
        """:meth:`_target`, with its guest's RQ doorbell applied and the packet's
        P_Key the QP's (else None: Python makes the checks again and counts)."""
        t = self._target(qpn, env)
        if t is None or t.rq_posted != t.qp.rq_pi:
            return None
        if ((p[2] << 8 | p[3]) & 0x7FFF) != (t.rc.cfg.pkey & 0x7FFF):
            return None
        return t

    cdef object _in_order(self, uint32_t qpn, uint32_t psn, const uint8_t *p, Envelope env):
        """:meth:`_checked`, and its responder between messages, expecting ``psn``."""
        t = self._checked(qpn, p, env)
        if t is None:
            return None
        resp = t.rc.responder
        if resp.dead or resp.cur_kind is not None or resp.psn != psn:
            return None
        return t

    cdef bint _begin(self, uint32_t qpn, Envelope env) except -1:
        t = self._target(qpn, env)
        if t is None:
            return False
        rc = t.rc
        cfg = rc.cfg
        if not (int(cfg.access) & _REMOTE_WRITE):
            return False
        resp = rc.responder
        if resp.dead or resp.cur_kind is not _KIND_WRITE:
            return False
        cur = resp.cur
        if type(cur) is not _WRITE_CTX:
            return False
        view = cur.view
        if type(view) is not _MEMORYVIEW or view.itemsize != 1 or not view.c_contiguous:
            return False                # what `ctx.view[a:b] = payload` would index by bytes
        try:
            PyObject_GetBuffer(view, &self.view, PyBUF_WRITABLE)
        except (BufferError, TypeError):
            return False
        self.have_view = True
        length, offset = cur.length, cur.offset
        if not (0 <= offset <= length <= self.view.len):
            self._drop_view()
            return False
        self.t, self.rc, self.resp, self.cur, self.env = t, rc, resp, cur, env
        self.qpn = qpn
        self.length, self.offset = length, offset
        self.psn, self.msn = resp.psn, resp.msn
        self.mtu, self.pkey = cfg.path_mtu, cfg.pkey
        self.packets, self.ack_psn, self.ended = 0, -1, False
        self.active = True
        return True

    cdef void _drop_view(self) noexcept:
        if self.have_view:
            PyBuffer_Release(&self.view)
            self.have_view = False

    cdef int _end(self) except -1:
        """Write the session's state back and report it."""
        if not self.active:
            return 0
        self.active = False
        self._drop_view()
        t, rc, resp, cur = self.t, self.rc, self.resp, self.cur
        self.t = self.rc = self.resp = self.cur = self.env = None
        if self.packets:
            resp.psn = self.psn
            resp.msn = self.msn
            resp.nak_sent = False
            cur.offset = self.offset
            if self.ended:
                resp.cur = None
                resp.cur_kind = None
            rc.metrics.rx_packets += self.packets
            if self.ack_psn >= 0:
                self._queue_ack(t, rc, resp, self.ack_psn)  # the last AckReq (older ACKs coalesce)
            self.taken += self.packets
            self.done(t, self.packets)
        return 0

    cdef int _queue_ack(self, t, rc, resp, uint32_t psn) except -1:
        """``resp._ack(psn)``, or, with an ``ack_sink`` and nothing in the
        responder's ``out`` (so that nothing there could coalesce with it),
        the ACK held here with the MSN of now (a newer one of the same QP
        replaces it, as ``_ack`` coalesces), to leave at the end of the call:
        natively if the call took the whole batch, else put in ``out`` as
        ``_ack`` would have (the Python engine takes the next packet)."""
        if self.ack_sink is None or (t not in self.pend and resp.out):
            resp._ack(psn)
            return 0
        if t not in self.pend:
            rc.metrics.tx_packets += 1      # _ack's count (a replaced ACK: -1 +1)
        self.pend[t] = (psn, resp.msn)
        return 0

    cdef int _send_acks(self, bint wire) except -1:
        """The held ACKs: to ``ack_sink`` (``wire``), else to the responders'
        ``out`` (counted there already)."""
        pend, self.pend = self.pend, {}
        for t, (psn, msn) in pend.items():
            rc = t.rc
            if wire:
                cfg = rc.cfg
                self.acks_sent += 1
                self.ack_sink(t.peer, cfg.dest_qp_num, cfg.pkey, psn, _SYNDROME_ACK, msn)
            else:
                rc.metrics.tx_packets -= 1
                rc.responder._ack(psn, msn)
        return 0

    cdef bint _send_only(self, const uint8_t *p, Parsed *ps, Envelope env) except -1:
        """Take one SEND ONLY (with immediate) packet if it is the plain case:
        the checks of ``RcQp.receive`` and ``Responder.on_request`` in their
        order, all before anything changes; False leaves it to Python."""
        cdef Py_buffer bufs[MAX_SEND_VIEWS]
        cdef int nb = 0, k
        cdef Py_ssize_t have = 0, take
        cdef uint32_t qpn = _be24(p + 5), psn = _be24(p + 9), plen = ps.payload_len
        cdef const uint8_t *src = p + ps.hdr_len
        t = self._in_order(qpn, psn, p, env)
        if t is None:
            return False
        rc = t.rc
        cfg = rc.cfg
        resp = rc.responder
        rq = resp.rq
        if not rq or plen > cfg.path_mtu:
            return False                # RNR NAK / invalid request: the engine's
        wr_id, sgl = rq[0]
        if plen > sgl.total:
            return False                # LOC_LEN_ERR and a NAK: the engine's
        views = sgl.views
        try:
            while have < plen:
                if nb == MAX_SEND_VIEWS or nb >= len(views):
                    return False
                PyObject_GetBuffer(views[nb], &bufs[nb], PyBUF_WRITABLE)
                nb += 1
                have += bufs[nb - 1].len
        except (BufferError, TypeError):
            return False
        finally:
            if have < plen:             # not every buffer taken: give them back
                for k in range(nb):
                    PyBuffer_Release(&bufs[k])
        # commit: as Responder._do_send does for a message's only packet
        have = 0
        for k in range(nb):
            take = min(<Py_ssize_t>plen - have, bufs[k].len)
            memcpy(bufs[k].buf, src + have, take)
            have += take
            PyBuffer_Release(&bufs[k])
        rq.popleft()
        imm = None
        if ps.opcode == _SEND_ONLY_IMM:
            imm = _be32(p + opdesc(ps.opcode).immdt)
        resp.nak_sent = False
        resp.msn = (resp.msn + 1) & MSN_MASK
        resp.completions.append(_COMPLETION(wr_id, _WC_SUCCESS, _WC_RECV, cfg.qp_num, plen, imm,
                                            None, cfg.dest_qp_num))
        resp.psn = (psn + 1) & PSN_MASK
        if p[8] & 0x80:
            self._queue_ack(t, rc, resp, psn)
        rc.metrics.rx_packets += 1
        _collect(rc)
        self.taken += 1
        self.done(t, 1)
        return True

    cdef bint _write_first(self, const uint8_t *p, Parsed *ps, Envelope env) except -1:
        """Take one WRITE FIRST or WRITE ONLY (no immediate data) packet if it
        is the plain case: the checks of ``RoceFabric.receive`` (target, peer,
        port; no receives waiting to be handed over, as ``NetworkQp.receive``
        would hand them over first), ``RcQp.receive``, ``Responder.on_request``
        and ``_do_write`` in their order, all before anything changes (the
        R_Key lookup, ``memory.resolve``, changes nothing); False leaves it to
        Python, which makes them again and answers (NAK, drop, duplicate
        ACK). It starts the message as ``_do_write`` does: payload copied,
        ``cur`` a ``_WriteCtx`` (the MIDDLE/LAST packets then take the session
        path), PSN advanced, the ACK queued if AckReq is set."""
        cdef Py_buffer buf
        cdef const OpDesc *d = opdesc(ps.opcode)
        cdef const uint8_t *reth
        cdef uint32_t qpn = _be24(p + 5), psn = _be24(p + 9), plen = ps.payload_len
        cdef uint32_t rkey, dma_len
        cdef uint64_t va
        cdef bint only = ps.opcode == _WRITE_ONLY
        if d.reth < 0:
            return False
        reth = p + d.reth
        va = (<uint64_t>_be32(reth) << 32) | _be32(reth + 4)
        rkey = _be32(reth + 8)
        dma_len = _be32(reth + 12)
        t = self._in_order(qpn, psn, p, env)
        if t is None:
            return False
        rc = t.rc
        cfg = rc.cfg
        resp = rc.responder
        if not (int(cfg.access) & _REMOTE_WRITE):
            return False                # NAK invalid request: the engine's
        if plen > <uint32_t>cfg.path_mtu or (not only and plen != <uint32_t>cfg.path_mtu):
            return False
        if dma_len == 0 or dma_len > _MAX_MSG_SIZE or (only and plen != dma_len) or \
                (not only and plen >= dma_len):
            return False                # a zero-length WRITE, or a NAK: the engine's
        try:
            view = resp.memory.resolve(rkey, va, dma_len, _ACCESS_REMOTE_WRITE)
        except _REMOTE_ACCESS_ERROR:
            return False                # NAK remote access error: the engine's
        if type(view) is not _MEMORYVIEW or view.itemsize != 1 or not view.c_contiguous \
                or len(view) != dma_len:
            return False                # scattered: the engine writes it piece by piece
        try:
            PyObject_GetBuffer(view, &buf, PyBUF_WRITABLE)
        except (BufferError, TypeError):
            return False
        # commit: as _do_write does for a message's first (or only) packet
        memcpy(buf.buf, p + ps.hdr_len, plen)
        PyBuffer_Release(&buf)
        resp.nak_sent = False
        if only:
            resp.msn = (resp.msn + 1) & MSN_MASK
        else:
            resp.cur = _WRITE_CTX(view, dma_len, plen, rkey)
            resp.cur_kind = _KIND_WRITE
        resp.psn = (psn + 1) & PSN_MASK
        if p[8] & 0x80:
            self._queue_ack(t, rc, resp, psn)
        rc.metrics.rx_packets += 1
        self.taken += 1
        self.done(t, 1)
        return True

    cdef bint _ack(self, const uint8_t *p, Parsed *ps, Envelope env) except -1:
        """Take one ACK (AETH type ACK) if it is the plain case: it
        completes zero or more PENDING SEND/WRITE WQEs of the requester in
        order (coalesced), exactly as ``RcQp.receive`` ->
        ``Requester.on_response`` -> ``_ack`` would, with no WQE left to send
        and no RNR stall; every check before anything changes. False leaves
        it to Python."""
        cdef uint32_t qpn = _be24(p + 5), psn = _be24(p + 9), comp_psn, last, first
        cdef int off = opdesc(ps.opcode).aeth
        cdef int k = 0, nsq, j
        cdef bint at_end = False
        if self.clock is None or off < 0 or (p[off] >> 5) & 3 != 0:
            return False
        t = self._checked(qpn, p, env)
        if t is None:
            return False
        rc = t.rc
        st = rc.state
        if st is not _RTS and st is not _SQD:
            return False                # dropped_qp_state: the engine counts it
        cfg = rc.cfg
        req = rc.requester
        if req.dead or req.rnr_deadline is not None or _psn_diff(psn, req.psn_hi) >= 0:
            return False
        sq = req.sq
        nsq = len(sq)
        if nsq == 0 or req.send_idx != nsq:
            return False                # nothing sent, or WQEs waiting for the window
        comp_psn = req.comp_psn
        # the WQEs this ACK completes (all sent: first_psn set), then the one it lands in
        while True:
            if k >= nsq or k >= MAX_ACKED:
                return False
            w = sq[k]
            if w.first_psn is None or w.rd_atomic:
                return False
            first = w.first_psn
            last = (first + w.npkts - 1) & PSN_MASK
            if _psn_diff(psn, last) > 0:
                if w.state is not _PENDING:
                    return False
                comp_psn = (last + 1) & PSN_MASK
                k += 1
                continue
            break
        if _psn_diff(psn, comp_psn) < 0:
            return False                # a stale duplicate: the engine counts it
        at_end = psn == last and w.state is _PENDING
        # commit: as _complete and _progress would
        now = self.clock()
        completions = req.completions
        qp_num = cfg.qp_num
        for j in range(k + (1 if at_end else 0)):
            w = sq.popleft()
            wr = w.wr
            if wr.signaled:
                completions.append(_COMPLETION(wr.wr_id, _WC_SUCCESS, _WC_OPCODE_OF(wr.opcode),
                                               qp_num, w.length))
        req.send_idx = len(sq)
        req.comp_psn = (psn + 1) & PSN_MASK
        req.retry_left = cfg.retry_cnt
        req.rnr_left = cfg.rnr_retry
        req.retry_started = False
        to = _ACK_TIMEOUT(cfg.timeout)
        req.retrans_deadline = now + to if (to is not None and sq and sq[0].first_psn is not None
                                            and req.comp_psn != req.psn_hi) else None
        rc.metrics.rx_packets += 1
        _collect(rc)
        self.taken += 1
        self.done(t, 1)
        return True

    def __call__(self, RxRing rx, int i, int n, dict envs) -> int:
        cdef const uint8_t *p
        cdef PyObject *eo
        cdef Envelope env
        cdef Parsed ps
        cdef uint32_t qpn, psn, plen
        cdef uint64_t end
        cdef bint last
        if not 0 <= i <= n <= rx.count:
            raise IndexError(f"slots {i}..{n} not in the ring ({rx.count})")
        self.stop = 0
        try:
            while i < n:
                p = rx.pkt[i]
                eo = PyDict_GetItem(envs, rx._key(i))
                if eo == NULL:
                    self.stop = 1
                    break
                env = <Envelope>eo
                if parse_verify(p, rx.plen[i], env, &ps) != PARSE_OK:
                    self.stop = 2
                    break
                if ps.opcode == _SEND_ONLY or ps.opcode == _SEND_ONLY_IMM:
                    self._end()         # a WRITE run of this QP writes its state back first
                    if not self._send_only(p, &ps, env):
                        self.stop = 8
                        break
                    i += 1
                    continue
                if ps.opcode == _ACKNOWLEDGE:
                    self._end()
                    if not self._ack(p, &ps, env):
                        self.stop = 9
                        break
                    i += 1
                    continue
                if ps.opcode == _WRITE_FIRST or ps.opcode == _WRITE_ONLY:
                    self._end()
                    if not self._write_first(p, &ps, env):
                        self.stop = 10
                        break
                    i += 1
                    continue
                if ps.opcode != _WRITE_MIDDLE and ps.opcode != _WRITE_LAST:
                    self.stop = 3
                    break
                qpn = _be24(p + 5)
                if not self.active or qpn != self.qpn or env is not self.env:
                    self._end()
                    if not self._begin(qpn, env):
                        self.stop = 4
                        break
                # the responder's checks, in its order (roce.rc.qp / responder)
                if ((p[2] << 8 | p[3]) & 0x7FFF) != (self.pkey & 0x7FFF):
                    self.stop = 5
                    break
                psn = _be24(p + 9)
                if psn != self.psn:
                    self.stop = 6
                    break
                plen = ps.payload_len
                last = ps.opcode == _WRITE_LAST
                if plen > self.mtu or (not last and plen != self.mtu):
                    self.stop = 7
                    break
                end = self.offset + plen
                if end > self.length or (last and end != self.length):
                    self.stop = 7
                    break
                # commit
                memcpy(<uint8_t *>self.view.buf + self.offset, p + ps.hdr_len, plen)
                self.offset = end
                self.psn = (psn + 1) & PSN_MASK
                self.packets += 1
                if p[8] & 0x80:
                    self.ack_psn = psn
                i += 1
                if last:
                    self.msn = (self.msn + 1) & MSN_MASK
                    self.ended = True
                    self._end()
            self._end()
            if self.pend:
                self._send_acks(i >= n)     # the whole batch taken: the ACKs leave from here
        finally:
            self._end()
            if self.pend:                   # an error: the engine's way
                self._send_acks(False)
        return i
