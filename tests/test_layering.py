"""The layering of docs/architecture.md, read from the source with :mod:`ast`:
physics <- methods <- interfaces <- workflows <- cli, with dl beside qsm.

Every import counts, at module level or inside a function (a lazy import is
still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qsmprep"

#: subpackage -> the qsmprep subpackages it may never import
FORBIDDEN = {
    "qsm": {"dl", "interfaces", "workflows", "cli"},
    "dl": {"interfaces", "workflows", "cli"},
    "interfaces": {"workflows", "cli"},
    "workflows": {"cli"},
}


def _imports(path):
    """Absolute ``qsmprep.*`` module names imported by the file at ``path``."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out |= {name} | {f"{name}.{a.name}" for a in node.names}
    return {m for m in out if m == "qsmprep" or m.startswith("qsmprep.")}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_layer_imports_one_above_it(layer):
    bad = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for name in _imports(path):
            parts = name.split(".")
            if len(parts) > 1 and parts[1] in FORBIDDEN[layer]:
                bad.append(f"{path.relative_to(PACKAGE.parent)} imports {name}")
    assert not bad, "\n".join(bad)


def test_registry_imports_no_method_module():
    """The methods layer names its functions as strings; importing it loads
    neither the physics nor dl (see test_registry for the run-time check)."""
    assert _imports(PACKAGE / "qsm" / "registry.py") == set()


def test_the_checker_sees_relative_and_lazy_imports(tmp_path, monkeypatch):
    fake = PACKAGE / "qsm" / "x.py"  # a path inside the package; never written
    src = "from ..dl import methods\ndef f():\n    from . import kernels\n    import qsmprep.cli\n"
    monkeypatch.setattr(Path, "read_text", lambda self, **kw: src)
    assert _imports(fake) >= {"qsmprep.dl.methods", "qsmprep.qsm.kernels", "qsmprep.cli"}
