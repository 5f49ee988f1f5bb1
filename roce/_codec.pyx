# cython: language_level=3
"""Native RoCEv2 packet codec: the hot-path twin of :mod:`roce.packet` and
:mod:`roce.headers` (IBTA vol. 1 9.2-9.3 headers, annex A17 ICRC).

* :class:`Envelope`: the IP/UDP envelope between this host and one peer
  (addresses, ports; for sending, the peer's sockaddr), built once per peer
  instead of an :class:`~roce.icrc.IpContext` per packet.
* :func:`decode`: syntax checks in the reference's order (length, opcode,
  TVer, header length, payload, pad count) and the ICRC for IPv4 ID 0 (the ID
  a Linux sender with DF writes), or for the small ID of a UDP GSO segment
  (1 .. GSO_SEGMENTS - 1, solved natively: roce._icrc), or IPv6, then the same
  :class:`~roce.packet.RocePacket` the reference builds. It returns ``None``
  for anything else (a malformed datagram, or an ICRC that needs ID
  recovery): the caller then runs the reference, which raises the typed error
  or recovers the ID. So the native path never invents its own errors.
* :func:`encode`: the reference's :meth:`RocePacket.encode` (pad, PadCnt,
  ICRC, ``pkt.icrc`` set), or ``None`` when a field does not fit or a header
  is missing or extra (the reference then raises).
* Fast constructors of the frozen header dataclasses (:func:`bth`,
  :func:`aeth`, ...) and of :class:`RocePacket` for the RC engine: they fill
  the dataclasses' slots directly (what ``object.__setattr__`` in a frozen
  dataclass's ``__init__`` does, without its per-field call).

tests/roce/test_native.py compares every function with the reference on
random and hand-made packets, and with scapy.
"""
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.long cimport PyLong_AsUnsignedLongLong, PyLong_Check
from cpython.object cimport PyObject_IsTrue
from cpython.exc cimport PyErr_Clear
from libc.stdint cimport int16_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

from roce._icrc cimport GSO_SEGMENTS, crc32_raw, icrc_id_solve, icrc_seed

import ipaddress

from roce.headers import Aeth, AtomicAckEth, AtomicEth, Bth, Deth, Ieth, ImmDt, Reth
from roce.opcodes import OPCODE_TABLE, Ext
from roce.packet import RocePacket

cdef extern from *:
    """
    #include <Python.h>
    /* Store into a slot of a __slots__ class through its member descriptor
       (bypasses a frozen dataclass's __setattr__, as object.__setattr__ does). */
    static int rcd_set_slot(PyObject *descr, PyObject *obj, PyObject *v) {
        descrsetfunc f = Py_TYPE(descr)->tp_descr_set;
        if (f == NULL) {
            PyErr_SetString(PyExc_TypeError, "not a slot descriptor");
            return -1;
        }
        return f(descr, obj, v);
    }
    static PyObject *rcd_alloc(PyObject *cls) {
        PyTypeObject *t = (PyTypeObject *)cls;
        return t->tp_alloc(t, 0);
    }
    static inline uint16_t rcd_be16(const uint8_t *p) { return (uint16_t)((p[0] << 8) | p[1]); }
    static inline uint32_t rcd_be32(const uint8_t *p) {
        return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3]; }
    static inline uint64_t rcd_be64(const uint8_t *p) {
        return ((uint64_t)rcd_be32(p) << 32) | rcd_be32(p + 4); }
    static inline uint32_t rcd_le32(const uint8_t *p) {
        return ((uint32_t)p[3] << 24) | ((uint32_t)p[2] << 16) | ((uint32_t)p[1] << 8) | p[0]; }
    static inline void rcd_put16(uint8_t *p, uint16_t v) { p[0] = v >> 8; p[1] = (uint8_t)v; }
    static inline void rcd_put32(uint8_t *p, uint32_t v) {
        p[0] = v >> 24; p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v; }
    static inline void rcd_put64(uint8_t *p, uint64_t v) {
        rcd_put32(p, (uint32_t)(v >> 32)); rcd_put32(p + 4, (uint32_t)v); }
    static inline void rcd_putle32(uint8_t *p, uint32_t v) {
        p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); p[2] = (uint8_t)(v >> 16); p[3] = v >> 24; }
    """
    int rcd_set_slot(object descr, object obj, object v) except -1
    object rcd_alloc(object cls)
    uint16_t rcd_be16(const uint8_t *p) noexcept nogil
    uint32_t rcd_be32(const uint8_t *p) noexcept nogil
    uint64_t rcd_be64(const uint8_t *p) noexcept nogil
    uint32_t rcd_le32(const uint8_t *p) noexcept nogil
    void rcd_put16(uint8_t *p, uint16_t v) noexcept nogil
    void rcd_put32(uint8_t *p, uint32_t v) noexcept nogil
    void rcd_put64(uint8_t *p, uint64_t v) noexcept nogil
    void rcd_putle32(uint8_t *p, uint32_t v) noexcept nogil


# ------------------------------------------------------------ opcode table
cdef OpDesc _OPS[256]


cdef void _build_ops() except *:
    memset(_OPS, 0, sizeof(_OPS))
    cdef int op
    cdef OpDesc *d
    for op in range(256):
        d = &_OPS[op]
        d.reth = d.aeth = d.immdt = d.atomic_eth = d.atomic_ack_eth = d.deth = d.ieth = -1
    for op, info in OPCODE_TABLE.items():
        d = &_OPS[op]
        d.valid = 1
        d.has_payload = info.has_payload
        d.hdr_len = info.length
        for e, off in info.offsets.items():
            if e is Ext.RETH:
                d.reth = off
            elif e is Ext.AETH:
                d.aeth = off
            elif e is Ext.IMMDT:
                d.immdt = off
            elif e is Ext.ATOMIC_ETH:
                d.atomic_eth = off
            elif e is Ext.ATOMIC_ACK_ETH:
                d.atomic_ack_eth = off
            elif e is Ext.DETH:
                d.deth = off
            elif e is Ext.IETH:
                d.ieth = off


_build_ops()


cdef const OpDesc *opdesc(uint8_t opcode) noexcept nogil:
    return &_OPS[opcode]


# ------------------------------------------------------ dataclass makers
cdef class _Maker:
    """Builds instances of one __slots__ dataclass from values in field order."""
    cdef object cls
    cdef tuple descrs

    def __init__(self, cls, names):
        self.cls = cls
        self.descrs = tuple(cls.__dict__[n] for n in names)

    cdef inline object make(self, tuple values):
        cdef object obj = rcd_alloc(self.cls)
        cdef Py_ssize_t i
        for i in range(len(self.descrs)):
            rcd_set_slot(self.descrs[i], obj, values[i])
        return obj


cdef _Maker _BTH = _Maker(Bth, ("opcode", "dest_qp", "psn", "se", "m", "pad_count", "tver",
                                "pkey", "fecn", "becn", "resv6", "ackreq", "resv7"))
cdef _Maker _RETH = _Maker(Reth, ("va", "rkey", "dma_len"))
cdef _Maker _AETH = _Maker(Aeth, ("syndrome", "msn"))
cdef _Maker _IMMDT = _Maker(ImmDt, ("imm",))
cdef _Maker _IETH = _Maker(Ieth, ("rkey",))
cdef _Maker _ATOMIC = _Maker(AtomicEth, ("va", "rkey", "swap_add", "compare"))
cdef _Maker _ATOMIC_ACK = _Maker(AtomicAckEth, ("orig",))
cdef _Maker _DETH = _Maker(Deth, ("qkey", "src_qp"))
cdef _Maker _PKT = _Maker(RocePacket, ("bth", "reth", "aeth", "immdt", "atomic_eth",
                                       "atomic_ack_eth", "deth", "ieth", "payload", "icrc",
                                       "ip_id"))


cdef object new_bth(int opcode, uint32_t dest_qp, uint32_t psn, bint se, bint ackreq, int pkey):
    return _BTH.make((opcode, dest_qp, psn, se, False, 0, 0, pkey, False, False, 0, ackreq, 0))


def bth(int opcode, uint32_t dest_qp, uint32_t psn, bint se=False, bint ackreq=False,
        int pkey=0xFFFF):
    """``Bth(opcode=, dest_qp=, psn=, se=, ackreq=, pkey=)``, other fields default."""
    return new_bth(opcode, dest_qp, psn, se, ackreq, pkey)


def aeth(int syndrome, uint32_t msn):
    """``Aeth(syndrome, msn)``."""
    return _AETH.make((syndrome, msn))


def reth(uint64_t va, uint32_t rkey, uint32_t dma_len):
    """``Reth(va, rkey, dma_len)``."""
    return _RETH.make((va, rkey, dma_len))


def immdt(uint32_t imm):
    return _IMMDT.make((imm,))


def ieth(uint32_t rkey):
    return _IETH.make((rkey,))


def packet(bth, payload=b"", reth=None, aeth=None, immdt=None, atomic_eth=None,
           atomic_ack_eth=None, ieth=None):
    """``RocePacket(bth, reth=, aeth=, immdt=, atomic_eth=, atomic_ack_eth=, ieth=,
    payload=)`` (no DETH: RC only)."""
    return _PKT.make((bth, reth, aeth, immdt, atomic_eth, atomic_ack_eth, None, ieth, payload,
                      None, None))


# --------------------------------------------------------------- envelope
cdef class Envelope:
    def __init__(self, src, dst, int sport, int dport):
        s = ipaddress.ip_address(src)
        d = ipaddress.ip_address(dst)
        if s.version != d.version:
            raise ValueError(f"address families differ: {s} / {d}")
        if not (0 <= sport < 65536 and 0 <= dport < 65536):
            raise ValueError(f"ports {sport}, {dport} out of range")
        self.version = s.version
        self.src, self.dst = str(s), str(d)
        self.sport, self.dport = sport, dport
        sp, dp = s.packed, d.packed
        memset(self.src_b, 0, 16)
        memset(self.dst_b, 0, 16)
        memcpy(self.src_b, <const char *>sp, len(sp))
        memcpy(self.dst_b, <const char *>dp, len(dp))
        memset(self.sockaddr, 0, 28)
        if self.version == 4:       # struct sockaddr_in
            self.sockaddr[0] = 2    # AF_INET, host order (little-endian hosts)
            rcd_put16(&self.sockaddr[2], dport)
            memcpy(&self.sockaddr[4], self.dst_b, 4)
            self.sockaddr_len = 16
        else:                       # struct sockaddr_in6
            self.sockaddr[0] = 10   # AF_INET6
            rcd_put16(&self.sockaddr[2], dport)
            memcpy(&self.sockaddr[8], self.dst_b, 16)
            self.sockaddr_len = 28

    def __repr__(self):
        return f"Envelope({self.src!r}, {self.dst!r}, sport={self.sport}, dport={self.dport})"

    def reversed(self) -> Envelope:
        """The envelope of the other direction."""
        return Envelope(self.dst, self.src, self.dport, self.sport)


# ----------------------------------------------------------------- decode
cdef int parse_verify(const uint8_t *p, size_t n, Envelope env, Parsed *out) noexcept nogil:
    cdef const OpDesc *d
    cdef size_t body
    cdef uint32_t crc
    cdef int ident
    out.status = PARSE_MALFORMED
    if n < 16:
        return out.status
    d = &_OPS[p[0]]
    if not d.valid or (p[1] & 0x0F) != 0 or n < <size_t>d.hdr_len + 4:
        return out.status
    body = n - d.hdr_len - 4
    if body and not d.has_payload:
        return out.status
    out.pad = (p[1] >> 4) & 3
    if out.pad > body:
        return out.status
    out.opcode = p[0]
    out.hdr_len = d.hdr_len
    out.payload_len = <uint32_t>(body - out.pad)
    out.icrc = rcd_le32(p + n - 4)
    crc = icrc_seed(env.version, env.src_b, env.dst_b, env.sport, env.dport, 0, 1, n, p)
    crc = crc32_raw(crc, p + 12, n - 16) ^ 0xFFFFFFFFu
    out.ip_id = 0
    if crc != out.icrc and env.version == 4:
        # a segment of a UDP GSO send carries its index as IPv4 ID (roce._icrc)
        ident = icrc_id_solve(n, crc ^ out.icrc)
        if 0 < ident < GSO_SEGMENTS:
            out.ip_id = <uint16_t>ident
            crc = out.icrc
    out.status = PARSE_OK if crc == out.icrc else PARSE_ICRC
    return out.status


cdef object build_packet(const uint8_t *p, Parsed *ps, object ip_id):
    """The RocePacket of a datagram ``parse_verify`` accepted (payload copied)."""
    cdef const OpDesc *d = &_OPS[ps.opcode]
    cdef uint8_t b1 = p[1]
    cdef uint32_t w2 = rcd_be32(p + 4), w3 = rcd_be32(p + 8)
    cdef const uint8_t *q
    bth = _BTH.make((ps.opcode, w2 & 0xFFFFFF, w3 & 0xFFFFFF, (b1 & 0x80) != 0, (b1 & 0x40) != 0,
                     (b1 >> 4) & 3, b1 & 0xF, rcd_be16(p + 2), (w2 >> 31) != 0,
                     ((w2 >> 30) & 1) != 0, (w2 >> 24) & 0x3F, (w3 >> 31) != 0,
                     (w3 >> 24) & 0x7F))
    reth = aeth = immdt = atomic = atomic_ack = deth = ieth = None
    if d.reth >= 0:
        q = p + d.reth
        reth = _RETH.make((rcd_be64(q), rcd_be32(q + 8), rcd_be32(q + 12)))
    if d.aeth >= 0:
        q = p + d.aeth
        aeth = _AETH.make((q[0], rcd_be32(q) & 0xFFFFFF))
    if d.immdt >= 0:
        immdt = _IMMDT.make((rcd_be32(p + d.immdt),))
    if d.atomic_eth >= 0:
        q = p + d.atomic_eth
        atomic = _ATOMIC.make((rcd_be64(q), rcd_be32(q + 8), rcd_be64(q + 12), rcd_be64(q + 20)))
    if d.atomic_ack_eth >= 0:
        atomic_ack = _ATOMIC_ACK.make((rcd_be64(p + d.atomic_ack_eth),))
    if d.deth >= 0:
        q = p + d.deth
        deth = _DETH.make((rcd_be32(q), rcd_be32(q + 4) & 0xFFFFFF))
    if d.ieth >= 0:
        ieth = _IETH.make((rcd_be32(p + d.ieth),))
    payload = PyBytes_FromStringAndSize(<const char *>p + ps.hdr_len, ps.payload_len)
    return _PKT.make((bth, reth, aeth, immdt, atomic, atomic_ack, deth, ieth, payload, ps.icrc,
                      ip_id))


def decode(data, Envelope env):
    """:func:`roce.packet.decode` for a datagram from ``env.src`` to
    ``env.dst`` whose IPv4 ID is 0 or a UDP GSO segment's index (IPv6: no ID),
    with DF; ``None`` if that decode would raise or needs ``recover_ipv4_id``
    for another ID (run the reference)."""
    cdef Py_buffer view
    cdef Parsed ps
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        if parse_verify(<const uint8_t *>view.buf, <size_t>view.len, env, &ps) != PARSE_OK:
            return None
        return build_packet(<const uint8_t *>view.buf, &ps, ps.ip_id if env.version == 4 else None)
    finally:
        PyBuffer_Release(&view)


# ----------------------------------------------------------------- encode
cdef int _fits(object v, int bits, uint64_t *out) except -2:
    """0 and the value if ``v`` is an int of at most ``bits`` bits, else -1
    (the reference's FieldRange check)."""
    cdef uint64_t x
    if not PyLong_Check(v) or v < 0:
        return -1
    try:
        x = PyLong_AsUnsignedLongLong(v)
    except OverflowError:
        return -1
    if bits < 64 and (x >> bits):
        return -1
    out[0] = x
    return 0


cdef Py_ssize_t encode_header(object pkt, uint8_t *hdr, Py_ssize_t plen) except -2:
    """BTH (PadCnt for ``plen`` payload bytes) and extension headers of a
    RocePacket into ``hdr`` (>= 64 bytes); returns the header length, or -1
    if the reference encode would raise (then nothing is promised in hdr)."""
    cdef uint64_t opcode, dest_qp, psn, pkey, pad, tver, resv6, resv7, a, b, c, e
    cdef const OpDesc *d
    bth = pkt.bth
    if _fits(bth.opcode, 8, &opcode) or _fits(bth.pad_count, 2, &pad) or \
            _fits(bth.tver, 4, &tver) or _fits(bth.pkey, 16, &pkey) or \
            _fits(bth.resv6, 6, &resv6) or _fits(bth.dest_qp, 24, &dest_qp) or \
            _fits(bth.resv7, 7, &resv7) or _fits(bth.psn, 24, &psn):
        return -1
    d = &_OPS[opcode]
    if not d.valid or (plen and not d.has_payload):
        return -1
    pad = (-plen) & 3
    hdr[0] = <uint8_t>opcode
    hdr[1] = ((0x80 if PyObject_IsTrue(bth.se) else 0) | (0x40 if PyObject_IsTrue(bth.m) else 0)
              | (pad << 4) | tver)
    rcd_put16(hdr + 2, <uint16_t>pkey)
    rcd_put32(hdr + 4, (0x80000000u if PyObject_IsTrue(bth.fecn) else 0)
              | (0x40000000u if PyObject_IsTrue(bth.becn) else 0) | <uint32_t>(resv6 << 24)
              | <uint32_t>dest_qp)
    rcd_put32(hdr + 8, (0x80000000u if PyObject_IsTrue(bth.ackreq) else 0)
              | <uint32_t>(resv7 << 24) | <uint32_t>psn)
    x = pkt.reth
    if (x is None) != (d.reth < 0):
        return -1
    if x is not None:
        if _fits(x.va, 64, &a) or _fits(x.rkey, 32, &b) or _fits(x.dma_len, 32, &c):
            return -1
        rcd_put64(hdr + d.reth, a)
        rcd_put32(hdr + d.reth + 8, <uint32_t>b)
        rcd_put32(hdr + d.reth + 12, <uint32_t>c)
    x = pkt.aeth
    if (x is None) != (d.aeth < 0):
        return -1
    if x is not None:
        if _fits(x.syndrome, 8, &a) or _fits(x.msn, 24, &b):
            return -1
        rcd_put32(hdr + d.aeth, <uint32_t>((a << 24) | b))
    x = pkt.immdt
    if (x is None) != (d.immdt < 0):
        return -1
    if x is not None:
        if _fits(x.imm, 32, &a):
            return -1
        rcd_put32(hdr + d.immdt, <uint32_t>a)
    x = pkt.atomic_eth
    if (x is None) != (d.atomic_eth < 0):
        return -1
    if x is not None:
        if _fits(x.va, 64, &a) or _fits(x.rkey, 32, &b) or _fits(x.swap_add, 64, &c) or \
                _fits(x.compare, 64, &e):
            return -1
        rcd_put64(hdr + d.atomic_eth, a)
        rcd_put32(hdr + d.atomic_eth + 8, <uint32_t>b)
        rcd_put64(hdr + d.atomic_eth + 12, c)
        rcd_put64(hdr + d.atomic_eth + 20, e)
    x = pkt.atomic_ack_eth
    if (x is None) != (d.atomic_ack_eth < 0):
        return -1
    if x is not None:
        if _fits(x.orig, 64, &a):
            return -1
        rcd_put64(hdr + d.atomic_ack_eth, a)
    x = pkt.deth
    if (x is None) != (d.deth < 0):
        return -1
    if x is not None:
        if _fits(x.qkey, 32, &a) or _fits(x.src_qp, 24, &b):
            return -1
        rcd_put32(hdr + d.deth, <uint32_t>a)
        rcd_put32(hdr + d.deth + 4, <uint32_t>b)
    x = pkt.ieth
    if (x is None) != (d.ieth < 0):
        return -1
    if x is not None:
        if _fits(x.rkey, 32, &a):
            return -1
        rcd_put32(hdr + d.ieth, <uint32_t>a)
    return d.hdr_len


def encode(pkt, Envelope env):
    """``pkt.encode(IpContext(env.src, env.dst, env.sport, env.dport))`` (sets
    ``pkt.icrc``), or ``None`` if the reference would raise."""
    cdef uint8_t hdr[64]
    cdef Py_buffer pv
    cdef Py_ssize_t hlen, plen, total, pad
    cdef uint32_t crc
    cdef uint8_t *out
    try:
        PyObject_GetBuffer(pkt.payload, &pv, PyBUF_SIMPLE)
    except (TypeError, BufferError):
        return None
    try:
        plen = pv.len
        hlen = encode_header(pkt, hdr, plen)
        if hlen < 0:
            return None
        pad = (-plen) & 3
        total = hlen + plen + pad + 4
        if total + 8 > 0xFFFF or (env.version == 4 and total + 28 > 0xFFFF):
            return None
        res = PyBytes_FromStringAndSize(NULL, total)
        out = <uint8_t *>PyBytes_AS_STRING(res)
        memcpy(out, hdr, hlen)
        memcpy(out + hlen, pv.buf, plen)
        memset(out + hlen + plen, 0, pad)
        with nogil:
            crc = icrc_seed(env.version, env.src_b, env.dst_b, env.sport, env.dport, 0, 1,
                            total, out)
            crc = crc32_raw(crc, out + 12, total - 16) ^ 0xFFFFFFFFu
        rcd_putle32(out + total - 4, crc)
    finally:
        PyBuffer_Release(&pv)
    pkt.icrc = crc
    return res
