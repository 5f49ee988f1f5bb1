"""Stubs for virtio_rdma._datapath (see _datapath.pyx and datapath.py)."""
from collections.abc import Iterable
from typing import Any, final

from virtio_rdma.qp import QueuePair

enabled: bool    # the fast path is taken (datapath.set_fast_path switches it)
completed: int   # WQEs completed by the fast path since import

# ``dev`` is the device core (virtio_rdma.core.RdmaDeviceCore); typed loosely so that this
# stub does not pin the core's module layout.
def run_sq(dev: Any, qp: QueuePair, now: float) -> int: ...

@final
class DbrecScanner:
    key: object
    def rebuild(self, qps: Iterable[QueuePair], key: object) -> None: ...
    def scan(self, mem: object) -> list[QueuePair]: ...

wire_enabled: bool   # the wire path is taken (tests compare it with the Python engine)
wire_started: int    # send WQEs the wire path started since import
wire_direct: bool    # run_wire_sq encodes into the fabric's TX ring (RoceFabric.tx_route)
wire_direct_msgs: int  # of wire_started, those whose packets it encoded there itself

# ``net`` is the QP's fabric.roce_qp.NetworkQp
def run_wire_sq(dev: Any, qp: QueuePair, net: Any, now: float) -> int: ...
wire_recvs: int      # receive WQEs the wire path handed to an engine since import
def run_wire_rq(dev: Any, qp: QueuePair, net: Any) -> int: ...
wire_cqes_written: int  # completions the wire path wrote as CQEs since import
def wire_cqes(dev: Any, qp: QueuePair, net: Any, sends: list[Any], recvs: list[Any]) -> tuple[int, int]: ...
wire_pumps: int      # NetworkQp.pump bodies run natively since import
def wire_pump(dev: Any, qp: QueuePair, net: Any, now: float) -> bool: ...
wire_settled: int    # fast-path packets whose QP was settled at once since import
def wire_settle(dev: Any, qp: QueuePair, net: Any) -> bool: ...
records_applied: int  # doorbell record changes applied natively since import
def apply_records(core: Any, qps: list[QueuePair], now: float,
                  progress_sq: Any) -> tuple[list[QueuePair], int]: ...
kick_enabled: bool   # the native doorbellq kick is taken (tests compare it with the generic path)
kicks_served: int    # doorbellq kicks served natively since import
def kick_doorbellq(core: Any, q: Any, mem: Any, vring: Any, now: float, budget: int,
                   apply_changed: Any) -> int: ...
