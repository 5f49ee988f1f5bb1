"""RoCEv2 codec and RC transport benchmark, each against a baseline measured
in the same run:

* ``codec``  -- encode + decode (with ICRC) of a RoCEv2 packet vs scapy
  building the same IP/UDP/BTH packet (scapy computes the ICRC) and parsing it;
* ``icrc``   -- :func:`roce.icrc.compute_icrc` vs scapy's ``BTH.compute_icrc``;
* ``idsolve``-- IPv4 ID recovery by GF(2) solving vs brute force over IDs;
* ``rc``     -- a SEND through two in-memory RC QPs (segmentation, ACKs,
  completions, full codec per packet) vs encoding+decoding the same packets
  alone: the ratio is the transport's own overhead.

``python -m bench.bench_roce [--quick] [--json]``
"""
from __future__ import annotations

import argparse
import json
import time

from roce.headers import Bth, Reth
from roce.icrc import IpContext, compute_icrc, solve_ipv4_id
from roce.opcodes import Opcode
from roce.packet import RocePacket, decode

CTX = IpContext("192.0.2.1", "192.0.2.2", sport=49152)


def _rate(fn, min_time: float) -> float:
    """Calls per second of ``fn`` over at least ``min_time`` seconds."""
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= min_time:
            return n / dt


def bench_codec(min_time):
    from scapy.all import IP, UDP, Raw, raw
    from scapy.contrib.roce import BTH
    payload = bytes(1024)
    pkt = RocePacket(Bth(opcode=Opcode.RC_RDMA_WRITE_FIRST, dest_qp=5, psn=9),
                     reth=Reth(0x1000, 7, 4096), payload=payload)

    def ours():
        decode(pkt.encode(CTX), CTX)

    def scapy():
        w = raw(IP(src="192.0.2.1", dst="192.0.2.2", flags="DF") / UDP(sport=49152, dport=4791)
                / BTH(opcode=6, dqpn=5, psn=9) / Raw(Reth(0x1000, 7, 4096).pack() + payload))
        IP(w)
    return ("codec: encode+decode, 1 KiB WRITE_FIRST (pkt/s)", _rate(ours, min_time),
            _rate(scapy, min_time))


def bench_icrc(min_time):
    from scapy.all import IP, UDP, Raw
    from scapy.contrib.roce import BTH
    payload = bytes(4096)
    ib = Bth(opcode=4, dest_qp=5, psn=9).pack() + payload
    ip, udp = CTX.headers(len(ib) + 4)
    sp = IP(src="192.0.2.1", dst="192.0.2.2", flags="DF") / UDP(sport=49152, dport=4791) / \
        BTH(opcode=4, dqpn=5, psn=9) / Raw(payload)
    b = sp[BTH]
    return ("icrc: 4 KiB payload (pkt/s)", _rate(lambda: compute_icrc(ip, udp, ib), min_time),
            _rate(lambda: b.compute_icrc(b"") , min_time))


def bench_idsolve(min_time):
    ctx = IpContext("192.0.2.1", "192.0.2.2", sport=49152, ip_id=0xC0DE)
    wire = RocePacket(Bth(opcode=4, dest_qp=5, psn=9), payload=bytes(1024)).encode(ctx)
    ip, udp = ctx.with_id(0).headers(len(wire))
    ib, rx = wire[:-4], int.from_bytes(wire[-4:], "little")
    assert solve_ipv4_id(ip, udp, ib, rx) == 0xC0DE

    def brute():
        h = bytearray(ip)
        for i in range(1 << 16):
            h[4:6] = i.to_bytes(2, "big")
            if compute_icrc(h, udp, ib) == rx:
                return i
    return ("idsolve: recover IPv4 ID, 1 KiB packet (solves/s)",
            _rate(lambda: solve_ipv4_id(ip, udp, ib, rx), min_time), _rate(brute, 0))


def bench_rc(min_time, size=1 << 20, mtu=4096):
    from roce.rc import MemoryTable, RcQp, SendWR
    from verbs import QpState, WrOpcode
    data = bytes(size)

    def transport():
        a, b = RcQp(1, MemoryTable()), RcQp(2, MemoryTable())
        for q, peer in ((a, 2), (b, 1)):
            q.modify(QpState.INIT)
            q.modify(QpState.RTR, dest_qp_num=peer, path_mtu=mtu)
            q.modify(QpState.RTS)
        rbuf = bytearray(size)
        b.post_recv(1, [memoryview(rbuf)])
        a.post_send(SendWR(1, WrOpcode.SEND, [memoryview(data)]))
        now = 0.0
        while not a.poll_send_cq():
            now += 1e-6
            for src, dst, ctx in ((a, b, CTX), (b, a, CTX)):
                for p in src.transmit(now):
                    dst.receive(decode(p.encode(ctx), ctx), now)

    pkts = [RocePacket(Bth(opcode=1, dest_qp=2, psn=i), payload=memoryview(data)[:mtu])
            for i in range(size // mtu)]

    def codec_only():
        for p in pkts:
            decode(p.encode(CTX), CTX)
    t = _rate(transport, min_time)
    c = _rate(codec_only, min_time)
    return (f"rc: 1 MiB SEND, MTU {mtu}, in memory (MB/s)", t * size / 1e6, c * size / 1e6)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    mt = 0.2 if args.quick else 1.0
    rows = []
    baselines = {"codec": "scapy", "icrc": "scapy", "idsolve": "brute force", "rc": "codec only"}
    for name, fn in (("codec", bench_codec), ("icrc", bench_icrc), ("idsolve", bench_idsolve),
                     ("rc", bench_rc)):
        label, ours, base = fn(mt)
        rows.append(dict(section=name, what=label, ours=ours, baseline=base,
                         baseline_name=baselines[name], ratio=ours / base))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'benchmark':52} {'ours':>12} {'baseline':>12}  {'ratio':>8}  baseline")
    for r in rows:
        print(f"{r['what']:52} {r['ours']:12.1f} {r['baseline']:12.1f}  {r['ratio']:8.2f}x  "
              f"{r['baseline_name']}")


if __name__ == "__main__":
    main()
