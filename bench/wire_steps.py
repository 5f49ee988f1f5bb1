"""Where a two-host 64 B SEND half round trip spends the daemons' CPU, step by step.

``bench.fabric_bench send_lat`` measures the half round trip end to end (two
daemons, two guests, a veth); this measures what one daemon does on it, in
one process and without scheduling noise: two device cores (the test
driver's guests, ``tests/virtio_rdma/driver.py``: run from a checkout) each
with a :class:`fabric.roce.RoceFabric` whose UDP socket is a real one on the
loopback (:class:`fabric.roce.RoceFabricService`), a connected RC QP pair,
and 64 B inline SENDs ping-ponged between them, as ib_send_lat does. Each
direction is timed in three steps:

* ``send``: a changed doorbell record -> the datagram handed to the kernel
  (``core.poll``: the record scan, ``apply_records`` running
  ``NetworkQp.progress``'s body natively: ``run_wire_sq`` encoding into the
  TX ring (``TxRing.add_msg``), ``sendmmsg``; and, after the datagram left,
  ``run_wire_rq`` handing the engine the receives for the reply);
* ``receive``: the socket polled -> the SEND's CQE in the guest's ring and the
  ACK handed to the kernel (``recvmmsg``, the native fast path, its CQE
  written at once (``wire_settle``) and its ACK put in the TX ring,
  ``sendmmsg``; a QP that cannot be settled at once is pumped after the
  batch: ``wire_pump`` and its ``wire_cqes``);
* ``ack``: the ACK polled -> the send WQE retired.

With ``--parts`` the Python and native functions inside each step are timed
too (each wrapped: a wrapper adds about 0.1-0.3 us to its part, not to the
step totals printed without ``--parts``), those that ran in at least half of
their step's iterations. The ``sendto`` row is the floor
of one datagram: a plain ``socket.sendto`` of 100 bytes on the loopback,
measured in the same run. Medians over the iterations after the first
fifth.

With ``--ab NAME`` one change (see ``AB``) is switched on and off on
alternate round trips of the same run, and each step is reported for both:
an interleaved before/after on a shared machine.

    python -m bench.wire_steps [--iters N] [--parts] [--ab NAME] [--json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import struct
import time

from bench.machine import header as machine_header, machine

A_IP, B_IP, PORT = "127.0.0.41", "127.0.0.42", 47910

#: (module, attribute, label) of the parts timed with --parts
PARTS = (("roce.udp", "RoceUdpEndpoint.flush", "sendmmsg (TX ring flush)"),
         ("roce.udp", "RoceUdpEndpoint._deliver", "receive fast path (_deliver)"),
         ("virtio_rdma.doorbells", "_apply_records", "apply_records (run_wire_sq, run_wire_rq)"),
         ("fabric.roce_qp", "run_wire_sq", "run_wire_sq (with transmit)"),
         ("fabric.roce_qp", "run_wire_rq", "run_wire_rq"),
         ("fabric.roce_qp", "wire_cqes", "wire_cqes"),
         ("fabric.roce_qp", "wire_pump", "wire_pump (pump body: CQEs, packets out)"),
         ("fabric.roce", "wire_settle", "wire_settle (CQEs at once, no pump)"),
         ("roce.udp", "RoceUdpEndpoint.transmit_ack", "ACK into the TX ring (fast path)"),
         ("fabric.roce_qp", "NetworkQp.pump", "NetworkQp.pump"),
         ("fabric.roce_qp", "NetworkQp._post_recvs", "receives to the engine"),
         ("fabric.roce", "RoceFabric.flush_deferred", "deferred pumps"),
         ("fabric.roce", "RoceFabric.transmit", "RoceFabric.transmit"),
         ("fabric.roce", "TxRoute.done", "packets counted, ring flushed (TxRoute.done)"),
         ("roce.rc.responder", "Responder._ack", "ACK built (Responder._ack)"))


def _median(v: list[int]) -> float:
    v = sorted(v[len(v) // 5:])
    return v[len(v) // 2] / 1000 if v else float("nan")


class _Timer:
    """Step totals, and with ``parts`` the time each wrapped part took within the step."""

    def __init__(self, parts: bool):
        self.steps: dict[str, list[int]] = {}
        self.parts: dict[tuple[str, str], list[int]] = {}
        self._acc: dict[str, int] = {}
        self._undo: list = []
        if parts:
            self._wrap_parts()

    def _wrap_parts(self) -> None:
        import importlib

        for modname, path, label in PARTS:
            obj = importlib.import_module(modname)
            *owner, attr = path.split(".")
            for name in owner:
                obj = getattr(obj, name)
            self._undo.append((obj, attr, getattr(obj, attr)))
            setattr(obj, attr, self._wrapped(getattr(obj, attr), label))

    def _wrapped(self, fn, label):
        acc, clock = self._acc, time.perf_counter_ns

        def part(*a, **kw):
            t = clock()
            try:
                return fn(*a, **kw)
            finally:
                acc[label] = acc.get(label, 0) + clock() - t
        return part

    def begin(self) -> int:
        self._acc.clear()
        return time.perf_counter_ns()

    def end(self, step: str, t0: int) -> None:
        self.steps.setdefault(step, []).append(time.perf_counter_ns() - t0)
        for label, ns in self._acc.items():
            self.parts.setdefault((step, label), []).append(ns)
        self._acc.clear()

    def close(self) -> None:
        for obj, attr, fn in reversed(self._undo):
            setattr(obj, attr, fn)


def _sendto_floor(n: int) -> float:
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        a.bind((A_IP, 0))
        b.bind((B_IP, 0))
        b.setblocking(False)
        data, to, ts = bytes(100), b.getsockname(), []
        for _ in range(n):
            t = time.perf_counter_ns()
            a.sendto(data, to)
            ts.append(time.perf_counter_ns() - t)
            b.recv(2048)
        return _median(ts)
    finally:
        a.close()
        b.close()


def _ab_tx_direct(services, on: bool) -> None:
    """The TX ring flushed natively at the end of run_wire_sq
    (``TxRing.flush_direct``), or through the endpoint's Python ``tx_added``."""
    for svc in services:
        svc.endpoint._tx.owner = svc.endpoint if on else None


#: ``--ab NAME``: a change switched on and off on alternate round trips of one
#: run, each step timed separately for each (``NAME on`` / ``NAME off``)
AB = {"tx_direct": _ab_tx_direct}


async def _run(iters: int, parts: bool, port: int = PORT, ab: str | None = None) -> dict:
    from tests.virtio_rdma.driver import fabric_sides, loopback_fabrics
    from verbs import SendFlags, WrOpcode

    async with loopback_fabrics(A_IP, B_IP, port) as (fa, fb, sa, sb):
        # DBREC_POLL, as under --poll-us
        sides = fabric_sides(fa, fb, size=8 << 20, cq=256, mr=4096, dbrec_poll=True,
                             max_send_wr=64, max_recv_wr=64)
        (ga, qa, _, _), (gb, qb, _, _) = sides
        ga.connect(qa, qb.qpn, gid=fb.gid, path_mtu=5)
        gb.connect(qb, qa.qpn, gid=fa.gid, path_mtu=5)
        for g, qp, _, buf in sides:
            for i in range(32):
                g.post_recv(qp, i, [(buf, 0, 64)])
        timer = _Timer(parts)
        try:
            for i in range(iters):
                tag = ""
                if ab is not None:
                    AB[ab]((sa, sb), i % 2 == 0)
                    tag = f" [{ab} {'on' if i % 2 == 0 else 'off'}]"
                for me, peer, svc_me, svc_peer in ((sides[0], sides[1], sa, sb),
                                                   (sides[1], sides[0], sb, sa)):
                    g, qp, cq, _ = me
                    g.write_send_wqe(qp, i, WrOpcode.SEND, inline=bytes(64),
                                     flags=SendFlags.SIGNALED)
                    g.write(qp.dbrec, struct.pack("<II", qp.sq_pi, qp.rq_pi))
                    t = timer.begin()
                    g.core.poll(time.monotonic())
                    timer.end("send" + tag, t)
                    _poll_until(timer, "receive" + tag, svc_peer, peer[0], peer[2])
                    peer[0].post_recv(peer[1], i, [(peer[3], 0, 64)])
                    _poll_until(timer, "ack" + tag, svc_me, g, cq)
        finally:
            timer.close()
    # a part that ran in fewer than half of its step's iterations (the first receives
    # handed over in one go, ...) is not part of the typical step: left out
    return {"steps": {k: _median(v) for k, v in timer.steps.items()},
            "parts": {f"{s}: {p}": _median(v) for (s, p), v in timer.parts.items()
                      if 2 * len(v) >= len(timer.steps[s])}}


def _poll_until(timer: _Timer, step: str, svc, g, cq) -> None:
    """Poll ``svc``'s socket until ``g`` finds a CQE on ``cq``; time the poll that brought it."""
    for _ in range(10_000_000):
        t = timer.begin()
        if svc.poll():
            timer.end(step, t)
            if g.poll(cq):
                return
    raise RuntimeError(f"no completion for the {step} step")


def run(iters: int = 3000, parts: bool = False, port: int = PORT, ab: str | None = None) -> dict:
    """The steps' medians (and the parts' with ``parts``), the sendto floor, the machine."""
    out = asyncio.run(_run(iters, parts, port, ab))
    out["sendto"] = _sendto_floor(max(1000, iters))
    out["machine"] = machine()
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=3000)
    ap.add_argument("--parts", action="store_true", help="time the parts of each step too")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--port", type=int, default=PORT, help="UDP port of both fabrics")
    ap.add_argument("--ab", choices=sorted(AB), default=None,
                    help="time a change on and off on alternate round trips (same run)")
    args = ap.parse_args(argv)
    out = run(args.iters, args.parts, args.port, args.ab)
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(machine_header(out["machine"]))
    print(f"# 64 B SEND, in-process, one daemon's steps (medians, us); {args.iters} round trips")
    for k, v in out["steps"].items():
        print(f"{k:60} {v:8.2f}")
    for k, v in sorted(out["parts"].items()):
        print(f"  {k:58} {v:8.2f}")
    print(f"{'floor: one sendto of 100 B on the loopback':60} {out['sendto']:8.2f}")


if __name__ == "__main__":
    main()
