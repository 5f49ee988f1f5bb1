"""``vrdma demo``: the main job, end to end, with nothing to set up.

Starts the back-end daemon, then two guest processes that each open the
virtio-rdma device through guest_lib, connect RC queue pairs out of band,
exchange messages (SEND/RECV with immediate data), RDMA WRITE and READ,
run both atomics, verify every byte; then each guest hands accelerator jobs
to its device (the client FFTs and inverse FFTs, the server LTE Turbo
encodes and decodes, through guest_lib.accel) and checks every result
against accel_core called in the guest itself; and finish with a
perftest-style summary (64-byte send latency, RDMA WRITE bandwidth) against
floors measured in the same run.
"""
from __future__ import annotations

import multiprocessing as mp
import struct
import sys
import time

NAME = "demo"
HELP = ("start a back-end and two guests: connect QPs, SEND, WRITE, READ, atomics, FFT and Turbo jobs "
        "on the device's accelerators, verify, perftest summary")


def add_arguments(p) -> None:
    p.add_argument("--iters", type=int, default=1000, help="iterations of the latency summary")
    p.add_argument("--no-perf", action="store_true", help="skip the perftest summary")


def _guest(role: str, path: str, conn, out) -> None:
    from guest_lib import SGE, RecvWR, SendWR
    from verbs import WcOpcode, WrOpcode
    from vrdma.perftest import make_guest

    log = []
    try:
        g = make_guest(path, 1 << 20)
        conn.send(g.info())
        peer = conn.recv()
        g.connect(peer)
        log.append(f"{role}: QP {g.qp.qp_num:#x} connected to QP {peer['qpn']:#x} (GID {g.gid})")
        mr = g.mr
        if role == "server":
            g.qp.post_recv([RecvWR(wr_id=i, sg=[SGE(mr.buf + 4096 * i, 4096, mr.lkey)]) for i in range(4)])
            mr.write(struct.pack("<Q", 1000), offset=65536)  # atomic target
            mr.write(b"server's data for READ " * 100, offset=131072)
            conn.send("ready")
            wc = g.poll_one()
            msg = mr.read(wc.byte_len, 0)
            assert wc.opcode == WcOpcode.RECV and wc.imm_data == 0x1234, wc
            log.append(f"server: received {wc.byte_len} bytes with imm 0x{wc.imm_data:x}: {msg[:24]!r}...")
            mr.write(msg.upper(), offset=8192)
            g.qp.post_send(SendWR(wr_id=1, opcode=WrOpcode.SEND, sg=[SGE(mr.buf + 8192, len(msg), mr.lkey)]))
            g.poll_one()
            conn.recv()  # client finished its one-sided operations
            written = mr.read(256 * 1024, 262144)
            assert written == bytes(range(256)) * 1024, "RDMA WRITE data mismatch"
            counter = struct.unpack("<Q", mr.read(8, 65536))[0]
            assert counter == 7, counter
            log.append("server: verified 256 KiB written by RDMA WRITE and the atomics' result (7)")
            conn.send("verified")
        else:
            g.qp.post_recv(RecvWR(wr_id=9, sg=[SGE(mr.buf + 4096, 4096, mr.lkey)]))
            conn.recv()
            msg = b"hello from the client guest over virtio-rdma " * 20
            mr.write(msg)
            g.qp.post_send(SendWR(wr_id=1, opcode=WrOpcode.SEND_WITH_IMM, sg=[SGE(mr.buf, len(msg), mr.lkey)],
                                  imm_data=0x1234))
            wcs = [g.poll_one(), g.poll_one()]
            reply = next(w for w in wcs if w.opcode == WcOpcode.RECV)
            assert mr.read(reply.byte_len, 4096) == msg.upper()
            log.append(f"client: SEND done; reply of {reply.byte_len} bytes verified")
            mr.write(bytes(range(256)) * 1024, offset=262144)
            g.qp.post_send(SendWR(wr_id=2, opcode=WrOpcode.RDMA_WRITE,
                                  sg=[SGE(mr.buf + 262144, 262144, mr.lkey)],
                                  remote_addr=peer["addr"] + 262144, rkey=peer["rkey"]))
            g.poll_one()
            g.qp.post_send(SendWR(wr_id=3, opcode=WrOpcode.RDMA_READ,
                                  sg=[SGE(mr.buf + 600000, 2300, mr.lkey)],
                                  remote_addr=peer["addr"] + 131072, rkey=peer["rkey"]))
            g.poll_one()
            assert mr.read(2300, 600000) == (b"server's data for READ " * 100)[:2300]
            log.append("client: RDMA WRITE 256 KiB done; RDMA READ 2300 bytes verified")
            g.qp.post_send(SendWR(wr_id=4, opcode=WrOpcode.ATOMIC_FETCH_AND_ADD,
                                  sg=[SGE(mr.buf + 700000, 8, mr.lkey)],
                                  remote_addr=peer["addr"] + 65536, rkey=peer["rkey"], compare_add=5))
            g.poll_one()
            old = struct.unpack("<Q", mr.read(8, 700000))[0]
            g.qp.post_send(SendWR(wr_id=5, opcode=WrOpcode.ATOMIC_CMP_AND_SWP,
                                  sg=[SGE(mr.buf + 700008, 8, mr.lkey)],
                                  remote_addr=peer["addr"] + 65536, rkey=peer["rkey"],
                                  compare_add=1005, swap=7))
            g.poll_one()
            old2 = struct.unpack("<Q", mr.read(8, 700008))[0]
            assert (old, old2) == (1000, 1005), (old, old2)
            log.append("client: FETCH_AND_ADD(+5) saw 1000, CMP_AND_SWP(1005 -> 7) saw 1005")
            conn.send("done")
            conn.recv()
        log.extend(_accel_jobs(role, g.ctx))
        g.close()
        out.put((role, log, None))
    except BaseException as e:
        out.put((role, log, f"{type(e).__name__}: {e}"))


def _accel_jobs(role: str, ctx) -> list[str]:
    """Accelerator jobs through the device (guest_lib.accel), each result checked
    against accel_core run here: FFT within float tolerances, Turbo bit-exact."""
    import numpy as np

    import accel_core
    from guest_lib import accel

    rng = np.random.default_rng(14 if role == "client" else 36212)
    log = []
    if role == "client":
        x = (rng.standard_normal((16, 2048)) + 1j * rng.standard_normal((16, 2048))).astype(np.complex64)
        t = time.perf_counter()
        y = accel.fft(ctx, x)
        z = accel.ifft(ctx, y)
        dt = time.perf_counter() - t
        np.testing.assert_allclose(y, accel_core.fft(x), rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(z, x, rtol=1e-4, atol=1e-4)
        log.append(f"client: device FFT + inverse FFT of 16 x 2048 complex64 ({dt * 1e3:.1f} ms) equal "
                   "accel_core's; the round trip gives the input back")
    else:
        k = 6144
        bits = rng.integers(0, 2, (4, k), dtype=np.uint8)
        t = time.perf_counter()
        coded = accel.turbo_encode(ctx, bits)
        assert np.array_equal(coded, accel_core.turbo_encode(bits)), "Turbo encode mismatch"
        noise = rng.normal(0, 1.5, coded.shape).astype(np.float32)
        llr = (1.0 - 2.0 * coded.astype(np.float32)) * 4.0 + noise
        decoded, used = accel.turbo_decode(ctx, llr, iterations=8)
        dt = time.perf_counter() - t
        want, want_used = accel_core.turbo_decode(llr, iterations=8)
        assert np.array_equal(decoded, want) and np.array_equal(used, want_used), "Turbo decode mismatch"
        errors = int((decoded != bits).sum())
        log.append(f"server: device Turbo encode + decode of 4 blocks of K={k} ({dt * 1e3:.1f} ms) "
                   f"bit-exact with accel_core; {errors} bit errors after {list(map(int, used))} iterations")
    return log


def run(args) -> int:
    from vhost_user.testing import DaemonProcess
    from vrdma.perftest import print_rows, run_pair

    t0 = time.monotonic()
    with DaemonProcess() as d:
        print(f"vrdma demo: back-end daemon pid {d.proc.pid} listening on {d.path}")
        ctx = mp.get_context("fork")
        a, b = ctx.Pipe()
        out = ctx.Queue()
        procs = [ctx.Process(target=_guest, args=(r, d.path, c, out))
                 for r, c in (("server", a), ("client", b))]
        for p in procs:
            p.start()
        failed = False
        results = []
        for _ in procs:
            results.append(out.get(timeout=120))
            if results[-1][2]:
                break  # e.g. the daemon died: the other guest may wait on the pipe for ever
        for p in procs:
            p.join(10 if len(results) == len(procs) else 0)
            if p.is_alive():
                p.kill()
                p.join()
        for role, log, err in sorted(results):
            for line in log:
                print("  " + line)
            if err:
                print(f"  {role}: FAILED: {err}")
                failed = True
        if failed:
            return 1
        print(f"vrdma demo: all data verified ({time.monotonic() - t0:.1f} s)")
        if not args.no_perf:
            print("\nperftest-style summary (each against a floor measured now):")
            from vrdma.perftest import eventfd_floor, memcpy_floor

            lat = run_pair(d.path, "send_lat", 64, args.iters)
            lat["floor_eventfd_half_rtt_us"] = eventfd_floor(2000)["t_typical"]
            lat["ratio_vs_floor"] = lat["t_typical"] / lat["floor_eventfd_half_rtt_us"]
            print_rows("send_lat", [lat])
            bw = run_pair(d.path, "write_bw", 1 << 20, 128, 16)
            fl = memcpy_floor(1 << 20)
            bw["floor_memcpy_MiB"] = fl["bw_avg_MiB"]
            bw["ratio_vs_memcpy"] = bw["bw_avg_MiB"] / fl["bw_avg_MiB"]
            print_rows("write_bw", [bw])
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run(None))
