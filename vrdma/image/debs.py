"""Debian's own packages as image inputs: versions, download, unpack, library closure.

Nothing is installed: ``apt-get download`` fetches the exact candidate versions (their
list is the cache key), ``dpkg-deb -x`` unpacks them into a staging root, ``ldd`` (the
host is the same Debian release) lists the shared libraries a binary needs, looked up
in the unpacked root first, then on the host; ``modules.dep`` orders kernel modules.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Sequence

from .errors import BuildError, ToolMissing

TOOLS = ("apt-get", "apt-cache", "dpkg-deb", "depmod", "ldd")
#: where the unpacked root's shared libraries are searched (BLAS/LAPACK live in their
#: alternatives directories, which the postinst would link and we do not run)
LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu",
            "usr/lib/x86_64-linux-gnu/blas", "usr/lib/x86_64-linux-gnu/lapack")
GUEST_LIB_DIR = "usr/lib/x86_64-linux-gnu"


def run(argv: Sequence[str], *, cwd: str | None = None, env: dict | None = None,
        timeout: float = 900) -> str:
    """Run a build tool; its stdout, or BuildError with the tail of its stderr."""
    try:
        out = subprocess.run(list(argv), cwd=cwd, env=env, capture_output=True, text=True,
                             timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise ToolMissing(f"{argv[0]} not available: {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        raise BuildError(f"{' '.join(argv)} took more than {timeout} s") from exc
    if out.returncode != 0:
        raise BuildError(f"{' '.join(argv)} failed (rc={out.returncode}): {out.stderr[-2000:]}")
    return out.stdout


def check_tools() -> None:
    for tool in TOOLS:
        if shutil.which(tool) is None:
            raise ToolMissing(f"{tool} not found: cannot build the guest image")


def kernel_package() -> str:
    """The versioned kernel image package that ``linux-image-amd64`` depends on."""
    out = run(["apt-cache", "depends", "linux-image-amd64"])
    for line in out.splitlines():
        m = re.match(r"\s*Depends:\s*(linux-image-\S+-amd64)\s*$", line)
        if m:
            return m.group(1)
    raise BuildError(f"no kernel package in apt-cache depends linux-image-amd64: {out!r}")


def candidate_versions(packages: Sequence[str]) -> dict[str, str]:
    """Candidate version of each package according to apt."""
    out = run(["apt-cache", "policy", *packages])
    versions: dict[str, str] = {}
    current = None
    for line in out.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            current = line[:-1]
        elif current and line.strip().startswith("Candidate:"):
            versions[current] = line.split(":", 1)[1].strip()
    missing = [p for p in packages if versions.get(p) in (None, "(none)")]
    if missing:
        raise ToolMissing(f"apt has no candidate for {missing}")
    return versions


def download_and_unpack(versions: dict[str, str], debs: str, root: str) -> None:
    """``apt-get download`` each ``package=version`` into ``debs`` (kept), unpack into ``root``."""
    os.makedirs(debs, exist_ok=True)
    have = set(os.listdir(debs))
    want = []
    for pkg, ver in versions.items():
        prefix = f"{pkg}_{ver.replace(':', '%3a')}_"
        if not any(d.startswith(prefix) for d in have):
            want.append(f"{pkg}={ver}")
    if want:
        try:
            run(["apt-get", "download", *want], cwd=debs)
        except BuildError as exc:
            raise ToolMissing(f"apt-get download impossible: {exc}") from exc
    for pkg, ver in versions.items():
        prefix = f"{pkg}_{ver.replace(':', '%3a')}_"
        matches = [d for d in os.listdir(debs) if d.startswith(prefix)]
        if not matches:
            raise BuildError(f"downloaded .deb for {pkg}={ver} not found in {debs}")
        run(["dpkg-deb", "-x", os.path.join(debs, matches[0]), root])


def ldd_closure(root: str, files: Sequence[str], *, lib_dirs: Sequence[str] = LIB_DIRS,
                guest_lib_dir: str = GUEST_LIB_DIR) -> tuple[dict[str, str], dict[str, str]]:
    """Shared libraries ``files`` need, recursively, searched in ``root``'s ``lib_dirs``
    first, then on the host.

    Returns ({guest path: source path}, {file: missing library line}); a guest path is
    relative, the loader at its ABI path (``lib64/...``), every other library in
    ``guest_lib_dir``. A file whose closure is incomplete is reported, not fatal (the
    caller decides: a Python extension module of the stdlib that cannot load is dropped,
    the interpreter is not).
    """
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = ":".join(os.path.join(root, d) for d in lib_dirs)
    libs: dict[str, str] = {}
    missing: dict[str, str] = {}
    todo = list(files)
    done: set[str] = set()
    while todo:
        f = todo.pop()
        if f in done:
            continue
        done.add(f)
        out = run(["ldd", f], env=env)
        for raw in out.splitlines():
            line = raw.strip()
            if "not found" in line:
                missing[f] = line
                continue
            m = re.match(r"(?:\S+ => )?(/\S+) \(0x", line)
            if not m:
                continue
            src = m.group(1)
            real = os.path.realpath(src)
            guest = src[len(root):] if src.startswith(root + "/") else src
            if guest.startswith("/lib64/"):
                libs[guest.lstrip("/")] = real  # the loader, at its ABI path
            else:
                libs[f"{guest_lib_dir}/{os.path.basename(guest)}"] = real
            todo.append(real)
    return libs, missing


def modules_in_order(root: str, release: str, wanted: Sequence[str]) -> list[str]:
    """Module paths (relative to lib/modules/<release>) in load order, dependencies first;
    built-in modules are skipped."""
    moddir = os.path.join(root, "lib/modules", release)
    deps: dict[str, list[str]] = {}
    with open(os.path.join(moddir, "modules.dep")) as f:
        for line in f:
            path, _, rest = line.partition(":")
            deps[path] = rest.split()
    by_name = {os.path.basename(p).split(".ko")[0].replace("-", "_"): p for p in deps}
    builtin: set[str] = set()
    bpath = os.path.join(moddir, "modules.builtin")
    if os.path.exists(bpath):
        with open(bpath) as f:
            builtin = {os.path.basename(line.strip()).split(".ko")[0].replace("-", "_") for line in f}
    order: list[str] = []

    def visit(path: str, stack: tuple[str, ...]) -> None:
        if path in order:
            return
        if path in stack:
            raise BuildError(f"module dependency cycle through {path}")
        for dep in deps.get(path, []):
            visit(dep, (*stack, path))
        order.append(path)

    for name in wanted:
        if name in builtin:
            continue
        if name not in by_name:
            raise BuildError(f"module {name} not found in {moddir}/modules.dep")
        visit(by_name[name], ())
    return order
