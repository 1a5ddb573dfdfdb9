"""The import graph of the package has no cycle, hidden or not.

Every ``import`` and ``from ... import`` of a module of mmkernels, at module
level or inside a function, is an edge; an edge to a package is an edge to its
``__init__``. A cycle means that some module can only be imported in one
order, and that a reader (or a tool) cannot tell what a module needs from its
imports. Kernel backends are imported in one place, by mmkernels/__init__.py.

And every module imports, one after another in a fresh interpreter: the
static graph cannot see a name a module imports that is no longer there.
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mmkernels"


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def import_graph() -> dict[str, set[str]]:
    """module name -> names of the mmkernels modules it imports."""
    modules = _modules()
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if _is_package(name, modules) else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # "from pkg import sub" imports the submodule; "from pkg import name", pkg.
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            for target in targets:
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of names (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_graph_sees_the_package_imports():
    graph = import_graph()
    assert "mmkernels.backends" in graph["mmkernels.ops.logsumexp"]
    assert "mmkernels.ops.logsumexp" in graph["mmkernels.triton"]


def test_no_import_cycle_in_mmkernels():
    """Edges into the top package's __init__ (``import mmkernels``) from inside it would
    be cycles too; the only module allowed to import the backend packages is the top one."""
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
    for name, targets in graph.items():
        if name != "mmkernels":
            assert not {"mmkernels.triton", "mmkernels.compiled"} & targets or name.startswith(
                ("mmkernels.triton", "mmkernels.compiled")), (name, targets)


# Imports each module named on the command line in turn; prints what failed, and the
# modules whose import wants a package that is not installed (an optional dependency).
_IMPORT_EACH = """
import importlib, json, sys
failed, missing = {}, {}
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as e:
        if (e.name or "").partition(".")[0] == "mmkernels":
            failed[name] = repr(e)
        else:
            missing[name] = e.name
    except Exception as e:
        failed[name] = type(e).__name__ + ": " + str(e)
print(json.dumps({"failed": failed, "missing": missing}))
"""


def test_every_module_imports_in_a_fresh_interpreter():
    """Every module of the package, in sorted order, in an interpreter that imported
    none of them before (pytest's has), raises nothing at import: no stale name
    (``from mmkernels.x import gone``), no module-level code that fails. ``__main__``
    modules are left out (importing one runs it); a module whose import needs an
    optional dependency that is not installed is not a failure (the integrations')."""
    names = sorted(name for name in _modules() if not name.endswith(".__main__"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(PACKAGE.parent),
                                                                     os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", _IMPORT_EACH, *names], cwd=PACKAGE.parent, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["failed"] == {}, result["failed"]
    assert "mmkernels.ops.contrastive" in names and len(names) > 40


def test_import_mmkernels_leaves_its_optional_peers_alone():
    """The integrations' peers are imported on use only: importing mmkernels, its
    integrations package and the open_clip_train entry point imports none of them."""
    code = ("import sys, mmkernels, mmkernels.integrations, mmkernels.integrations.open_clip_train; "
            "loaded = {'open_clip', 'open_clip_train', 'sentence_transformers', 'transformers'} & set(sys.modules); "
            "assert not loaded, loaded")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
