"""The package's modules import alone, and import each other without a cycle (function-level imports included)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The package's folders as setup.py maps them: qwen_quant.kernels and qwen_quant.calibration live at the top.
PACKAGES = {"qwen_quant": REPO / "qwen_quant", "qwen_quant.kernels": REPO / "kernels",
            "qwen_quant.calibration": REPO / "calibration"}


def package_modules() -> dict:
    """Module name -> source file of every module of the package."""
    modules = {}
    for package, folder in PACKAGES.items():
        for file in sorted(folder.glob("*.py")):
            modules[package if file.stem == "__init__" else f"{package}.{file.stem}"] = file
    return modules


def imported_modules(name: str, file: Path, known: set) -> set:
    """The package modules `name` imports anywhere in its file (a function-level import is an edge too)."""
    package = name if file.stem == "__init__" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            # `from package import module` names a module; `from module import name` names the module itself.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def test_the_import_graph_has_no_cycle():
    modules = package_modules()
    graph = {name: imported_modules(name, file, set(modules)) for name, file in modules.items()}
    assert graph["qwen_quant.model"] >= {"qwen_quant.loading"}  # the graph is read: a known edge is there
    done, path = set(), []

    def visit(name):
        if name in path:
            cycle = path[path.index(name):] + [name]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if name in done:
            return
        path.append(name)
        for target in sorted(graph[name]):
            visit(target)
        path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


def test_file_access_knows_nothing_of_the_model():
    modules = package_modules()
    for name in ("qwen_quant.checkpoint", "qwen_quant.loading"):
        assert "qwen_quant.model" not in imported_modules(name, modules[name], set(modules))


# Each module is imported with no package module loaded before it; one interpreter serves them all, forgetting the
# package between imports, since a fresh interpreter per module would spend minutes importing torch again.
IMPORT_EACH_ALONE = """
import importlib, sys
for module in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "qwen_quant" or m.startswith("qwen_quant.")]:
        del sys.modules[loaded]
    importlib.import_module(module)
"""


def test_each_module_imports_alone_in_a_fresh_interpreter():
    done = subprocess.run([sys.executable, "-c", IMPORT_EACH_ALONE, *sorted(package_modules())], capture_output=True,
                          text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
