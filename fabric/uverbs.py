"""Memory registration with a chosen IOVA, through the kernel's uverbs command ABI.

A guest's MR must be registered with the host's RDMA device under the
guest's own virtual address (its iova): peers put that address in their
RETHs and the HCA translates it. libibverbs has ``ibv_reg_mr_iova2`` for
this, but the pyverbs of rdma-core 44 (Debian 12) only registers at the
host address, and providers such as rxe cannot import a pyverbs context
into a second library handle (``ibv_import_device`` is EOPNOTSUPP there).

So this module speaks the same command libibverbs' ``ibv_cmd_reg_mr``
sends: the stable write() ABI of ``/dev/infiniband/uverbsN``
(``include/uapi/rdma/ib_user_verbs.h``: ``IB_USER_VERBS_CMD_REG_MR`` and
``IB_USER_VERBS_CMD_DEREG_MR``), on the command fd of a pyverbs
:class:`pyverbs.device.Context`, into the kernel PD of a pyverbs
:class:`pyverbs.pd.PD` (``pd.handle``). The MR is then a kernel object of
that same context, usable by the context's QPs like any other. Providers
whose REG_MR carries no driver data (rxe, siw, mlx4, mlx5...) accept it;
the kernel rejects a malformed or short command with EINVAL/ENOSPC.

The codecs are pure (:func:`encode_reg_mr`, :func:`decode_reg_mr_resp`,
:func:`encode_dereg_mr`); :class:`KernelMr` does the I/O and owns one MR
handle.
"""
from __future__ import annotations

import ctypes
import os

from construct import Int16ul, Int32ul, Int64ul, Struct

from virtio_rdma.errors import FabricError

CMD_REG_MR = 9      # enum ib_uverbs_write_cmds
CMD_DEREG_MR = 13

CmdHdr = Struct("command" / Int32ul, "in_words" / Int16ul, "out_words" / Int16ul)
RegMr = Struct("response" / Int64ul, "start" / Int64ul, "length" / Int64ul, "hca_va" / Int64ul,
               "pd_handle" / Int32ul, "access_flags" / Int32ul)
RegMrResp = Struct("mr_handle" / Int32ul, "lkey" / Int32ul, "rkey" / Int32ul)
DeregMr = Struct("mr_handle" / Int32ul)

_U64 = (1 << 64) - 1


def _command(cmd: int, body: bytes, out_size: int) -> bytes:
    size = CmdHdr.sizeof() + len(body)
    assert size % 4 == 0 and out_size % 4 == 0
    return CmdHdr.build(dict(command=cmd, in_words=size // 4, out_words=out_size // 4)) + body


def encode_reg_mr(response: int, start: int, length: int, hca_va: int, pd_handle: int,
                  access: int) -> bytes:
    """The write() buffer of IB_USER_VERBS_CMD_REG_MR (``response``: the
    address the kernel writes :data:`RegMrResp` to)."""
    for name, v, top in (("start", start, _U64), ("length", length, _U64), ("hca_va", hca_va, _U64),
                         ("pd_handle", pd_handle, 0xFFFFFFFF), ("access", access, 0xFFFFFFFF)):
        if not 0 <= v <= top:
            raise FabricError(f"REG_MR {name}={v:#x} out of range")
    if length == 0 or hca_va + length - 1 > _U64:
        raise FabricError(f"REG_MR length {length} at iova {hca_va:#x} is empty or wraps")
    return _command(CMD_REG_MR, RegMr.build(dict(response=response, start=start, length=length,
                                                 hca_va=hca_va, pd_handle=pd_handle,
                                                 access_flags=access)), RegMrResp.sizeof())


def decode_reg_mr_resp(data: bytes):
    return RegMrResp.parse(data)


def encode_dereg_mr(mr_handle: int) -> bytes:
    return _command(CMD_DEREG_MR, DeregMr.build(dict(mr_handle=mr_handle)), 0)


class KernelMr:
    """One MR registered through ``cmd_fd`` (see module doc); ``close()``
    deregisters it. ``start`` is the host address of the pages (they must
    stay mapped while registered: the kernel pins them), ``iova`` the
    address the HCA and its peers know them by."""

    __slots__ = ("cmd_fd", "handle", "lkey", "rkey", "iova", "length")

    def __init__(self, cmd_fd: int, pd_handle: int, start: int, length: int, iova: int,
                 access: int):
        resp = ctypes.create_string_buffer(RegMrResp.sizeof())
        cmd = encode_reg_mr(ctypes.addressof(resp), start, length, iova, pd_handle, access)
        try:
            n = os.write(cmd_fd, cmd)
        except OSError as e:
            raise FabricError(f"REG_MR of {length} bytes at {start:#x} as iova {iova:#x} "
                              f"(access {access:#x}) failed: {e.strerror}", e.errno) from None
        if n != len(cmd):
            raise FabricError(f"REG_MR: short write ({n} of {len(cmd)} bytes)")
        r = decode_reg_mr_resp(resp.raw)
        self.cmd_fd: int | None = cmd_fd  # None once closed
        self.handle = r.mr_handle
        self.lkey = r.lkey
        self.rkey = r.rkey
        self.iova = iova
        self.length = length

    def close(self) -> None:
        if self.cmd_fd is None:
            return
        fd, self.cmd_fd = self.cmd_fd, None
        try:
            os.write(fd, encode_dereg_mr(self.handle))
        except OSError as e:
            # the context is gone (its close destroyed the MR) or the MR is in
            # use by a memory window; nothing else holds the handle
            raise FabricError(f"DEREG_MR of handle {self.handle} failed: {e.strerror}",
                              e.errno) from None

    def __repr__(self) -> str:
        return (f"KernelMr(handle={self.handle}, lkey={self.lkey:#x}, rkey={self.rkey:#x}, "
                f"iova={self.iova:#x}, length={self.length})")
