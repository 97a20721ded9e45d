"""The code base stays lint-clean (ruff, configured in pyproject.toml)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_is_clean() -> None:
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    result = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


PACKAGE = ROOT / "halos"
MAX_FUNCTION_LINES = 50
# Which subpackages may not import which (anywhere in the module, lazily included).
FORBIDDEN_IMPORTS = {
    "halos.train": ("halos.eval", "halos.hub", "halos.rl"),
    "halos.rl": ("halos.eval", "halos.hub"),
    "halos.losses": ("halos.eval", "halos.hub", "halos.rl.online_ppo", "halos.suite"),
    "halos.data": ("halos.models", "halos.train", "halos.rl", "halos.eval", "halos.losses"),
    # Models use the log-prob kernel and collation of train/, never its loop or setup.
    "halos.models": ("halos.train.run", "halos.train.loop", "halos.train.session",
                     "halos.train.engine", "halos.train.checkpoints", "halos.rl", "halos.eval",
                     "halos.suite"),
}
# Snakemake imports halos.suite to plan: no torch at module level there (or in what it imports).
TORCH_FREE_AT_IMPORT = ("halos.suite", "halos.config", "halos.files", "halos.models")


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        out[name] = ast.parse(path.read_text(), filename=str(path))
    return out


def _imports(node: ast.AST) -> set[str]:
    names = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Import):
            names |= {alias.name for alias in sub.names}
        elif isinstance(sub, ast.ImportFrom) and sub.module:
            names.add(sub.module)
            names |= {f"{sub.module}.{alias.name}" for alias in sub.names}
    return names


def test_functions_are_at_most_50_lines() -> None:
    long = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, long


def test_subpackages_import_only_downstream() -> None:
    problems = []
    for name, tree in _modules().items():
        for package, forbidden in FORBIDDEN_IMPORTS.items():
            if name == package or name.startswith(package + "."):
                bad = sorted(i for i in _imports(tree) if i.startswith(forbidden))
                problems += [f"{name} imports {b}" for b in bad]
    assert not problems, problems


def test_planning_imports_no_torch() -> None:
    """What Snakemake imports to plan a suite loads without torch (module-level imports)."""
    code = ("import sys; import halos.suite, halos.config, halos.files, halos.models; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', "
            "'deepspeed')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, check=True)
    assert result.stdout.strip() == "[]", result.stdout
    assert TORCH_FREE_AT_IMPORT
