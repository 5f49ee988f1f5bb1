"""TxRing.add_run / add_msg on a run whose payload range the SG list does
not cover: ValueError (as the reference, PacketRun.packets, refuses it),
never a read past the SG arrays -- also when the packet has more pieces
than a datagram's iovecs and is gathered into one buffer. Run in a child
interpreter so that a crash fails this test, not the suite."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from roce._codec import Envelope
from roce._udpio import TxRing
from roce.opcodes import Opcode
from roce.packet import PacketRun
from roce.rc.sgl import SgLengthError, SgList

OPS = (Opcode.RC_SEND_FIRST, Opcode.RC_SEND_MIDDLE, Opcode.RC_SEND_LAST, Opcode.RC_SEND_ONLY)

_CHILD = """
from roce._codec import Envelope
from roce._udpio import TxRing
from roce.opcodes import Opcode
from roce.packet import PacketRun
from roce.rc.sgl import SgList
OPS = (Opcode.RC_SEND_FIRST, Opcode.RC_SEND_MIDDLE, Opcode.RC_SEND_LAST, Opcode.RC_SEND_ONLY)
sgl = SgList([bytes([i]) for i in range({pieces})])
run = PacketRun(OPS, 1, 0, 1, 0, 0x12, 0xFFFF, 1024, {length}, sgl)
ring = TxRing(8)
try:
    ring.add_run(run, Envelope("192.0.2.1", "192.0.2.2", 49152, 4791), 0, False)
except ValueError as e:
    print("ValueError", ring.count, ring.gathered)
else:
    print("accepted")
"""


@pytest.mark.parametrize("pieces", [3, 8, 9, 20])
def test_payload_past_the_sg_list_is_refused(pieces):
    """``pieces`` one-byte SG entries, a run of 1000 bytes: the reference
    raises; the ring raises ValueError and queues nothing (9 and 20 pieces:
    over a datagram's 8 payload iovecs, the gathered copy's path)."""
    sgl = SgList([bytes([i]) for i in range(pieces)])
    with pytest.raises(SgLengthError):
        PacketRun(OPS, 1, 0, 1, 0, 0x12, 0xFFFF, 1024, 1000, sgl).packets()
    r = subprocess.run([sys.executable, "-c", _CHILD.format(pieces=pieces, length=1000)],
                       check=False, capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert r.returncode == 0, f"child died ({r.returncode}): {r.stderr[-500:]}"
    assert r.stdout.split() == ["ValueError", "0", "0"]


def test_covered_scattered_payload_is_gathered():
    """The same 20 pieces with a run of their 20 bytes: gathered, one datagram."""
    sgl = SgList([bytes([i]) for i in range(20)])
    ring = TxRing(8)
    run = PacketRun(OPS, 1, 0, 1, 0, 0x12, 0xFFFF, 1024, 20, sgl)
    assert ring.add_run(run, Envelope("192.0.2.1", "192.0.2.2", 49152, 4791), 0, False) == 1
    assert ring.count == 1 and ring.gathered == 1
