"""The repository's Cython extensions, built portable for the guest image.

The in-place extensions are compiled with ``-march=native``: on an AVX-512 host they use
instructions QEMU's TCG does not emulate and the guest's Python dies of SIGILL.  This
runs the repository's own setup.py with ``VRDMA_NATIVE=0`` on a staged copy of the
sources (the repository is never written), for the packages the image ships
(``VRDMA_ONLY``), and caches the .so files under ``cache_root/ext-<key>/`` (the key hashes
the sources, the interpreter, Cython and numpy); every extension of the repository is
built once and each image takes those of the packages it ships.  The harness's rxe guests use the
same build (:func:`build`, ``qemu_tests.rxe_guest.portable_extensions``) with their own cache.

They are compiled by the interpreter running the build (CPython 3.11, the ABI tag
``cpython-311-x86_64-linux-gnu`` Debian's python3.11 loads) against that environment's
numpy headers, which target numpy's 1.23 C API by default, so Debian 12's numpy 1.24
loads them; the image's build checks it by importing every one of them with Debian's
interpreter and numpy (``builder``).
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence

from .debs import run
from .errors import BuildError, ToolMissing

_SOURCES = (".pyx", ".pxd", ".pxi", ".h")
_SKIP_DIRS = {"build", "var", "__pycache__", "node_modules"}


def _sources(repo: str, packages: Sequence[str]) -> list[str]:
    found = ["setup.py"]
    for pkg in sorted(packages):
        for dirpath, dirnames, filenames in os.walk(os.path.join(repo, pkg)):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in _SKIP_DIRS)
            found.extend(os.path.relpath(os.path.join(dirpath, name), repo) for name in sorted(filenames)
                         if name.endswith(_SOURCES) or name == "__init__.py")
    return found


def _extension_packages(repo: str) -> list[str]:
    """Top-level packages of ``repo`` with a Cython source (what setup.py builds)."""
    return sorted(e.name for e in os.scandir(repo) if e.is_dir() and not e.name.startswith(".")
                  and os.path.isfile(os.path.join(e.path, "__init__.py"))
                  and any(f.endswith(".pyx") for _, _, fs in os.walk(e.path) for f in fs))


BUILDS_KEPT = 3  # sources change while people work; each build is ~15 MB


def prune(cache_root: str, kept: int = BUILDS_KEPT) -> None:
    """Keep the ``kept`` most recently used extension builds."""
    builds = sorted((e for e in os.scandir(cache_root) if e.name.startswith("ext-") and e.is_dir()
                     and not e.name.startswith("ext-build-")),
                    key=lambda e: e.stat().st_mtime, reverse=True)
    for old in builds[kept:]:
        shutil.rmtree(old.path, ignore_errors=True)


def build(repo: str, cache_root: str, *, packages: Sequence[str] | None = None, timeout: float = 900,
          kept: int = BUILDS_KEPT) -> str:
    """Build (or reuse) every Cython extension of ``repo`` portable; the cache directory
    holding them (``cache_root/ext-<key>/``, repo-relative paths). The key hashes the
    sources of ``packages`` (default: every package with a Cython source), the interpreter,
    Cython and numpy. Keeps the ``kept`` most recently used builds. ToolMissing without
    Cython or numpy, BuildError if setup.py fails or builds nothing."""
    try:
        import Cython
        import numpy
    except ImportError as exc:
        raise ToolMissing(f"cannot build portable extensions: {exc}") from exc
    sources = _sources(repo, _extension_packages(repo) if packages is None else packages)
    digest = hashlib.sha256()
    for tag in (sys.version, sys.executable, Cython.__version__, numpy.__version__):
        digest.update(tag.encode() + b"\0")
    for rel in sources:
        with open(os.path.join(repo, rel), "rb") as f:
            digest.update(rel.encode() + b"\0" + hashlib.sha256(f.read()).digest())
    out_dir = os.path.join(cache_root, "ext-" + digest.hexdigest()[:16])
    os.makedirs(cache_root, exist_ok=True)
    with open(os.path.join(cache_root, ".ext-lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(os.path.join(out_dir, "DONE")):
            with tempfile.TemporaryDirectory(prefix="ext-build-", dir=cache_root) as tmp:
                src = os.path.join(tmp, "src")
                for rel in sources:
                    os.makedirs(os.path.join(src, os.path.dirname(rel)), exist_ok=True)
                    shutil.copy2(os.path.join(repo, rel), os.path.join(src, rel))
                env = {**os.environ, "VRDMA_NATIVE": "0"}
                env.pop("VRDMA_ONLY", None)
                run([sys.executable, "setup.py", "-q", "build_ext", "--inplace", "-j", "2"],
                    cwd=src, env=env, timeout=timeout)
                stage = os.path.join(tmp, "out")
                os.makedirs(stage)
                count = 0
                for dirpath, dirnames, filenames in os.walk(src):
                    dirnames[:] = [d for d in dirnames if d != "build"]
                    for name in filenames:
                        if name.endswith(".so"):
                            rel = os.path.relpath(os.path.join(dirpath, name), src)
                            os.makedirs(os.path.join(stage, os.path.dirname(rel)), exist_ok=True)
                            shutil.copy2(os.path.join(dirpath, name), os.path.join(stage, rel))
                            count += 1
                if not count:
                    raise BuildError(f"setup.py built no extension from {repo}")
                open(os.path.join(stage, "DONE"), "w").close()
                if os.path.exists(out_dir):
                    shutil.rmtree(out_dir)
                os.rename(stage, out_dir)
        os.utime(out_dir)
        prune(cache_root, kept)
    return out_dir


def portable_extensions(repo: str, packages: Sequence[str], cache_root: str,
                        timeout: float = 900) -> dict[str, str]:
    """{repo-relative .so path: cached portable .so} for the extensions of ``packages``."""
    out_dir = build(repo, cache_root, timeout=timeout)
    built: dict[str, str] = {}
    for dirpath, _, filenames in os.walk(out_dir):
        for name in sorted(filenames):
            if name.endswith(".so"):
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, out_dir)
                if rel.split(os.sep)[0] in packages:
                    built[rel] = path
    return built
