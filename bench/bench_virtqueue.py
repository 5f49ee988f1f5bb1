"""Split virtqueue micro-benchmarks: the Cython hot path against a struct.unpack_from baseline.

Measured in the same run on the same rings (one memfd region):

* device pop+push of a 3-descriptor chain (2 readable + 1 writable), one chain at a time;
* device pop_many+push_many of the same chains, 64 per batch;
* driver add+get_used of 3-buffer chains;
* a full in-process round trip (driver add, device pop+push, driver get_used).

The baseline is a pure-Python split ring with the same checks (avail idx window, head and
next bounds, loop / length limit, WRITE ordering, buffer inside one region) using
struct.unpack_from / pack_into on memoryviews; it resolves buffers to (region, offset)
like the Cython side and, like it, creates no per-buffer memoryviews.

    .venv/bin/python bench/bench_virtqueue.py [--rounds 200] [--batch 128] [--json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from virtio.memory import GuestMemory, MemoryRegion  # noqa: E402
from virtio.split import DeviceQueue, DriverQueue, device_queue_for  # noqa: E402

QSIZE = 512
RING = 0x1000
DATA = 0x100000
_H = struct.Struct("<H")
_DESC = struct.Struct("<QIHH")
_ELEM = struct.Struct("<II")


class PyRegions:
    def __init__(self, mem: GuestMemory):
        self.regions = [(r.gpa, r.size, r.view) for r in mem.regions()]

    def translate(self, gpa: int, n: int):
        for i, (g, size, _) in enumerate(self.regions):
            if g <= gpa and gpa + n <= g + size:
                return i, gpa - g
        raise ValueError(f"gpa {gpa:#x} len {n} outside memory")

    def view(self, gpa: int, n: int):
        i, off = self.translate(gpa, n)
        return self.regions[i][2], off


class PyDeviceQueue:
    """Baseline device side: the same validation as DeviceQueue, with struct."""

    def __init__(self, mem, size, desc, avail, used):
        self.r = PyRegions(mem)
        self.size = size
        self.dmv, self.doff = self.r.view(desc, 16 * size)
        self.amv, self.aoff = self.r.view(avail, 6 + 2 * size)
        self.umv, self.uoff = self.r.view(used, 6 + 8 * size)
        self.last_avail = 0
        self.used = _H.unpack_from(self.umv, self.uoff + 2)[0]

    def pop(self):
        size = self.size
        idx = _H.unpack_from(self.amv, self.aoff + 2)[0]
        if idx == self.last_avail:
            return None
        if (idx - self.last_avail) & 0xFFFF > size:
            raise ValueError("avail idx ahead")
        head = _H.unpack_from(self.amv, self.aoff + 4 + 2 * (self.last_avail % size))[0]
        if head >= size:
            raise ValueError("head")
        segs = []
        i, steps, seen_write = head, 0, False
        while True:
            steps += 1
            if steps > size:
                raise ValueError("loop")
            addr, length, flags, nxt = _DESC.unpack_from(self.dmv, self.doff + 16 * i)
            if flags & 4:
                raise ValueError("indirect not handled by the baseline")
            if flags & 2:
                seen_write = True
            elif seen_write:
                raise ValueError("order")
            segs.append((addr, length, flags, self.r.translate(addr, length)))
            if not flags & 1:
                break
            if nxt >= size:
                raise ValueError("next")
            i = nxt
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        return head, segs

    def push(self, head, written):
        _ELEM.pack_into(self.umv, self.uoff + 4 + 8 * (self.used % self.size), head, written)
        self.used = (self.used + 1) & 0xFFFF
        _H.pack_into(self.umv, self.uoff + 2, self.used)


class PyDriverQueue:
    """Baseline driver side with struct (free list and tokens in Python lists)."""

    def __init__(self, mem, size, base):
        from virtio.constants import split_ring_layout
        r = PyRegions(mem)
        self.size = size
        self.desc, self.avail, self.used, total = split_ring_layout(size, base)
        self.dmv, self.doff = r.view(self.desc, 16 * size)
        self.amv, self.aoff = r.view(self.avail, 6 + 2 * size)
        self.umv, self.uoff = r.view(self.used, 6 + 8 * size)
        mv, off = r.view(base, total)
        mv[off:off + total] = bytes(total)
        self.next = list(range(1, size + 1))
        self.ndesc = [0] * size
        self.tokens = [None] * size
        self.free_head, self.num_free, self.avail_idx, self.last_used = 0, size, 0, 0

    def add(self, outs, ins, token):
        bufs = [(g, n, 0) for g, n in outs] + [(g, n, 2) for g, n in ins]
        if len(bufs) > self.num_free:
            raise RuntimeError("full")
        head = idx = self.free_head
        for k, (g, n, f) in enumerate(bufs):
            last = k + 1 == len(bufs)
            _DESC.pack_into(self.dmv, self.doff + 16 * idx, g, n, f | (0 if last else 1),
                            0 if last else self.next[idx])
            idx = self.next[idx]
        self.free_head = idx
        self.ndesc[head] = len(bufs)
        self.num_free -= len(bufs)
        self.tokens[head] = token
        _H.pack_into(self.amv, self.aoff + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        _H.pack_into(self.amv, self.aoff + 2, self.avail_idx)
        return head

    def get_used(self):
        idx = _H.unpack_from(self.umv, self.uoff + 2)[0]
        if idx == self.last_used:
            return None
        head, length = _ELEM.unpack_from(self.umv, self.uoff + 4 + 8 * (self.last_used % self.size))
        if head >= self.size or self.tokens[head] is None:
            raise ValueError("bad head")
        tail = head
        for _ in range(self.ndesc[head] - 1):
            tail = self.next[tail]
        self.next[tail] = self.free_head
        self.free_head = head
        self.num_free += self.ndesc[head]
        token, self.tokens[head] = self.tokens[head], None
        self.last_used = (self.last_used + 1) & 0xFFFF
        return token, length


def chain(i):
    base = DATA + 64 * i
    return [(base, 16), (base + 16, 16)], [(base + 32, 32)]


def measure(fn, rounds, batch):
    """Median ns per chain over `rounds` calls of fn(), each processing `batch` chains."""
    samples = [fn() / batch for _ in range(rounds)]
    return statistics.median(samples)


def run(rounds: int, batch: int) -> list[dict]:
    mem = GuestMemory([MemoryRegion.memfd(4 << 20, gpa=0, name="vrdma-bench", hugetlb="auto")])
    pc = time.perf_counter_ns
    results = []

    # -- device side: the same DriverQueue feeds both devices -----------------------------------
    drv = DriverQueue(mem, 0, QSIZE, RING)
    cy_dev = device_queue_for(drv)
    py_dev = PyDeviceQueue(mem, QSIZE, drv.desc_gpa, drv.avail_gpa, drv.used_gpa)

    def fill():
        for i in range(batch):
            outs, ins = chain(i)
            drv.add(outs, ins, i)

    def drain():
        while drv.get_used() is not None:
            pass

    def cy_one():
        fill()
        t = pc()
        for _ in range(batch):
            c = cy_dev.pop(mem)
            cy_dev.push(mem, c, 32)
        dt = pc() - t
        drain()
        return dt

    def cy_batch():
        fill()
        t = pc()
        while True:
            cs = cy_dev.pop_many(mem, 64)
            if not cs:
                break
            cy_dev.push_many(mem, [(c, 32) for c in cs])
        dt = pc() - t
        drain()
        return dt

    def py_one():
        fill()
        t = pc()
        for _ in range(batch):
            head, _segs = py_dev.pop()
            py_dev.push(head, 32)
        dt = pc() - t
        drain()
        return dt

    # the two devices must agree on the ring state: run them in lock-step rounds
    def sync_py():
        py_dev.last_avail, py_dev.used = cy_dev.last_avail_idx, cy_dev.used_idx

    def sync_cy():
        cy_dev.last_avail_idx, cy_dev.used_idx = py_dev.last_avail, py_dev.used

    samples = {"cy_one": [], "cy_batch": [], "py_one": []}
    for _ in range(rounds):
        samples["cy_one"].append(cy_one() / batch)
        sync_py()
        samples["py_one"].append(py_one() / batch)
        sync_cy()
        samples["cy_batch"].append(cy_batch() / batch)
        sync_py()
    base = statistics.median(samples["py_one"])
    for name, key in [("device pop+push (3-desc chain)", "cy_one"),
                      ("device pop_many+push_many (64/batch)", "cy_batch")]:
        v = statistics.median(samples[key])
        results.append(dict(name=name, ns_per_chain=v, baseline_ns=base, speedup=base / v))

    # -- driver side: the same Cython device serves both drivers --------------------------------
    cy_drv = DriverQueue(mem, 1, QSIZE, 0x20000)
    dev1 = device_queue_for(cy_drv)
    py_drv = PyDriverQueue(mem, QSIZE, 0x30000)
    dev2 = DeviceQueue(2, QSIZE, py_drv.desc, py_drv.avail, py_drv.used)
    bufs = [chain(i) for i in range(batch)]

    def drv_round(d, dev):
        t = pc()
        for i in range(batch):
            d.add(bufs[i][0], bufs[i][1], i)
        dt = pc() - t
        dev.push_many(mem, [(c, 32) for c in dev.pop_many(mem, batch)])
        t = pc()
        for _ in range(batch):
            d.get_used()
        return dt + pc() - t

    cy = measure(lambda: drv_round(cy_drv, dev1), rounds, batch)
    py = measure(lambda: drv_round(py_drv, dev2), rounds, batch)
    results.append(dict(name="driver add+get_used (3 bufs)", ns_per_chain=cy, baseline_ns=py, speedup=py / cy))

    # -- full round trip, both sides -------------------------------------------------------------
    def rt_cy():
        t = pc()
        for i in range(batch):
            cy_drv.add(bufs[i][0], bufs[i][1], i)
            c = dev1.pop(mem)
            dev1.push(mem, c, 32)
            cy_drv.get_used()
        return pc() - t

    def rt_py():
        t = pc()
        for i in range(batch):
            py_drv.add(bufs[i][0], bufs[i][1], i)
            head, _ = py_dev2.pop()
            py_dev2.push(head, 32)
            py_drv.get_used()
        return pc() - t

    py_dev2 = PyDeviceQueue(mem, QSIZE, py_drv.desc, py_drv.avail, py_drv.used)
    py_dev2.last_avail, py_dev2.used = dev2.last_avail_idx, dev2.used_idx
    cy = measure(rt_cy, rounds, batch)
    py = measure(rt_py, rounds, batch)
    results.append(dict(name="round trip add/pop/push/get_used", ns_per_chain=cy, baseline_ns=py,
                        speedup=py / cy))
    mem.close()
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a = ap.parse_args(argv)
    if not 1 <= a.batch <= QSIZE // 3:
        ap.error(f"--batch must be in 1..{QSIZE // 3}")
    res = run(a.rounds, a.batch)
    if a.json:
        print(json.dumps({"rounds": a.rounds, "batch": a.batch, "results": res}, indent=2))
        return
    print(f"{'benchmark':40s} {'vrdma ns':>10s} {'struct ns':>10s} {'speedup':>8s}")
    for r in res:
        print(f"{r['name']:40s} {r['ns_per_chain']:10.0f} {r['baseline_ns']:10.0f} {r['speedup']:7.1f}x")
    print(f"(median of {a.rounds} rounds of {a.batch} chains; baseline = pure-Python struct.unpack_from "
          "split ring with the same checks, same run)")


if __name__ == "__main__":
    main()
