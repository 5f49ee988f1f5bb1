"""Driver and device in two processes: memfd guest memory and eventfds passed with
SCM_RIGHTS (as vhost-user does), vring addresses given as frontend virtual addresses,
10k requests each answered by the device."""
import gc
import json
import os
import select
import socket
import traceback

import pytest

from virtio.memory import GuestMemory, MemoryRegion, live_mappings, proc_maps_count
from virtio.split import DeviceQueue, DriverQueue

N = 10_000
QSIZE = 256
INFLIGHT = 64
GPA = 0x4000_0000
SIZE = 1 << 20
RING = GPA
DATA = GPA + 0x10000
NAME = "vrdma-test-xproc"
WAIT_MS = 10_000          # hang guard only: a stuck peer fails the test instead of blocking it


def _device(sock) -> int:
    msg, fds, _, _ = socket.recv_fds(sock, 4096, 3)
    info = json.loads(msg)
    memfd, kick, call = fds
    mem = GuestMemory([MemoryRegion.from_fd(memfd, gpa=info["gpa"], size=info["size"], uva=info["uva"])])
    os.close(memfd)                    # the mapping stays valid
    size = info["qsize"]
    q = DeviceQueue(0, size, mem.uva_to_gpa(info["desc"], 16 * size), mem.uva_to_gpa(info["avail"], 6 + 2 * size),
                    mem.uva_to_gpa(info["used"], 6 + 8 * size), event_idx=info["event_idx"])
    poll = select.poll()
    poll.register(kick, select.POLLIN)
    done = calls = wakeups = 0
    while done < info["n"]:
        chains = q.pop_many(mem, 64)
        if chains:
            items = []
            for ch in chains:
                req = int.from_bytes(ch.read(), "little")
                ch.write((2 * req + 1).to_bytes(8, "little"))
                items.append((ch, 8))
            q.push_many(mem, items)
            done += len(chains)
            if q.should_notify(mem):
                os.eventfd_write(call, 1)
                calls += 1
            continue
        if q.enable_notification(mem):
            continue
        if not poll.poll(WAIT_MS):
            return 3
        os.eventfd_read(kick)
        wakeups += 1
        q.disable_notification(mem)
    sock.send(json.dumps({"calls": calls, "wakeups": wakeups, "done": done}).encode())
    mem.close()
    return 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("event_idx", [False, True])
def test_cross_process_10k_requests(event_idx):
    gc.collect()
    base = (live_mappings(), proc_maps_count(f"memfd:{NAME}"))
    region = MemoryRegion.memfd(SIZE, gpa=GPA, name=NAME, hugetlb=False)
    mem = GuestMemory([region])
    drv = DriverQueue(mem, 0, QSIZE, RING, event_idx=event_idx)
    kick = os.eventfd(0, os.EFD_CLOEXEC)
    call = os.eventfd(0, os.EFD_CLOEXEC)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:                                    # device process
        rc = 2
        try:
            a.close()
            rc = _device(b)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(rc)
    try:
        b.close()
        base_uva = region.uva - GPA
        info = dict(gpa=GPA, size=SIZE, uva=region.uva, qsize=QSIZE, event_idx=event_idx, n=N,
                    desc=base_uva + drv.desc_gpa, avail=base_uva + drv.avail_gpa, used=base_uva + drv.used_gpa)
        socket.send_fds(a, [json.dumps(info).encode()], [region.fd, kick, call])
        poll = select.poll()
        poll.register(call, select.POLLIN)
        slots = list(range(INFLIGHT))
        sent = got = kicks = sleeps = 0
        while got < N:
            added = False
            while slots and sent < N:
                s = slots.pop()
                mem.write(DATA + 16 * s, sent.to_bytes(8, "little"))
                drv.add([(DATA + 16 * s, 8)], [(DATA + 16 * s + 8, 8)], (sent, s))
                sent += 1
                added = True
            # a driver only asks whether to notify after it made buffers available
            if added and drv.kick_needed():
                os.eventfd_write(kick, 1)
                kicks += 1
            used = drv.get_used()
            if used is None:
                if drv.enable_cb():
                    continue
                assert poll.poll(WAIT_MS), f"device stopped answering after {got} replies"
                os.eventfd_read(call)
                sleeps += 1
                continue
            (i, s), n = used
            assert n == 8
            assert int.from_bytes(mem.read(DATA + 16 * s + 8, 8), "little") == 2 * i + 1
            slots.append(s)
            got += 1
        stats = json.loads(a.recv(4096))
        print(f"event_idx={event_idx}: {N} requests, {kicks} kicks, {stats['calls']} calls, "
              f"{stats['wakeups']} device wakeups, {sleeps} driver sleeps")
        assert stats["done"] == N
        assert 1 <= kicks <= N and stats["calls"] <= N
        assert drv.num_free == QSIZE and drv.avail_idx == N & 0xFFFF
    finally:
        _, status = os.waitpid(pid, 0)
        a.close()
        os.close(kick)
        os.close(call)
        mem.close()
    assert os.waitstatus_to_exitcode(status) == 0
    gc.collect()
    assert (live_mappings(), proc_maps_count(f"memfd:{NAME}")) == base
