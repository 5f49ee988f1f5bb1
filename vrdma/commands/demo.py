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

``--hosts N`` (N >= 2, root): N hosts in network namespaces on one bridge
(:mod:`vrdma.lab`), host0 without accelerators, a daemon on each with every
other host as a peer; a guest on each submits FFT and Turbo decode jobs
through the verbs-shaped AQ layer (some forced to another host), checks each
result against accel_core, and the demo prints where each job ran and how
long it waited, then each daemon's scheduler: its policy (``board``: one
RDMA READ of the load board host0 holds, one FETCH_ADD announcing each job
sent), its decisions and reads, and the load rows it took from the others'
authenticated datagrams.
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
    p.add_argument("--hosts", type=int, default=1, metavar="N",
                   help="N >= 2: N hosts in network namespaces (host0 without accelerators), a "
                        "daemon on each linked to the others over RoCEv2, a guest on each "
                        "submitting FFT and Turbo jobs; prints where each job ran and how long it "
                        "waited (needs root)")


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


# ------------------------------------------------------------------ --hosts N
_FFT_N, _FFT_B, _K = 2048, 16, 6144


def _cluster_guest(i: int, sock: str, forced: int, out) -> None:
    """Host ``i``'s guest: FFT jobs (its device places them), FFT jobs forced to
    host id ``forced``, Turbo decode jobs; each result checked against accel_core
    run here. Puts (i, rows, error): rows (wr_id, op, host id, wait us, service us)."""
    rows: list[tuple] = []
    try:
        import numpy as np

        import accel_core
        from guest_lib import CQ, MR, PD, SGE, Context
        from guest_lib.aq import AQ, AccelWR
        from guest_lib.cq import AccelWC
        from verbs import Access
        from virtio_rdma.constants import AccelOp, AccelStatus, AqFlags

        rng = np.random.default_rng(1000 + i)
        with Context(sock, mem_size=64 << 20, timeout=60) as ctx:
            pd, cq = PD(ctx), CQ(ctx, 256)
            x = (rng.standard_normal((_FFT_B, _FFT_N)) + 1j * rng.standard_normal((_FFT_B, _FFT_N))
                 ).astype(np.complex64)
            bits = rng.integers(0, 2, (1, _K), dtype=np.uint8)
            coded = accel_core.turbo_encode(bits).astype(np.float32)
            llr = ((1 - 2 * coded) * 2.0 + rng.normal(0, 1.0, coded.shape)).astype(np.float32)
            fin, lin = MR(pd, x.nbytes, Access.LOCAL_WRITE), MR(pd, llr.nbytes, Access.LOCAL_WRITE)
            fin.write(x.tobytes())
            lin.write(llr.tobytes())
            plan = [(AQ(pd, cq, AccelOp.FFT), 4), (AQ(pd, cq, AccelOp.TURBO_DECODE), 2)]
            if forced:
                plan.append((AQ(pd, cq, AccelOp.FFT, flags=AqFlags.FORCE_TARGET, target_host=forced), 2))
            outs: dict[int, tuple] = {}
            wr = 0
            for q, n in plan:
                for _ in range(n):
                    fft = q.op is AccelOp.FFT
                    size = x.nbytes if fft else _K + 1
                    o = MR(pd, size, Access.LOCAL_WRITE)
                    src = fin if fft else lin
                    q.post(AccelWR(wr_id=wr, size=_FFT_N if fft else _K, batch=_FFT_B if fft else 1,
                                   iterations=0 if fft else 8, inputs=[SGE(src.buf, src.length, src.lkey)],
                                   outputs=[SGE(o.buf, size, o.lkey)]))
                    outs[wr] = (q.op, o)
                    wr += 1
            want_fft = accel_core.fft(x).tobytes()
            want_bits, want_used = accel_core.turbo_decode(llr, iterations=8)
            want_its = int(np.asarray(want_used).reshape(-1)[0])
            done = 0
            deadline = time.monotonic() + 60
            while done < wr:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{wr - done} of {wr} jobs did not complete")
                _, wcs = cq.poll(16)
                if not wcs:
                    time.sleep(0.001)
                for w in wcs:
                    if not isinstance(w, AccelWC):
                        raise RuntimeError(f"a verbs completion on the jobs' CQ: {w!r}")
                    done += 1
                    op, o = outs[w.wr_id]
                    if w.accel_status is not AccelStatus.SUCCESS:
                        raise RuntimeError(f"job {w.wr_id} ({op.name}) completed {w.accel_status!r}")
                    if op is AccelOp.FFT:
                        assert o.read(x.nbytes) == want_fft, "FFT result differs from accel_core's"
                    else:
                        got = o.read(_K + 1)
                        assert got[:_K] == want_bits.tobytes() and got[_K] == want_its, \
                            "Turbo decode result differs from accel_core's"
                    rows.append((w.wr_id, op.name, w.host, w.wait_us, w.service_us))
        out.put((i, sorted(rows), None))
    except BaseException as e:
        out.put((i, rows, f"{type(e).__name__}: {e}"))


def run_hosts(n: int) -> int:
    import tempfile

    from vrdma import lab

    why = lab.available()
    if why:
        print(f"vrdma demo --hosts {n}: cannot run here: {why}", file=sys.stderr)
        return 2
    import os

    from roce.auth import write_key_file

    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vrdma-demo-") as tmp:
        key = os.path.join(tmp, "cluster.key")
        write_key_file(key)
        specs = [lab.HostSpec("none" if i == 0 else "fft=1,turbo=1",
                              extra=("--cluster-key", key, "--load-period", "0.2",
                                     "--metrics-file", os.path.join(tmp, f"host{i}.json")))
                 for i in range(n)]
        return _run_cluster(lab, specs, tmp, n, t0)


def _run_cluster(lab, specs, tmp: str, n: int, t0: float) -> int:
    import json
    import os

    with lab.LabCluster(specs, tmp) as c:
        for h in c.hosts:
            print(f"vrdma demo: {h.name} {h.ip} in namespace {h.ns.name}: vrdma backend pid "
                  f"{h.proc.popen.pid}, accelerators {h.spec.accelerators}, peers {', '.join(h.peers)}")
        c.wait_linked()
        print(f"vrdma demo: every daemon linked to every other over RoCEv2 ({time.monotonic() - t0:.1f} s)")
        ctx = mp.get_context("fork")
        out = ctx.Queue()
        procs = []
        for h in c.hosts:
            nxt = next(j for j in [*range(h.index + 1, n), *range(h.index)] if c.hosts[j].spec.ops())
            p = ctx.Process(target=_cluster_guest, args=(h.index, h.sock, c.host_id(h.index, nxt), out))
            p.start()
            procs.append(p)
        results = [out.get(timeout=180) for _ in procs]
        for p in procs:
            p.join(10)
        failed = False
        for i, rows, err in sorted(results):
            h = c.hosts[i]
            print(f"\n{h.name} ({h.ip}, accelerators {h.spec.accelerators}): its guest's jobs")
            print(f"  {'job':>3}  {'op':<13} {'ran on':<22} {'wait us':>8} {'service us':>10}")
            for wr_id, op, host, wait, service in rows:
                ran = c.ran_on(i, host)
                print(f"  {wr_id:>3}  {op:<13} {ran.name + ' ' + ran.ip:<22} {wait:>8} {service:>10}")
            if err:
                print(f"  FAILED: {err}")
                failed = True
        for h in c.hosts:
            h.stop()
        print("\nvrdma demo: the daemons' schedulers (vrdma backend --metrics-file)")
        for h in c.hosts:
            try:
                with open(os.path.join(tmp, f"host{h.index}.json")) as f:
                    m = json.load(f)
            except (OSError, ValueError) as e:
                print(f"  {h.name}: no metrics: {e}")
                failed = True
                continue
            s = m["peering"]["scheduler"]
            lt = m["load_table"] or {}
            ls = lt.get("listener", {})
            refused = sum(v for k, v in ls.items() if k not in ("received", "accepted", "own"))
            sent = lt.get("announcer", {}).get("sent", 0)
            reads = f"{s['reads'] / s['decisions']:.1f} READs/decision" if s["decisions"] else "no READs"
            print(f"  {h.name}: policy {s['policy']}: {s['decisions']} decisions ({s['local']} here, "
                  f"{s['remote']} remote; {reads}, {s['reads_failed']} failed); load rows sent "
                  f"{sent}, taken {ls.get('accepted', 0)}, refused {refused}")
            for host, t in sorted(s["transfer"].items()):
                print(f"      to {c.ran_on(h.index, int(host)).name}: {t['latency_us']} us one way "
                      f"(READ round trips), {t['mb_per_s']} MB/s (remote jobs)")
        if failed:
            return 1
        print(f"\nvrdma demo: {sum(len(r) for _, r, _ in results)} jobs on {n} hosts, every result equal to "
              f"accel_core's ({time.monotonic() - t0:.1f} s)")
    return 0


def run(args) -> int:
    if args.hosts >= 2:
        return run_hosts(args.hosts)
    if args.hosts != 1:
        print(f"vrdma demo: --hosts {args.hosts}: give 1 (one host) or at least 2", file=sys.stderr)
        return 2
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
        print("vrdma demo: (`vrdma demo --hosts 3` runs three hosts in network namespaces, jobs "
              "shipped between their daemons over RDMA)")
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
