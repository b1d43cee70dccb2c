"""The house's layering, checked: the import-linter contract in pyproject.toml holds (no circle, no upward
import inside `minsota/`), it does fail on an upward import, and the built-in plugins import the core only.
"""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")  # installed with .[dev], beside this Python
# What a plugin may import: the public surface (`minsota`) and the floors of components and below. Never the
# decoder, the trainer or anything above, and never another plugin (minsota.builtins.*).
PLUGIN_IMPORTS = {
    "minsota",
    "minsota.components",
    "minsota.data",
    "minsota.errors",
    "minsota.hookspecs",
    "minsota.prepared",
    "minsota.loss",
    "minsota.reference",
    "minsota.registry",
    "minsota.state",
}


def lint_imports(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": str(LINT_IMPORTS.parent), **({"PYTHONPATH": str(pythonpath)} if pythonpath else {})}
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(cwd / "pyproject.toml"), "--no-cache"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_import_layers_hold():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_an_upward_import_breaks_the_layers(tmp_path):
    """The contract is not vacuous: a copy of the core where `minsota.model` imports the generation module
    above it (a circle, too) fails, naming the import."""
    shutil.copytree(REPO / "minsota", tmp_path / "minsota", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    with open(tmp_path / "minsota" / "model.py", "a") as f:
        f.write("\nimport minsota.generation  # deliberately upward\n")
    result = lint_imports(tmp_path, pythonpath=tmp_path)
    assert result.returncode != 0 and "minsota.model is not allowed to import minsota.generation" in result.stdout, (
        result.stdout + result.stderr
    )


def imported_modules(path: Path) -> list[str]:
    """The absolute minsota modules a file imports (``from minsota import x`` counts minsota.x if x is a module)."""
    core = {p.stem for p in (REPO / "minsota").glob("*.py")}
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append(node.module)
            if node.module == "minsota":
                found += [f"minsota.{alias.name}" for alias in node.names if alias.name in core]
    return [name for name in found if name == "minsota" or name.startswith("minsota.")]


def test_builtin_plugins_import_only_the_core():
    """torchtune's modules/ never imports models/: a built-in subclasses the bases in `minsota.components`, as a
    third-party plugin would, and never imports the decoder, the trainer or another built-in."""
    wrong = {
        f"plugins/{path.name}: {name}"
        for path in sorted((REPO / "plugins").glob("*.py"))
        for name in imported_modules(path)
        if name not in PLUGIN_IMPORTS
    }
    assert not wrong, sorted(wrong)
