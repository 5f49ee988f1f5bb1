"""The admin protocol's codec (vrdma.ops.wire): round trips, typed errors naming the
bad value, and any bytes at all decode to a request or an AdminError (Hypothesis)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from vrdma.ops import wire


def test_request_and_response_round_trip():
    req = wire.Request(7, "cancel", {"job": "3.1.5"})
    line = wire.encode_request(req)
    assert line.endswith(b"\n") and wire.decode_request(line) == req
    assert wire.decode_response(wire.encode_result(7, [{"a": 1}])) == (7, [{"a": 1}])
    with pytest.raises(wire.RemoteError) as e:
        wire.decode_response(wire.encode_error(7, wire.NotFound("job 3.1.5: gone")))
    assert (e.value.kind, str(e.value)) == ("not_found", "job 3.1.5: gone")


@pytest.mark.parametrize(("line", "err", "names"), [
    (b"{", wire.ProtocolError, "not JSON"),
    (b'"x"', wire.ProtocolError, "str"),
    (b'{"id":-1,"cmd":"health"}', wire.ProtocolError, "-1"),
    (b'{"id":true,"cmd":"health"}', wire.ProtocolError, "True"),
    (b'{"id":1,"cmd":5}', wire.ProtocolError, "5"),
    (b'{"id":1,"cmd":"reboot"}', wire.UnknownCommand, "reboot"),
    (b'{"id":1,"cmd":"health","args":[1]}', wire.ProtocolError, "[1]"),
    (b"[" * 100_000, wire.TooLong, "65536"),
    (b"[" * 50_000 + b"]" * 50_000, wire.TooLong, "65536"),
    (b"[" * 30_000 + b"]" * 30_000, wire.ProtocolError, "not JSON"),  # deep nesting
])
def test_bad_requests_are_typed_errors_naming_the_value(line, err, names):
    with pytest.raises(err) as e:
        wire.decode_request(line)
    assert names in str(e.value)


def test_line_splitter_bounds_lines():
    s = wire.LineSplitter(limit=16)
    assert s.feed(b"ab\ncd") == [b"ab\n"] and s.pending == 2
    assert s.feed(b"\n") == [b"cd\n"]
    with pytest.raises(wire.TooLong):
        s.feed(b"x" * 16)
    with pytest.raises(wire.TooLong):
        wire.LineSplitter(limit=16).feed(b"y" * 20 + b"\n")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_any_bytes_are_a_request_or_an_admin_error(data):
    try:
        req = wire.decode_request(data)
    except wire.AdminError:
        return
    assert req.cmd in wire.COMMANDS and isinstance(req.args, dict)


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                    max_leaves=20))
def test_any_json_value_is_a_request_or_an_admin_error(doc):
    import json

    for line in (json.dumps(doc).encode(), json.dumps({"id": 1, "cmd": "jobs", "args": doc}).encode()):
        try:
            wire.decode_request(line)
        except wire.AdminError:
            pass


def test_tenant_labels_are_capped():
    from vrdma.ops.view import MAX_TENANT_SERIES, DaemonView

    v = DaemonView()
    labels = [v.tenant(uid=uid) for uid in range(1000, 1000 + 3 * MAX_TENANT_SERIES)]
    assert labels[:MAX_TENANT_SERIES] == [f"uid:{u}" for u in range(1000, 1000 + MAX_TENANT_SERIES)]
    assert set(labels[MAX_TENANT_SERIES:]) == {"other"}
    assert v.tenant(uid=1000) == "uid:1000" and len(v._tenant_labels) == MAX_TENANT_SERIES
