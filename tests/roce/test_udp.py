"""roce.udp over loopback: real sockets, ICRC verified on receive, IPv4 ID
recovery against a raw-socket sender with a non-zero ID, and two RC QPs
talking through the sockets."""
import asyncio
import socket
import struct
import time

import pytest

from roce.headers import Aeth, Bth, Reth
from roce.icrc import IpContext
from roce.opcodes import Opcode
from roce.packet import RocePacket
from roce.rc import MemoryTable, RcQp, SendWR
from verbs import Access, QpState, WcStatus, WrOpcode
from roce.udp import open_endpoint


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_loopback_send_receive_and_corruption():
    async def main():
        got = []
        a = await open_endpoint("127.0.0.1", lambda p, ip: got.append((p, ip)), port=0)
        b = await open_endpoint("127.0.0.1", lambda p, ip: got.append((p, ip)), port=0)
        try:
            pkt = RocePacket(Bth(opcode=Opcode.RC_SEND_ONLY, dest_qp=7, psn=1), payload=b"hi!")
            a.send(pkt, "127.0.0.1", b.local[1])
            # a datagram with a broken ICRC is dropped and counted
            raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            raw.sendto(b"\x04" + bytes(19), ("127.0.0.1", b.local[1]))
            raw.close()
            for _ in range(100):
                if got and b.metrics.rx_icrc_errors:
                    break
                await asyncio.sleep(0.01)
        finally:
            await a.aclose()
            await b.aclose()
        (p, ip), = got
        assert bytes(p.payload) == b"hi!" and ip == "127.0.0.1" and p.ip_id == 0
        assert b.metrics.rx_icrc_errors == 1 and a.metrics.tx_packets == 1
    run(main())


def test_ipv4_id_recovered_from_raw_sender():
    try:
        rs = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    except PermissionError:
        pytest.skip("raw sockets need CAP_NET_RAW")

    async def main():
        got = []
        b = await open_endpoint("127.0.0.1", lambda p, ip: got.append(p), port=0)
        try:
            ctx = IpContext("127.0.0.1", "127.0.0.1", sport=4791, dport=b.local[1], ip_id=0xBEEF)
            ib = RocePacket(Bth(opcode=Opcode.RC_SEND_ONLY, dest_qp=9, psn=3),
                            payload=b"kernel rxe style").encode(ctx)
            ip, udp = ctx.headers(len(ib))
            rs.sendto(ip + udp + ib, ("127.0.0.1", 0))
            for _ in range(100):
                if got:
                    break
                await asyncio.sleep(0.01)
        finally:
            rs.close()
            await b.aclose()
        assert got and got[0].ip_id == 0xBEEF and b.metrics.rx_id_recovered == 1
    run(main())


def test_two_rc_qps_over_udp_loopback():
    async def main():
        loop = asyncio.get_running_loop()
        qps = {}
        eps = {}

        def deliver(name):
            def on_packet(pkt, ip):
                qps[name].receive(pkt, loop.time())
                pump()
            return on_packet

        def pump():
            for name, peer in (("a", "b"), ("b", "a")):
                for pkt in qps[name].transmit(loop.time()):
                    eps[name].send(pkt, "127.0.0.1", eps[peer].local[1])
                d = qps[name].next_deadline()
                if d is not None:
                    loop.call_at(d, lambda q=qps[name]: (q.handle_timer(loop.time()), pump()))

        eps["a"] = await open_endpoint("127.0.0.1", deliver("a"), port=0)
        eps["b"] = await open_endpoint("127.0.0.1", deliver("b"), port=0)
        mem = MemoryTable()
        qps["a"], qps["b"] = RcQp(1, MemoryTable()), RcQp(2, mem)
        for q, peer in ((qps["a"], 2), (qps["b"], 1)):
            q.modify(QpState.INIT)
            q.modify(QpState.RTR, dest_qp_num=peer, path_mtu=4096, rq_psn=0)
            q.modify(QpState.RTS, sq_psn=0, timeout=14)
        data = bytes(range(256)) * 1024          # 256 KiB
        target = bytearray(len(data))
        rkey, va = mem.register(target, Access.REMOTE_WRITE)
        qps["a"].post_send(SendWR(1, WrOpcode.RDMA_WRITE, [memoryview(data)], remote_addr=va,
                                  rkey=rkey))
        pump()
        wc = []
        for _ in range(500):
            wc += qps["a"].poll_send_cq()
            if wc:
                break
            await asyncio.sleep(0.01)
        await eps["a"].aclose()
        await eps["b"].aclose()
        assert [c.status for c in wc] == [WcStatus.SUCCESS]
        assert target == data
    run(main())


def test_acks_of_a_send_wait_for_the_reply():
    """ACK parking (roce.udp.PARK_BATCH, ``park_acks``): the ACK a lone
    SEND leaves waits and leaves with the next packet sent (one datagram
    after the other, in order); with nothing else to send it leaves after
    two polls that find nothing; after a WRITE it leaves at once. Off, as
    by default, it leaves at once."""
    async def main():
        got = []
        a = await open_endpoint("127.0.0.1", lambda p, ip: got.append(p.bth.opcode), port=0)
        ack = RocePacket(Bth(opcode=Opcode.RC_ACKNOWLEDGE, dest_qp=7, psn=1), aeth=Aeth(0x1F, 1))
        reply = RocePacket(Bth(opcode=Opcode.RC_SEND_ONLY, dest_qp=7, psn=9), payload=b"re")
        b = await open_endpoint("127.0.0.1",
                                lambda p, ip: b.transmit([ack], "127.0.0.1", a.local[1]), port=0)
        b.park_acks = True
        loop = asyncio.get_running_loop()
        loop.remove_reader(a._fd)                       # this test polls both by hand
        loop.remove_reader(b._fd)

        async def arrive(pkt):
            a.send(pkt, "127.0.0.1", b.local[1])
            for _ in range(200):
                if b.poll():
                    return
                await asyncio.sleep(0.005)
            raise AssertionError("nothing arrived")

        def at_a():
            time.sleep(0.02)
            a.poll()
            out, got[:] = list(got), []
            return out
        try:
            send = RocePacket(Bth(opcode=Opcode.RC_SEND_ONLY, dest_qp=3, psn=1), payload=b"q")
            await arrive(send)
            assert b.metrics.tx_acks_parked == 1 and at_a() == []       # parked
            b.transmit([reply], "127.0.0.1", a.local[1])                # the reply takes it along
            assert at_a() == [Opcode.RC_ACKNOWLEDGE, Opcode.RC_SEND_ONLY]
            await arrive(send)
            assert b.metrics.tx_acks_parked == 2 and at_a() == []
            b.poll()
            assert at_a() == []                                         # one empty poll: still
            b.poll()
            assert at_a() == [Opcode.RC_ACKNOWLEDGE]                    # the second sends it
            await arrive(send)
            assert at_a() == []
            await asyncio.sleep(0)                                      # the loop's next callbacks
            assert at_a() == [Opcode.RC_ACKNOWLEDGE]
            write = RocePacket(Bth(opcode=Opcode.RC_RDMA_WRITE_ONLY, dest_qp=3, psn=2),
                               reth=Reth(0, 1, 1), payload=b"w")
            await arrive(write)
            assert b.metrics.tx_acks_parked == 3 and at_a() == [Opcode.RC_ACKNOWLEDGE]
            b.park_acks = False
            await arrive(send)
            assert b.metrics.tx_acks_parked == 3 and at_a() == [Opcode.RC_ACKNOWLEDGE]
        finally:
            await a.aclose()
            await b.aclose()
        assert b.metrics.tx_packets == 6 and b.metrics.tx_errors == 0
    run(main())
