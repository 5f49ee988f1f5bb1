"""``vrdma rc-pingpong`` end to end: one real back-end daemon (LocalFabric),
a server process and a client process, as two guests of one host."""
import os
import re
import socket
import subprocess
import sys

import pytest

from tests.rc_pingpong.conftest import free_port, wait_listening
from vhost_user.testing import DaemonProcess, open_fds
from vrdma.cli import main
from vrdma.rc_pingpong import exchange

ADDRESS = re.compile(r"^  (local address: |remote address:) LID 0x([0-9a-f]{4}), QPN 0x([0-9a-f]{6}), "
                     r"PSN 0x([0-9a-f]{6}), GID (\S+)$")
BYTES = re.compile(r"^(\d+) bytes in (\d+\.\d\d) seconds = (\d+\.\d\d|inf) Mbit/sec$")
ITERS = re.compile(r"^(\d+) iters in (\d+\.\d\d) seconds = (\d+\.\d\d) usec/iter$")
CMD = [sys.executable, "-m", "vrdma", "rc-pingpong"]


@pytest.fixture(scope="module")
def backend():
    with DaemonProcess() as d:
        yield d.path


def spawn(args, env=None):
    return subprocess.Popen(CMD + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(procs, timeout=60):
    """(returncode, stdout, stderr) of each; every process is gone afterwards."""
    out = []
    try:
        for p in procs:
            so, se = p.communicate(timeout=timeout)
            out.append((p.returncode, so, se))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def run_pair(backend, server_args, client_args=None, timeout=60):
    port = free_port()
    common = ["--backend", backend, "-p", str(port), "--timeout", "30"]
    srv = spawn(common + server_args)
    procs = [srv]
    try:
        wait_listening(port, alive=lambda: srv.poll() is None)
        procs.append(spawn(common + (server_args if client_args is None else client_args) + ["localhost"]))
    finally:
        results = finish(procs, timeout)
    return results


def parse(stdout):
    lines = stdout.splitlines()
    assert len(lines) >= 4, stdout
    local, remote = ADDRESS.match(lines[0]), ADDRESS.match(lines[1])
    assert local and local.group(1) == "local address: ", lines[0]
    assert remote and remote.group(1) == "remote address:", lines[1]
    b, i = BYTES.match(lines[2]), ITERS.match(lines[3])
    assert b and i, lines[2:4]
    return local.groups()[1:], remote.groups()[1:], int(b.group(1)), int(i.group(1)), lines[4:]


@pytest.mark.parametrize("args, size", [
    (["-s", "1", "-N"], 1),  # inline; -N posts the same SEND
    ([], 4096),  # default -s 4096 over the default path MTU 1024: 4 packets
    (["-s", "8192", "-m", "4096"], 8192),  # above the largest MTU
    (["-s", "5000", "-e", "-r", "3"], 5000),  # events, receive queue topped up every other iteration
])
def test_server_and_client_ping_pong(backend, args, size):
    (src, sout, serr), (crc, cout, cerr) = run_pair(backend, args + ["-n", "20"])
    assert src == 0 and crc == 0, (sout, serr, cout, cerr)
    assert serr == cerr == ""
    s_local, s_remote, s_bytes, s_iters, s_rest = parse(sout)
    c_local, c_remote, c_bytes, c_iters, c_rest = parse(cout)
    assert s_local == c_remote and c_local == s_remote
    assert s_local[0] == c_local[0] == "0000"  # Ethernet link layer: no LID
    assert s_local[1] != c_local[1]
    assert s_local[3] == c_local[3] == "::"  # no -g: no GID, as rc_pingpong
    assert s_bytes == c_bytes == size * 20 * 2
    assert s_iters == c_iters == 20
    assert s_rest == c_rest == []


def test_gid_index_and_buffer_validation(backend):
    (src, sout, serr), (crc, cout, cerr) = run_pair(backend, ["-g", "0", "-c", "-s", "10000", "-n", "10"])
    assert src == 0 and crc == 0, (sout, serr, cout, cerr)
    for out in (sout, cout):
        local, remote, *_ , rest = parse(out)
        assert local[3] == remote[3] == "::ffff:127.0.0.1"  # the LocalFabric's IPv4-mapped GID
        assert rest == []  # no "invalid data in page N"


def test_defaults_long_options_and_env(backend):
    """rc_pingpong's defaults (1000 iterations, no timeout) and long options,
    the back-end named by VRDMA_BACKEND."""
    port = free_port()
    env = dict(os.environ, VRDMA_BACKEND=backend)
    srv = spawn([f"--port={port}", "--size=64"], env)
    procs = [srv]
    try:
        wait_listening(port, alive=lambda: srv.poll() is None)
        procs.append(spawn([f"--port={port}", "--size", "64", "--rx-depth=16", "localhost"], env))
    finally:
        (src, sout, serr), (crc, cout, cerr) = finish(procs)
    assert src == 0 and crc == 0, (sout, serr, cout, cerr)
    assert parse(sout)[2:4] == parse(cout)[2:4] == (64 * 1000 * 2, 1000)


def test_server_rejects_a_garbled_address_and_exits_1(backend):
    port = free_port()
    srv = spawn(["--backend", backend, "-p", str(port)])
    try:
        wait_listening(port, alive=lambda: srv.poll() is None)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            c.sendall(b"0000:0001zz:000000:" + b"0" * 32 + b"\0")
            assert c.recv(exchange.MSG_SIZE) == b""  # closed unanswered
    finally:
        (rc, out, err), = finish([srv])
    assert rc == 1
    assert ADDRESS.match(out.splitlines()[0])
    assert err.splitlines() == ["bad qpn in the address message: b'0001zz'"]


def test_server_times_out_without_a_client(backend):
    (rc, out, err), = finish([spawn(["--backend", backend, "-p", str(free_port()), "--timeout", "0.3"])])
    assert rc == 1
    assert err.splitlines()[-1] == "accept() failed"


# --- failures that need no peer: the command in this process ------------------------

def rc_pingpong(capsys, *args):
    rc = main(["rc-pingpong", *args])
    out, err = capsys.readouterr()
    return rc, out, err.splitlines()


def test_client_without_server(backend, capsys):
    port = free_port()
    rc, out, err = rc_pingpong(capsys, "--backend", backend, "-p", str(port), "localhost")
    assert rc == 1
    assert ADDRESS.match(out.splitlines()[0])
    assert err == [f"Couldn't connect to localhost:{port}"]


@pytest.mark.parametrize("args, last", [
    (["-g", "1"], "can't read sgid of index 1"),
    (["-i", "2"], "Failed to modify QP to INIT"),
    (["-o"], "The device isn't ODP capable or does not support RC send and receive with ODP"),
    (["-t"], "The device isn't completion timestamp capable"),
    (["-j"], "Device doesn't support dm allocation"),
    (["-U"], "Couldn't allocate parent domain"),
    (["-o", "-j"], "DM memory region can't be on demand"),
    (["-P"], "prefetch is valid only with on-demand memory region"),
])
def test_setup_failures_exit_1_with_rc_pingpongs_message(backend, capsys, args, last):
    fds = open_fds()
    rc, out, err = rc_pingpong(capsys, "--backend", backend, "-p", str(free_port()), *args)
    assert rc == 1 and err[-1] == last, err
    assert out == ""
    assert open_fds() == fds  # the device context and its memory are released


@pytest.mark.parametrize("args", [["-m", "1000"], ["-p", "65536"], ["-p", "-1"], ["-i", "0"], ["a", "b"]])
def test_bad_values_print_usage_and_exit_1(capsys, args):
    rc, out, err = rc_pingpong(capsys, "--backend", "/nonexistent", *args)
    assert rc == 1 and out.startswith("Usage:\n  vrdma rc-pingpong ") and err == []


def test_no_backend(capsys, monkeypatch):
    monkeypatch.delenv("VRDMA_BACKEND", raising=False)
    rc, out, err = rc_pingpong(capsys)
    assert rc == 1 and err[-1] == "No IB devices found"


def test_backend_not_listening(tmp_path, capsys):
    rc, out, err = rc_pingpong(capsys, "--backend", str(tmp_path / "none.sock"), "-d", "rxe0")
    assert rc == 1 and err[-1] == "Couldn't get context for rxe0"
