"""How gn_det's modules depend on each other: benchmark and inspection code (gn_det.diagnostics.bench) is not
loaded by ``import gn_det``, and no module imports, directly or through others, one that
imports it back."""
import ast
import json
import os
import subprocess
import sys
from typing import Dict, List, Optional, Set

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def module_files(root: str = ROOT) -> Dict[str, str]:
    """Dotted module name -> file, for every module of ``root``/gn_det/ (a package is its __init__)."""
    modules = {}
    for folder, _, files in os.walk(os.path.join(root, "gn_det")):
        for name in files:
            if name.endswith(".py"):
                parts = os.path.relpath(os.path.join(folder, name), root)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts.pop()
                modules[".".join(parts)] = os.path.join(folder, name)
    return modules


def imported_modules(module: str, path: str, known: Set[str]) -> Set[str]:
    """The gn_det modules that ``module``'s file imports, at its top level or inside functions
    (a lazy import still closes a cycle): ``from P import name`` imports P.name where that is a
    module, else P. The package ``gn_det`` itself is left out: every module's parent, it is not
    a dependency any module chose."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    is_package = os.path.basename(path) == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base: Optional[str] = node.module
            if node.level:
                parts = module.split(".")[:len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != "gn_det" and t != module)
    return found


def import_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One cycle of ``graph`` (module -> the modules it imports) as a path, or None."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def import_graph(root: str = ROOT) -> Dict[str, Set[str]]:
    files = module_files(root)
    return {name: imported_modules(name, path, set(files)) for name, path in files.items()}


def test_no_import_cycle_among_gn_det_modules():
    graph = import_graph()
    # The checker sees what matters: layers imports recompute, modeling imports layers.
    assert "gn_det.recompute" in graph["gn_det.layers.group_norm"]
    assert "gn_det.layers.group_norm" in graph["gn_det.modeling.projections"]
    cycle = import_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_checker_finds_a_lazy_import_cycle(tmp_path):
    # The cycle this check was written for: layers imports recompute at its top, recompute
    # imports layers inside a function (as gn_det's recompute.py did before it was split).
    package = tmp_path / "gn_det"
    (package / "layers").mkdir(parents=True)
    (package / "__init__.py").write_text("from .layers import GroupNorm\n")
    (package / "layers" / "__init__.py").write_text("from .group_norm import GroupNorm\n")
    (package / "layers" / "group_norm.py").write_text("from .. import recompute\nclass GroupNorm: pass\n")
    (package / "recompute.py").write_text("def walk():\n    from .layers import GroupNorm\n    return GroupNorm\n")
    graph = import_graph(str(tmp_path))
    assert graph["gn_det.layers.group_norm"] == {"gn_det.recompute"} and graph["gn_det.recompute"] == {"gn_det.layers"}
    assert import_cycle(graph) == ["gn_det.layers", "gn_det.layers.group_norm", "gn_det.recompute", "gn_det.layers"]
    (package / "recompute.py").write_text("def walk():\n    return None\n")
    assert import_cycle(import_graph(str(tmp_path))) is None


def test_import_gn_det_loads_no_benchmark_or_inspection_code():
    pytest.importorskip("detectron2")
    code = ("import json, sys; import gn_det; import detectron2.modeling; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('gn_det'))))")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True, cwd=ROOT)
    loaded = json.loads(out.stdout.splitlines()[-1])
    assert "gn_det.modeling.projections" in loaded  # detectron2 was found: the whole library loaded
    # (the plugin only: neither the diagnostics nor the training application)
    moved = [m for m in loaded if m.startswith(("gn_det.diagnostics", "gn_det.train"))]
    assert not moved, f"import gn_det loaded {moved}"
    assert not hasattr(__import__("gn_det"), "count_saved_tensors")  # a benchmark counter: gn_det.diagnostics.bench.memory


def test_development_layout_lists_every_module_and_tool():
    """docs/DEVELOPMENT.md's Layout names every module of gn_det/ and every file of tools/ (so a
    new one is described where a newcomer to the code looks first)."""
    with open(os.path.join(ROOT, "docs", "DEVELOPMENT.md")) as f:
        text = f.read()
    layout = text[text.index("## Layout"):]
    layout = layout[:layout.index("```", layout.index("```") + 3)]
    files = [os.path.relpath(path, ROOT) for path in module_files().values()]
    files += [os.path.join("tools", name) for name in os.listdir(os.path.join(ROOT, "tools"))
              if not name.startswith((".", "__"))]
    missing = [path for path in files if os.path.basename(path) != "__init__.py"
               and os.path.basename(path) not in layout]
    assert not missing, f"docs/DEVELOPMENT.md's Layout does not name: {missing}"


def test_moved_module_paths_still_work():
    """Every old path of gn_det._moved.MOVED imports as the same module object as its new path
    (no second copy, also for a moved package's submodules), and `python -m gn_det.check` /
    `python -m gn_det.env`, the documented commands, run the moved modules."""
    pytest.importorskip("detectron2")
    import importlib

    from gn_det._moved import MOVED

    for old, new in MOVED.items():
        assert importlib.import_module(old) is importlib.import_module(new), old
    import gn_det.data.checks
    import gn_det.train.data.checks
    assert gn_det.data.checks is gn_det.train.data.checks
    out = subprocess.run([sys.executable, "-m", "gn_det.check", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "usage: python -m gn_det.check" in out.stdout, out.stderr[-2000:]


def test_the_operations_import_nothing_of_the_policy_or_above():
    """gn_det.ops holds the operations only: none of its modules imports, directly or through
    others, the policy that picks them, the layers, the detectron2 glue or the applications
    (gn_det.config's rules and gn_det.errors are the exceptions it may use: the one table of
    each setting's rule, not followed further)."""
    graph = import_graph()
    allowed = {"gn_det.config", "gn_det.errors"}
    for module in (m for m in graph if m.startswith("gn_det.ops")):
        seen, todo = set(), [module]
        while todo:
            for dep in graph[todo.pop()]:
                if dep not in seen:
                    seen.add(dep)
                    if dep not in allowed:
                        todo.append(dep)
        outside = sorted(m for m in seen if not m.startswith("gn_det.ops") and m not in allowed)
        assert not outside, f"{module} imports {outside}"
