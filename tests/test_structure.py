"""How the package hangs together: the teaching modules stand on their own.

The modules under kerasrot/ teach the experiment; kerasrot/runner/ is the
machinery of the `kerasrot` command (recipes, stage cache, speed-ups,
reports) and builds on them, never the other way round. Imports are read
from the source (every `import`, also those inside functions), not by
importing, so a cycle that only shows at run time is found too.
"""

import ast
import importlib
import importlib.util
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kerasrot"


def module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def kerasrot_imports(path):
    """The kerasrot modules that `path` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from kerasrot import data` imports the module kerasrot.data
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant):
                found.add(node.args[0].value)
    return {name for name in found if name == "kerasrot" or name.startswith("kerasrot.")}


def import_graph():
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: {m for m in kerasrot_imports(path) if m in modules and m != name}
            for name, path in modules.items()}


def test_the_import_graph_is_read():
    graph = import_graph()
    assert "kerasrot.data" in graph["kerasrot.runner.stages"]
    assert "kerasrot.folders" in graph["kerasrot.data"]


def test_no_import_cycle():
    graph = import_graph()
    graph = {name: deps - {"kerasrot"} for name, deps in graph.items()}  # the package's lazy __init__
    visiting, done = [], set()

    def visit(name):
        if name in done:
            return
        assert name not in visiting, " -> ".join([*visiting[visiting.index(name):], name])
        visiting.append(name)
        for dependency in sorted(graph[name]):
            visit(dependency)
        visiting.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


def test_teaching_modules_do_not_import_the_runner():
    graph = import_graph()
    # `python -m kerasrot` (kerasrot/__main__.py) is the command itself: it starts runner.cli.
    teaching = {name: deps for name, deps in graph.items()
                if not name.startswith("kerasrot.runner") and name != "kerasrot.__main__"}
    reaching_up = {name: sorted(d for d in deps if d.startswith("kerasrot.runner")) for name, deps in teaching.items()}
    assert not {name: deps for name, deps in reaching_up.items() if deps}


def test_no_module_level_cache():
    # State a run needs travels with the run (runner.stages.RunCache), not in
    # module globals that a test or a second run in one process would have to reset.
    pattern = re.compile(r"lru_cache|^_[a-z_]* = \{\}", re.MULTILINE)
    allowed = {
        # Pillow's list of readable suffixes: a constant of the installed Pillow.
        ("kerasrot.folders", "functools.cache"),
        # a torch.autograd.Function class, defined on first use (torch is there only on its backend).
        ("kerasrot.runner.speed", "functools.cache"),
        # the one CUDA stream that CUDA-graph warm-ups and captures share, by design one per process.
        ("kerasrot.runner.cuda_graphs", "functools.cache"),
    }
    for path in PACKAGE.rglob("*.py"):
        assert not pattern.search(path.read_text()), path
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for decorator in node.decorator_list:
                    if ast.unparse(decorator) in ("functools.cache", "cache", "lru_cache"):
                        assert (module_name(path), ast.unparse(decorator)) in allowed, (path, node.name)


def can_import(module, name):
    """Whether `from module import name` works: an attribute (the lazy public API too), or a submodule."""
    found = importlib.import_module(module)
    is_package = hasattr(found, "__path__")
    return hasattr(found, name) or (is_package and importlib.util.find_spec(f"{module}.{name}") is not None)


def imported_names(module, names):
    """The names `from module import names` brings in, read by Python's own parser (aliases, comments, parentheses)."""
    return [alias.name for alias in ast.parse(f"from {module} import {names}").body[0].names]


def test_scripts_import_what_the_package_has():
    # benchmarks/gpu_session.sh runs on a lent GPU machine, where a moved
    # function costs metered minutes: its `python3 -c "from kerasrot... import"`
    # lines, and those of the benchmarks and examples, must name what exists.
    # Unlike the tests above, this one imports, as the scripts will.
    root = PACKAGE.parent
    # The names: one line of them, or a parenthesised list over several lines.
    statement = re.compile(r"from (kerasrot[\w.]*) import (\([^)]*\)|[\w, ]+)")
    scripts = [path for path in [*root.glob("benchmarks/*"), *root.glob("examples/*.py")] if path.is_file()]
    imports = [(script.name, module, name)
               for script in scripts
               for module, names in statement.findall(script.read_text())
               for name in imported_names(module, names)]
    assert len(imports) > 10  # the pattern finds them
    missing = [f"{script}: {module} has no {name}" for script, module, name in imports if not can_import(module, name)]
    assert missing == []
