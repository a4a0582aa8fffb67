"""The layer rules of docs/architecture.md, checked on the source (ast, no imports executed).

Layers, lowest first; a module may import its own layer and the layers below, never above:

    passes_registry < qpasses.errors < qpasses.numerics < qpasses.ir < qpasses.modules
        < qpasses.algorithms < qpasses.analyses < qpasses.passes
        < (qpasses.pipelines, qpasses.report, qpasses.cli, qpasses/__init__)

Also: passes_registry never imports qpasses; no module under qpasses/passes/ imports another one
(shared code lives in a lower layer); no private name (``_x``, not dunder) is imported from
another module, by ``from m import _x`` or by ``m._x`` on an imported module; tools/ never edit
``sys.path`` (they run as ``python -m tools.NAME``); no source file under qpasses/ is over
``MAX_LINES`` lines.

Function-level (lazy) imports count like top-level ones.
"""
from __future__ import annotations

import ast
import os
from dataclasses import dataclass

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("passes_registry", "qpasses")
MAX_LINES = 600

LAYERS = (
    ("passes_registry",),
    ("qpasses.errors",),
    ("qpasses.numerics",),
    ("qpasses.ir",),
    ("qpasses.modules",),
    ("qpasses.algorithms",),
    ("qpasses.analyses",),
    ("qpasses.passes",),
    ("qpasses.pipelines", "qpasses.report", "qpasses.cli", "qpasses", "qpasses.export"),
)

# Files over MAX_LINES that are being split right now; this list only shrinks.
OVERSIZED_BEING_SPLIT: set[str] = set()

# Known violations, (importer module, imported module or "module._name"), being fixed; this list
# only shrinks: a pair that no longer occurs must be removed (the test says so).
KNOWN_VIOLATIONS: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class Import:
    importer: str        # dotted module name of the importing file
    module: str          # dotted name of the imported module
    name: str | None     # the imported name for ``from module import name``, else None
    line: int


def _module_name(rel_path: str) -> str:
    parts = rel_path[:-len(".py")].split(os.sep)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def source_files() -> dict[str, str]:
    """Dotted module name -> path relative to the repository, for every module of PACKAGES."""
    out = {}
    for pkg in PACKAGES:
        for root, dirs, files in os.walk(os.path.join(REPO, pkg)):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for f in sorted(files):
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(root, f), REPO)
                    out[_module_name(rel)] = rel
    return out


def _resolve_relative(importer: str, is_package: bool, level: int, module: str | None) -> str:
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    if level > 1:
        base = base[:-(level - 1)]
    return ".".join(base + ([module] if module else []))


def read(rel_path: str) -> str:
    with open(os.path.join(REPO, rel_path)) as f:
        return f.read()


def imports_of(module: str, rel_path: str, source: str, known: set[str]) -> list[Import]:
    """Every import in the file (any depth), and ``m._x`` accesses on imported modules."""
    tree = ast.parse(source, rel_path)
    is_package = rel_path.endswith("__init__.py")
    out: list[Import] = []
    module_aliases: dict[str, str] = {}   # local name -> imported module (for m._x accesses)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out.append(Import(module, a.name, None, node.lineno))
                if a.asname:
                    module_aliases[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom):
            src = node.module or ""
            if node.level:
                src = _resolve_relative(module, is_package, node.level, node.module)
            for a in node.names:
                sub = f"{src}.{a.name}"
                if sub in known:      # ``from pkg import submodule``
                    out.append(Import(module, sub, None, node.lineno))
                    module_aliases[a.asname or a.name] = sub
                else:
                    out.append(Import(module, src, a.name, node.lineno))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in module_aliases):
            out.append(Import(module, module_aliases[node.value.id], node.attr, node.lineno))
    return out


def _project(module: str) -> bool:
    return module.split(".")[0] in PACKAGES


def layer_of(module: str) -> int:
    best, rank = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    assert rank >= 0, f"{module} is in no layer: add it to LAYERS"
    return rank


def _is_private(name: str | None) -> bool:
    return bool(name) and name.startswith("_") and not (name.startswith("__")
                                                        and name.endswith("__"))


def violations(sources: dict[str, str] | None = None) -> list[tuple[str, str, str]]:
    """(importer, imported, why) for every broken rule; imported is ``module`` or ``module._x``.
    ``sources`` (relative path -> text) replaces or adds files of the tree."""
    files = source_files()
    for rel in sources or {}:
        files[_module_name(rel)] = rel
    known = set(files)
    out = []
    for module, rel in files.items():
        text = (sources or {}).get(rel)
        for imp in imports_of(module, rel, read(rel) if text is None else text, known):
            if not _project(imp.module):
                continue
            target = imp.module
            if module.startswith("passes_registry") and target.startswith("qpasses"):
                out.append((module, target, "passes_registry imports qpasses"))
            elif layer_of(target) > layer_of(module):
                out.append((module, target, "imports a higher layer"))
            if (module.startswith("qpasses.passes.") and target.startswith("qpasses.passes")
                    and target != module):
                out.append((module, target, "one pass module imports another"))
            if _is_private(imp.name) and target != module:
                out.append((module, f"{target}.{imp.name}", "imports a private name"))
    return sorted(set(out))


def test_layer_and_import_rules():
    found = violations()
    pairs = {(a, b) for a, b, _ in found}
    new = [v for v in found if (v[0], v[1]) not in KNOWN_VIOLATIONS]
    fixed = sorted(KNOWN_VIOLATIONS - pairs)
    print(f"known import-rule violations still allowed: {len(KNOWN_VIOLATIONS)}")
    assert not new, "import rules broken (see tests/test_architecture.py):\n" + "\n".join(
        f"  {a} -> {b}: {why}" for a, b, why in new)
    assert not fixed, ("fixed, remove from KNOWN_VIOLATIONS in tests/test_architecture.py:\n"
                       + "\n".join(f"  {p}" for p in fixed))


@pytest.mark.parametrize("rel,source,expected", [
    ("qpasses/numerics/costs.py", "def f():\n    from qpasses.passes import dce\n",
     ("qpasses.numerics.costs", "qpasses.passes.dce", "imports a higher layer")),
    ("passes_registry/printing.py", "import qpasses.errors\n",
     ("passes_registry.printing", "qpasses.errors", "passes_registry imports qpasses")),
    ("qpasses/passes/dce.py", "from qpasses.passes.canonicalize import Canonicalize\n",
     ("qpasses.passes.dce", "qpasses.passes.canonicalize", "one pass module imports another")),
    ("qpasses/ir/trace.py", "from qpasses.errors import _hidden\n",
     ("qpasses.ir.trace", "qpasses.errors._hidden", "imports a private name")),
    ("qpasses/ir/trace.py", "from qpasses import errors\nx = errors._hidden\n",
     ("qpasses.ir.trace", "qpasses.errors._hidden", "imports a private name")),
])
def test_the_checker_reports_a_broken_rule(rel, source, expected):
    assert expected in violations({rel: source})


def test_tools_do_not_edit_sys_path():
    tools = os.path.join(REPO, "tools")
    bad = []
    for f in sorted(os.listdir(tools)):
        if not f.endswith(".py"):
            continue
        with open(os.path.join(tools, f)) as fh:
            tree = ast.parse(fh.read(), f)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr == "path"
                    and isinstance(node.value, ast.Name) and node.value.id == "sys"):
                bad.append(f"tools/{f}:{node.lineno}")
    assert not bad, "tools/ run as `python -m tools.NAME`; no sys.path edits: " + ", ".join(bad)


def test_no_source_file_is_too_long():
    too_long = {}
    for rel in source_files().values():
        if not rel.startswith("qpasses"):
            continue
        with open(os.path.join(REPO, rel)) as f:
            n = sum(1 for _ in f)
        if n > MAX_LINES:
            too_long[rel] = n
    new = {f: n for f, n in too_long.items() if f not in OVERSIZED_BEING_SPLIT}
    assert not new, f"files over {MAX_LINES} lines (split them): {new}"
