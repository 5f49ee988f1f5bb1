"""One verbs program, two places: in a QEMU guest over the virtio-pci driver
(``Context("pci:auto")``) or on the host as a process guest (a socket path),
against a host peer (a process guest) on the same daemon.

``python qemu_tests/pci_traffic.py DEVICE PORT [ITERS]`` is the *active*
side: it listens on TCP PORT, takes the peer's connection, exchanges QP
info (JSON lines), then does SEND with immediate (the peer answers with a
SEND), RDMA WRITE of 256 KiB, RDMA READ, FETCH_AND_ADD and CMP_AND_SWAP,
each checked, then (PCI) an RDMA WRITE from and a READ into an MR larger
than the longest run of physically adjacent huge pages, across its first
page-list boundary (the pool is fragmented first: every fourth free huge
page is held, so no run is longer than three pages), and ITERS 64-byte
SEND ping-pongs, timed; it prints one line
``RESULT {json}`` (latency, the transport's counters). :func:`peer` is the
passive side, run by the test on the host (or ``peer DEVICE HOST PORT
ITERS`` in a second guest); it checks what was written into its memory.
``garbage`` mode programs descriptors pointing outside guest memory into
the controlq (the isolation test).
"""
from __future__ import annotations

import json
import os
import socket
import statistics
import struct
import sys
import time

from guest_lib import SGE, RecvWR, SendWR
from guest_lib.endpoint import RcEndpoint
from verbs import WcOpcode, WrOpcode

MSG = b"hello from the guest over virtio-rdma " * 20
READ_DATA = b"the peer's data for RDMA READ " * 100
WRITE_DATA = bytes(range(256)) * 1024


def _poll1(g: RcEndpoint, timeout: float):
    """The next completion (successful), polling with sched_yield between
    empty polls: on a busy host the daemon then gets the CPU it needs (as
    perftest's polling mode does); the measured loop uses it on both sides."""
    deadline = time.monotonic() + timeout
    cq = g.cq
    while True:
        n, wcs = cq.poll(1)
        if n:
            if wcs[0].status:
                raise RuntimeError(f"completion error: {wcs[0]}")
            return wcs[0]
        if time.monotonic() > deadline:
            raise TimeoutError(f"no completion within {timeout} s")
        os.sched_yield()


def _send(f, obj) -> None:
    f.write((json.dumps(obj) + "\n").encode())
    f.flush()


def _recv(f) -> dict:
    line = f.readline()
    if not line:
        raise ConnectionError("the peer closed the exchange")
    return json.loads(line)


def _info(g: RcEndpoint) -> dict:
    i = g.info()
    i["gid"] = i["gid"].hex()
    return i


def _peer_info(d: dict) -> dict:
    return dict(d, gid=bytes.fromhex(d["gid"]))


PEER_SCRATCH = 655360  # 256 KiB of the peer's 1 MiB MR that it does not check
OWN_SCRATCH = 786432  # the last 256 KiB of the active side's 1 MiB MR


def _fragment_hugepages(keep_every: int = 4) -> list:
    """Take every free huge page (one mapping each), then give back all but
    every ``keep_every``-th in physical order: the pages a driver gets next
    form runs of at most ``keep_every - 1`` adjacent pages. Returns the held
    ones (close them to give them back)."""
    from guest_lib.transports.hugemem import HUGEPAGE, HugeMemory, HugeMemoryError
    from virtio.memory import free_hugepages

    pages: list[HugeMemory] = []
    for _ in range(free_hugepages()):
        try:
            m = HugeMemory(HUGEPAGE)
        except HugeMemoryError:
            break  # fewer than counted: what we got
        pages.append(m)
    pages.sort(key=lambda m: m.runs[0][2])
    held = [m for i, m in enumerate(pages) if i % keep_every == keep_every - 1]
    for i, m in enumerate(pages):
        if i % keep_every != keep_every - 1:
            m.close()
    return held


def _page_list_mr(g: RcEndpoint, peer: dict) -> dict | None:
    """An MR one huge page longer than the longest run: registered as a page
    list; 256 KiB across its first chunk boundary go to the peer by RDMA WRITE
    (read back into the one-chunk MR) and come back by RDMA READ into the
    page-list MR across the boundary at another offset."""
    from guest_lib import MR
    from guest_lib.transports.hugemem import HUGEPAGE

    mem = getattr(g.ctx.transport, "mem", None)
    if mem is None:
        return None  # a process guest: one memfd, every MR one chunk
    size = mem.largest_run + HUGEPAGE
    qp, n = g.qp, len(WRITE_DATA)
    mr = MR(g.pd, size)
    try:
        c0 = mr.chunks[0][1]
        src, dst = c0 - n // 2, c0 - n // 3
        mr.write(WRITE_DATA, offset=src)
        qp.post_send(SendWR(wr_id=6, opcode=WrOpcode.RDMA_WRITE, sg=[SGE(mr.buf + src, n, mr.lkey)],
                            remote_addr=peer["addr"] + PEER_SCRATCH, rkey=peer["rkey"]))
        g.poll_one(30)
        own = SGE(g.mr.buf + OWN_SCRATCH, n, g.mr.lkey)
        qp.post_send(SendWR(wr_id=7, opcode=WrOpcode.RDMA_READ, sg=[own],
                            remote_addr=peer["addr"] + PEER_SCRATCH, rkey=peer["rkey"]))
        g.poll_one(30)
        wrote = g.mr.read(n, OWN_SCRATCH) == WRITE_DATA
        qp.post_send(SendWR(wr_id=8, opcode=WrOpcode.RDMA_READ, sg=[SGE(mr.buf + dst, n, mr.lkey)],
                            remote_addr=peer["addr"] + PEER_SCRATCH, rkey=peer["rkey"]))
        g.poll_one(30)
        read = mr.read(n, dst) == WRITE_DATA
        return {"size": size, "chunks": len(mr.chunks), "first_chunk": c0, "largest_run": mem.largest_run,
                "runs": [k for _, k, _ in mem.runs], "write_ok": wrote, "read_ok": read,
                "boundary_crossed": src < c0 < src + n and dst < c0 < dst + n}
    finally:
        mr.close()


def active(device: str, port: int, iters: int) -> dict:
    held = _fragment_hugepages() if device.startswith("pci:") else []
    try:
        r = _active(device, port, iters)
    finally:
        for m in held:
            m.close()
    r["held_hugepages"] = len(held)
    return r


def _active(device: str, port: int, iters: int) -> dict:
    g = RcEndpoint(device, 1 << 20)
    srv = socket.create_server(("0.0.0.0", port))  # noqa: S104  the guest's user-network port
    try:
        srv.settimeout(60)
        conn, _ = srv.accept()
        f = conn.makefile("rwb")
        _send(f, _info(g))
        peer = _peer_info(_recv(f))
        g.connect(peer)
        mr, qp = g.mr, g.qp
        qp.post_recv(RecvWR(wr_id=9, sg=[SGE(mr.buf + 4096, 4096, mr.lkey)]))
        _recv(f)  # the peer is ready
        mr.write(MSG)
        qp.post_send(SendWR(wr_id=1, opcode=WrOpcode.SEND_WITH_IMM, sg=[SGE(mr.buf, len(MSG), mr.lkey)],
                            imm_data=0x1234))
        wcs = [g.poll_one(30), g.poll_one(30)]
        reply = next(w for w in wcs if w.opcode == WcOpcode.RECV)
        assert mr.read(reply.byte_len, 4096) == MSG.upper(), "the peer's reply differs"
        mr.write(WRITE_DATA, offset=262144)
        qp.post_send(SendWR(wr_id=2, opcode=WrOpcode.RDMA_WRITE,
                            sg=[SGE(mr.buf + 262144, len(WRITE_DATA), mr.lkey)],
                            remote_addr=peer["addr"] + 262144, rkey=peer["rkey"]))
        g.poll_one(30)
        qp.post_send(SendWR(wr_id=3, opcode=WrOpcode.RDMA_READ, sg=[SGE(mr.buf + 600000, 2300, mr.lkey)],
                            remote_addr=peer["addr"] + 131072, rkey=peer["rkey"]))
        g.poll_one(30)
        assert mr.read(2300, 600000) == READ_DATA[:2300], "RDMA READ data differs"
        qp.post_send(SendWR(wr_id=4, opcode=WrOpcode.ATOMIC_FETCH_AND_ADD,
                            sg=[SGE(mr.buf + 700000, 8, mr.lkey)],
                            remote_addr=peer["addr"] + 65536, rkey=peer["rkey"], compare_add=5))
        g.poll_one(30)
        qp.post_send(SendWR(wr_id=5, opcode=WrOpcode.ATOMIC_CMP_AND_SWP,
                            sg=[SGE(mr.buf + 700008, 8, mr.lkey)],
                            remote_addr=peer["addr"] + 65536, rkey=peer["rkey"], compare_add=1005, swap=7))
        g.poll_one(30)
        olds = struct.unpack("<QQ", mr.read(16, 700000))
        assert olds == (1000, 1005), f"atomics saw {olds}"
        page_list = _page_list_mr(g, peer)
        _send(f, {"done": True})
        assert _recv(f).get("verified"), "the peer did not verify"
        # 64-byte SEND ping-pong: half the round trip is the latency
        rtts = []
        for i in range(iters):
            qp.post_recv(RecvWR(wr_id=100 + i, sg=[SGE(mr.buf + 8192, 64, mr.lkey)]))
            t = time.perf_counter()
            qp.post_send(SendWR(wr_id=200 + i, opcode=WrOpcode.SEND, sg=[SGE(mr.buf, 64, mr.lkey)]))
            got = {_poll1(g, 30).opcode, _poll1(g, 30).opcode}
            rtts.append(time.perf_counter() - t)
            assert WcOpcode.RECV in got
        result = {"verified": ["SEND_WITH_IMM", "RDMA_WRITE", "RDMA_READ", "FETCH_AND_ADD", "CMP_AND_SWP"],
                  "page_list": page_list, "big_mr": _big_mr(g), "second_driver": _second_driver(device, g),
                  "iters": iters, "send64_half_rtt_us": statistics.median(rtts) / 2 * 1e6 if rtts else None,
                  "device": device, "features": g.ctx.features,
                  "local_gid": _info(g)["gid"], "remote_gid": peer["gid"].hex()}
        counters = getattr(g.ctx.transport, "counters", None)
        if counters is not None:
            result["counters"] = dict(counters)
        _recv(f)  # the peer finished
        t = g.ctx.transport
        g.close()
        if counters is not None:
            result["closed"] = dict(t.counters)  # type: ignore[attr-defined]
        return result
    finally:
        srv.close()


def _second_driver(device: str, g: RcEndpoint) -> str | None:
    """A second driver for the function in use (by its address): refused
    (EBUSY) for PCI."""
    if not device.startswith("pci:"):
        return None
    from guest_lib import Context, RDMAError

    try:
        Context(f"pci:{g.ctx.transport.name}", mem_size=4 << 20).close()
    except RDMAError as e:
        return f"errno {e.errno}: {e}"
    return "opened"


def _big_mr(g: RcEndpoint) -> dict:
    """MRs past one 2 MiB page: 5 MiB (registered: one chunk when a run of
    adjacent huge pages holds it, else a page list) and 64 MiB, more than the
    driver's memory (refused with a MemoryError saying how much is free)."""
    from guest_lib import MR

    out: dict = {}
    runs = getattr(getattr(g.ctx.transport, "mem", None), "runs", None)
    if runs is not None:
        out["runs"] = [n for _, n, _ in runs]
    for size in (5 << 20, 64 << 20):
        try:
            mr = MR(g.pd, size)
        except MemoryError as e:
            out[str(size)] = f"refused: {e}"
            continue
        mr.write(b"x" * 4096, offset=size - 4096)
        out[str(size)] = "registered"
        mr.close()
    return out


def peer(device: str, addr: tuple[str, int], iters: int, timeout: float = 90,
         poll_timeout: float = 60) -> dict:
    """The passive side (a process guest on the host): connects to the active
    side at ``addr`` (retrying until it listens), answers and verifies; a
    completion that takes longer than ``poll_timeout`` is an error."""
    deadline = time.monotonic() + timeout
    while True:
        conn = f = None
        try:
            conn = socket.create_connection(addr, timeout=5)
            f = conn.makefile("rwb")
            first = f.readline()  # slirp accepts before the guest listens: wait for data
            if first:
                break
        except OSError:
            pass
        for x in (f, conn):
            if x is not None:
                x.close()
        if time.monotonic() > deadline:
            raise TimeoutError(f"no active side at {addr} within {timeout} s")
        time.sleep(0.5)
    try:
        conn.settimeout(timeout)
        return _serve(device, f, first, iters, poll_timeout)
    finally:
        f.close()
        conn.close()


def _serve(device: str, f, first: bytes, iters: int, poll_timeout: float) -> dict:
    with RcEndpoint(device, 1 << 20) as g:
        other = _peer_info(json.loads(first))
        _send(f, _info(g))
        g.connect(other)
        mr, qp = g.mr, g.qp
        qp.post_recv([RecvWR(wr_id=i, sg=[SGE(mr.buf + 4096 * i, 4096, mr.lkey)]) for i in range(4)])
        mr.write(struct.pack("<Q", 1000), offset=65536)
        mr.write(READ_DATA, offset=131072)
        _send(f, {"ready": True})
        wc = g.poll_one(poll_timeout)
        assert wc.opcode == WcOpcode.RECV and wc.imm_data == 0x1234, wc
        msg = mr.read(wc.byte_len, 0)
        assert msg == MSG, "SEND payload differs"
        mr.write(msg.upper(), offset=8192)
        qp.post_send(SendWR(wr_id=1, opcode=WrOpcode.SEND, sg=[SGE(mr.buf + 8192, len(msg), mr.lkey)]))
        g.poll_one(poll_timeout)
        _recv(f)
        assert mr.read(len(WRITE_DATA), 262144) == WRITE_DATA, "RDMA WRITE data differs"
        assert struct.unpack("<Q", mr.read(8, 65536))[0] == 7, "atomics left the wrong value"
        _send(f, {"verified": True})
        qp.post_recv(RecvWR(wr_id=50, sg=[SGE(mr.buf + 8192, 64, mr.lkey)]))
        for i in range(iters):
            _poll1(g, poll_timeout)
            qp.post_recv(RecvWR(wr_id=51 + i, sg=[SGE(mr.buf + 8192, 64, mr.lkey)]))
            qp.post_send(SendWR(wr_id=300 + i, opcode=WrOpcode.SEND, sg=[SGE(mr.buf + 16384, 64, mr.lkey)]))
            _poll1(g, poll_timeout)
        _send(f, {"finished": True})
        return {"peer_verified": True}


def garbage(device: str) -> dict:
    """Open the device, then put a descriptor chain whose addresses lie far
    outside guest RAM on the controlq and notify: the daemon must drop this
    guest and nobody else."""
    from guest_lib.transports.virtio_pci import VirtioPciTransport
    from virtio_rdma.constants import CONTROLQ

    # poll-only waits here (interrupts=False): the other tests sleep on INTx
    t = VirtioPciTransport(device.removeprefix("pci:") or "auto", mem_size=8 << 20, interrupts=False)
    bad = 0xDEAD_0000_0000
    t.queues[CONTROLQ].add([(bad, 64)], [(bad + 4096, 64)], "garbage")
    t.notify(CONTROLQ)
    try:
        t.wait_used(CONTROLQ, 2)
        answered = True
    except Exception as e:
        answered = type(e).__name__
    out = {"answered": answered, "counters": dict(t.counters)}
    t.close()
    return out


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "garbage":
        r = garbage(sys.argv[2])
    elif mode == "peer":  # peer DEVICE HOST PORT ITERS: the passive side, e.g. in a second guest
        r = peer(sys.argv[2], (sys.argv[3], int(sys.argv[4])), int(sys.argv[5]), timeout=120)
    else:
        r = active(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 100)
    print("RESULT " + json.dumps(r), flush=True)
