"""The layers of docs/architecture.md, checked on the source: every foodlib module imports only
modules of its own layer or below, the imports form no cycle, and an import inside a function is
marked ``# lazy: <why>`` (it keeps torch or an optional package out of a light code path).

The imports are read with ``ast``, nothing is imported. A new module must be given a layer here
(and in docs/architecture.md), or the first test fails and says so.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "foodlib"

#: Lowest first. A module may import from its own layer and the layers listed before it.
LAYERS: list[tuple[str, set[str]]] = [
    ("basics", {"foodlib", "foodlib.errors", "foodlib.messages", "foodlib.files", "foodlib.metrics",
                "foodlib.plots", "foodlib.gpu_slots"}),
    ("parts", {"foodlib.data", "foodlib.models", "foodlib.losses", "foodlib.features", "foodlib.trainable",
               "foodlib.distributed"}),
    ("config", {"foodlib.config"}),
    ("run services", {"foodlib.runtime", "foodlib.runfolder", "foodlib.tensorboard_log", "foodlib.trunk_cache",
                      "foodlib.analysis", "foodlib.openset", "foodlib.enrolled"}),
    ("training", {"foodlib.train"}),
    ("workflows", {"foodlib.inference", "foodlib.suite", "foodlib.suite_workers",
                   "foodlib.report", "foodlib.tuning"}),
    ("entry", {"foodlib.cli"}),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """Index of the layer of ``module``: a package's layer covers its submodules (foodlib.data.scan)."""
    best = None
    for index, (_, members) in enumerate(LAYERS):
        for member in members:
            inside = module.startswith(member + ".") and (PACKAGE.parent / Path(*member.split("."))).is_dir() and member != "foodlib"
            if (module == member or inside) and (best is None or len(member) > len(best[1])):
                best = (index, member)
    if best is None:
        raise KeyError(module)
    return best[0]


def foodlib_imports(path: Path, me: str | None = None) -> list[tuple[str, int, bool, str]]:
    """(imported foodlib module, line, inside a function?, the source line) for every import in ``path``
    (read as module ``me``, by default the module the path names)."""
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    me = me or module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            targets = []
            if isinstance(child, ast.Import):
                targets = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join(up + ([child.module] if child.module else []))
                # `from foodlib import plots` imports the module foodlib.plots
                targets = [f"{base}.{alias.name}" if _is_module(f"{base}.{alias.name}") else base for alias in child.names]
            for target in targets:
                if target == "foodlib" or target.startswith("foodlib."):
                    end = getattr(child, "end_lineno", child.lineno)
                    found.append((_owner(target), child.lineno, in_function, " ".join(lines[child.lineno - 1:end])))
            visit(child, inner)

    visit(tree, False)
    return found


def _is_module(name: str) -> bool:
    relative = Path(*name.split("."))
    return (ROOT / relative).with_suffix(".py").is_file() or (ROOT / relative / "__init__.py").is_file()


def _owner(name: str) -> str:
    """The module a dotted name lives in (foodlib.data.cache.X -> foodlib.data.cache)."""
    while name and not _is_module(name):
        name = name.rsplit(".", 1)[0]
    return name


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    missing = []
    for path in SOURCES:
        try:
            layer_of(module_name(path))
        except KeyError:
            missing.append(module_name(path))
    assert not missing, f"give these modules a layer in tests/test_architecture.py and docs/architecture.md: {missing}"


def test_no_module_imports_a_module_above_its_layer():
    upward = []
    for path in SOURCES:
        me = module_name(path)
        for target, line, _, _ in foodlib_imports(path):
            if layer_of(target) > layer_of(me):
                upward.append(f"{path.relative_to(ROOT)}:{line} ({LAYERS[layer_of(me)][0]}) imports {target} "
                              f"({LAYERS[layer_of(target)][0]})")
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def test_imports_inside_functions_say_why():
    unmarked = []
    for path in SOURCES:
        for target, line, in_function, text in foodlib_imports(path):
            if in_function and "# lazy:" not in text:
                unmarked.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not unmarked, ("a foodlib import inside a function needs a `# lazy: <why>` comment (it must keep torch or "
                          "an optional package off a light path); otherwise import at the top:\n" + "\n".join(unmarked))


def test_the_modules_import_no_cycle():
    graph: dict[str, set[str]] = {}
    for path in SOURCES:
        me = module_name(path)
        graph.setdefault(me, set()).update(t for t, *_ in foodlib_imports(path)
                                            if t != me and not me.startswith(t + ".") and not t.startswith(me + "."))
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node)


def test_the_layer_check_catches_an_upward_import(tmp_path):
    """The checker itself: an import of train inside a function of a basics module is found as such."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from foodlib.train import fit\n")
    found = foodlib_imports(probe, me="foodlib.metrics")
    assert [(target, inside) for target, _, inside, _ in found] == [("foodlib.train", True)]
    assert layer_of("foodlib.train") > layer_of("foodlib.metrics")


def test_the_light_modules_import_no_torch():
    """Reading configs, parsing the command line, reports and metrics start fast: no torch import."""
    import subprocess
    import sys

    light = ["foodlib", "foodlib.config", "foodlib.cli", "foodlib.metrics", "foodlib.plots", "foodlib.report",
             "foodlib.openset", "foodlib.suite", "foodlib.features", "foodlib.runfolder", "foodlib.enrolled"]
    code = f"import sys\nfor m in {light!r}:\n    __import__(m)\nprint('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.stdout.strip() == "False", result.stdout + result.stderr
