# cython: language_level=3
"""Batched UDP I/O for RoCEv2 (the native half of :mod:`roce.udp`).

* :class:`RxRing`: ``recvmmsg`` of up to ``nslots`` datagrams per system
  call into preallocated slots (64 KiB each: any UDP datagram fits, so none
  is ever truncated), with the sender's address of each; per packet,
  :meth:`RxRing.packet` runs the native syntax + ICRC check and builds the
  :class:`~roce.packet.RocePacket`. On a socket with ``UDP_GRO`` a slot may
  hold several datagrams of one sender coalesced by the kernel (a ``UDP_GRO``
  control message gives their size; the last may be shorter): the ring
  splits them back, so index ``i`` is always one datagram (``count`` of
  them), whatever the slots.
* :class:`TxRing`: packets are encoded as they are added (BTH and extension
  headers, pad and ICRC in small per-slot buffers; the payload is not
  copied: its iovec points at the caller's buffer, typically guest memory)
  and sent with ``sendmmsg``, many per system call. The ring holds a buffer
  reference of every payload until it is flushed.

UDP GSO (``UDP_SEGMENT``, Linux >= 4.18): consecutive datagrams to the same
destination with the same length (the last of a run may be shorter) leave as
one message with a ``UDP_SEGMENT`` control message (the segment size = that
length), up to GSO_SEGMENTS datagrams and 64 KiB: the kernel (or the NIC)
cuts the very same datagrams from it, one skb through the stack instead of
one per datagram. What segmentation changes on the wire is the IPv4 ID:
segment ``k`` of a send gets ID ``k`` (a DF datagram of an unconnected socket
has ID 0, and GSO increments it per segment), and the RoCEv2 ICRC covers the
ID, so the ring computes each datagram's ICRC for the ID it will carry
(:func:`roce._icrc.icrc_id_delta`; the auth trailer of a sealed datagram is
computed over that ICRC). Receivers that see the IP header (kernel rxe, an
RNIC, tshark) check it as it is; :class:`RxRing` (no IP header) solves for
the segment's ID (roce._codec.parse_verify). Runs are formed as slots are
added, within one flush: nothing waits for a run. A datagram whose run could
not leave as one message (the kernel refused GSO: EIO/EINVAL, counted in
``gso_fallbacks``, and the ring stops trying; or the socket buffer was full,
see :meth:`TxRing.flush`) is re-finished for ID 0 (ICRC, and the seal with
its own counter) and sent alone.

Sockets are the caller's (non-blocking); nothing here owns an fd.
"""
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Calloc, PyMem_Free, PyMem_Malloc, PyMem_Realloc
from libc.errno cimport EAGAIN, EINTR, EINVAL, EIO, errno
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset

from roce._codec cimport (Envelope, PARSE_ICRC, PARSE_MALFORMED, PARSE_OK, Parsed, build_packet,
                          encode_header, opdesc, parse_verify)
from roce._icrc cimport GSO_SEGMENTS, crc32_raw, icrc_id_delta, icrc_seed
from verbs._verbs cimport PSN_MASK
from roce._auth cimport CTR_LEN, PSEUDO_LEN, TAG_LEN, TRAILER_LEN, MacKey, RxAuth, TxAuth, Window

cdef extern from "<openssl/crypto.h>" nogil:
    int CRYPTO_memcmp(const void *a, const void *b, size_t n)

import ipaddress
import os

from roce.opcodes import Opcode

cdef uint8_t _OP_ACKNOWLEDGE = Opcode.RC_ACKNOWLEDGE

cdef extern from "<sys/socket.h>" nogil:
    struct timespec:
        pass
    int recvmmsg(int fd, mmsghdr *msgs, unsigned int n, int flags, timespec *timeout)
    int sendmmsg(int fd, mmsghdr *msgs, unsigned int n, int flags)
    int MSG_DONTWAIT
    int MSG_TRUNC
    struct cmsghdr:
        size_t cmsg_len
        int cmsg_level
        int cmsg_type
    cmsghdr *CMSG_FIRSTHDR(msghdr *m)
    cmsghdr *CMSG_NXTHDR(msghdr *m, cmsghdr *c)
    unsigned char *CMSG_DATA(cmsghdr *c)
    size_t CMSG_SPACE(size_t n)
    size_t CMSG_LEN(size_t n)

cdef extern from "<netinet/in.h>" nogil:
    int IPPROTO_UDP

cdef enum:
    UDP_SEGMENT = 103       # linux/udp.h: the segment size of a GSO send (a uint16)
    UDP_GRO = 104           # linux/udp.h: the segment size of a coalesced receive (an int)
    GSO_BYTES = 65507       # UDP payload of one send: 65535 less the IPv4 and UDP headers
    CTL = 32                # control buffer per message: CMSG_SPACE(2) is 24

cdef enum:
    HDR = 64
    TRAILER = 8 + TRAILER_LEN   # pad, ICRC, and the auth trailer of a sealed datagram
    MAXIOV = 10           # per datagram: header, up to 8 payload pieces, pad + ICRC
    MAXVIEWS = 64         # SG entries of one run


cdef inline void _put32(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = <uint8_t>(v >> 24)
    p[1] = <uint8_t>(v >> 16)
    p[2] = <uint8_t>(v >> 8)
    p[3] = <uint8_t>v


cdef inline uint16_t _be16(const uint8_t *p) noexcept nogil:
    return <uint16_t>((p[0] << 8) | p[1])


cdef inline uint64_t _be64(const uint8_t *p) noexcept nogil:
    cdef uint64_t v = 0
    cdef int k
    for k in range(8):
        v = (v << 8) | p[k]
    return v


cdef class RxRing:
    def __cinit__(self, int nslots=64):
        if not 1 <= nslots <= 1024:
            raise ValueError(f"nslots {nslots} not in 1..1024")
        self.nslots = nslots
        self.buf = <uint8_t *>PyMem_Malloc(<size_t>nslots * SLOT)
        self.names = <uint8_t *>PyMem_Calloc(nslots, NAMELEN)
        self.iovs = <iovec *>PyMem_Calloc(nslots, sizeof(iovec))
        self.msgs = <mmsghdr *>PyMem_Calloc(nslots, sizeof(mmsghdr))
        self.ctl = <uint8_t *>PyMem_Calloc(nslots, CTL)
        self.pkt = <uint8_t **>PyMem_Calloc(<size_t>nslots * PER_SLOT, sizeof(uint8_t *))
        self.plen = <uint32_t *>PyMem_Calloc(<size_t>nslots * PER_SLOT, sizeof(uint32_t))
        self.pslot = <uint16_t *>PyMem_Calloc(<size_t>nslots * PER_SLOT, sizeof(uint16_t))
        if not (self.buf and self.names and self.iovs and self.msgs and self.ctl and self.pkt
                and self.plen and self.pslot):
            raise MemoryError()
        cdef int i
        for i in range(nslots):
            self.iovs[i].iov_base = self.buf + <size_t>i * SLOT
            self.iovs[i].iov_len = SLOT
            self.msgs[i].msg_hdr.msg_iov = &self.iovs[i]
            self.msgs[i].msg_hdr.msg_iovlen = 1
            self.msgs[i].msg_hdr.msg_name = self.names + i * NAMELEN

    def __dealloc__(self):
        PyMem_Free(self.buf)
        PyMem_Free(self.names)
        PyMem_Free(self.iovs)
        PyMem_Free(self.msgs)
        PyMem_Free(self.ctl)
        PyMem_Free(self.pkt)
        PyMem_Free(self.plen)
        PyMem_Free(self.pslot)

    def recv(self, int fd) -> int:
        """Receive what is queued, up to ``nslots`` slots; returns the number
        of datagrams (``count``: more than the slots when the kernel coalesced
        some, see the module doc), 0 if none."""
        cdef int i, r
        for i in range(self.nslots):
            self.msgs[i].msg_hdr.msg_namelen = NAMELEN
            self.msgs[i].msg_hdr.msg_control = self.ctl + i * CTL
            self.msgs[i].msg_hdr.msg_controllen = CTL
            self.msgs[i].msg_hdr.msg_flags = 0
        self.count = 0
        self.slots = 0
        while True:
            with nogil:
                r = recvmmsg(fd, self.msgs, self.nslots, MSG_DONTWAIT, NULL)
            if r >= 0:
                self.slots = r
                self._split(r)
                return self.count
            if errno == EINTR:
                continue
            if errno == EAGAIN:
                return 0
            raise OSError(errno, os.strerror(errno))

    cdef void _split(self, int r) noexcept:
        """The datagram table of slots ``0 .. r-1``: one entry per datagram."""
        cdef int s, n = 0, k, c
        cdef uint32_t length, size
        cdef int gro
        cdef uint8_t *p
        cdef msghdr *m
        cdef cmsghdr *cm
        for s in range(r):
            m = &self.msgs[s].msg_hdr
            length = self.msgs[s].msg_len
            p = self.buf + <size_t>s * SLOT
            size = 0
            if m.msg_controllen >= CMSG_LEN(sizeof(int)):
                cm = CMSG_FIRSTHDR(m)
                while cm != NULL:
                    if cm.cmsg_level == IPPROTO_UDP and cm.cmsg_type == UDP_GRO \
                            and cm.cmsg_len >= CMSG_LEN(sizeof(int)):
                        memcpy(&gro, CMSG_DATA(cm), sizeof(int))
                        if gro > 0:
                            size = <uint32_t>gro
                    cm = CMSG_NXTHDR(m, cm)
            if size == 0 or size >= length:
                self.pkt[n] = p
                self.plen[n] = length
                self.pslot[n] = <uint16_t>s
                n += 1
                continue
            # coalesced: datagrams of ``size`` bytes, the last maybe shorter
            c = <int>((length + size - 1) // size)
            if c > PER_SLOT:
                self.gro_dropped += c - PER_SLOT
                c = PER_SLOT
            self.gro_buffers += 1
            self.gro_packets += c
            for k in range(c):
                self.pkt[n] = p + <size_t>k * size
                self.plen[n] = size if <uint32_t>(k + 1) * size <= length else length - <uint32_t>k * size
                self.pslot[n] = <uint16_t>s
                n += 1
        self.count = n

    cdef void _check(self, int i) except *:
        if not 0 <= i < self.count:
            raise IndexError(f"packet {i} not received ({self.count} in the ring)")

    cdef object _key(self, int i):
        cdef const uint8_t *a = self.names + <size_t>self.pslot[i] * NAMELEN
        cdef uint8_t k[22]
        if a[0] == 2:   # AF_INET: port and address in one int
            return (<uint64_t>_be16(a + 2) << 32) | ((<uint64_t>a[4] << 24) | (a[5] << 16)
                                                     | (a[6] << 8) | a[7])
        memcpy(k, a + 2, 2)             # AF_INET6: port, address, scope (not the flow label)
        memcpy(k + 2, a + 8, 20)
        return PyBytes_FromStringAndSize(<const char *>k, 22)

    def open_sealed(self, int n, RxAuth auth):
        """Authenticate slots ``0 .. n-1`` (roce.auth): a datagram from a
        plain peer is left as it is; any other must carry a valid trailer with
        a counter new to its sender's window, and is stripped of it (its
        length shrinks); one that fails gets length 0 and its index in the
        returned set (None if none failed). Counted in ``auth``."""
        cdef int i
        cdef const uint8_t *a
        cdef uint8_t *p
        cdef uint8_t pseudo[PSEUDO_LEN]
        cdef uint8_t tag[TAG_LEN]
        cdef unsigned int length
        cdef uint64_t counter
        cdef Window w
        cdef MacKey key = auth.key
        cdef bint ok
        cdef bint has_plain = len(auth.plain) > 0
        dropped = None
        if not 0 <= n <= self.count:
            raise IndexError(f"{n} slots, {self.count} in the ring")
        for i in range(n):
            a = self.names + <size_t>self.pslot[i] * NAMELEN
            memset(pseudo, 0, PSEUDO_LEN)
            if a[0] == 2:
                pseudo[0] = 4
                memcpy(pseudo + 1, a + 4, 4)
            else:
                pseudo[0] = 6
                memcpy(pseudo + 1, a + 8, 16)
            if has_plain and PyBytes_FromStringAndSize(<const char *>pseudo + 1, 16) in auth.plain:
                auth.plaintext += 1
                continue
            p = self.pkt[i]
            length = self.plen[i]
            if pseudo[0] != auth.version or length < TRAILER_LEN + 12:
                auth.short += 1
                self.plen[i] = 0
                dropped = dropped or set()
                dropped.add(i)
                continue
            memcpy(pseudo + 17, auth.local, 16)
            memcpy(pseudo + 33, a + 2, 2)           # source port, network order
            memcpy(pseudo + 35, auth.local + 16, 2)
            counter = _be64(p + length - TRAILER_LEN)
            with nogil:
                ok = (key.begin() == 1 and key.update(pseudo, PSEUDO_LEN) == 1
                      and key.update(p, length - TRAILER_LEN) == 1 and key.finish(counter, tag) == 1
                      and CRYPTO_memcmp(tag, p + length - TAG_LEN, TAG_LEN) == 0)
            if not ok:
                auth.failed += 1
                self.plen[i] = 0
                dropped = dropped or set()
                dropped.add(i)
                continue
            key_i = self._key(i)
            wo = auth.windows.get(key_i)
            if wo is not None:
                w = <Window>wo
                if not w.ok(counter):
                    auth.replayed += 1
                    self.plen[i] = 0
                    dropped = dropped or set()
                    dropped.add(i)
                    continue
            if wo is None:
                if len(auth.windows) >= 65536:      # never forget a window: that would allow replays
                    auth.failed += 1
                    self.plen[i] = 0
                    dropped = dropped or set()
                    dropped.add(i)
                    continue
                w = Window()
                auth.windows[key_i] = w
            w.record(counter)
            self.plen[i] = length - TRAILER_LEN
            auth.opened += 1
        return dropped

    def peer_key(self, int i):
        """A hashable key of slot ``i``'s source address and port."""
        self._check(i)
        return self._key(i)

    def peer(self, int i):
        """``(ip, port)`` that sent slot ``i``."""
        self._check(i)
        cdef const uint8_t *a = self.names + <size_t>self.pslot[i] * NAMELEN
        port = _be16(a + 2)
        if a[0] == 2:
            return str(ipaddress.IPv4Address(PyBytes_FromStringAndSize(<const char *>a + 4, 4))), port
        return str(ipaddress.IPv6Address(PyBytes_FromStringAndSize(<const char *>a + 8, 16))), port

    def any_opcode(self, int n, bytes opcodes) -> bool:
        """Does one of slots ``0 .. n-1`` start with a BTH opcode in
        ``opcodes`` (a datagram too short for a BTH counts as none)?"""
        cdef int i
        if not 0 <= n <= self.count:
            raise IndexError(f"{n} slots, {self.count} in the ring")
        for i in range(n):
            if self.plen[i] >= 12 and self.pkt[i][0] in opcodes:
                return True
        return False

    def datagram(self, int i) -> bytes:
        """A copy of slot ``i``'s datagram."""
        self._check(i)
        return PyBytes_FromStringAndSize(<const char *>self.pkt[i], self.plen[i])

    def packet(self, int i, Envelope env):
        """``(status, packet)``: 0 and the decoded RocePacket (payload
        copied; IPv4 ID 0, or a UDP GSO segment's index) if slot ``i`` passes the syntax and ICRC checks
        for ``env``; 1 (malformed) or 2 (ICRC, maybe a non-zero IPv4 ID) and
        None otherwise."""
        self._check(i)
        cdef Parsed ps
        cdef const uint8_t *p = self.pkt[i]
        cdef int st = parse_verify(p, self.plen[i], env, &ps)
        if st != PARSE_OK:
            return st, None
        return 0, build_packet(p, &ps, ps.ip_id if env.version == 4 else None)


cdef class TxRing:
    # attributes: roce/_udpio.pxd (virtio_rdma._datapath adds messages natively: add_msg)

    def __cinit__(self, int nslots=64, bint gso=True):
        if not 1 <= nslots <= 1024:
            raise ValueError(f"nslots {nslots} not in 1..1024")
        self.nslots = nslots
        self.keep = []
        self.envs = [None] * nslots
        self.gso = gso
        self.hdrs = <uint8_t *>PyMem_Malloc(<size_t>nslots * HDR)
        self.trailers = <uint8_t *>PyMem_Calloc(nslots, TRAILER)
        self.names = <uint8_t *>PyMem_Calloc(nslots, NAMELEN)
        self.iovs = <iovec *>PyMem_Calloc(nslots * MAXIOV, sizeof(iovec))
        self.msgs = <mmsghdr *>PyMem_Calloc(nslots, sizeof(mmsghdr))
        self.dlen = <uint32_t *>PyMem_Calloc(nslots, sizeof(uint32_t))
        self.crc0 = <uint32_t *>PyMem_Calloc(nslots, sizeof(uint32_t))
        self.seg = <uint16_t *>PyMem_Calloc(nslots, sizeof(uint16_t))
        self.ctr = <uint64_t *>PyMem_Calloc(nslots, sizeof(uint64_t))
        self.sealed = <uint8_t *>PyMem_Calloc(nslots, 1)
        self.out = <mmsghdr *>PyMem_Calloc(nslots, sizeof(mmsghdr))
        self.oiov = <iovec *>PyMem_Calloc(nslots * MAXIOV, sizeof(iovec))
        self.ctl = <uint8_t *>PyMem_Calloc(nslots, CTL)
        self.ofirst = <int *>PyMem_Calloc(nslots, sizeof(int))
        self.ocount = <int *>PyMem_Calloc(nslots, sizeof(int))
        if not (self.hdrs and self.trailers and self.names and self.iovs and self.msgs
                and self.dlen and self.crc0 and self.seg and self.ctr and self.sealed and self.out and self.oiov
                and self.ctl and self.ofirst and self.ocount):
            raise MemoryError()

    def __dealloc__(self):
        PyMem_Free(self.hdrs)
        PyMem_Free(self.trailers)
        PyMem_Free(self.names)
        PyMem_Free(self.iovs)
        PyMem_Free(self.msgs)
        PyMem_Free(self.dlen)
        PyMem_Free(self.crc0)
        PyMem_Free(self.seg)
        PyMem_Free(self.ctr)
        PyMem_Free(self.sealed)
        PyMem_Free(self.out)
        PyMem_Free(self.oiov)
        PyMem_Free(self.ctl)
        PyMem_Free(self.ofirst)
        PyMem_Free(self.ocount)

    cdef void _release(self) noexcept:
        cdef int i
        self.keep.clear()
        for i in range(self.count):
            self.envs[i] = None

    cdef int _hold(self, object obj, const uint8_t **buf, Py_ssize_t *length) except -1:
        """Pointer and length of ``obj``'s bytes, valid until the ring is
        flushed: a memoryview of it (an export: it cannot be resized or
        freed meanwhile) is kept until then."""
        cdef Py_buffer view
        mv = memoryview(obj)
        PyObject_GetBuffer(mv, &view, PyBUF_SIMPLE)
        buf[0] = <const uint8_t *>view.buf
        length[0] = view.len
        PyBuffer_Release(&view)
        self.keep.append(mv)
        return 0

    @property
    def full(self) -> bool:
        return self.count == self.nslots

    def only_opcode(self, int opcode) -> bool:
        """Do all queued datagrams (at least one) carry BTH opcode ``opcode``?"""
        cdef int i
        if self.count == 0:
            return False
        for i in range(self.count):
            if self.hdrs[i * HDR] != opcode:
                return False
        return True

    def set_auth(self, TxAuth auth) -> None:
        """Seal datagrams added with ``seal=True`` with ``auth`` (roce.auth)."""
        self.auth = auth

    cdef void _finish(self, int i, Envelope env, Py_ssize_t hlen, Py_ssize_t plen,
                      int npieces, bint seal) noexcept nogil:
        """Slot ``i`` has its header (``hlen`` bytes) and ``npieces`` payload
        iovecs (``plen`` bytes) in place: pad, ICRC, trailer (and the auth
        trailer if ``seal``), msghdr."""
        cdef uint8_t *hdr = self.hdrs + i * HDR
        cdef uint8_t *tr = self.trailers + i * TRAILER
        cdef iovec *iov = self.iovs + MAXIOV * i
        cdef Py_ssize_t pad = (-plen) & 3
        cdef Py_ssize_t total = hlen + plen + pad + 4
        cdef uint32_t crc, size
        cdef uint16_t k0
        cdef int k
        cdef msghdr *m = &self.msgs[i].msg_hdr
        cdef msghdr *prev
        memset(tr, 0, pad)
        hdr[1] = (hdr[1] & 0xCF) | <uint8_t>(pad << 4)
        crc = icrc_seed(env.version, env.src_b, env.dst_b, env.sport, env.dport, 0, 1, total, hdr)
        crc = crc32_raw(crc, hdr + 12, hlen - 12)
        for k in range(1, npieces + 1):
            crc = crc32_raw(crc, <const uint8_t *>iov[k].iov_base, iov[k].iov_len)
        crc = crc32_raw(crc, tr, pad) ^ 0xFFFFFFFFu
        self.crc0[i] = crc
        self.dlen[i] = <uint32_t>(total + (TRAILER_LEN if seal else 0))
        self.sealed[i] = seal
        # does it continue the GSO run of slot i - 1 (same destination, the
        # run's size, which slot i - 1 has too, room left)?
        self.seg[i] = 0
        if self.gso and i > 0:
            k0 = self.seg[i - 1]
            size = self.dlen[i - k0 - 1]
            prev = &self.msgs[i - 1].msg_hdr
            if (k0 + 1 < GSO_SEGMENTS and self.dlen[i - 1] == size and self.dlen[i] <= size
                    and (k0 + 1) * size + self.dlen[i] <= GSO_BYTES
                    and prev.msg_namelen == env.sockaddr_len
                    and memcmp(prev.msg_name, env.sockaddr, env.sockaddr_len) == 0):
                self.seg[i] = k0 + 1
                if env.version == 4:        # it will carry IPv4 ID k0 + 1
                    crc ^= icrc_id_delta(<size_t>total, <uint16_t>(k0 + 1))
        tr[pad] = <uint8_t>crc
        tr[pad + 1] = <uint8_t>(crc >> 8)
        tr[pad + 2] = <uint8_t>(crc >> 16)
        tr[pad + 3] = <uint8_t>(crc >> 24)
        iov[0].iov_base = hdr
        iov[0].iov_len = hlen
        iov[npieces + 1].iov_base = tr
        iov[npieces + 1].iov_len = pad + 4
        if seal:
            self.ctr[i] = self.auth.counter
            self.auth.counter += 1
            self.auth.sealed += 1
            self._seal(env, iov, npieces + 2, tr + pad + 4, self.ctr[i])
            iov[npieces + 1].iov_len = pad + 4 + TRAILER_LEN
        memcpy(self.names + i * NAMELEN, env.sockaddr, env.sockaddr_len)
        m.msg_name = self.names + i * NAMELEN
        m.msg_namelen = env.sockaddr_len
        m.msg_iov = iov
        m.msg_iovlen = npieces + 2
        m.msg_control = NULL
        m.msg_controllen = 0
        m.msg_flags = 0

    cdef void _seal(self, Envelope env, iovec *iov, int niov, uint8_t *out,
                    uint64_t counter) noexcept nogil:
        """Write ``counter`` and the tag of the datagram in ``iov`` to ``out``."""
        cdef uint8_t pseudo[PSEUDO_LEN]
        cdef int k
        cdef bint ok
        pseudo[0] = <uint8_t>env.version
        memcpy(pseudo + 1, env.src_b, 16)
        memcpy(pseudo + 17, env.dst_b, 16)
        pseudo[33] = <uint8_t>(env.sport >> 8)
        pseudo[34] = <uint8_t>env.sport
        pseudo[35] = <uint8_t>(env.dport >> 8)
        pseudo[36] = <uint8_t>env.dport
        ok = self.auth.key.begin() == 1 and self.auth.key.update(pseudo, PSEUDO_LEN) == 1
        for k in range(niov):
            ok = ok and self.auth.key.update(<const uint8_t *>iov[k].iov_base, iov[k].iov_len) == 1
        for k in range(8):
            out[k] = <uint8_t>(counter >> (56 - 8 * k))
        if not (ok and self.auth.key.finish(counter, out + CTR_LEN) == 1):
            memset(out + CTR_LEN, 0, TAG_LEN)   # the receiver drops it (counted there)

    def add(self, pkt, Envelope env, bint seal=False) -> bool:
        """Encode ``pkt`` for ``env`` (its ``dst`` is the destination) into
        the next slot, sealed if ``seal`` (:meth:`set_auth` first). False if
        the ring is full (flush first) or the packet cannot be encoded (the
        reference encoder says why)."""
        if self.count == self.nslots:
            return False
        if seal and self.auth is None:
            raise ValueError("seal=True without set_auth()")
        cdef int i = self.count
        cdef const uint8_t *buf
        cdef Py_ssize_t hlen, plen
        cdef iovec *iov = self.iovs + MAXIOV * i
        try:
            self._hold(pkt.payload, &buf, &plen)
        except (TypeError, BufferError, ValueError):
            return False
        hlen = encode_header(pkt, self.hdrs + i * HDR, plen)
        if hlen < 0 or hlen + plen + 60 + TRAILER_LEN > 0xFFFF:
            self.keep.pop()
            return False
        iov[1].iov_base = <void *>buf
        iov[1].iov_len = plen
        self._finish(i, env, hlen, plen, 1, seal)
        self.envs[i] = env
        self.count = i + 1
        return True

    def add_ack(self, Envelope env, uint32_t dest_qp, uint32_t pkey, uint32_t psn,
                uint32_t syndrome, uint32_t msn, bint seal=False) -> bool:
        """Encode an ACKNOWLEDGE (BTH + AETH, no payload; every other BTH
        field zero, as ``make_bth``/``make_aeth`` build the responder's ACK)
        for ``env`` into the next slot: the bytes :meth:`add` gives for that
        RocePacket, without one. False if the ring is full (flush first);
        ValueError for a field out of range."""
        cdef int i = self.count
        cdef uint8_t *hdr
        if dest_qp >> 24 or pkey >> 16 or psn >> 24 or syndrome >> 8 or msn >> 24:
            raise ValueError(f"ACK field out of range: dest_qp {dest_qp:#x} pkey {pkey:#x} "
                             f"psn {psn:#x} syndrome {syndrome:#x} msn {msn:#x}")
        if seal and self.auth is None:
            raise ValueError("seal=True without set_auth()")
        if i == self.nslots:
            return False
        hdr = self.hdrs + i * HDR
        hdr[0] = <uint8_t>_OP_ACKNOWLEDGE
        hdr[1] = 0
        hdr[2] = <uint8_t>(pkey >> 8)
        hdr[3] = <uint8_t>pkey
        _put32(hdr + 4, dest_qp)
        _put32(hdr + 8, psn)
        _put32(hdr + 12, (syndrome << 24) | msn)
        self._finish(i, env, 16, 0, 0, seal)
        self.envs[i] = env
        self.count = i + 1
        return True

    def add_run(self, run, Envelope env, int start=0, bint seal=False) -> int:
        """Encode packets ``start, start + 1, ...`` of a
        :class:`~roce.packet.PacketRun` into free slots, payloads pointing into
        its SG list; returns the index of the first packet not added (``run.count``
        when all are). Raises ValueError for a run the reference would not build."""
        cdef int first_op, mid_op, last_op, only_op
        cdef bint has_reth = run.reth is not None
        cdef bint has_imm = run.imm is not None, has_ieth = run.ieth is not None
        cdef uint64_t va = 0
        cdef uint32_t rkey = 0, imm = 0, ieth = 0
        first_op, mid_op, last_op, only_op = run.ops
        if has_reth:
            va, rkey = run.reth
        if has_imm:
            imm = run.imm
        if has_ieth:
            ieth = run.ieth
        sgl = run.sgl
        return self.add_msg(first_op, mid_op, last_op, only_op, run.npkts, run.first, run.count,
                            run.psn, run.dest_qp, run.pkey, run.mtu, run.length, sgl.views,
                            sgl.starts, has_reth, va, rkey, has_imm, imm, has_ieth, ieth, run.se,
                            run.noack, run.ack_every, env, start, seal)

    cdef int add_msg(self, int first_op, int mid_op, int last_op, int only_op, int npkts,
                     int first, int count, uint32_t psn0, uint32_t dest_qp, int pkey,
                     uint64_t mtu, uint64_t length, list views, list starts, bint has_reth,
                     uint64_t va, uint32_t rkey, bint has_imm, uint32_t imm, bint has_ieth,
                     uint32_t ieth, bint se, uint32_t noack, uint32_t ack_every, Envelope env,
                     int start, bint seal) except -1:
        """:meth:`add_run` of a run given by its fields (the one encoder of
        runs: ``virtio_rdma._datapath.run_wire_sq`` calls it without building
        the PacketRun): packets ``start, ...`` of packets ``first .. first +
        count - 1`` of a message of ``npkts`` packets, payload from the SG
        entries ``views`` at offsets ``starts``."""
        cdef int j, i, k, nv, npieces, opcode
        cdef uint64_t off, end, pos, take
        cdef bint last, ackreq
        cdef uint8_t *hdr
        cdef Py_ssize_t hlen
        cdef iovec *iov
        cdef const uint8_t *vbuf
        cdef Py_ssize_t vlen
        cdef uint8_t *gbuf
        cdef bytes gathered
        if seal and self.auth is None:
            raise ValueError("seal=True without set_auth()")
        if not (0 < mtu and 0 <= first and 0 <= start <= count and first + count <= npkts
                and 0 <= pkey < 65536 and dest_qp < (1 << 24) and psn0 < (1 << 24)):
            raise ValueError(f"bad run: first {first} count {count} npkts {npkts} start {start} "
                             f"mtu {mtu} pkey {pkey} dest_qp {dest_qp:#x} psn {psn0:#x}")
        nv = len(views)
        if nv > MAXVIEWS:
            raise ValueError(f"run over {nv} SG entries (at most {MAXVIEWS})")
        cdef uint64_t vstarts[MAXVIEWS]
        cdef const uint8_t *vbufs[MAXVIEWS]
        cdef uint64_t vlens[MAXVIEWS]
        if start == count or self.count == self.nslots:
            return start
        for k in range(nv):
            self._hold(views[k], &vbuf, &vlen)
            vbufs[k] = vbuf
            vlens[k] = <uint64_t>vlen
            vstarts[k] = starts[k]
        # the AckReq counter as it stands before packet `start`
        for j in range(start):
            noack += 1
            if first + j == npkts - 1 or noack >= ack_every:
                noack = 0
        j = start
        while j < count and self.count < self.nslots:
            i = self.count
            k = first + j
            last = k == npkts - 1
            opcode = only_op if npkts == 1 else first_op if k == 0 else last_op if last else mid_op
            noack += 1
            ackreq = last or noack >= ack_every
            if ackreq:
                noack = 0
            off = <uint64_t>k * mtu
            end = off + mtu if off + mtu < length else length
            hdr = self.hdrs + i * HDR
            hdr[0] = <uint8_t>opcode
            hdr[1] = 0x80 if (last and se) else 0
            hdr[2] = <uint8_t>(pkey >> 8)
            hdr[3] = <uint8_t>pkey
            _put32(hdr + 4, dest_qp)
            _put32(hdr + 8, (0x80000000u if ackreq else 0) | ((psn0 + <uint32_t>j) & PSN_MASK))
            hlen = 12
            if k == 0 and has_reth:
                _put32(hdr + 12, <uint32_t>(va >> 32))
                _put32(hdr + 16, <uint32_t>va)
                _put32(hdr + 20, rkey)
                _put32(hdr + 24, <uint32_t>length)
                hlen = 28
            if last and has_imm:
                _put32(hdr + hlen, imm)
                hlen += 4
            elif last and has_ieth:
                _put32(hdr + hlen, ieth)
                hlen += 4
            if hlen != opdesc(opcode).hdr_len or not opdesc(opcode).valid:
                raise ValueError(f"run opcode 0x{opcode:02x} does not match its headers")
            # payload [off, end) from the SG entries, one iovec per piece; a
            # packet of more pieces than a datagram's iovecs takes (a guest's
            # WQE of many small SGEs) is copied into one buffer instead
            iov = self.iovs + MAXIOV * i
            npieces = 0
            pos = off
            k = 0
            while pos < end:
                while k < nv and vstarts[k] + vlens[k] <= pos:
                    k += 1
                if k == nv:
                    raise ValueError(f"run payload [{off}, {end}) outside its SG list "
                                     f"of {vstarts[nv - 1] + vlens[nv - 1] if nv else 0} bytes")
                if npieces == MAXIOV - 2:
                    gathered = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>(end - off))
                    gbuf = <uint8_t *><char *>gathered
                    pos = off
                    k = 0
                    while pos < end:
                        while k < nv and vstarts[k] + vlens[k] <= pos:
                            k += 1
                        if k == nv:     # the first pass stopped before it could tell
                            raise ValueError(f"run payload [{off}, {end}) outside its SG list "
                                             f"of {vstarts[nv - 1] + vlens[nv - 1]} bytes")
                        take = vstarts[k] + vlens[k] - pos
                        if take > end - pos:
                            take = end - pos
                        memcpy(gbuf + (pos - off), vbufs[k] + (pos - vstarts[k]), take)
                        pos += take
                    self.keep.append(gathered)
                    iov[1].iov_base = gbuf
                    iov[1].iov_len = end - off
                    npieces = 1
                    self.gathered += 1
                    break
                take = vstarts[k] + vlens[k] - pos
                if take > end - pos:
                    take = end - pos
                iov[1 + npieces].iov_base = <void *>(vbufs[k] + (pos - vstarts[k]))
                iov[1 + npieces].iov_len = take
                npieces += 1
                pos += take
            self._finish(i, env, hlen, <Py_ssize_t>(end - off), npieces, seal)
            self.envs[i] = env
            self.count = i + 1
            j += 1
        return j

    cdef void _alone(self, int i) noexcept:
        """Make slot ``i`` a datagram of its own, with IPv4 ID 0: the ICRC for
        ID 0 and, if sealed, the seal again (same counter: the other version
        never left)."""
        cdef msghdr *m = &self.msgs[i].msg_hdr
        cdef iovec *last = &m.msg_iov[m.msg_iovlen - 1]
        cdef uint8_t *tr = <uint8_t *>last.iov_base
        cdef uint32_t crc = self.crc0[i]
        cdef size_t tlen = last.iov_len
        cdef Envelope env
        if self.seg[i] == 0:
            return
        self.seg[i] = 0
        env = <Envelope>self.envs[i]
        if env.version != 4:
            return
        if self.sealed[i]:
            tlen -= TRAILER_LEN
        tr[tlen - 4] = <uint8_t>crc
        tr[tlen - 3] = <uint8_t>(crc >> 8)
        tr[tlen - 2] = <uint8_t>(crc >> 16)
        tr[tlen - 1] = <uint8_t>(crc >> 24)
        if self.sealed[i]:
            last.iov_len = tlen
            self._seal(env, m.msg_iov, <int>m.msg_iovlen, tr + tlen, self.ctr[i])
            last.iov_len = tlen + TRAILER_LEN

    cdef int _plan(self, int o, int i, int n) noexcept:
        """Messages ``o, o + 1, ...`` for slots ``i .. n-1``: a slot alone, or
        a GSO run (its slots' iovecs gathered, a UDP_SEGMENT control message).
        Returns the number of messages."""
        cdef int c, k, s
        cdef size_t nv
        cdef msghdr *m
        cdef cmsghdr *cm
        cdef uint16_t size
        while i < n:
            c = 1
            while i + c < n and self.seg[i + c] == self.seg[i + c - 1] + 1:
                c += 1
            self.ofirst[o] = i
            self.ocount[o] = c
            if c == 1:
                self.out[o] = self.msgs[i]
            else:
                m = &self.out[o].msg_hdr
                m[0] = self.msgs[i].msg_hdr
                m.msg_iov = self.oiov + MAXIOV * i
                nv = 0
                for s in range(i, i + c):
                    for k in range(<int>self.msgs[s].msg_hdr.msg_iovlen):
                        m.msg_iov[nv] = self.msgs[s].msg_hdr.msg_iov[k]
                        nv += 1
                m.msg_iovlen = nv
                m.msg_control = self.ctl + o * CTL
                m.msg_controllen = CMSG_SPACE(sizeof(uint16_t))
                cm = CMSG_FIRSTHDR(m)
                cm.cmsg_level = IPPROTO_UDP
                cm.cmsg_type = UDP_SEGMENT
                cm.cmsg_len = CMSG_LEN(sizeof(uint16_t))
                size = <uint16_t>self.dlen[i]
                memcpy(CMSG_DATA(cm), &size, sizeof(uint16_t))
            o += 1
            i += c
        return o

    def flush(self, int fd):
        """``sendmmsg`` every slot (GSO runs as one message each). Returns
        ``(sent, errors, left)``: datagrams the kernel took, datagrams it
        refused (counted and dropped, like a lossy network: RC retransmits),
        and ``left`` datagrams (as bytes and ``(ip, port)``, each for IPv4 ID
        0) not sent because the socket buffer is full, for the caller to send
        once the socket is writable. The ring is empty after."""
        cdef int res[2]
        left = self._flush(fd, res)
        return res[0], res[1], left

    cdef int flush_direct(self, uint32_t n, bint seal) except -1:
        """What the owner endpoint's ``tx_added(n, seal)`` does when it is
        not delivering a batch (count ``n`` packets a native sender added,
        then ``flush``), without its Python frames: the common end of
        ``virtio_rdma._datapath.run_wire_sq``. Returns 0, having done
        nothing, when the endpoint must do it (no owner, a batch being
        delivered, a backlog waiting for the socket, closed); else 1. The
        endpoint's counters change exactly as ``tx_added`` changes them."""
        ep = self.owner
        if ep is None or ep._holding or ep._closed or ep._backlog:
            return 0
        cdef int res[2]
        m = ep.metrics
        m.tx_packets += n
        if seal:
            m.tx_sealed = self.auth.sealed
        ep._parked = 0
        self.direct_flushes += 1
        if not self.count:
            return 1
        left = self._flush(ep._fd, res)
        if res[1]:
            m.tx_errors += res[1]
        m.tx_gso_calls, m.tx_gso_datagrams, m.tx_gso_fallbacks = \
            self.gso_calls, self.gso_datagrams, self.gso_fallbacks
        if left:
            ep._tx_left(left)
        return 1

    cdef list _flush(self, int fd, int *res):
        """:meth:`flush`'s body: ``res`` gets ``(sent, errors)``; returns ``left``."""
        cdef int j = 0, r, sent = 0, errors = 0, k, c, i
        cdef int n = self.count
        cdef int nout = self._plan(0, 0, n)
        left = []
        while j < nout:
            with nogil:
                r = sendmmsg(fd, &self.out[j], nout - j, MSG_DONTWAIT)
            if r > 0:
                for k in range(j, j + r):
                    c = self.ocount[k]
                    sent += c
                    if c > 1:
                        self.gso_calls += 1
                        self.gso_datagrams += c
                j += r
                continue
            if r < 0 and errno == EINTR:
                continue
            if r == 0 or errno == EAGAIN:
                for i in range(self.ofirst[j], n):
                    self._alone(i)
                    left.append((self._slot_bytes(i), self._slot_addr(i)))
                break
            if self.ocount[j] > 1 and (errno == EIO or errno == EINVAL):
                # no GSO here (a device without checksum offload, ...): the
                # rest one by one, and no more runs on this ring
                self.gso = False
                self.gso_fallbacks += 1
                i = self.ofirst[j]
                for k in range(i, n):
                    self._alone(k)
                nout = self._plan(j, i, n)
                continue
            errors += self.ocount[j]   # refused (ENOBUFS, EMSGSIZE, EHOSTUNREACH, ...): dropped
            j += 1
        self._release()
        self.count = 0
        res[0] = sent
        res[1] = errors
        return left

    def flush_bytes(self) -> list:
        """Empty the ring without sending: each slot's datagram (bytes, for
        IPv4 ID 0) and ``(ip, port)``, in order."""
        cdef int i
        for i in range(self.count):
            self._alone(i)
        out = [(self._slot_bytes(i), self._slot_addr(i)) for i in range(self.count)]
        self.clear()
        return out

    def clear(self) -> None:
        self._release()
        self.count = 0

    cdef bytes _slot_bytes(self, int i):
        cdef msghdr *m = &self.msgs[i].msg_hdr
        cdef size_t total = 0, pos = 0
        cdef size_t k
        for k in range(m.msg_iovlen):
            total += m.msg_iov[k].iov_len
        cdef bytes out = PyBytes_FromStringAndSize(NULL, total)
        cdef char *o = out
        for k in range(m.msg_iovlen):
            memcpy(o + pos, m.msg_iov[k].iov_base, m.msg_iov[k].iov_len)
            pos += m.msg_iov[k].iov_len
        return out

    cdef tuple _slot_addr(self, int i):
        cdef const uint8_t *a = self.names + i * NAMELEN
        port = _be16(a + 2)
        if a[0] == 2:
            return str(ipaddress.IPv4Address(PyBytes_FromStringAndSize(<const char *>a + 4, 4))), port
        return str(ipaddress.IPv6Address(PyBytes_FromStringAndSize(<const char *>a + 8, 16))), port
