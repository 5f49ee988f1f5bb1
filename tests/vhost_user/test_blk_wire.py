"""virtio-blk wire formats: the hot-path struct layout agrees with the construct spec."""
from hypothesis import given
from hypothesis import strategies as st

from vhost_user.blk import (
    CONFIG_SIZE,
    ReqHeader,
    decode_config,
    decode_request_header,
    encode_config,
    encode_request_header,
)


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1))
def test_request_header_matches_construct(type_, sector):
    raw = encode_request_header(type_, sector)
    assert raw == ReqHeader.build(dict(type=type_, reserved=0, sector=sector))
    assert decode_request_header(raw) == (type_, sector)


def test_config_layout():
    raw = encode_config(capacity_sectors=2048, seg_max=126, num_queues=4)
    assert len(raw) == CONFIG_SIZE == 60
    c = decode_config(raw)
    assert (c.capacity, c.seg_max, c.num_queues, c.blk_size) == (2048, 126, 4, 512)
    assert raw[34:36] == (4).to_bytes(2, "little")  # num_queues at offset 34, as QEMU reads it
