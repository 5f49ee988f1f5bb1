"""Packet capture in a namespace (dumpcap) and RoCEv2 decoding (tshark).

:class:`Capture` runs ``dumpcap -i IFACE -f "udp port 4791" -P -w FILE``
inside a namespace and waits for its "File:" line, which dumpcap prints only
once the interface is open and the filter set. libpcap hands
packets to dumpcap in blocks that are retired on a timer (well under a
second here), so a packet that was just sent may not be in the file yet and
is lost if dumpcap is stopped at once: :meth:`Capture.wait_for` polls the
file (classic pcap, counted by :func:`count_packets`) until it holds the
expected number of packets, and :meth:`Capture.stop` takes that number too.

:func:`decode` reads a capture with ``tshark -T fields``, decoding UDP 4791
as InfiniBand (Wireshark's RRoCE: BTH and the extension headers after the
UDP header; it is the default, ``-d`` makes it explicit and allows other
ports), and returns one :class:`RoceRecord` per packet. The heuristic
dissectors Wireshark tries on an InfiniBand payload (RPC-over-RDMA, iSER,
SMB Direct, ...) are disabled: one that claims a payload also swallows the
ICRC field. Wireshark 4.0 shows the ICRC but does not check it; the records
carry the IP envelope and the UDP payload so a caller can check it with
:mod:`roce.packet` (:meth:`RoceRecord.ip_context`).
"""
from __future__ import annotations

import functools
import os
import re
import signal
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from .errors import NetlabError, ProcessFailed
from .ns import Namespace, run

ROCE_PORT = 4791
_PCAP_MAGIC = {b"\xd4\xc3\xb2\xa1": "<", b"\xa1\xb2\xc3\xd4": ">",
               b"\x4d\x3c\xb2\xa1": "<", b"\xa1\xb2\x3c\x4d": ">"}


def count_packets(path: str) -> int:
    """Complete packet records in a classic pcap file (0 if not written yet)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return 0
    if len(data) < 24:
        return 0
    order = _PCAP_MAGIC.get(data[:4])
    if order is None:
        raise NetlabError(f"{path} is not a classic pcap file (magic {data[:4].hex()})")
    n, off = 0, 24
    rec = struct.Struct(order + "IIII")
    while off + 16 <= len(data):
        incl = rec.unpack_from(data, off)[2]
        off += 16 + incl
        if off > len(data):
            break
        n += 1
    return n


class Capture:
    """dumpcap on ``iface`` in ``ns`` writing ``path``. Context manager;
    :meth:`stop` is idempotent and returns the number of packets captured."""

    def __init__(self, ns: Namespace, iface: str, path: str, *,
                 capture_filter: str = f"udp port {ROCE_PORT}", snaplen: int = 0,
                 timeout: float = 10.0) -> None:
        self.path = str(path)
        argv = ["dumpcap", "-q", "-i", iface, "-f", capture_filter, "-P", "-w", self.path]
        if snaplen:
            argv += ["-s", str(snaplen)]
        self.proc = ns.popen(argv)
        self.captured: int | None = None
        self.kernel_dropped: int | None = None
        try:
            self.proc.expect("File: ", stream="stderr", timeout=timeout)
        except BaseException:
            self.proc.stop()
            raise

    def count(self) -> int:
        return count_packets(self.path)

    def wait_for(self, packets: int, timeout: float = 5.0) -> int:
        """Wait until the file holds at least ``packets`` packets; the count."""
        end = time.monotonic() + timeout
        while True:
            n = self.count()
            if n >= packets:
                return n
            if time.monotonic() >= end or not self.proc.alive():
                raise ProcessFailed("capture", self.proc.argv,
                                    f"{n} of {packets} packets in {self.path} after {timeout:g} s")
            time.sleep(0.01)

    def stop(self, expect: int | None = None, timeout: float = 5.0) -> int:
        """Stop dumpcap (after :meth:`wait_for` ``expect`` packets, if given)."""
        if self.captured is None:
            try:
                if expect is not None:
                    self.wait_for(expect, timeout)
            finally:
                self.proc.stop(sig=signal.SIGINT)
                m = re.search(r"Packets captured: (\d+)", self.proc.stderr)
                d = re.search(r"Packets received/dropped on interface .*?: \d+/(\d+)",
                              self.proc.stderr)
                self.kernel_dropped = int(d.group(1)) if d else None
                self.captured = int(m.group(1)) if m else self.count()
        return self.captured

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ------------------------------------------------------------------- decoding
def _int(s: str) -> int:
    return int(s, 0)


def _bool(s: str) -> bool:
    return s in ("1", "True", "true")


def _hex(s: str) -> bytes:
    return bytes.fromhex(s.replace(":", ""))


def _icrc(s: str) -> int:
    """tshark reads the ICRC big-endian; roce (like rxe) writes it
    least significant byte first."""
    return int.from_bytes(int(s, 0).to_bytes(4, "big"), "little")


@functools.cache
def _payload_heuristics() -> tuple[str, ...]:
    """Protocols with a heuristic on InfiniBand payloads (not ethertype)."""
    out = run(["tshark", "-G", "heuristic-decodes"]).stdout
    rows = (line.split("\t") for line in out.splitlines())
    return tuple(sorted({r[1] for r in rows
                         if len(r) >= 2 and r[0] == "infiniband.payload" and r[1] != "ethertype"}))


@dataclass(frozen=True)
class RoceRecord:
    """One captured RoCEv2 packet as tshark decoded it. Fields absent from
    a packet (no RETH, no AETH, ...) are None."""

    frame: int
    protocols: str
    src: str
    dst: str
    ip_id: int
    df: bool
    ttl: int
    dscp_ecn: int
    sport: int
    dport: int
    opcode: int | None
    se: bool | None
    pad_count: int | None
    pkey: int | None
    dest_qp: int | None
    ackreq: bool | None
    psn: int | None
    reth_va: int | None
    reth_rkey: int | None
    reth_len: int | None
    aeth_syndrome: int | None
    aeth_msn: int | None
    icrc: int | None                 # as roce.packet reports it (see _icrc)
    payload: bytes                   # the whole UDP payload: BTH .. ICRC

    def ip_context(self):
        """The envelope as :class:`roce.icrc.IpContext`, to check the ICRC
        with ``roce.packet.decode(rec.payload, rec.ip_context())``."""
        from roce.icrc import IpContext
        return IpContext(self.src, self.dst, self.sport, self.dport, ip_id=self.ip_id,
                         df=self.df, ttl=self.ttl, tos=self.dscp_ecn)


_FIELDS: dict[str, tuple[str, Callable[[str], Any]]] = {  # record attribute -> (tshark field, parser)
    "frame": ("frame.number", _int), "protocols": ("frame.protocols", str),
    "src": ("ip.src", str), "dst": ("ip.dst", str), "ip_id": ("ip.id", _int),
    "df": ("ip.flags.df", _bool), "ttl": ("ip.ttl", _int), "dscp_ecn": ("ip.dsfield", _int),
    "sport": ("udp.srcport", _int), "dport": ("udp.dstport", _int),
    "opcode": ("infiniband.bth.opcode", _int), "se": ("infiniband.bth.se", _bool),
    "pad_count": ("infiniband.bth.padcnt", _int), "pkey": ("infiniband.bth.p_key", _int),
    "dest_qp": ("infiniband.bth.destqp", _int), "ackreq": ("infiniband.bth.a", _bool),
    "psn": ("infiniband.bth.psn", _int), "reth_va": ("infiniband.reth.va", _int),
    "reth_rkey": ("infiniband.reth.r_key", _int), "reth_len": ("infiniband.reth.dmalen", _int),
    "aeth_syndrome": ("infiniband.aeth.syndrome", _int),
    "aeth_msn": ("infiniband.aeth.msn", _int), "icrc": ("infiniband.invariant.crc", _icrc),
    "payload": ("udp.payload", _hex),
}
assert list(_FIELDS) == [f.name for f in fields(RoceRecord)]


def decode(path: str, *, port: int = ROCE_PORT, display_filter: str = "udp") -> list[RoceRecord]:
    """Every packet of the capture matching ``display_filter``, decoded by
    tshark with UDP ``port`` as RoCEv2."""
    if not os.path.exists(path):
        raise NetlabError(f"no capture file {path}")
    argv = ["tshark", "-n", "-r", str(path), "-d", f"udp.port=={port},infiniband",
            "-Y", display_filter, "-T", "fields", "-E", "separator=/t", "-E", "occurrence=f",
            "-E", "quote=n"]
    for proto in _payload_heuristics():
        argv += ["--disable-protocol", proto]
    for tshark_field, _ in _FIELDS.values():
        argv += ["-e", tshark_field]
    out = run(argv, timeout=60).stdout
    records = []
    for line in out.splitlines():
        cols = line.split("\t")
        if len(cols) != len(_FIELDS):
            raise NetlabError(f"tshark printed {len(cols)} fields, expected {len(_FIELDS)}: "
                              f"{line!r}")
        kw: dict[str, Any] = {}
        for (name, (_, parse)), text in zip(_FIELDS.items(), cols, strict=True):
            kw[name] = parse(text) if text else (b"" if name == "payload" else None)
        records.append(RoceRecord(**kw))
    return records
