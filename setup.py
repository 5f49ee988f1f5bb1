"""Build the Cython extensions of vrdma.

Every ``_*.pyx`` file below a package is one extension module named after its
path (``virtio/_split.pyx`` -> ``virtio._split``), so a new kernel needs no
edit here. Kernels are compiled with -O3; ``-march=native`` is added unless
VRDMA_NATIVE=0 (set it when building a wheel for other machines).
VRDMA_ONLY=path/prefix[,...] builds only the matching .pyx files (handy while
working on one kernel: ``VRDMA_ONLY=accel_core python setup.py build_ext -i``).
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
                extra_compile_args=cflags,
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
