"""Accelerator jobs from a guest through the device: guest_lib's three
accelerator layers (docs/accel-api.md) on ``Context(DEVICE)``, in a QEMU
guest over the virtio-pci driver or on the host as a process guest.

``python qemu_tests/pci_accel.py DEVICE SEED`` makes its inputs with
:func:`inputs` (``numpy.random.default_rng(SEED)``: the same arrays on any
machine), runs

* the verbs-shaped layer: an :class:`~guest_lib.aq.AQ` of FFT on its own PD,
  CQ and MR, one :class:`~guest_lib.aq.AccelWR` posted, its AccelWC polled;
* accel_core's call shapes: ``guest_lib.accel.fft``, ``ifft``,
  ``turbo_encode``, ``turbo_decode``;
* the file-like device: ``guest_lib.accel.open("fft" / "turbo_decode")``,
  ``write()`` then ``read()``;

and prints one line ``RESULT {json}`` with every output array (base64 of its
bytes, dtype, shape). The test recomputes each with accel_core on the host
(:func:`reference`) and compares: FFTs within a tolerance, Turbo bit-exact.
The kernels run in the daemon on the host; the guest only moves bytes.
"""
from __future__ import annotations

import base64
import json
import sys
import time

import numpy as np

FFT_N = 1200        # mixed radix (2^4 * 3 * 5^2)
FFT_BATCH = 3
TURBO_K = 1008
TURBO_BATCH = 2
DECODE_ITERS = 6


def inputs(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((FFT_BATCH, FFT_N)) + 1j * rng.standard_normal((FFT_BATCH, FFT_N)))
    bits = rng.integers(0, 2, (TURBO_BATCH, TURBO_K), dtype=np.uint8)
    noise = rng.standard_normal((TURBO_BATCH, 3, TURBO_K + 4))
    return {"x": x.astype(np.complex64), "bits": bits, "noise": noise}


def llr_of(code: np.ndarray, noise: np.ndarray, sigma: float = 0.8) -> np.ndarray:
    """Channel LLRs of ``code`` sent as BPSK through AWGN ``sigma * noise``."""
    y = (1.0 - 2.0 * code) + sigma * noise
    return (2 * y / sigma**2).astype(np.float32)


def reference(seed: int) -> dict[str, np.ndarray]:
    """What the guest must get: accel_core called on the host."""
    import accel_core

    i = inputs(seed)
    code = accel_core.turbo_encode(i["bits"])
    llr = llr_of(code, i["noise"])
    bits, used = accel_core.turbo_decode(llr, iterations=DECODE_ITERS)
    fft = accel_core.fft(i["x"])
    return {"aq_fft": fft[0], "fft": fft, "ifft": accel_core.ifft(i["x"]), "encode": code,
            "decode_bits": bits, "decode_used": used, "file_fft": fft[1],
            "file_decode": np.concatenate([bits[0], np.asarray(used[:1], np.uint8)])}


def _pack(a: np.ndarray) -> dict:
    a = np.ascontiguousarray(a)
    return {"dtype": a.dtype.str, "shape": list(a.shape), "b64": base64.b64encode(a.tobytes()).decode()}


def unpack(d: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(d["b64"]), dtype=np.dtype(d["dtype"])).reshape(d["shape"])


def _aq_fft(ctx, x: np.ndarray) -> tuple[np.ndarray, dict]:
    """One FFT through the verbs-shaped layer: AQ post, CQ poll."""
    from guest_lib import CQ, MR, PD, SGE
    from guest_lib.aq import AQ, AccelWR
    from guest_lib.cq import AccelWC
    from virtio_rdma.constants import AccelOp, AccelStatus

    nbytes = x.nbytes
    with PD(ctx) as pd, CQ(ctx, 8) as cq, MR(pd, 2 * nbytes) as mr, AQ(pd, cq, AccelOp.FFT, depth=4) as aq:
        mr.write(x.tobytes())
        assert aq.post(AccelWR(wr_id=0xF0F, size=x.size, inputs=[SGE(mr.buf, nbytes, mr.lkey)],
                               outputs=[SGE(mr.buf + nbytes, nbytes, mr.lkey)])) == 1
        deadline = time.monotonic() + 60
        while True:
            n, wcs = cq.poll(1)
            if n:
                break
            if time.monotonic() > deadline:
                raise TimeoutError("no accelerator completion within 60 s")
            time.sleep(0.001)
        wc = wcs[0]
        assert isinstance(wc, AccelWC) and wc.wr_id == 0xF0F, wc
        assert wc.accel_status == AccelStatus.SUCCESS, wc
        y = np.frombuffer(mr.read(nbytes, nbytes), dtype=x.dtype).copy()
        return y, {"wr_id": wc.wr_id, "op": int(wc.op), "byte_len": wc.byte_len, "aqn": wc.aqn}


def run(device: str, seed: int) -> dict:
    from guest_lib import Context, accel

    i = inputs(seed)
    x, bits = i["x"], i["bits"]
    with Context(device, mem_size=32 << 20, timeout=60.0) as ctx:
        if not ctx.has_accel:
            return {"error": "the device does not offer VIRTIO_RDMA_F_ACCEL"}
        aq_fft, wc = _aq_fft(ctx, x[0])
        fft = accel.fft(ctx, x)
        ifft = accel.ifft(ctx, x)
        code = accel.turbo_encode(ctx, bits)
        llr = llr_of(code, i["noise"])  # the guest's own encoding, sent through the channel
        dbits, used = accel.turbo_decode(ctx, llr, iterations=DECODE_ITERS)
        with accel.open(ctx, "fft", n=FFT_N) as f:
            assert f.write(x[1].tobytes()) == x[1].nbytes
            file_fft = np.frombuffer(f.read(), np.complex64)
        with accel.open(ctx, "turbo_decode", k=TURBO_K, iterations=DECODE_ITERS) as f:
            f.write(llr[0].tobytes())
            file_decode = np.frombuffer(f.read(), np.uint8)
        out = {"aq_fft": aq_fft, "fft": fft, "ifft": ifft, "encode": code, "decode_bits": dbits,
               "decode_used": used, "file_fft": file_fft, "file_decode": file_decode}
        counters = getattr(ctx.transport, "counters", None)
        return {"device": device, "aq_wc": wc, "arrays": {k: _pack(v) for k, v in out.items()},
                "counters": dict(counters) if counters is not None else None}


if __name__ == "__main__":
    print("RESULT " + json.dumps(run(sys.argv[1], int(sys.argv[2]))), flush=True)
