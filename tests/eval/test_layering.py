"""eval scores predictions and reads data without the engine (DESIGN.md, "Layout"): no module under eval/
imports `engine`, at the top or inside a function, and importing eval's modules leaves it unloaded."""
import ast
import json
import subprocess
import sys
from pathlib import Path

EVAL = Path(__file__).resolve().parents[2] / "eval"
MODULES = sorted(EVAL.rglob("*.py"))


def _engine_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [f"{path.relative_to(EVAL.parent)}:{node.lineno}: {n}" for n in names
                  if n == "engine" or n.startswith("engine.")]
    return found


def test_no_eval_module_imports_engine():
    assert len(MODULES) > 5  # the walk found the package
    assert [hit for path in MODULES for hit in _engine_imports(path)] == []


def test_importing_eval_leaves_engine_unloaded():
    names = sorted(".".join(p.relative_to(EVAL.parent).with_suffix("").parts).removesuffix(".__init__")
                   for p in MODULES)
    assert {"eval.score", "eval.retrieval", "eval.run"} <= set(names)
    code = ("import importlib, json, sys\n"
            f"for name in {names!r}:\n"
            "    importlib.import_module(name)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m == 'engine' or m.startswith('engine.'))))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=EVAL.parent, capture_output=True, text=True, check=True)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_eval_run_points_to_the_command_that_moved():
    done = subprocess.run([sys.executable, "-m", "eval.run"], cwd=EVAL.parent, capture_output=True, text=True)
    assert done.returncode == 2 and "python -m engine.zero_shot" in done.stderr
