"""The layers import only downward: astguard (the contract) <- training <- service <- clients <- evaluation, with the
user client torch-free. Checked twice: from the source (every import, lazy ones inside functions included, and
import_module/__import__ calls with a literal name), and by importing every module in a fresh process."""
from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

STDLIB = set(sys.stdlib_module_names)

# package (or module) -> the top-level modules it must never import
FORBIDDEN = {
    "astguard": {"training", "service", "clients", "evaluation", "torch", "torchvision", "numpy", "onnxruntime"},
    "training": {"service", "clients", "evaluation"},
    "service": {"training", "clients", "evaluation", "torch", "torchvision"},
    "clients": {"evaluation"},
}
# the user client may import the standard library, these, and nothing else
CLIENT_ALLOWED = {"httpx", "numpy", "PIL", "astguard"}


def imported_modules(source: str) -> set[str]:
    """Every module the source imports, wherever the import statement stands (module level, function, branch)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)
            if name in ("import_module", "__import__"):
                names.add(node.args[0].value)
    return names


def violations(path: Path, forbidden: set[str], allowed: set[str] | None = None) -> list[str]:
    found = []
    for name in sorted(imported_modules(path.read_text())):
        top = name.split(".")[0]
        if top in forbidden or (allowed is not None and top not in allowed and top not in STDLIB):
            found.append(f"{path.relative_to(REPO)} imports {name}")
    return found


def package_files(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def package_modules(package: str) -> list[str]:
    found = [package]
    for info in pkgutil.walk_packages([str(REPO / package)], prefix=package + "."):
        if not info.name.endswith("__main__"):  # running it would start the program
            found.append(info.name)
    return found


def test_the_source_check_sees_lazy_imports_and_import_module_calls():
    source = ("import os\n"
              "def later():\n"
              "    from service.runtime import OnnxModel\n"
              "    if True:\n"
              "        import torch.nn as nn\n"
              "    importlib.import_module('clients.client')\n"
              "    __import__('evaluation')\n")
    assert imported_modules(source) == {"os", "service.runtime", "torch.nn", "clients.client", "evaluation"}


def test_the_source_check_flags_a_forbidden_import_and_an_unlisted_one(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    bad = tmp_path / "mod.py"
    bad.write_text("def f():\n    import training.data\n    import requests\n")
    assert violations(bad, {"training"}) == ["mod.py imports training.data"]
    assert violations(bad, set(), CLIENT_ALLOWED) == ["mod.py imports requests", "mod.py imports training.data"]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_module_of_a_layer_imports_a_layer_above_it_even_lazily(package):
    found = [v for path in package_files(package) for v in violations(path, FORBIDDEN[package])]
    assert not found, "\n".join(found)


def test_the_user_client_imports_only_httpx_numpy_pillow_and_the_contract():
    assert not violations(REPO / "clients" / "client.py", set(), CLIENT_ALLOWED)


def _loaded_after_importing(modules: list[str]) -> set[str]:
    code = (f"import importlib, json, sys\nfor m in {modules!r}:\n    importlib.import_module(m)\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return set(json.loads(r.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_importing_every_module_of_a_layer_in_a_fresh_process_loads_nothing_above_it(package):
    loaded = _loaded_after_importing(package_modules(package))
    assert not loaded & FORBIDDEN[package], sorted(loaded & FORBIDDEN[package])


def test_importing_the_user_client_in_a_fresh_process_loads_no_torch_nor_any_other_layer():
    loaded = _loaded_after_importing(["clients.client"])
    assert not loaded & {"torch", "torchvision", "training", "service", "evaluation"}
