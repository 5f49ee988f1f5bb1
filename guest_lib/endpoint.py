"""A ready-made RC endpoint: Context + PD + MR + CQ + QP, and how to connect it.

What every two-guest program repeats (the demo, the perftest tools, the
tests), in the spirit of pyverbs' tests/base.py RCResources: open the device,
register one buffer, make one CQ and one RC QP, publish (QPN, GID, starting
PSN, address, rkey) out of band, and walk the QP RESET -> INIT -> RTR -> RTS.

Starting PSNs are random (:func:`new_psn`), as rc_pingpong and perftest draw
them with lrand48: a peer that is not the connected one cannot guess the
PSN window a responder accepts.
"""
from __future__ import annotations

import secrets
import time

from guest_lib.context import Context
from guest_lib.cq import CQ, WC
from guest_lib.errors import UserError
from guest_lib.mr import MR
from guest_lib.pd import PD
from guest_lib.qp import QP, AHAttr, QPAttr, QPCap, QPInitAttr
from verbs import Access, WcStatus

ALL_ACCESS = Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_READ | Access.REMOTE_ATOMIC


def new_psn() -> int:
    """A starting PSN: 24 bits from a cryptographic source."""
    return secrets.randbits(24)


def connect_qp(qp: QP, dest_qpn: int, dgid: bytes, *, rq_psn: int, sq_psn: int | None = None,
               access: int = ALL_ACCESS, **attrs) -> None:
    """RESET -> INIT -> RTR -> RTS towards (dgid, dest_qpn). ``rq_psn`` is the
    peer's starting PSN (learnt out of band); ``sq_psn`` ours (random if not
    given). ``attrs`` are further QPAttr fields (rnr_retry, min_rnr_timer,
    timeout...)."""
    if sq_psn is None:
        sq_psn = new_psn()
    attr = QPAttr(qp_access_flags=access, dest_qp_num=dest_qpn, ah_attr=AHAttr(dgid=bytes(dgid)),
                  rq_psn=rq_psn, sq_psn=sq_psn, **attrs)
    qp.to_init(attr)
    qp.to_rtr(attr)
    qp.to_rts(attr)


def poll_cq(cq: CQ, n: int = 1, timeout: float = 5.0) -> list[WC]:
    """Busy-poll until ``n`` completions (any status); TimeoutError otherwise."""
    out: list = []  # an endpoint's CQ has no accelerator queue: WCs only
    deadline = time.monotonic() + timeout
    while len(out) < n:
        out += cq.poll(n - len(out))[1]
        if len(out) < n and time.monotonic() > deadline:
            raise TimeoutError(f"only {len(out)} of {n} completions within {timeout} s")
    return out


class RcEndpoint:
    def __init__(self, path: str, buf_size: int = 1 << 20, *, cap: QPCap | None = None, cq_size: int = 256,
                 mem_size: int | None = None, access: int = ALL_ACCESS, hugetlb="auto"):
        self.ctx = Context(path, mem_size=mem_size or max(16 << 20, buf_size + (8 << 20)),
                           hugetlb=hugetlb)
        try:
            self.pd = PD(self.ctx)
            self.mr = MR(self.pd, buf_size, access)
            self.cq = CQ(self.ctx, cq_size)
            self.qp = QP(self.pd, QPInitAttr(scq=self.cq, rcq=self.cq, cap=cap or QPCap()))
            self.gid = self.ctx.query_gid()
            self.psn = new_psn()  #: our starting PSN, published by info()
        except BaseException:
            self.ctx.close()
            raise

    def info(self) -> dict:
        """What the peer needs, to be sent out of band."""
        return dict(qpn=self.qp.qp_num, gid=self.gid.raw, psn=self.psn, addr=self.mr.buf,
                    rkey=self.mr.rkey)

    def connect(self, peer: dict, **attrs) -> None:
        """Connect to ``peer`` (its :meth:`info`): our SQ starts at our PSN,
        our RQ expects the peer's (``sq_psn`` / ``rq_psn`` in ``attrs`` win)."""
        attrs.setdefault("sq_psn", self.psn)
        if "rq_psn" not in attrs:
            if "psn" not in peer:
                raise UserError("the peer's info has no starting PSN: pass rq_psn")
            attrs["rq_psn"] = peer["psn"]
        self.psn = attrs["sq_psn"]
        connect_qp(self.qp, peer["qpn"], peer["gid"], **attrs)

    def poll(self, n: int = 1, timeout: float = 5.0) -> list[WC]:
        return poll_cq(self.cq, n, timeout)

    def poll_one(self, timeout: float = 10.0) -> WC:
        """The next completion, which must be successful."""
        (wc,) = poll_cq(self.cq, 1, timeout)
        if wc.status != WcStatus.SUCCESS:
            raise RuntimeError(f"completion error: {wc}")
        return wc

    def close(self) -> None:
        self.ctx.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def connect_pair(a: RcEndpoint, b: RcEndpoint, **attrs) -> None:
    """Connect two endpoints' QPs to each other (both on hand, e.g. one host)."""
    a.connect(b.info(), **attrs)
    b.connect(a.info(), **attrs)
