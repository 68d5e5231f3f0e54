"""The package's imports go one way, in the order data flows (README, "How it is built"):
a module imports only modules of an earlier layer.  A new module is placed in LAYERS."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "bngen"

LAYERS = [
    {"version", "dtypes", "threads", "c_names", "target", "statistics"},  # facts with no dependencies
    {"spec"},
    {"entries", "oracle", "frameworks"},
    {"plan"},
    {"render"},
    {"cache"},
    {"compiler"},
    {"binder"},
    {"kernel"},
    {"build"},
    {"fold", "emit", "distributed"},
    {"population"},
    {"layer", "catalogue", "torch", "resnet"},
    {"bench"},
    {"bench_distributed"},
    {"cli", "__init__", "__main__"},
]
# Imports made inside a function on first use, that would otherwise close a cycle; each
# is the public convenience of a lower module reaching up (Spec.from_torch and co.).
LAZY_UPWARD = {("spec", "frameworks")}


def _layer(name: str) -> int:
    for i, members in enumerate(LAYERS):
        if name in members:
            return i
    raise AssertionError(f"bngen/{name}.py is in no layer of tests/test_layout.py: place it in the data flow")


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            module = (node.module or "").split(".")[0]
            if module:
                yield module
            else:  # from . import a, b
                yield from (alias.name for alias in node.names)


def test_imports_go_one_way():
    for path in sorted(PACKAGE.glob("*.py")):
        me = path.stem
        if me in ("__init__", "__main__"):  # the package's face: it may import everything
            continue
        for other in set(_imports(path)):
            if (me, other) in LAZY_UPWARD:
                continue
            assert _layer(other) < _layer(me), f"bngen/{me}.py imports .{other}, which is not in an earlier layer"
