"""The load board: every accelerator host's live counters in one region, and
the work dispatchers announced to each, read with one RDMA READ (policy
``board``; docs/scheduler.md, "The board"). Pure: layout and codec, no I/O.

The board lives on one host of the cluster (the lowest address: every
daemon computes the same, :func:`board_host`); slot ``i`` is the ``i``-th
address of the cluster in address order. The region::

    counters[n]          n x COUNTERS_SIZE   each host's seqlocked counters
                                             (scheduler.wire), RDMA-WRITten by
                                             that host as its load moves
    inbound[n][MAX_KINDS] n x MAX_KINDS x u64 work announced to each host per
                                             kind, in millionths of the kind's
                                             reference job (RDMA FETCH_ADD:
                                             + by the dispatcher that sends a
                                             job, - by its target once the job
                                             has landed or been refused)

A dispatcher READs the whole region, and a candidate's row is its counters
with the announced work added to its queued work (:func:`decode_board`):
jobs still on their way count at once for every reader.
"""
from __future__ import annotations

import ipaddress
import struct
from collections.abc import Mapping, Sequence

from scheduler.table import LoadRow
from scheduler.wire import COUNTERS_SIZE, MAX_KINDS, WireError, decode_counters, kind_id

#: bytes of one host's announced work (a u64 per kind)
INBOUND_SIZE = 8 * MAX_KINDS
#: announced work is counted in these parts of one reference job
UNITS_PER_JOB = 1_000_000
_U64 = struct.Struct("<Q")
_MASK = (1 << 64) - 1


def cluster_order(addresses: Sequence[str]) -> list[str]:
    """The cluster's addresses in board slot order (address order, each once)."""
    ips = sorted({ipaddress.ip_address(a) for a in addresses}, key=lambda ip: (ip.version, ip.packed))
    return [str(ip) for ip in ips]


def board_host(addresses: Sequence[str]) -> str:
    """The address of the host that holds the board: the lowest."""
    return cluster_order(addresses)[0]


def board_size(n: int) -> int:
    return n * (COUNTERS_SIZE + INBOUND_SIZE)


def counters_offset(slot: int) -> int:
    return slot * COUNTERS_SIZE


def inbound_offset(n: int, slot: int, kind: str) -> int:
    """Offset of slot ``slot``'s announced work of ``kind`` (8-byte aligned)."""
    return n * COUNTERS_SIZE + slot * INBOUND_SIZE + 8 * (kind_id(kind) % MAX_KINDS)


def inbound_base(n: int) -> int:
    return n * COUNTERS_SIZE


def units_of(size: float) -> int:
    """Announced units of a job of ``size`` reference jobs (at least 1)."""
    return max(1, round(size * UNITS_PER_JOB))


def as_u64(delta: int) -> int:
    """A FETCH_ADD operand: ``delta`` modulo 2^64 (a negative one subtracts)."""
    return delta & _MASK


def add(region: memoryview | bytearray, offset: int, delta: int) -> int:
    """A local FETCH_ADD (the board host's own updates); returns the old value."""
    old = _U64.unpack_from(region, offset)[0]
    _U64.pack_into(region, offset, (old + delta) & _MASK)
    return old


def decode_board(buf: bytes | bytearray | memoryview, n: int, slots: Mapping[int, int],
                 now: float) -> dict[int, LoadRow | None]:
    """The rows of the hosts ``slots`` names (host id -> slot) in a board read:
    each host's counters with the work announced to it added to its queued
    work; None for a slot whose counters are torn, empty or malformed."""
    mv = memoryview(buf)
    if len(mv) < board_size(n):
        raise WireError(f"board read of {len(mv)} bytes, a board of {n} hosts is {board_size(n)}")
    out: dict[int, LoadRow | None] = {}
    for host, slot in slots.items():
        if not 0 <= slot < n:
            out[host] = None
            continue
        try:
            row = decode_counters(mv[counters_offset(slot):counters_offset(slot) + COUNTERS_SIZE], host, now)
        except WireError:
            out[host] = None
            continue
        queued = dict(row.queued)
        for k in row.units:
            raw = _U64.unpack_from(mv, inbound_offset(n, slot, k))[0]
            units = raw - (1 << 64) if raw >> 63 else raw   # a transient negative: none
            if units > 0:
                queued[k] = queued.get(k, 0.0) + units / UNITS_PER_JOB * row.service_time[k]
        out[host] = LoadRow(host, row.units, row.service_time, queued, row.busy, row.seq, row.updated)
    return out

