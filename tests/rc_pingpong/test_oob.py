"""The TCP exchange over real sockets on this host. A raw socket plays
ibv_rc_pingpong's side byte for byte where the other peer is ours."""
import socket
import time

import pytest

from tests.rc_pingpong.conftest import Background, wait_listening
from vrdma.rc_pingpong import exchange, oob
from vrdma.rc_pingpong.errors import MessageFormatError, OobError, OobTimeout, PingpongError, SetupError
from vrdma.rc_pingpong.exchange import Dest

MAPPED = bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 1])
SERVER = Dest(0, 0x100, 0x123456, MAPPED)
CLIENT = Dest(0, 0x101, 0xFEDCBA, MAPPED)


def raw_client(port: int, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def recv_all(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def start_server(port, connect_qp=lambda d: None, **kw):
    bg = Background(oob.server_exchange, port, SERVER, connect_qp, **kw)
    wait_listening(port)
    return bg


def test_our_client_and_server_swap_destinations(port):
    seen = []
    srv = start_server(port, seen.append)
    assert oob.client_exchange("localhost", port, CLIENT) == SERVER
    assert srv.result() == CLIENT
    assert seen == [CLIENT]


def test_server_answers_only_after_connecting_its_qp_then_reads_done(port):
    """As rc_pingpong's server: read 52, RTR/RTS, write 52, read 'done\\0'."""
    checked = []

    def connect_qp(dest):
        # Nothing may have been sent to the client before its QP is reachable.
        c.setblocking(False)
        with pytest.raises(BlockingIOError):
            c.recv(1)
        c.setblocking(True)
        checked.append(dest)

    srv = start_server(port, connect_qp)
    with raw_client(port) as c:
        c.sendall(exchange.encode(CLIENT))
        assert recv_all(c, exchange.MSG_SIZE) == exchange.encode(SERVER)
        c.sendall(b"done\0")
        assert srv.result() == CLIENT
        assert c.recv(1) == b""  # the server closed
    assert checked == [CLIENT]


def test_client_writes_52_bytes_then_done(port):
    """As rc_pingpong's client sees it from the server's side."""
    with socket.create_server(("127.0.0.1", port)) as ls:
        cli = Background(oob.client_exchange, "127.0.0.1", port, CLIENT)
        conn, _ = ls.accept()
        with conn:
            conn.settimeout(5)
            assert recv_all(conn, exchange.MSG_SIZE) == exchange.encode(CLIENT)
            conn.sendall(exchange.encode(SERVER))
            assert recv_all(conn, 64) == b"done\0"  # then EOF: nothing more
        assert cli.result() == SERVER


def test_server_reads_a_message_that_arrives_in_pieces(port):
    srv = start_server(port)
    with raw_client(port) as c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        msg = exchange.encode(CLIENT)
        for piece in (msg[:3], msg[3:30], msg[30:]):
            c.sendall(piece)
            time.sleep(0.02)
        assert recv_all(c, exchange.MSG_SIZE) == exchange.encode(SERVER)
        c.sendall(b"do")
        time.sleep(0.02)
        c.sendall(b"ne\0")
        assert srv.result() == CLIENT


def test_server_rejects_garbage_naming_the_field(port):
    srv = start_server(port)
    with raw_client(port) as c:
        c.sendall(b"0000:00zz00:000000:" + b"0" * 32 + b"\0")
        with pytest.raises(MessageFormatError) as ei:
            srv.result()
        assert ei.value.field == "qpn"
        assert c.recv(1) == b""  # closed without answering


def test_server_reports_a_short_message(port):
    srv = start_server(port)
    with raw_client(port) as c:
        c.sendall(exchange.encode(CLIENT)[:20])
        c.shutdown(socket.SHUT_WR)
        with pytest.raises(OobError) as ei:
            srv.result()
    assert str(ei.value) == "20/52: Couldn't read remote address"
    assert ei.value.lines()[0].startswith("server read:")


def test_server_wants_done(port):
    srv = start_server(port)
    with raw_client(port) as c:
        c.sendall(exchange.encode(CLIENT))
        recv_all(c, exchange.MSG_SIZE)
        c.sendall(b"nope!")
        with pytest.raises(OobError, match="Couldn't send/recv local address"):
            srv.result()


def test_server_qp_failure_is_reported_and_the_client_told_by_eof(port):
    def connect_qp(dest):
        raise SetupError("Failed to modify QP to RTR", "device said no")

    srv = start_server(port, connect_qp)
    with pytest.raises(OobError) as cli_err:
        oob.client_exchange("localhost", port, CLIENT)
    assert str(cli_err.value) == "Couldn't read/write remote address"
    with pytest.raises(SetupError) as ei:
        srv.result()
    assert ei.value.lines() == ["device said no", "Failed to modify QP to RTR", "Couldn't connect to remote QP"]


def test_server_times_out_waiting_for_a_client(port):
    t0 = time.monotonic()
    with pytest.raises(OobTimeout, match=r"accept\(\) failed"):
        oob.server_exchange(port, SERVER, lambda d: None, accept_timeout=0.2)
    assert time.monotonic() - t0 < 5


def test_server_times_out_on_a_silent_client(port):
    srv = start_server(port, timeout=0.2)
    with raw_client(port):
        with pytest.raises(OobTimeout, match="Couldn't read remote address"):
            srv.result()


def test_client_refused(port):
    with pytest.raises(OobError) as ei:
        oob.client_exchange("localhost", port, CLIENT)
    assert str(ei.value) == f"Couldn't connect to localhost:{port}"


def test_client_unknown_host():
    with pytest.raises(OobError, match=r" for no-such-host\.invalid:18515$"):
        oob.client_exchange("no-such-host.invalid", 18515, CLIENT)


def test_client_times_out_on_a_silent_server(port):
    with socket.create_server(("127.0.0.1", port)) as ls:
        cli = Background(oob.client_exchange, "127.0.0.1", port, CLIENT, timeout=0.2)
        conn, _ = ls.accept()
        with conn:
            with pytest.raises(OobTimeout, match="Couldn't read/write remote address"):
                cli.result()


def test_client_rejects_a_short_or_garbled_reply_without_done(port):
    for reply, error in ((exchange.encode(SERVER)[:30], OobError),
                         (b"x" * exchange.MSG_SIZE, MessageFormatError)):
        with socket.create_server(("127.0.0.1", port)) as ls:
            cli = Background(oob.client_exchange, "127.0.0.1", port, CLIENT)
            conn, _ = ls.accept()
            with conn:
                conn.settimeout(5)
                recv_all(conn, exchange.MSG_SIZE)
                conn.sendall(reply)
                if len(reply) < exchange.MSG_SIZE:
                    conn.shutdown(socket.SHUT_WR)
                with pytest.raises(error):
                    cli.result()
                assert conn.recv(8) == b""  # no "done"


def test_port_in_use(port):
    with socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True):
        with pytest.raises(OobError) as ei:
            oob.listen(port)
    assert str(ei.value) == f"Couldn't listen to port {port}"


def test_client_over_ipv6(port):
    with socket.create_server(("::1", port), family=socket.AF_INET6) as ls:
        cli = Background(oob.client_exchange, "::1", port, CLIENT)
        conn, _ = ls.accept()
        with conn:
            recv_all(conn, exchange.MSG_SIZE)
            conn.sendall(exchange.encode(SERVER))
            assert recv_all(conn, 5) == b"done\0"
        assert cli.result() == SERVER


def test_errors_share_one_base():
    for cls in (OobError, OobTimeout, MessageFormatError, SetupError):
        assert issubclass(cls, PingpongError)
