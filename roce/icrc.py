"""Invariant CRC of RoCEv2 packets (IBTA vol. 1 annex A17.3.3 "ICRC", computed
exactly as Linux rxe's rxe_icrc.c does).

The ICRC is the standard CRC-32 (``zlib.crc32``: reflected polynomial
0xEDB88320, initial value and final XOR all-ones) over a pseudo packet:

* 8 bytes of 0xFF standing for the masked LRH (rxe folds them into its seed
  0xDEBB20E3);
* the IP header with the fields routers may change set to all ones: IPv4 TOS,
  TTL and header checksum; IPv6 traffic class, flow label and hop limit. The
  IPv4 Identification field is *not* masked;
* the UDP header with the checksum set to 0xFFFF;
* the BTH with its 8 "resv8a" bits (FECN, BECN, 6 reserved) set to ones;
* the rest of the IB transport headers, the payload and the pad bytes.

On the wire the 32-bit result is written least significant byte first (rxe
stores the CPU-order word on little-endian hosts; scapy's ``BTH.pack_icrc``
does the same).

Recovering the IPv4 ID: a UDP socket does not show the IP header, yet kernel
rxe senders put a non-zero ID in it. Because CRC-32 is affine over GF(2) in
the message bits (for a fixed length), ``icrc(id) = icrc(0) ^ L(id)`` with
``L`` linear; :func:`solve_ipv4_id` precomputes the 16 basis columns
``L(1 << i)`` for the packet length, solves the 32x16 system, and returns the
single ID that makes the received ICRC valid, or ``None``. Pure functions.
"""
from __future__ import annotations

import ipaddress
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from .errors import BadIpHeader, FieldRange

ROCE_UDP_PORT = 4791
IPV4_HDR_LEN = 20
IPV6_HDR_LEN = 40
UDP_HDR_LEN = 8
_LRH_MASKED = b"\xff" * 8
_ID_OFFSET = 8 + 4          # byte offset of the IPv4 ID in the pseudo packet


def icrc_to_bytes(icrc: int) -> bytes:
    return icrc.to_bytes(4, "little")


def icrc_from_bytes(b) -> int:
    return int.from_bytes(b, "little")


def ipv4_checksum(hdr) -> int:
    """Internet checksum (RFC 1071) of an IPv4 header whose checksum field is 0."""
    s = sum(struct.unpack(f"!{len(hdr) // 2}H", hdr))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF

_IpLike = str | bytes | int | ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class IpContext:
    """The IP/UDP envelope of a RoCEv2 datagram, as far as the ICRC needs it.

    ``udp_payload_len`` is not part of it: it follows from the packet.
    Defaults match what a Linux UDP socket with IP_PMTUDISC_DO sends: DF set
    and IPv4 ID 0.
    """

    src: _IpLike                # an IPv4Address / IPv6Address after __post_init__
    dst: _IpLike
    sport: int
    dport: int = ROCE_UDP_PORT
    ip_id: int = 0
    df: bool = True
    ttl: int = 64
    tos: int = 0            # IPv4 TOS / IPv6 traffic class
    flow_label: int = 0     # IPv6 only
    _src: bytes = field(init=False, repr=False, compare=False, default=b"")
    _dst: bytes = field(init=False, repr=False, compare=False, default=b"")

    def __post_init__(self) -> None:
        try:
            s = ipaddress.ip_address(self.src)
            d = ipaddress.ip_address(self.dst)
        except ValueError as e:
            raise BadIpHeader(str(e), field="address", value=(self.src, self.dst)) from None
        if s.version != d.version:
            raise BadIpHeader(f"address families differ: {s} / {d}", field="address",
                              value=(self.src, self.dst))
        for name, v, bits in (("sport", self.sport, 16), ("dport", self.dport, 16),
                              ("ip_id", self.ip_id, 16), ("ttl", self.ttl, 8),
                              ("tos", self.tos, 8), ("flow_label", self.flow_label, 20)):
            if not isinstance(v, int) or v < 0 or v >> bits:
                raise FieldRange(f"IpContext.{name}", v, bits)
        object.__setattr__(self, "src", s)
        object.__setattr__(self, "dst", d)
        object.__setattr__(self, "_src", s.packed)
        object.__setattr__(self, "_dst", d.packed)

    @property
    def version(self) -> int:
        return self.src.version  # type: ignore[union-attr]  # an address after __post_init__

    def with_id(self, ip_id: int) -> IpContext:
        return IpContext(self.src, self.dst, self.sport, self.dport, ip_id, self.df, self.ttl,
                         self.tos, self.flow_label)

    def headers(self, udp_payload_len: int) -> tuple[bytes, bytes]:
        """The IP and UDP headers of a datagram whose UDP payload (BTH up to
        and including the ICRC) is ``udp_payload_len`` bytes."""
        udp_len = UDP_HDR_LEN + udp_payload_len
        if udp_len > 0xFFFF:
            raise FieldRange("udp_length", udp_len, 16)
        udp = struct.pack("!HHHH", self.sport, self.dport, udp_len, 0)
        if self.version == 4:
            total = IPV4_HDR_LEN + udp_len
            if total > 0xFFFF:
                raise FieldRange("ipv4_total_length", total, 16)
            hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, self.tos, total, self.ip_id,
                                        0x4000 if self.df else 0, self.ttl, 17, 0,
                                        self._src, self._dst))
            struct.pack_into("!H", hdr, 10, ipv4_checksum(hdr))
            return bytes(hdr), udp
        word0 = (6 << 28) | (self.tos << 20) | self.flow_label
        ip6 = struct.pack("!IHBB16s16s", word0, udp_len, 17, self.ttl, self._src, self._dst)
        return ip6, udp


def _pseudo_header(ip_header, udp_header, bth) -> bytearray:
    """The masked LRH + IP + UDP + BTH prefix of the ICRC input."""
    n = len(ip_header)
    if len(udp_header) != UDP_HDR_LEN:
        raise BadIpHeader(f"UDP header is {len(udp_header)} bytes, not 8",
                          field="udp_header", value=len(udp_header))
    if len(bth) < 12:
        raise BadIpHeader(f"IB part is {len(bth)} bytes, shorter than a BTH",
                          field="ib_bytes", value=len(bth))
    ver = ip_header[0] >> 4 if n else 0
    buf = bytearray(_LRH_MASKED)
    buf += ip_header
    if ver == 4 and n == IPV4_HDR_LEN and ip_header[0] == 0x45:
        buf[8 + 1] = 0xFF                       # TOS
        buf[8 + 8] = 0xFF                       # TTL
        buf[8 + 10:8 + 12] = b"\xff\xff"        # header checksum
    elif ver == 6 and n == IPV6_HDR_LEN:
        buf[8] |= 0x0F                          # traffic class, high nibble
        buf[8 + 1:8 + 4] = b"\xff\xff\xff"      # traffic class low nibble + flow label
        buf[8 + 7] = 0xFF                       # hop limit
    else:
        raise BadIpHeader(
            f"IP header of {n} bytes, version {ver}: need a 20-byte IPv4 header without "
            "options or a 40-byte IPv6 header", field="ip_header", value=n)
    off = len(buf)
    buf += udp_header
    buf[off + 6:off + 8] = b"\xff\xff"          # UDP checksum
    off = len(buf)
    buf += bth[:12]
    buf[off + 4] = 0xFF                         # resv8a: FECN, BECN, resv6
    return buf


def compute_icrc_reference(ip_header, udp_header, ib_bytes) -> int:
    """ICRC of a packet: ``ib_bytes`` is the UDP payload without the trailing
    4 ICRC bytes (BTH, extension headers, payload, pad). Returns the CRC value;
    use :func:`icrc_to_bytes` for its wire bytes. The reference (zlib);
    :func:`compute_icrc` is the same function, natively when built."""
    crc = zlib.crc32(_pseudo_header(ip_header, udp_header, ib_bytes))
    mv = memoryview(ib_bytes)
    return zlib.crc32(mv[12:], crc)


_native_icrc: Callable[[Any, Any, Any], int] | None
try:
    from ._icrc import compute_icrc as _native_icrc
except ImportError:  # pragma: no cover - extension not built
    _native_icrc = None


def compute_icrc(ip_header, udp_header, ib_bytes) -> int:
    """:func:`compute_icrc_reference`, with the native CRC (:mod:`roce._icrc`)
    when it is built; the checks and errors are the reference's."""
    if _native_icrc is None or len(ib_bytes) < 12:
        return compute_icrc_reference(ip_header, udp_header, ib_bytes)
    if len(udp_header) != UDP_HDR_LEN or not (
            (len(ip_header) == IPV4_HDR_LEN and ip_header[0] == 0x45)
            or (len(ip_header) == IPV6_HDR_LEN and ip_header[0] >> 4 == 6)):
        return compute_icrc_reference(ip_header, udp_header, ib_bytes)  # raises the right error
    return _native_icrc(ip_header, udp_header, ib_bytes)


@lru_cache(maxsize=128)
def _id_solver(total_len: int) -> tuple[tuple[int, int, int], ...]:
    """Row-reduced basis of the linear map ID -> ICRC change for a pseudo
    packet of ``total_len`` bytes: tuples (vector, pivot bit, id mask)."""
    zeros = bytes(total_len)
    z = zlib.crc32(zeros)
    tail = total_len - _ID_OFFSET - 2
    rows: list[tuple[int, int, int]] = []
    for i in range(16):
        v = zlib.crc32(zeros[:_ID_OFFSET] + (1 << i).to_bytes(2, "big") + zeros[:tail]) ^ z
        m = 1 << i
        for rv, rp, rm in rows:
            if v >> rp & 1:
                v ^= rv
                m ^= rm
        if v == 0:          # cannot happen for CRC-32 (bursts <= 32 bits are detected)
            continue
        p = v.bit_length() - 1
        rows = [((rv ^ v, rp, rm ^ m) if rv >> p & 1 else (rv, rp, rm)) for rv, rp, rm in rows]
        rows.append((v, p, m))
    return tuple(rows)


def solve_ipv4_id(ip_header, udp_header, ib_bytes, received_icrc: int) -> int | None:
    """The IPv4 Identification value for which ``received_icrc`` is the valid
    ICRC of this packet, or ``None`` if no 16-bit ID makes it valid.
    The ID field of ``ip_header`` is ignored (treated as 0)."""
    if len(ip_header) != IPV4_HDR_LEN or ip_header[0] != 0x45:
        raise BadIpHeader("ID recovery needs a 20-byte IPv4 header without options",
                          field="ip_header", value=len(ip_header))
    hdr = bytearray(ip_header)
    hdr[4:6] = b"\0\0"
    t = compute_icrc(hdr, udp_header, ib_bytes) ^ received_icrc
    total = 8 + IPV4_HDR_LEN + UDP_HDR_LEN + len(ib_bytes)
    ident = 0
    for rv, rp, rm in _id_solver(total):
        if t >> rp & 1:
            t ^= rv
            ident ^= rm
    return ident if t == 0 else None
