"""The package's module graph: data flows one way through the stage subpackages, and no module imports back."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: The layers of ``kdcache`` in the order data flows, lowest first; a module imports only from its own package or a
#: lower layer. The settings table and the plain modules at the top of the package (errors, sizes, devices, plots)
#: form ``base``.
ORDER = ("base", "dataset", "views", "models", "teacher", "store", "dump", "feed", "losses", "train", "experiments")
#: Stage two trains from a cache without running stage one.
STAGE_TWO = ("feed", "losses", "train")
TOP = ("kdcache", "kdcache.cli")  # the public face and the command line may reach every layer


def _modules() -> dict[str, Path]:
    """Every module of the library and the CLI by its import name."""
    found = {}
    for folder, package in (("pipeline", "kdcache"), ("cli", "kdcache.cli")):
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [package, *path.relative_to(ROOT / folder).with_suffix("").parts]
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _package(module: str, path: Path) -> str:
    """The package a relative import in ``module`` (at ``path``) is relative to."""
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _referenced(module: str, path: Path, names: set[str]) -> set[str]:
    """Modules ``module`` imports: absolute and relative imports (inside functions too) and module-name strings
    (``import_module("kdcache.x")``, lazy tables)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = _package(module, path).rsplit(".", node.level - 1)[0]
                base = f"{anchor}.{base}" if base else anchor
            found |= {base, *(f"{base}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
            found.add(node.value)
    return {m for m in found if m in names and not module.startswith(m)}  # its own packages are no import back


def _imports() -> dict[str, set[str]]:
    modules = _modules()
    names = set(modules)
    return {m: _referenced(m, p, names) for m, p in modules.items()}


def _layer(module: str) -> str:
    """``kdcache.store.cache`` -> ``store``; ``kdcache.errors`` -> ``base``; the package root and CLI -> themselves."""
    if module in TOP or module.startswith("kdcache.cli."):
        return "top"
    parts = module.split(".")
    return parts[1] if parts[1] in ORDER else "base"


def _layer_violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, deps in sorted(graph.items()):
        here = _layer(module)
        if here == "top":
            continue
        for dep in sorted(deps):
            there = _layer(dep)
            upward = there == "top" or ORDER.index(there) > ORDER.index(here)
            if upward or (here in STAGE_TWO and there == "dump"):
                found.append(f"{module} ({here}) imports {dep} ({there})")
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return path[path.index(d) :] + [d]
            if d not in state and (found := visit(d)):
                return found
        path.pop()
        state[m] = 2
        return None

    return next((c for m in sorted(graph) if m not in state and (c := visit(m))), None)


def test_no_import_cycles():
    graph = _imports()
    assert {"kdcache.dump.loop", "kdcache.dump.cluster", "kdcache.dump.chunks", "kdcache.cli"} <= set(graph)
    assert (
        "kdcache.dump.chunks" in graph["kdcache.dump.cluster"] and "kdcache.dump.cluster" in graph["kdcache.dump.loop"]
    )
    cycle = _cycle({m: {d for d in deps if _layer(d) != "top" or _layer(m) == "top"} for m, deps in graph.items()})
    assert cycle is None, " -> ".join(cycle)


def test_layers_follow_the_data_flow():
    graph = _imports()
    assert {_layer(m) for m in graph} == {"top", *ORDER}
    assert _layer_violations(graph) == []


def test_layer_check_counts_relative_imports_and_module_strings(tmp_path):
    pkg = tmp_path / "kdcache" / "store"
    pkg.mkdir(parents=True)
    (pkg / "cache.py").write_text(
        "from ..train import trainer\nimport importlib\nimportlib.import_module('kdcache.dump')\n"
    )
    names = {"kdcache.store.cache", "kdcache.train", "kdcache.train.trainer", "kdcache.dump"}
    found = _referenced("kdcache.store.cache", pkg / "cache.py", names)
    assert found == {"kdcache.train", "kdcache.train.trainer", "kdcache.dump"}
    graph = {
        "kdcache.store.cache": found,
        "kdcache.train.trainer": set(),
        "kdcache.dump": set(),
        "kdcache.train": set(),
    }
    assert len(_layer_violations(graph)) == 3
    assert _layer_violations({"kdcache.train.trainer": {"kdcache.dump.loop"}, "kdcache.dump.loop": set()})


def test_cycle_finder_finds_a_function_level_import_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _long_functions(limit: int = 60) -> list[str]:
    """Functions of the library and CLI longer than ``limit`` lines, not counting their docstrings."""
    found = []
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            lines = node.end_lineno - node.lineno + 1
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                lines -= first.end_lineno - first.lineno + 1
            if lines > limit:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_functions_fit_on_a_screen():
    assert _long_functions() == []
