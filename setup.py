"""Build the Cython extensions of vrdma.

Every ``_*.pyx`` file below a package is one extension module named after its
path (``virtio/_split.pyx`` -> ``virtio._split``), so a new kernel needs no
edit here. Kernels are compiled with -O3; ``-march=native`` is added unless
VRDMA_NATIVE=0 (set it when building a wheel for other machines).
VRDMA_ONLY=path/prefix[,...] builds only the matching .pyx files (handy while
working on one kernel: ``VRDMA_ONLY=accel_core python setup.py build_ext -i``).

accel_core's SIMD kernels are the exception: ``accel_core/_fft.pyx`` and
``accel_core/_turbo.pyx`` are built for baseline x86-64 (the scalar path), and
their ``_avx2`` / ``_avx512`` twins (which include the same source) for those
instruction sets, never with -march=native, so one build runs the best path on
any x86-64 (accel_core.simd picks it by CPUID at run time).
"""
import os
from pathlib import Path

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

PACKAGES = ["verbs", "vrdma", "virtio", "vhost_user", "virtio_rdma", "fabric", "guest_lib", "accel_core", "roce"]
ROOT = Path(__file__).parent

cflags = ["-O3", "-fno-strict-aliasing", "-Wno-unused-function"]
if os.environ.get("VRDMA_NATIVE", "1") != "0":
    cflags.append("-march=native")

#: extensions that link a system library (libcrypto: Debian libssl-dev)
LIBRARIES = {"roce._auth": ["crypto"], "roce._udpio": ["crypto"]}

#: flags of accel_core's per-ISA kernel modules (by module-name suffix); these modules
#: never get -march=native: the scalar one must run on any x86-64
SIMD_KERNELS = ("accel_core._fft", "accel_core._turbo")
SIMD_FLAGS = {
    "": ["-mtune=generic"],
    "_avx2": ["-mavx2", "-mfma", "-mtune=generic"],
    "_avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma",
                "-mprefer-vector-width=512", "-mtune=generic"],
}


def _flags(module: str) -> list[str]:
    for base in SIMD_KERNELS:
        for suffix, extra in SIMD_FLAGS.items():
            if module == base + suffix:
                portable = [f for f in cflags if f != "-march=native"]
                return portable + extra
    return cflags


only = [p for p in os.environ.get("VRDMA_ONLY", "").split(",") if p]

extensions = []
for pkg in PACKAGES:
    for pyx in sorted((ROOT / pkg).rglob("_*.pyx")):
        rel = pyx.relative_to(ROOT).with_suffix("")
        if only and not any(str(rel).startswith(p) for p in only):
            continue
        extensions.append(
            Extension(
                ".".join(rel.parts),
                [str(pyx.relative_to(ROOT))],
                include_dirs=[numpy.get_include()],
                extra_compile_args=_flags(".".join(rel.parts)),
                define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
                libraries=LIBRARIES.get(".".join(rel.parts), []),
            )
        )

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    ),
)
