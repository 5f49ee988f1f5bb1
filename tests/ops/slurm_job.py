"""The work of one Slurm job of tests/ops/test_slurm.py: two guests on the job's private
daemon ($VRDMA_SOCKET) do RDMA WRITEs and accelerator jobs; prints one JSON line with what
the daemon's admin socket said."""
from __future__ import annotations

import json
import os

import numpy as np

import accel_core
from guest_lib import SGE, accel
from guest_lib.endpoint import RcEndpoint, connect_pair
from guest_lib.wr import SendWR
from verbs import SendFlags, WcStatus, WrOpcode
from vrdma.ops.admin import AdminClient


def main() -> None:
    sock = os.environ["VRDMA_SOCKET"]
    a, z = RcEndpoint(sock, mem_size=32 << 20), RcEndpoint(sock, mem_size=32 << 20)
    try:
        connect_pair(a, z)
        msg = os.urandom(4096)
        a.mr.write(msg)
        for i in range(8):
            a.qp.post_send(SendWR(wr_id=i, opcode=WrOpcode.RDMA_WRITE, send_flags=SendFlags.SIGNALED,
                                  sg=[SGE(a.mr.buf, len(msg), a.mr.lkey)], remote_addr=z.mr.buf,
                                  rkey=z.mr.rkey))
            assert a.poll_one().status == WcStatus.SUCCESS
        assert z.mr.read(len(msg)) == msg
        x = (np.arange(4096) % 5 + 1j).astype(np.complex64)
        fft_ok = bool(np.array_equal(accel.fft(a.ctx, x), accel_core.fft(x)))
        bits = (np.arange(40) % 2).astype(np.uint8)
        enc_ok = bool(np.array_equal(accel.turbo_encode(z.ctx, bits), accel_core.turbo_encode(bits)))
        with AdminClient(os.environ["VRDMA_ADMIN_SOCKET"]) as c:
            health, guests = c.call("health"), c.call("guests")
        st, dst = os.stat(sock), os.stat(os.path.dirname(sock))
        with open(f"/proc/{health['pid']}/status") as f:
            daemon_uid = int(next(ln for ln in f if ln.startswith("Uid:")).split()[1])
        print(json.dumps({"job": os.environ.get("SLURM_JOB_ID"), "socket": sock, "daemon_pid": health["pid"],
                          "socket_uid": st.st_uid, "socket_mode": st.st_mode & 0o777, "dir_uid": dst.st_uid,
                          "dir_mode": dst.st_mode & 0o777, "daemon_uid": daemon_uid,
                          # the epilog kills the pid in this file: the job must not be able to change it
                          "pidfile_writable": os.access(os.path.dirname(sock) + ".pid", os.W_OK),
                          "guest_uids": sorted(g["uid"] for g in guests), "uid": os.getuid(),
                          "fft_ok": fft_ok, "turbo_ok": enc_ok, "writes_ok": True}), flush=True)
    finally:
        a.close()
        z.close()


if __name__ == "__main__":
    main()
