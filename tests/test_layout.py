"""The package's imports go one way, in the order data flows (README, "How it is built"):
a module imports only modules of an earlier layer.  The package root holds the public
modules; each subpackage is one stage of the pipeline.  A new module is placed in LAYERS."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "bngen"

LAYERS = [
    {"version", "core.errors", "core.dtypes", "core.threads", "statistics"},  # facts with no dependencies
    {"core.spec"},
    {"oracle", "frameworks"},  # what a spec computes (the float64 reference), the importers
    {"plan.target", "plan.entries"},
    {"plan.plan"},
    {"codegen.c_names", "codegen.render"},
    {"jit.cache"},
    {"jit.compiler"},
    {"jit.binder"},
    {"jit.kernel"},
    {"jit.build"},
    {"aot.fold", "aot.emit", "distributed", "torch_native"},
    {"layers.population"},
    {"layers.layer", "aot.catalogue", "torch", "tools.resnet"},
    {"tools.bench"},
    {"tools.bench_distributed"},
    {"tools.cli"},
]
# Imports made inside a function on first use, that would otherwise close a cycle; each
# is the public convenience of a lower module reaching up (Spec.from_torch and co.).
LAZY_UPWARD = {("core.spec", "frameworks")}
FACES = {"__init__", "__main__"}  # the package's and the command's face: they may import anything


def _name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def _layer(name: str) -> int:
    for i, members in enumerate(LAYERS):
        if name in members:
            return i
    raise AssertionError(f"bngen/{name.replace('.', '/')}.py is in no layer of tests/test_layout.py: place it in the data flow")


def _imports(path: Path, me: str):
    """The bngen modules that `path` imports, by dotted name below the package."""
    package = me.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)]
            module = base + (node.module.split(".") if node.module else [])
            if node.module:
                yield ".".join(module)
            else:  # from . import a, b
                yield from (".".join(module + [alias.name]) for alias in node.names)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            for name in names:
                assert not (name or "").startswith("bngen"), f"bngen/{me}.py imports {name} absolutely; use a relative import"


def test_every_package_is_a_stage():
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert packages == {"core", "plan", "codegen", "jit", "aot", "layers", "tools"}
    for package in packages:
        assert ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text())), f"bngen/{package} says what it is"


def test_imports_go_one_way():
    for path in sorted(PACKAGE.rglob("*.py")):
        me = _name(path)
        if me.split(".")[-1] in FACES:
            continue
        for other in set(_imports(path, me)):
            if (me, other) in LAZY_UPWARD:
                continue
            assert _layer(other) < _layer(me), f"bngen/{me}.py imports {other}, which is not in an earlier layer"
