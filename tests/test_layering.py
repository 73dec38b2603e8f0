"""The import rule of the repository (ARCHITECTURE.md, "Layers"), checked on the source text:

* the loss core (``modan_ext`` outside ``data/`` and ``training/``) imports nothing from
  ``modan_ext.data`` or ``modan_ext.training``;
* ``modan_ext.data`` imports nothing from ``modan_ext.training``;
* scripts in ``examples/`` and ``benchmarks/`` import the installed package (``modan_ext...``),
  the standard library and third-party packages only, never another file of this repository
  (benchmarks: except their own ``_common``), and do not edit ``sys.path``.

Every import is found, also those inside functions; a violation is reported as file:line.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "modan_ext"
LAYERS = {"data": f"{PACKAGE}.data", "training": f"{PACKAGE}.training"}
FORBIDDEN = {"core": ("data", "training"), "data": ("training",), "training": ()}
SCRIPT_FOLDERS = ("examples", "benchmarks")
ALLOWED_LOCAL = {"examples": set(), "benchmarks": {"_common"}}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    for layer, prefix in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return "core"


def imports(tree: ast.AST, module: str, is_package: bool):
    """(line, names, relative?) per import statement: `import a, b` names a and b; `from a import
    b` names a and a.b (b may be a submodule); relative imports are resolved against `module`."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, [alias.name], False
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".") if package else []
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            yield node.lineno, [base] + [f"{base}.{a.name}" if base else a.name
                                         for a in node.names], node.level > 0
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__", "run_module"):
                yield node.lineno, [node.args[0].value], False


def package_violations(source: str, module: str, is_package: bool, where: str) -> list[str]:
    own = layer_of(module)
    found = []
    for line, names, _ in imports(ast.parse(source), module, is_package):
        bad = [n for n in names if n.split(".")[0] == PACKAGE and layer_of(n) in FORBIDDEN[own]]
        if bad:
            found.append(f"{where}:{line}: the {own} layer imports {bad[0]} "
                         f"({layer_of(bad[0])} layer)")
    return found


def local_module_names() -> set[str]:
    names = {p.stem for p in ROOT.glob("*.py")} | {"tests", *SCRIPT_FOLDERS}
    for folder in ("tests", *SCRIPT_FOLDERS):
        names |= {p.stem for p in (ROOT / folder).glob("*.py")}
    return names - {PACKAGE}


def script_violations(source: str, folder: str, where: str, local: set[str]) -> list[str]:
    tree = ast.parse(source)
    found = []
    for line, names, relative in imports(tree, "", False):
        top = names[0].split(".")[0]
        if relative:
            found.append(f"{where}:{line}: relative import ({', '.join(names)})")
        elif top in local and top not in ALLOWED_LOCAL[folder]:
            found.append(f"{where}:{line}: imports {names[0]}, a file of this repository, not "
                         f"the {PACKAGE} package")
    for node in ast.walk(tree):
        edits_path = (isinstance(node, ast.Attribute) and node.attr == "path" and
                      isinstance(node.value, ast.Name) and node.value.id == "sys") or \
                     (isinstance(node, ast.ImportFrom) and node.module == "sys" and
                      any(a.name == "path" for a in node.names))
        if edits_path:
            found.append(f"{where}:{node.lineno}: uses sys.path (import the installed package "
                         "instead)")
    return sorted(found, key=lambda text: int(text[len(where) + 1:].split(":")[0]))


PACKAGE_FILES = sorted((ROOT / PACKAGE).rglob("*.py"))
SCRIPT_FILES = sorted(p for folder in SCRIPT_FOLDERS for p in (ROOT / folder).glob("*.py"))


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("path", PACKAGE_FILES, ids=_id)
def test_package_layers(path):
    problems = package_violations(path.read_text(encoding="utf-8"), module_name(path),
                                  path.name == "__init__.py", _id(path))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", SCRIPT_FILES, ids=_id)
def test_scripts_import_only_the_package(path):
    folder = path.relative_to(ROOT).parts[0]
    problems = script_violations(path.read_text(encoding="utf-8"), folder, _id(path),
                                 local_module_names())
    assert not problems, "\n".join(problems)


def test_the_files_checked_include_every_layer_and_script_folder():
    layers = {layer_of(module_name(p)) for p in PACKAGE_FILES}
    folders = {p.relative_to(ROOT).parts[0] for p in SCRIPT_FILES}
    assert layers == {"core", "data", "training"} and folders == set(SCRIPT_FOLDERS)


# ---- the checker itself finds what it must --------------------------------------------------

@pytest.mark.parametrize("source, module, is_package, expected", [
    ("from .data.records import ImageSet\n", "modan_ext.loss", False, "core layer imports modan_ext.data"),
    ("from modan_ext import training\n", "modan_ext.ops", False, "imports modan_ext.training"),
    ("def f():\n    import modan_ext.training.model\n", "modan_ext.reference", False, ":2: the core"),
    ("from ..training.model import build_encoder\n", "modan_ext.data.sources", False,
     "data layer imports modan_ext.training.model"),
    ("from ...training import cli\n", "modan_ext.data.readers", True, "data layer imports"),
    ("from ... import training\n", "modan_ext.data.synthetic", True, "imports modan_ext.training"),
])
def test_checker_finds_layer_violations(source, module, is_package, expected):
    problems = package_violations(source, module, is_package, "x.py")
    assert len(problems) == 1 and expected in problems[0] and problems[0].startswith("x.py:")


@pytest.mark.parametrize("source, module, is_package", [
    ("from ..loss import JaccardSupConLoss\nfrom ..data.records import ImageSet\n",
     "modan_ext.training.objective", False),
    ("from ..reference import label_similarity\n", "modan_ext.data.sources", False),
    ("from . import ops, reference\nimport torch\n", "modan_ext.loss", False),
    ("from ..training import model\n", "modan_ext.data.readers", True),  # = modan_ext.data.training
])
def test_checker_accepts_allowed_imports(source, module, is_package):
    assert package_violations(source, module, is_package, "x.py") == []


@pytest.mark.parametrize("source, folder, expected", [
    ("import sys, os\nsys.path.insert(0, os.path.dirname(__file__))\n", "benchmarks", ":2: uses sys.path"),
    ("from sys import path\n", "examples", "uses sys.path"),
    ("import pretrain\n", "examples", ":1: imports pretrain, a file of this repository"),
    ("from bench_loss import make_inputs\n", "benchmarks", "imports bench_loss"),
    ("from _common import make_inputs\n", "examples", "imports _common"),
    ("from . import helpers\n", "examples", "relative import"),
    ("import importlib\nimportlib.import_module('loss_cases')\n", "benchmarks", "imports loss_cases"),
])
def test_checker_finds_script_violations(source, folder, expected):
    local = {"pretrain", "bench_loss", "_common", "loss_cases", "tests"}
    problems = script_violations(source, folder, "s.py", local)
    assert len(problems) == 1 and expected in problems[0] and problems[0].startswith("s.py:")


def test_checker_accepts_package_and_own_common_imports():
    source = ("import argparse\nimport torch\nfrom modan_ext.training import cli\n"
              "from _common import make_inputs\n")
    assert script_violations(source, "benchmarks", "s.py", {"_common", "pretrain"}) == []
