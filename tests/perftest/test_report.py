"""perftest's output and arithmetic (vrdma.perftest_compat.report, engine's
lat_result/bw_result): rows against what perftest's printf formats print
(the expected strings are glibc printf's output of REPORT_FMT_LAT,
REPORT_FMT, REPORT_FMT_EXT, BASIC_ADDR_FMT + READ_FMT + RDMA_FMT and
PERF_GID_FMT for the same values), and the figures against direct
transcriptions of print_report_lat / print_report_bw."""
import random
import types

import pytest

from vrdma.perftest_compat import exchange as X
from vrdma.perftest_compat import report
from vrdma.perftest_compat.engine import BwResult, LatResult, bw_result, lat_result


def test_rows_match_perftests_printf():
    lat = LatResult(2, 1000, 1.5, 1234.567, 2.25, 3.125, 0.5, 10.0, 99.999)
    assert report.lat_row(lat) == (" 2       1000          1.50           1234.57      2.25     \t       3.12        "
                                   "\t0.50   \t\t10.00   \t\t100.00 \n")
    bw = BwResult(65536, 5000, 11234.56, 987.654321, 0.0157)
    assert report.bw_row(bw) == " 65536      5000             11234.56            987.65 \t\t   0.015700\n"
    # below 0.1 Gb/s perftest prints six decimals (REPORT_FMT_EXT)
    slow = BwResult(8, 200, 0.012345, 0.0456789, 1.5, gbits=True)
    assert report.bw_row(slow) == " 8          200           0.012345            0.045679            1.500000\n"


def test_address_lines_match_perftests_printf():
    gid = bytes(10) + b"\xff\xff" + bytes([203, 0, 113, 2])
    s = types.SimpleNamespace(p=types.SimpleNamespace(test=X.Test.READ_LAT),
                              rem=X.Dest(0, 0x80, 0x11, 0xB86AC, 0x47D, 0x560BD3494000, gid))
    assert report.address(s, local=False) == (
        " remote address: LID 0000 QPN 0x0011 PSN 0xb86ac OUT 0x80 RKey 0x00047d VAddr 0x00560bd3494000\n"
        " GID: 00:00:00:00:00:00:00:00:00:00:255:255:203:00:113:02\n")
    s.p.test = X.Test.SEND_BW
    assert report.address(s, local=False).splitlines()[0] == " remote address: LID 0000 QPN 0x0011 PSN 0xb86ac"
    assert report.c_alt_hex(0, 6) == "000000" and report.c_alt_hex(0x1234567, 6) == "0x1234567"


def _lat_reference(tposted, rtt):
    """print_report_lat, line by line (cycles = ns, cpu_mhz = 1000)."""
    delta = sorted(tposted[i + 1] - tposted[i] for i in range(len(tposted) - 1))
    mc = len(delta) - 2
    median = (delta[mc // 2] + delta[mc // 2 - 1]) // 2 if (mc - 1) % 2 else delta[mc // 2]
    q = 1000.0 * rtt
    avg = sum(d / q for d in delta[:mc]) / mc
    stdev_sum = 0
    for d in delta[:mc]:
        temp_var = int(avg - d / q)
        stdev_sum += int(temp_var ** 2)
    i99, i999 = -(-mc * 99 // 100), -(-mc * 999 // 1000)
    return (delta[0] / q, delta[mc] / q, median / q, avg, (stdev_sum / mc) ** 0.5, delta[i99] / q, delta[i999] / q)


@pytest.mark.parametrize("iters, rtt", [(5, 2), (6, 1), (1000, 2), (1001, 1)])
def test_latency_figures(iters, rtt):
    rng = random.Random(iters)
    t, tposted = 0, []
    for _ in range(iters):
        t += rng.randint(1000, 50000)
        tposted.append(t)
    r = lat_result(64, iters, tposted, rtt)
    assert (r.size, r.iters) == (64, iters)
    assert (r.t_min, r.t_max, r.t_typical, r.t_avg, r.t_stdev, r.p99, r.p999) == \
        pytest.approx(_lat_reference(tposted, rtt))


def _bw_reference(size, iters, tposted, tcompleted, cq_mod, post_list, fmt):
    opt = tcompleted[iters - 1] - tposted[0]
    for i in range(0, iters, post_list):
        j = -(-(i + 1) // cq_mod) * cq_mod - 1
        while j < iters:
            opt = min(opt, (tcompleted[j] - tposted[i]) / (j - i + 1))
            j += cq_mod
        if iters % cq_mod:
            j = iters - 1
            opt = min(opt, (tcompleted[j] - tposted[i]) / (j - i + 1))
    total = (tcompleted[iters - 1] - tposted[0]) / 1e9
    return size / (opt / 1e9) / fmt, size * iters / total / fmt, iters / total / 1e6


@pytest.mark.parametrize("iters, cq_mod, post_list", [(1000, 100, 1), (1050, 100, 1), (512, 1, 1), (400, 4, 4)])
def test_bandwidth_figures(iters, cq_mod, post_list):
    rng = random.Random(iters + cq_mod)
    t, tposted = 0, []
    for _ in range(iters):
        t += rng.randint(100, 3000)
        tposted.append(t)
    tcompleted = {}
    done = 0
    for k in range(iters):  # completions of the signaled WRs, as run_iter_bw counts them
        if k % cq_mod == cq_mod - 1 or k == iters - 1:
            done += cq_mod
            tcompleted[min(done, iters) - 1] = tposted[k] + rng.randint(5000, 20000)
    full = dict(tcompleted)
    r = bw_result(65536, iters, tposted, full, cq_mod, post_list, gbits=False)
    assert (r.bw_peak, r.bw_avg, r.msg_rate) == pytest.approx(
        _bw_reference(65536, iters, tposted, {**dict.fromkeys(range(iters), 1 << 62), **full}, cq_mod,
                      post_list, 0x100000))
    g = bw_result(65536, iters, tposted, full, cq_mod, post_list, gbits=True)
    assert g.bw_avg == pytest.approx(r.bw_avg * 0x100000 / 125000000)
