"""The verbs side of ibv_rc_pingpong, over guest_lib.

Follows rdma-core libibverbs/examples/rc_pingpong.c:

- :class:`PingpongContext` is ``pp_init_ctx``/``pp_close_ctx``: one device
  context, PD, a ``size``-byte buffer filled with 0x7b and registered with
  LOCAL_WRITE, one CQ of ``rx_depth + 1`` entries for both queues, and an RC
  QP with ``max_send_wr`` 1, ``max_recv_wr`` ``rx_depth`` and one SGE each,
  moved to INIT (pkey 0, the port, no remote access). Sends are inline when
  the QP's ``max_inline_data`` covers ``size``. ``connect`` is
  ``pp_connect_ctx`` (RTR then RTS with rc_pingpong's attributes).
- :class:`Schedule` is ``parse_single_wc``'s bookkeeping as a pure state
  machine: one SEND (wr_id 2) and one RECV (wr_id 1) in flight; a new SEND
  goes out once both the previous SEND and a RECV completed; receives are
  topped up to ``rx_depth`` once no more than one is left.
- :meth:`PingpongContext.pingpong` is main()'s loop: the client posts the
  first SEND, both sides poll two completions at a time (or, with events,
  wait for a CQ event, re-arm, then poll) until ``iters`` SENDs and RECVs
  completed. A message larger than the path MTU is one SEND; the fabric
  segments it.

Where our device differs from a HCA: it has no LIDs (its link layer is
Ethernet, so the LID is 0, as on RoCE) and its address vector is a GID.
rc_pingpong addresses the peer by GID only when the peer sent one
(``Dest.is_global``); otherwise it means "by LID, in this subnet". We read
that as "on this host" and use our own port's GID, so two guests of one
back-end ping-pong without ``-g`` as two ports of one IB subnet would. The
service level has no field in the device's address vector and is not used.
"""
from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass

from guest_lib import (
    CQ,
    MR,
    PD,
    QP,
    SGE,
    AHAttr,
    Context,
    QPAttr,
    QPCap,
    QPInitAttr,
    RecvWR,
    SendWR,
    VerbsError,
)
from verbs import Access, LinkLayer, Mtu, SendFlags, WcStatus, WrOpcode, wc_status_str
from vrdma.rc_pingpong.errors import CompletionError, SetupError
from vrdma.rc_pingpong.exchange import Dest

PINGPONG_RECV_WRID = 1
PINGPONG_SEND_WRID = 2
DEVICE_NAME = "vrdma0"
PAGE_SIZE = os.sysconf("SC_PAGESIZE")
_RQ_PI_MASK = 0xFFFFFFFF

def mtu_to_enum(mtu: int) -> int:
    """pp_mtu_to_enum: bytes -> enum ibv_mtu, 0 if not a valid MTU."""
    return _MTU_OF_BYTES.get(mtu, 0)


_MTU_OF_BYTES = {m.bytes: int(m) for m in Mtu}


@dataclass
class Config:
    """rc_pingpong's settings that reach the verbs (see the command for the rest)."""

    backend: str
    ib_devname: str | None = None
    ib_port: int = 1
    size: int = 4096
    mtu: int = int(Mtu.MTU_1024)
    rx_depth: int = 500
    iters: int = 1000
    sl: int = 0
    use_event: bool = False
    gidx: int = -1
    validate_buf: bool = False
    use_odp: bool = False
    implicit_odp: bool = False
    use_ts: bool = False
    use_dm: bool = False
    allow_cc_unprotected: bool = False
    timeout: float | None = None  # None: wait for completions as long as rc_pingpong does


class Schedule:
    """parse_single_wc's counters (scnt, rcnt, routs, pending), without I/O.

    :meth:`on_completion` says how many receives to post and whether to post
    the next SEND; the caller posts them, reporting receives through
    :meth:`receives_posted`.
    """

    def __init__(self, iters: int, rx_depth: int, routs: int, client: bool):
        self.iters, self.rx_depth, self.routs = iters, rx_depth, routs
        self.scnt = self.rcnt = 0
        # The client posts the first SEND before the loop starts.
        self.pending = PINGPONG_RECV_WRID | (PINGPONG_SEND_WRID if client else 0)

    @property
    def done(self) -> bool:
        return self.rcnt >= self.iters and self.scnt >= self.iters

    def on_completion(self, wr_id: int, status: int) -> tuple[int, bool]:
        """(receives to post now, whether to post a SEND after them)."""
        if status != WcStatus.SUCCESS:
            raise CompletionError(f"Failed status {wc_status_str(status)} ({status}) for wr_id {wr_id}")
        refill = 0
        if wr_id == PINGPONG_SEND_WRID:
            self.scnt += 1
        elif wr_id == PINGPONG_RECV_WRID:
            self.routs -= 1
            if self.routs <= 1:
                refill = self.rx_depth - self.routs
            self.rcnt += 1
        else:
            raise CompletionError(f"Completion for unknown wr_id {wr_id}")
        self.pending &= ~wr_id
        send = self.scnt < self.iters and not self.pending
        if send:
            self.pending = PINGPONG_RECV_WRID | PINGPONG_SEND_WRID
        return refill, send

    def receives_posted(self, n: int) -> None:
        self.routs += n
        if self.routs < self.rx_depth:
            raise CompletionError(f"Couldn't post receive ({self.routs})")


@dataclass
class Result:
    usec: float  # elapsed, as rc_pingpong's single-precision float
    num_cq_events: int


class PingpongContext:
    """pp_init_ctx: the verbs resources of one side, in INIT."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.size, self.rx_depth = cfg.size, cfg.rx_depth
        dev = cfg.ib_devname or DEVICE_NAME
        try:
            self.ctx = Context(cfg.backend, mem_size=max(16 << 20, cfg.size + (8 << 20)))
        except VerbsError as e:
            raise SetupError(f"Couldn't get context for {dev}", str(e)) from e
        try:
            self._init_resources()
        except BaseException:
            self.ctx.close()
            raise

    def _init_resources(self) -> None:
        cfg = self.cfg
        if cfg.allow_cc_unprotected:
            raise SetupError("Couldn't allocate parent domain", "the vrdma device has no parent domains")
        self.pd = _make(lambda: PD(self.ctx), "Couldn't allocate PD")
        if cfg.use_odp:
            raise SetupError("The device isn't ODP capable or does not support RC send and receive with ODP")
        if cfg.use_ts:
            raise SetupError("The device isn't completion timestamp capable")
        if cfg.use_dm:
            raise SetupError("Device doesn't support dm allocation")
        # A zero-byte SEND is legal; the buffer behind it still needs a byte.
        self.mr = _make(lambda: MR(self.pd, max(cfg.size, 1), Access.LOCAL_WRITE), "Couldn't register MR")
        self.buf = self.mr.view
        self.buf[:] = b"\x7b" * len(self.buf)
        self.cq = _make(lambda: CQ(self.ctx, cfg.rx_depth + 1), "Couldn't create CQ")
        self.qp = _make(lambda: QP(self.pd, QPInitAttr(scq=self.cq, rcq=self.cq,
                                                       cap=QPCap(1, cfg.rx_depth, 1, 1, 0))),
                        "Couldn't create QP")
        flags = SendFlags.SIGNALED
        if self.qp.cap.max_inline_data >= cfg.size:
            flags |= SendFlags.INLINE
        sge = SGE(self.mr.buf, cfg.size, self.mr.lkey)
        self._send_wr = SendWR(wr_id=PINGPONG_SEND_WRID, opcode=WrOpcode.SEND, sg=[sge], send_flags=flags)
        self._recv_wr = RecvWR(wr_id=PINGPONG_RECV_WRID, sg=[sge])
        try:
            self.qp.to_init(QPAttr(pkey_index=0, port_num=cfg.ib_port, qp_access_flags=0))
        except VerbsError as e:
            raise SetupError("Failed to modify QP to INIT", str(e)) from e

    # --- posting ------------------------------------------------------------
    def post_recv(self, n: int) -> int:
        """pp_post_recv: post up to ``n`` receives; returns how many went in."""
        if n <= 0:
            return 0
        before = self.qp.rq_pi
        try:
            self.qp.post_recv([self._recv_wr] * n)
        except VerbsError:
            pass  # a full queue stops the batch; count what was posted
        return (self.qp.rq_pi - before) & _RQ_PI_MASK

    def post_send(self) -> None:
        try:
            self.qp.post_send(self._send_wr)
        except VerbsError as e:
            raise CompletionError("Couldn't post send", str(e)) from e

    def req_notify(self) -> None:
        try:
            self.cq.req_notify()
        except VerbsError as e:
            raise CompletionError("Couldn't request CQ notification", str(e)) from e

    # --- addressing -----------------------------------------------------------
    def local_dest(self, gidx: int, psn: int) -> Dest:
        """This side's LID, QPN, PSN and (with ``gidx`` >= 0) GID."""
        port = self.cfg.ib_port
        try:
            portinfo = self.ctx.query_port(port)
        except VerbsError as e:
            raise SetupError("Couldn't get port info", str(e)) from e
        lid = getattr(portinfo, "lid", 0)  # the device is Ethernet: no LIDs
        if portinfo.link_layer != LinkLayer.ETHERNET and not lid:
            raise SetupError("Couldn't get local LID")
        gid = bytes(16)
        if gidx >= 0:
            try:
                gid = self.ctx.query_gid(port, gidx).raw
            except VerbsError as e:
                raise SetupError(f"can't read sgid of index {gidx}", str(e)) from e
        return Dest(lid, self.qp.qp_num, psn, gid)

    def connect(self, rem: Dest, my_psn: int, mtu: int, sl: int, sgid_idx: int) -> None:
        """pp_connect_ctx: RTR towards ``rem``, then RTS. ``sl`` has no
        field in the device's address vector."""
        port = self.cfg.ib_port
        if rem.is_global:
            # rc_pingpong passes its gid index (-1 without -g) as the u8 sgid_index.
            ah = AHAttr(dgid=rem.gid, sgid_index=sgid_idx & 0xFF, hop_limit=1, port_num=port)
        else:
            ah = AHAttr(dgid=self._own_gid(), sgid_index=0, hop_limit=1, port_num=port)
        attr = QPAttr(path_mtu=mtu, dest_qp_num=rem.qpn, rq_psn=rem.psn, max_dest_rd_atomic=1,
                      min_rnr_timer=12, ah_attr=ah, port_num=port)
        try:
            self.qp.to_rtr(attr)
        except VerbsError as e:
            raise SetupError("Failed to modify QP to RTR", str(e)) from e
        attr.timeout, attr.retry_cnt, attr.rnr_retry = 14, 7, 7
        attr.sq_psn, attr.max_rd_atomic = my_psn, 1
        try:
            self.qp.to_rts(attr)
        except VerbsError as e:
            raise SetupError("Failed to modify QP to RTS", str(e)) from e

    def _own_gid(self) -> bytes:
        try:
            return self.ctx.query_gid(self.cfg.ib_port, 0).raw
        except VerbsError as e:
            raise SetupError("Failed to modify QP to RTR", f"no GID to reach a peer without one: {e}") from e

    # --- the ping-pong ----------------------------------------------------------
    def pingpong(self, routs: int, client: bool) -> Result:
        """main()'s loop from the first SEND to the last completion."""
        cfg = self.cfg
        if client:
            if cfg.validate_buf:
                # rc_pingpong stores i / page_size % sizeof(char), which is 0.
                for i in range(0, cfg.size, PAGE_SIZE):
                    self.buf[i] = 0
            self.post_send()
        sched = Schedule(cfg.iters, cfg.rx_depth, routs, client)
        events = 0
        start = time.time_ns() // 1000
        while not sched.done:
            try:  # a device that fails (its daemon died: ENOTCONN) ends the run as rc_pingpong's would
                if cfg.use_event:
                    if not self.cq.get_event(cfg.timeout):
                        raise CompletionError("Failed to get cq_event",
                                              f"no CQ event within {cfg.timeout:g} s")
                    events += 1
                    self.req_notify()
                    wcs = self.cq.poll(2)[1]
                else:
                    wcs = self._poll_some()
            except VerbsError as e:
                raise CompletionError("Failed to get cq_event" if cfg.use_event else
                                      f"poll CQ failed {-getattr(e, 'errno', 1)}", str(e)) from e
            for wc in wcs:
                try:
                    refill, send = sched.on_completion(wc.wr_id, wc.status)
                    if refill:
                        sched.receives_posted(self.post_recv(refill))
                    if send:
                        self.post_send()
                except CompletionError as e:
                    raise CompletionError(f"parse WC failed {len(wcs)}", "\n".join(e.lines())) from e
        usec = time.time_ns() // 1000 - start
        return Result(struct.unpack("f", struct.pack("f", usec))[0], events)

    def _poll_some(self) -> list:
        """Busy-poll until one or two completions (as ibv_poll_cq(cq, 2))."""
        poll, timeout = self.cq.poll, self.cfg.timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            n, wcs = poll(2)
            if n:
                return wcs
            if deadline is not None and time.monotonic() > deadline:
                raise CompletionError("poll CQ failed 0", f"no completion within {timeout:g} s")
            os.sched_yield()  # let the back-end run on a busy host

    def invalid_pages(self) -> list[int]:
        """-c on the client: pages whose first byte is not the 0 it sent."""
        return [i // PAGE_SIZE for i in range(0, self.size, PAGE_SIZE) if self.buf[i] != 0]

    def close(self) -> None:
        self.ctx.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _make(factory, message: str):
    try:
        return factory()
    except VerbsError as e:
        raise SetupError(message, str(e)) from e


__all__ = ["Config", "PingpongContext", "Schedule", "Result", "mtu_to_enum",
           "PINGPONG_RECV_WRID", "PINGPONG_SEND_WRID"]
