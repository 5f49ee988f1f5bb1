"""What an application imports, found statically: the repository modules to ship.

Starting from the application file (and every module of the packages the image always
carries, ``ALWAYS``), each ``import``/``from ... import`` at any depth (function-level
imports included: a lazily imported transport is still shipped) is resolved against the
repository: a repository module is added with its parent packages' ``__init__`` and
followed; ``from pkg import name`` adds ``pkg.name`` when that is a module.  A Cython
extension reached so (``virtio._split``) is recorded in ``extensions`` and its .pyx's
import lines are followed too (``virtio_rdma._datapath`` imports ``virtio_rdma.cq`` at
run time).  Names that
are neither the repository's, the standard library's nor numpy's (Debian's, in the
image) are third-party and reported by top-level name, for the builder to copy from
the environment that runs it.  Pure: reads source files, runs nothing.
"""
from __future__ import annotations

import ast
import os
import re
import sys
from dataclasses import dataclass, field

#: packages every image carries whole, whatever the application imports
ALWAYS = ("guest_lib",)
#: modules the image itself provides (Debian's numpy, not the environment's), and the
#: compile-time namespaces of Cython's cimports
PROVIDED = frozenset({"numpy", "cython", "libc", "libcpp", "cpython", "posix"})


@dataclass
class Closure:
    """Repository modules (repo-relative .py paths) and third-party top-level names."""

    files: set[str] = field(default_factory=set)
    packages: set[str] = field(default_factory=set)  # repo packages with a module shipped
    extensions: set[str] = field(default_factory=set)  # Cython modules reached ("virtio._split")
    third_party: set[str] = field(default_factory=set)


def _module_file(repo: str, name: str) -> str | None:
    """Repo-relative path of module ``name`` (a .py file or a package __init__)."""
    base = os.path.join(repo, *name.split("."))
    if os.path.isfile(os.path.join(base, "__init__.py")):
        return os.path.relpath(os.path.join(base, "__init__.py"), repo)
    if os.path.isfile(base + ".py"):
        return os.path.relpath(base + ".py", repo)
    return None


def _extension_exists(repo: str, name: str) -> bool:
    base = os.path.join(repo, *name.split("."))
    return os.path.isfile(base + ".pyx")


_CYTHON_IMPORT = re.compile(r"^\s*(?:from\s+([\w.]+)\s+(?:c?import)\s+([\w, ()]+)|(?:c?import)\s+([\w.]+))",
                            re.MULTILINE)


def _pyx_imports(source: str, module: str) -> list[tuple[str, tuple[str, ...]]]:
    """Imports of a Cython source (not Python syntax: matched line by line); a ``cimport``
    of a .pxd costs nothing at run time but following it is harmless."""
    found: list[tuple[str, tuple[str, ...]]] = []
    for m in _CYTHON_IMPORT.finditer(source):
        if m.group(3):
            found.append((m.group(3), ()))
            continue
        name = m.group(1)
        if name.startswith("."):
            dots = len(name) - len(name.lstrip("."))
            base = module.split(".")[:-1]
            base = base[: len(base) - (dots - 1)]
            name = ".".join([*base, name.lstrip(".")] if name.lstrip(".") else base)
        names = tuple(n.strip() for n in m.group(2).replace("(", "").replace(")", "").split(",") if n.strip())
        found.append((name, names))
    return found


def _imports(source: str, module: str, is_package: bool) -> list[tuple[str, tuple[str, ...]]]:
    """(absolute module, imported names) of each import statement in ``source``."""
    found: list[tuple[str, tuple[str, ...]]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(a.name, ()) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.append((name, tuple(a.name for a in node.names)))
    return found


def _top_levels(repo: str) -> set[str]:
    return {e.name for e in os.scandir(repo)
            if e.is_dir() and os.path.isfile(os.path.join(e.path, "__init__.py"))}


def find(repo: str, app_file: str | None, app_source: str | None = None) -> Closure:
    """The closure of ``app_file`` (or ``app_source``) plus ``ALWAYS`` within ``repo``."""
    repo_tops = _top_levels(repo)
    closure = Closure()
    todo: list[tuple[str, str]] = []  # (module name, repo-relative file)

    def add(name: str) -> bool:
        parts = name.split(".")
        if parts[0] not in repo_tops:
            return False
        for i in range(1, len(parts) + 1):
            sub = ".".join(parts[:i])
            rel = _module_file(repo, sub)
            if rel is None:
                if not _extension_exists(repo, sub):
                    return False
                if sub not in closure.extensions:
                    closure.extensions.add(sub)
                    closure.packages.add(parts[0])
                    todo.append((sub, os.path.join(*sub.split(".")) + ".pyx"))
                return True
            if rel not in closure.files:
                closure.files.add(rel)
                closure.packages.add(parts[0])
                todo.append((sub, rel))
        return True

    def classify(name: str) -> None:
        top = name.split(".")[0]
        if not top or top in repo_tops or top in sys.stdlib_module_names or top in PROVIDED:
            return
        closure.third_party.add(top)

    for pkg in ALWAYS:
        for dirpath, dirnames, filenames in os.walk(os.path.join(repo, pkg)):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for fname in sorted(filenames):
                if fname.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, fname), repo)
                    mod = rel[:-3].replace(os.sep, ".").removesuffix(".__init__")
                    add(mod)
    roots: list[tuple[str, str]] = []
    if app_source is not None:
        roots.append(("__main__", app_source))
    elif app_file is not None:
        with open(app_file) as f:
            roots.append(("__main__", f.read()))
    while roots or todo:
        if roots:
            module, source, is_pkg, is_pyx = *roots.pop(), False, False
        else:
            module, rel = todo.pop()
            with open(os.path.join(repo, rel)) as f:
                source = f.read()
            is_pkg, is_pyx = rel.endswith("__init__.py"), rel.endswith(".pyx")
        found = _pyx_imports(source, module) if is_pyx else _imports(source, module, is_pkg)
        for name, names in found:
            if not add(name):
                classify(name)
                continue
            for sub in names:
                if sub != "*":
                    add(f"{name}.{sub}")
    return closure
