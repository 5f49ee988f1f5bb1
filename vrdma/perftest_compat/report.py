"""perftest's output, and the ``--plot`` PNG.

The text follows perftest v4.5-0.17's printf formats (perftest_parameters.h
``RESULT_LINE``, ``RESULT_FMT_LAT``, ``RESULT_FMT``/``RESULT_FMT_G``,
``REPORT_FMT_LAT``, ``REPORT_FMT``; ``ctx_print_test_info``;
``ctx_print_pingpong_data``'s ``BASIC_ADDR_FMT``/``RDMA_FMT``/``READ_FMT``
and ``PERF_GID_FMT``, which prints the GID bytes in decimal), so scripts that
parse perftest's output parse ours. Where the device differs from a HCA the
values say so (device name, ``Transport type``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from vrdma.perftest_compat import exchange as X

if TYPE_CHECKING:  # pragma: no cover
    from vrdma.perftest_compat.engine import BwResult, LatResult, Session

RESULT_LINE = "-" * 87 + "\n"
RESULT_FMT_LAT = (" #bytes #iterations    t_min[usec]    t_max[usec]  t_typical[usec]    t_avg[usec]    "
                  "t_stdev[usec]   99% percentile[usec]   99.9% percentile[usec] ")
RESULT_FMT = " #bytes     #iterations    BW peak[MB/sec]    BW average[MB/sec]   MsgRate[Mpps]"
RESULT_FMT_G = " #bytes     #iterations    BW peak[Gb/sec]    BW average[Gb/sec]   MsgRate[Mpps]"
WAITING = ("\n************************************\n"
           "* Waiting for client to connect... *\n"
           "************************************\n")
_TESTS = {"send": "Send", "write": "RDMA_Write", "read": "RDMA_Read"}


def c_alt_hex(v: int, width: int) -> str:
    """printf's ``%#0<width>x``: ``0x`` and zero padding, but plain zeros for 0."""
    if v == 0:
        return "0" * width
    return format(v, f"#0{width}x")


def c_left(fmt: str, v: float, width: int = 7) -> str:
    """``%-7.2f`` and friends."""
    return format(v, fmt).ljust(width)


def test_info(s: Session) -> str:
    """ctx_print_test_info: the header block."""
    p = s.p
    t = p.test
    kind = ("Post List BW " if p.post_list > 1 else "BW ") if t.is_bw else "Latency "
    lines = [RESULT_LINE.rstrip("\n"), f"                    {_TESTS[t.verb]} {kind}Test",
             f" Dual-port       : OFF\t\tDevice         : {p.ib_devname}",
             " Number of qps   : 1\t\tTransport type : IB",
             " Connection type : RC\t\tUsing SRQ      : OFF",
             " PCIe relax order: Unsupported",
             " ibv_wr* API     : OFF"]
    if p.client:
        lines.append(f" TX depth        : {p.tx_depth}")
    if p.post_list > 1:
        lines.append(f" Post List       : {p.post_list}")
    if t.verb == "send" and not p.client:
        lines.append(f" RX depth        : {p.rx_depth}")
    if t.is_bw:
        lines.append(f" CQ Moderation   : {p.cq_mod}")
    lines.append(f" Mtu             : {X.mtu_bytes(s.mtu_enum)}[B]")
    lines.append(" Link type       : Ethernet")
    lines.append(f" GID index       : {p.gid_index}")
    if t.verb == "read":
        lines.append(f" Outstand reads  : {s._res().out_reads()}")
    else:
        lines.append(f" Max inline data : {p.inline_size}[B]")
    lines += [" rdma_cm QPs\t : OFF", " Data ex. method : Ethernet", RESULT_LINE.rstrip("\n")]
    return "\n".join(lines) + "\n"


def address(s: Session, local: bool) -> str:
    """ctx_print_pingpong_data for our QP (``local``) or the peer's."""
    d = s._res().dest() if local else s.rem
    assert d is not None
    side = "local" if local else "remote"
    text = f" {side} address: LID {c_alt_hex(d.lid, 4)} QPN {c_alt_hex(d.qpn, 6)} PSN {c_alt_hex(d.psn, 6)}"
    verb = s.p.test.verb
    if verb == "read":
        text += f" OUT {c_alt_hex(d.out_reads, 4)}"
    if verb in ("read", "write"):
        text += f" RKey {c_alt_hex(d.rkey, 8)} VAddr {c_alt_hex(d.vaddr, 16)}"
    text += "\n"
    gid = d.gid or bytes(16)
    text += " GID: " + ":".join(f"{b:02d}" for b in gid) + "\n"
    return text


def result_header(s: Session) -> str:
    if s.p.test.is_bw:
        return RESULT_LINE + (RESULT_FMT_G if s.p.report_gbits else RESULT_FMT) + "\n"
    return RESULT_LINE + RESULT_FMT_LAT + "\n"


def lat_row(r: LatResult) -> str:
    """REPORT_FMT_LAT + REPORT_EXT."""
    return (f" {r.size:<7d} {r.iters}          {c_left('.2f', r.t_min)}        {c_left('.2f', r.t_max)}      "
            f"{c_left('.2f', r.t_typical)}  \t       {c_left('.2f', r.t_avg)}     \t"
            f"{c_left('.2f', r.t_stdev)}\t\t{c_left('.2f', r.p99)} \t\t{c_left('.2f', r.p999)}\n")


def bw_row(r: BwResult) -> str:
    """REPORT_FMT (REPORT_FMT_EXT below 0.1 Gb/s) + REPORT_EXT."""
    if r.gbits and r.bw_avg < 0.1:
        return (f" {r.size:<7d}    {r.iters}           {c_left('.6f', r.bw_peak)}            "
                f"{c_left('.6f', r.bw_avg)}            {c_left('.6f', r.msg_rate)}\n")
    return (f" {r.size:<7d}    {r.iters:<10d}       {c_left('.2f', r.bw_peak)}            "
            f"{c_left('.2f', r.bw_avg)}\t\t   {c_left('.6f', r.msg_rate)}\n")


def plot(path: str, test: X.Test, results: list, gbits: bool = False) -> None:
    """Latency and bandwidth against message size (log 2 axis), one PNG.

    Latency tests: t_typical and t_avg, and the one-way bandwidth they imply
    (size / t_typical). Bandwidth tests: average and peak bandwidth, and the
    time per message they imply (1 / message rate)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unit = "Gb/s" if gbits else "MB/s"
    sizes = [r.size for r in results]
    fig, (ax_lat, ax_bw) = plt.subplots(2, 1, figsize=(8, 8), sharex=True)
    if not test.is_bw:
        ax_lat.plot(sizes, [r.t_typical for r in results], "o-", label="t_typical")
        ax_lat.plot(sizes, [r.t_avg for r in results], "s--", label="t_avg")
        scale = 125.0 if gbits else 1e6 / 2**20  # bytes/us -> unit
        ax_bw.plot(sizes, [r.size / r.t_typical * (8 / 1000.0 if gbits else scale) if r.t_typical else 0
                           for r in results], "o-", label=f"size / t_typical [{unit}]")
    else:
        ax_lat.plot(sizes, [1.0 / r.msg_rate if r.msg_rate else 0 for r in results], "o-",
                    label="1 / MsgRate")
        ax_bw.plot(sizes, [r.bw_avg for r in results], "o-", label="BW average")
        ax_bw.plot(sizes, [r.bw_peak for r in results], "s--", label="BW peak")
    ax_lat.set_ylabel("latency [usec]")
    ax_bw.set_ylabel(f"bandwidth [{unit}]")
    ax_bw.set_xlabel("message size [bytes]")
    for ax in (ax_lat, ax_bw):
        ax.set_xscale("log", base=2)
        if all(y > 0 for line in ax.get_lines() for y in line.get_ydata()):
            ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    ax_lat.set_title(f"vrdma perftest {test.value}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
