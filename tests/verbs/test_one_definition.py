"""No second copy of a verbs/IBTA number: outside ``verbs/``, no module of
the repository defines an enumeration, constant or helper that ``verbs``
defines (by name), no Cython file spells a verbs constant, and the eventq
record layout is packed in one place (virtio_rdma/wire.py)."""
import ast
import re
from pathlib import Path

import verbs

ROOT = Path(__file__).resolve().parents[2]
SKIP_DIRS = {".venv", "build", ".git", "verbs", "__pycache__", ".hypothesis"}
NAMES = set(verbs.__all__) - {"parse"}  # "parse" is a common method name


def _sources(*suffixes):
    for path in ROOT.rglob("*"):
        if path.suffix in suffixes and not SKIP_DIRS & set(path.relative_to(ROOT).parts[:-1]):
            yield path


def test_no_python_module_redefines_a_verbs_name():
    found = []
    for path in _sources(".py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in tree.body:  # module level: classes, functions, constants
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name in NAMES:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    for n in ast.walk(t):
                        if isinstance(n, ast.Name) and n.id in NAMES and not _is_import_alias(node):
                            found.append(f"{path.relative_to(ROOT)}:{node.lineno} {n.id}")
    assert not found, found


def _is_import_alias(node) -> bool:
    """``X = verbs.X``-style re-binding is not a definition."""
    return isinstance(node.value, (ast.Attribute, ast.Name))


def test_no_cython_file_spells_a_verbs_constant():
    spelled = re.compile(r"^\s*(IBV_\w+|PSN_MASK|MSN_MASK|QPN_MASK)\s*=", re.M)
    found = [f"{p.relative_to(ROOT)}: {m.group(1)}" for p in _sources(".pyx", ".pxd")
             for m in spelled.finditer(p.read_text())]
    assert not found, found


def test_event_record_layout_is_packed_once():
    where = [p.relative_to(ROOT).as_posix() for p in _sources(".py", ".pyx")
             if '"<BBHI"' in p.read_text() and p.name != Path(__file__).name]
    assert where == ["virtio_rdma/wire.py"]
