"""Build a bootable single-application guest image from Debian's own packages.

The image is two files and a manifest, in ``CACHE_ROOT/<key>/`` (``--out DIR`` gets a copy):

* ``vmlinux``: the distribution kernel (the package ``linux-image-amd64`` depends on),
  the ELF extracted from its vmlinuz, booted directly through its PVH entry note;
* ``initramfs.cpio``: an uncompressed newc archive with busybox (busybox-static), Debian's CPython
  3.11 (python3.11-minimal, libpython3.11-minimal, libpython3.11-stdlib; the test suites,
  tkinter, idlelib, ensurepip... pruned) with Debian's numpy (python3-numpy with BLAS and
  LAPACK), their shared-library closure (``ldd``), uio and uio_pci_generic, the
  repository's modules the application imports (``closure``) with their Cython
  extensions built portable (``extensions``), pure-Python third-party packages they
  import (copied from the environment that builds), every .pyc precompiled by Debian's
  interpreter (unchecked-hash: the archive carries no mtimes), the application in /app,
  and /init (``initscript``);
* ``manifest.json``: the key, every input's version, sizes, the kernel release.

Packages are unpacked (``dpkg-deb -x``), never installed.  The key hashes the package
versions, the builder version, /init, the repository files shipped (and the extension
sources), the third-party packages' files and the application file: the image is rebuilt
only when one of them changes (``Image.cached`` says whether this call built it).  Before
an image is accepted, Debian's interpreter from the staging tree imports numpy and every
extension shipped (the same check the guest would make, on the host CPU).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import lzma
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

from . import closure as closure_mod, cpio, debs, extensions, initscript
from .errors import BuildError
from .vmlinux import extract_vmlinux

# A fixed name in /var/tmp (as the harness's rxe guest cache): builds run as root on a
# test machine; VRDMA_IMAGE_CACHE or --cache moves it.
CACHE_ROOT = os.environ.get("VRDMA_IMAGE_CACHE", "/var/tmp/vrdma-image")  # noqa: S108
BUILDER_VERSION = "4"  # bump when the layout changes
#: the repository: the directory holding the vrdma package (a source checkout)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_APP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_app.py")

PYTHON = "python3.11"
USER_PACKAGES = ("busybox-static", f"{PYTHON}-minimal", f"lib{PYTHON}-minimal", f"lib{PYTHON}-stdlib",
                 "python3-numpy", "libblas3", "liblapack3", "libgfortran5")
MODULES = ("uio", "uio_pci_generic")
STDLIB_PRUNE = frozenset({"test", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip",
                          "pydoc_data", "__pycache__", "venv", "turtle.py", "dist-packages",
                          "config-3.11-x86_64-linux-gnu"})
#: extension modules of the stdlib the image leaves out (test modules; databases, curses
#: and readline, whose libraries are most of the closure's weight)
DYNLOAD_PRUNE = ("_test", "_ctypes_test", "xxlimited", "_xx", "_dbm", "_gdbm", "nis", "_curses",
                 "readline", "_tkinter", "_sqlite3")
NUMPY_PRUNE = frozenset({"tests", "distutils", "__pycache__", "include", "f2py"})
#: uncompressed: the guest kernel copies it into its rootfs in ~2 s under TCG, where
#: gunzip of the same archive takes ~5 s more (measured, QEMU 7.2, loaded host)
INITRAMFS = "initramfs.cpio"
DEFAULT_HUGEPAGES = 64  # 2 MiB pages: 128 MiB for rings and registered memory
IMAGES_KEPT = 8  # newest images left in the cache (each ~140 MB); older ones are removed


@dataclass(frozen=True)
class Image:
    """A built image: its directory, files, key and whether this call found it cached."""

    directory: str
    key: str
    cached: bool

    @property
    def vmlinux(self) -> str:
        return os.path.join(self.directory, "vmlinux")

    @property
    def initramfs(self) -> str:
        return os.path.join(self.directory, INITRAMFS)

    @property
    def manifest(self) -> dict:
        with open(os.path.join(self.directory, "manifest.json")) as f:
            return json.load(f)


def load(directory: str) -> Image:
    """The image in ``directory`` (as ``vrdma image build --out`` left it); BuildError if none."""
    for name in ("vmlinux", INITRAMFS, "manifest.json"):
        if not os.path.isfile(os.path.join(directory, name)):
            raise BuildError(f"{directory} holds no image: {name} missing (vrdma image build --out)")
    with open(os.path.join(directory, "manifest.json")) as f:
        key = json.load(f).get("key", "")
    return Image(directory, key, True)


def _hash_file(digest, path: str, name: str) -> None:
    with open(path, "rb") as f:
        digest.update(name.encode() + b"\0" + hashlib.sha256(f.read()).digest())


def _third_party_dirs(names: Sequence[str]) -> dict[str, str]:
    """{top-level name: directory or file} of third-party modules in this environment."""
    found: dict[str, str] = {}
    for name in sorted(names):
        try:
            import importlib.util
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is None or spec.origin is None:
            continue  # an optional import the application guards (the guest lacks it too)
        origin = spec.origin
        found[name] = os.path.dirname(origin) if os.path.basename(origin) == "__init__.py" else origin
    return found


def _walk_files(top: str) -> list[str]:
    if os.path.isfile(top):
        return [top]
    out = []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        out += [os.path.join(dirpath, f) for f in sorted(filenames)]
    return out


def image_key(versions: dict[str, str], app_name: str, app_bytes: bytes, clos: closure_mod.Closure,
              third: dict[str, str], repo: str) -> tuple[str, str]:
    """(key, the text it hashes)."""
    digest = hashlib.sha256()
    for rel in sorted(clos.files):
        _hash_file(digest, os.path.join(repo, rel), rel)
    for rel in extensions._sources(repo, extensions._extension_packages(repo)):
        _hash_file(digest, os.path.join(repo, rel), rel)
    for name, top in sorted(third.items()):
        for path in _walk_files(top):
            _hash_file(digest, path, f"{name}:{os.path.relpath(path, top)}")
    lines = [f"builder={BUILDER_VERSION}",
             f"init={hashlib.sha256(initscript.INIT.encode()).hexdigest()[:16]}",
             f"app={app_name}:{hashlib.sha256(app_bytes).hexdigest()[:16]}",
             f"sources={digest.hexdigest()[:16]}",
             f"build-python={sys.version.split()[0]}",
             *(f"{p}={versions[p]}" for p in sorted(versions))]
    text = "\n".join(lines) + "\n"
    return hashlib.sha256(text.encode()).hexdigest()[:16], text


def build(app: str | None = None, out: str | None = None, *, cache_root: str = CACHE_ROOT,
          repo: str = REPO_ROOT, log=None) -> Image:
    """Build (or find cached) the image of ``app`` (default: rc-pingpong); copy it to ``out``.

    Safe against concurrent callers (a lock file in ``cache_root``).  ``log`` (a callable
    taking a str) hears about each step.
    """
    say = log or (lambda msg: None)
    debs.check_tools()
    app_path = os.path.abspath(app or DEFAULT_APP)
    try:
        with open(app_path, "rb") as f:
            app_bytes = f.read()
    except OSError as exc:
        raise BuildError(f"cannot read the application {app_path}: {exc}") from exc
    app_name = "app.py" if app_path.endswith(".py") else "app"
    kpkg = debs.kernel_package()
    release = kpkg[len("linux-image-"):]
    versions = debs.candidate_versions((kpkg, *USER_PACKAGES))
    try:
        app_source = app_bytes.decode() if app_name == "app.py" else None
    except UnicodeDecodeError as exc:
        raise BuildError(f"the application {app_path} is not UTF-8 Python: {exc}") from exc
    try:
        clos = closure_mod.find(repo, None, app_source if app_source is not None else "")
    except SyntaxError as exc:
        raise BuildError(f"cannot parse {exc.filename or app_path}: {exc}") from exc
    third = _third_party_dirs(sorted(clos.third_party))
    key, key_text = image_key(versions, app_name, app_bytes, clos, third, repo)
    out_dir = os.path.join(cache_root, key)
    os.makedirs(cache_root, exist_ok=True)
    with open(os.path.join(cache_root, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cached = os.path.exists(os.path.join(out_dir, "DONE"))
        if not cached:
            say(f"building image {key} (app {app_path})")
            _build_into(out_dir, key, key_text, versions, kpkg, release, app_name, app_bytes,
                        clos, third, repo, cache_root, say)
        else:
            say(f"image {key} is cached")
        os.utime(out_dir)
        _prune(cache_root, IMAGES_KEPT, lambda name: len(name) == 16 and "-" not in name)
        extensions.prune(cache_root)
    image = Image(out_dir, key, cached)
    if out is not None:
        image = _copy_out(image, out)
    return image


def _prune(cache_root: str, keep: int, match) -> None:
    """Remove all but the ``keep`` most recently used cache entries whose name ``match``es."""
    entries = sorted((e for e in os.scandir(cache_root) if e.is_dir() and match(e.name)),
                     key=lambda e: e.stat().st_mtime, reverse=True)
    for old in entries[keep:]:
        shutil.rmtree(old.path, ignore_errors=True)


def _copy_out(image: Image, out: str) -> Image:
    os.makedirs(out, exist_ok=True)
    try:
        if load(out).key == image.key:
            return Image(os.path.abspath(out), image.key, image.cached)
    except BuildError:
        pass
    for name in ("vmlinux", INITRAMFS, "manifest.json"):
        tmp = os.path.join(out, f".{name}.tmp")
        shutil.copyfile(os.path.join(image.directory, name), tmp)
        os.replace(tmp, os.path.join(out, name))
    return Image(os.path.abspath(out), image.key, image.cached)


def _copytree(src: str, dst: str, prune: frozenset[str]) -> None:
    shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True,
                    ignore=lambda d, names: [n for n in names if n in prune])


def _build_into(out_dir: str, key: str, key_text: str, versions: dict[str, str], kpkg: str,
                release: str, app_name: str, app_bytes: bytes, clos: closure_mod.Closure,
                third: dict[str, str], repo: str, cache_root: str, say) -> None:
    with tempfile.TemporaryDirectory(prefix="image-build-", dir=cache_root) as tmp:
        root = os.path.join(tmp, "root")
        stage = os.path.join(tmp, "stage")
        os.makedirs(root)
        os.makedirs(stage)
        say("downloading and unpacking " + " ".join(sorted(versions)))
        debs.download_and_unpack(versions, os.path.join(cache_root, "debs"), root)
        debs.run(["depmod", "-b", root, release])
        with open(os.path.join(root, "boot", f"vmlinuz-{release}"), "rb") as kf:
            vmlinux = extract_vmlinux(kf.read())

        def put(rel: str, src: str | None = None, data: bytes | None = None, mode: int = 0o644) -> None:
            dst = os.path.join(stage, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if src is not None:
                shutil.copyfile(src, dst)
            else:
                with open(dst, "wb") as f:
                    f.write(data or b"")
            os.chmod(dst, mode)

        # busybox, Python, numpy
        put("bin/busybox", os.path.join(root, "bin/busybox"), mode=0o755)
        put(f"usr/bin/{PYTHON}", os.path.join(root, f"usr/bin/{PYTHON}"), mode=0o755)
        os.symlink(PYTHON, os.path.join(stage, "usr/bin/python3"))
        pylib = f"usr/lib/{PYTHON}"
        _copytree(os.path.join(root, pylib), os.path.join(stage, pylib), STDLIB_PRUNE)
        dynload = os.path.join(stage, pylib, "lib-dynload")
        for name in os.listdir(dynload):
            if name.startswith(DYNLOAD_PRUNE):
                os.unlink(os.path.join(dynload, name))
        np_rel = "usr/lib/python3/dist-packages/numpy"
        _copytree(os.path.join(root, np_rel), os.path.join(stage, np_rel), NUMPY_PRUNE)
        # the repository's modules and their portable extensions, third-party packages
        opt = initscript.PYTHONPATH.lstrip("/")
        for rel in sorted(clos.files):
            put(f"{opt}/{rel}", os.path.join(repo, rel))
        if clos.extensions:
            say("building portable extensions for " + ", ".join(sorted(clos.packages)))
            for rel, path in extensions.portable_extensions(repo, sorted(clos.packages), cache_root).items():
                if rel.split(".", 1)[0].replace(os.sep, ".") in clos.extensions:
                    put(f"{opt}/{rel}", path, mode=0o755)
        _strip([p for p in _walk_files(os.path.join(stage, opt)) if p.endswith(".so")])
        for name, top in third.items():
            if os.path.isdir(top):
                _copytree(top, os.path.join(stage, opt, name), frozenset({"__pycache__"}))
            else:
                put(f"{opt}/{os.path.basename(top)}", top)
        # shared libraries: the interpreter's are required, an extension module's missing
        # library drops that module (the stdlib's _dbm, _curses_panel... we never import)
        so_files = [os.path.join(stage, f"usr/bin/{PYTHON}")]
        for top in (pylib, "usr/lib/python3", opt):
            so_files += [p for p in _walk_files(os.path.join(stage, top)) if p.endswith(".so")]
        libs, missing = debs.ldd_closure(root, so_files)
        for path, line in sorted(missing.items()):
            if path.startswith(os.path.join(stage, pylib, "lib-dynload")):
                os.unlink(path)
                say(f"dropped {os.path.relpath(path, stage)}: {line}")
            else:
                raise BuildError(f"{os.path.relpath(path, stage)}: missing shared library: {line}")
        libs, missing = debs.ldd_closure(root, [p for p in so_files if os.path.exists(p)])
        for guest, src in sorted(libs.items()):
            if not os.path.exists(os.path.join(stage, guest)):
                put(guest, src, mode=0o755)
        # kernel modules (flat, in load order)
        moddir = os.path.join(root, "lib/modules", release)
        names = []
        for rel in debs.modules_in_order(root, release, MODULES):
            name = os.path.basename(rel)
            with open(os.path.join(moddir, rel), "rb") as mf:
                data = mf.read()
            if name.endswith(".xz"):
                data, name = lzma.decompress(data), name[:-3]
            put(f"lib/modules/{name}", data=data)
            names.append(name)
        put("etc/vrdma/modules", data=("\n".join(names) + "\n").encode())
        put("etc/hosts", data=b"127.0.0.1 localhost\n::1 localhost\n")
        put("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\n")
        put("etc/group", data=b"root:x:0:\n")
        put(f"app/{app_name}", data=app_bytes, mode=0o755)
        put("app/run", data=initscript.run_script(app_name).encode(), mode=0o755)
        put("init", data=initscript.INIT.encode(), mode=0o755)
        for d in ("proc", "sys", "dev", "tmp", "run", "root"):
            os.makedirs(os.path.join(stage, d), exist_ok=True)
        _check_python(stage, opt, clos)
        say("precompiling .pyc")
        _compile(stage, [pylib, "usr/lib/python3", opt, "app"])
        archive = cpio.encode(_tree_entries(stage))
        staged_out = os.path.join(tmp, "out")
        os.makedirs(staged_out)
        with open(os.path.join(staged_out, "vmlinux"), "wb") as out:
            out.write(vmlinux)
        with open(os.path.join(staged_out, INITRAMFS), "wb") as out:
            out.write(archive)
        manifest = {"key": key, "inputs": key_text.splitlines(), "kernel_release": release,
                    "python": PYTHON, "app": app_name, "modules": names,
                    "repo_packages": sorted(clos.packages), "extensions": sorted(clos.extensions),
                    "third_party": sorted(third),
                    "sizes": {"vmlinux": len(vmlinux), "initramfs_cpio": len(archive)}}
        with open(os.path.join(staged_out, "manifest.json"), "w") as text:
            json.dump(manifest, text, indent=1)
        open(os.path.join(staged_out, "DONE"), "w").close()
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.rename(staged_out, out_dir)


def _strip(files: Sequence[str]) -> None:
    """Drop symbols and debug sections of our extensions (most of their size) if we can."""
    strip = shutil.which("strip")
    if strip and files:
        debs.run([strip, "--strip-unneeded", *files])


def _stage_env(stage: str, opt: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONPATH": os.path.join(stage, opt),
            "LD_LIBRARY_PATH": os.path.join(stage, debs.GUEST_LIB_DIR)}


def _check_python(stage: str, opt: str, clos: closure_mod.Closure) -> None:
    """Debian's interpreter (from the staging tree) imports numpy and every extension."""
    mods = ["numpy"]
    for path in _walk_files(os.path.join(stage, opt)):
        if path.endswith(".so"):
            rel = os.path.relpath(path, os.path.join(stage, opt))
            mods.append(rel.split(".", 1)[0].replace(os.sep, "."))
    code = "import importlib,sys\nfor m in sys.argv[1:]: importlib.import_module(m)\n"
    python = os.path.join(stage, "usr/bin", PYTHON)
    out = subprocess.run([python, "-c", code, *mods], env=_stage_env(stage, opt),
                         capture_output=True, text=True, timeout=300, check=False)
    if out.returncode != 0:
        raise BuildError(f"Debian's {PYTHON} cannot import {mods}: {out.stderr[-2000:]}")


def _compile(stage: str, tops: Sequence[str]) -> None:
    python = os.path.join(stage, "usr/bin", PYTHON)
    env = _stage_env(stage, initscript.PYTHONPATH.lstrip("/"))
    env.pop("PYTHONDONTWRITEBYTECODE")
    debs.run([python, "-m", "compileall", "-q", "-j", "2", "--invalidation-mode", "unchecked-hash",
              "-s", stage, "-p", "/", *(os.path.join(stage, t) for t in tops)], env=env, timeout=900)


def _tree_entries(stage: str) -> list[cpio.CpioEntry]:
    """Every directory, file and symlink under ``stage`` (parents first), as cpio entries."""
    entries: list[cpio.CpioEntry] = []
    for dirpath, dirnames, filenames in os.walk(stage):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, stage)
        if rel_dir != ".":
            entries.append(cpio.directory(rel_dir, stat.S_IMODE(os.lstat(dirpath).st_mode)))
        for name in sorted(filenames) + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            path = os.path.join(dirpath, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                entries.append(cpio.symlink(rel, os.readlink(path)))
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    entries.append(cpio.file(rel, f.read(), stat.S_IMODE(st.st_mode)))
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
    return entries
