"""The package's layout: no import cycles, small modules, each saying its one job."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "unnoise"
MAX_LINES = 350


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Every unnoise module that ``path`` imports, at any depth (lazy imports inside functions too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {name: _imports(path, name, modules) for name, path in modules.items()}
    # importing a.b.c runs a/__init__ and a/b/__init__ first: a package's __init__ is a parent's edge
    for name in graph:
        graph[name] -= {p for p in _parents(name)}
    return graph


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_package_has_no_import_cycles():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_modules_are_small_and_say_their_job():
    for name, path in _modules().items():
        lines = path.read_text().count("\n")
        assert lines <= MAX_LINES, f"{name} has {lines} lines (at most {MAX_LINES})"
        if path.name != "__init__.py" or path.stat().st_size:
            assert ast.get_docstring(ast.parse(path.read_text())), f"{name} has no docstring"


def test_the_layout_shows_the_architecture():
    core = {"schedules", "diffusion", "losses", "denoisers", "guidance", "likelihood"}
    assert {p.stem for p in PACKAGE.glob("*.py")} >= core
    for sub in ("sampling", "training", "nets", "modalities", "cli"):
        assert (PACKAGE / sub / "__init__.py").is_file(), sub
    same = {"data.py", "pipeline.py", "metrics.py", "io.py", "demo.py"}
    for modality in ("image", "text", "audio", "toy"):
        names = {p.name for p in (PACKAGE / "modalities" / modality).glob("*.py")}
        assert names >= same, f"modalities/{modality} lacks {sorted(same - names)}"
