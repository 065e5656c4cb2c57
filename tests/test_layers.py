"""The package's layers: data flows one way (config -> model + optimizer + loader -> trainer), so
the lower layers never import the upper ones, and no module imports itself through a cycle. Read
from the source (every import, also those inside functions), not from what happens to load."""

import ast
from pathlib import Path

import muongpt

SRC = Path(muongpt.__file__).parent
LOWER = ("muongpt.model", "muongpt.data", "muongpt.optim", "muongpt.kernels")
UPPER = ("muongpt.train", "muongpt.cli", "muongpt.config", "muongpt.generate")


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """module -> the muongpt modules it imports (``from a import b`` counts b when a module)."""
    modules = {module_name(p): p for p in SRC.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.add(node.module)
                targets |= {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_lower_layers_never_import_upper_ones():
    upward = [
        f"{m} -> {t}"
        for m, targets in imports().items()
        if within(m, LOWER)
        for t in targets
        if within(t, UPPER)
    ]
    config_up = [
        f"muongpt.config -> {t}"
        for t in imports()["muongpt.config"]
        if within(t, ("muongpt.train", "muongpt.cli"))
    ]
    assert upward + config_up == []


def test_the_model_does_not_import_kernels():
    kernels = [
        f"{m} -> {t}"
        for m, targets in imports().items()
        if within(m, ("muongpt.model",))
        for t in targets
        if within(t, ("muongpt.kernels",))
    ]
    assert kernels == []


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of imports between modules, ignoring a package's imports of its own submodules
    (an ``__init__`` re-exporting them), or None."""

    def edges(m):
        return {t for t in graph[m] if not t.startswith(m + ".")}

    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(edges(m)):
            if state.get(t) == 1:
                return stack[stack.index(t) :] + [t]
            if t not in state and (cycle := visit(t)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_no_import_cycles():
    assert find_cycle(imports()) is None


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = imports()
    graph["muongpt.generate"] = graph["muongpt.generate"] | {"muongpt.train.trainer"}
    graph["muongpt.train.trainer"] = graph["muongpt.train.trainer"] | {"muongpt.generate"}
    assert find_cycle(graph) is not None
