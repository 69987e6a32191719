"""The package's layers, checked from its imports (every ``import`` in ``src/graftkd``, including
function-level and ``TYPE_CHECKING`` ones, parsed with ``ast``). docs/architecture.md draws them.

Each module belongs to the first unit in ``LAYERS`` whose prefix names it; a unit may import only
the graftkd units listed for it (and itself). Besides the table: no circle between modules, and
nothing imports the CLI.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "graftkd"

#: the ground floor: what every layer may use
GROUND = ("graftkd.errors", "graftkd.registry", "graftkd.config_errors", "graftkd.config", "graftkd.files",
          "graftkd.runtime", "graftkd.distributed")

#: unit (module or package prefix, first match wins)  ->  the graftkd units it may import.
#: Read top to bottom: the ground floor first, the commands last. "*" = anything.
LAYERS: dict[str, tuple[str, ...]] = {
    "graftkd": (),  # the package's own (empty) __init__; matches only itself
    # ground floor: what every layer uses
    "graftkd.errors": (),
    "graftkd.registry": (),
    "graftkd.config_errors": (),
    "graftkd.config": ("graftkd.errors", "graftkd.registry", "graftkd.config_errors"),
    "graftkd.files": ("graftkd.errors",),
    "graftkd.runtime": ("graftkd.errors", "graftkd.config", "graftkd.distributed"),
    "graftkd.distributed": (),
    # building blocks: they know the ground floor only (models and data never know each other)
    "graftkd.losses": GROUND,
    "graftkd.models": GROUND,
    "graftkd.data.commands": ("*",),  # `graftkd data`: a command
    "graftkd.data": GROUND,
    "graftkd.export": GROUND + ("graftkd.models",),
    "graftkd.eval.commands": ("*",),  # `graftkd evaluate/report/export/predict`: commands
    "graftkd.eval": GROUND + ("graftkd.data", "graftkd.models", "graftkd.export"),
    "graftkd.teachers": GROUND + ("graftkd.losses", "graftkd.models", "graftkd.data"),
    # methods: the Method interface and the registry; concrete methods use the blocks below
    "graftkd.methods.base": GROUND,
    "graftkd.methods": GROUND + ("graftkd.losses", "graftkd.models", "graftkd.data", "graftkd.teachers"),
    # the training loop knows the Method interface and the loaders, no concrete method
    "graftkd.engine": GROUND + ("graftkd.methods.base", "graftkd.data.loaders"),
    # assembly: data + teachers + method + trainer + scoring
    "graftkd.experiment": GROUND + ("graftkd.data", "graftkd.models", "graftkd.teachers", "graftkd.methods",
                                    "graftkd.engine", "graftkd.eval.metrics"),
    # commands: may import anything; nothing imports them
    "graftkd.demo": ("*",),
    "graftkd.study": ("*",),  # `graftkd compare`
    "graftkd.commands": ("*",),
    "graftkd.cli": ("*",),
    "graftkd.__main__": ("graftkd.cli",),
}
#: third-party packages a unit may import (default: any); losses are pure torch
THIRD_PARTY: dict[str, tuple[str, ...]] = {"graftkd.losses": ("torch",)}
#: imported only by ``graftkd.__main__`` (the CLI dispatches to commands by name)
CLI = "graftkd.cli"


# ------------------------------------------------------------------------------------- parsing
def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imports_in(source: str, module: str, is_package: bool = False) -> list[tuple[str, int]]:
    """(imported name, line) of every import statement in ``source`` (the code of ``module``), at any
    depth; ``from a import b`` gives ``a.b`` when that is a module of graftkd, else ``a``."""
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub if sub in MODULES else base, node.lineno))
    return sorted(out, key=lambda x: x[1])


def imports_of(path: Path) -> list[tuple[str, int]]:
    return imports_in(path.read_text(), module_name(path), path.name == "__init__.py")


def graftkd_edges() -> list[tuple[str, str, int]]:
    """(importer, imported graftkd module, line) over the whole package, each once."""
    edges = set()
    for mod, path in MODULES.items():
        for name, line in imports_of(path):
            if name == "graftkd" or name.startswith("graftkd."):
                while name not in MODULES:  # `import graftkd.a.b` where b is an attribute
                    name = name.rpartition(".")[0]
                edges.add((mod, name, line))
    return sorted(edges)


def unit_of(mod: str) -> str:
    for unit in LAYERS:
        if mod == unit or (unit != "graftkd" and mod.startswith(unit + ".")):
            return unit
    raise AssertionError(f"{mod} is in no unit of LAYERS: add it to the table (and to docs/architecture.md)")


def within(mod: str, prefixes: tuple[str, ...]) -> bool:
    return any(p == "*" or mod == p or mod.startswith(p + ".") for p in prefixes)


def circles(edges: list[tuple[str, str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


# --------------------------------------------------------------------------------------- rules
def test_every_module_is_in_the_table_and_every_row_names_real_modules():
    for mod in MODULES:
        unit_of(mod)
    named = set(LAYERS) | {a for allowed in LAYERS.values() for a in allowed if a != "*"}
    assert not [u for u in named if not any(m == u or m.startswith(u + ".") for m in MODULES)]


def test_no_circle_between_modules():
    found = circles([(a, b) for a, b, _ in graftkd_edges() if a != b])
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def layer_violations(edges: list[tuple[str, str, int]]) -> list[str]:
    bad = []
    for a, b, line in edges:
        unit = unit_of(a)
        if not within(b, LAYERS[unit] + (unit,)):
            bad.append(f"{a}:{line} imports {b} ({unit} may import: {', '.join(LAYERS[unit]) or 'no graftkd module'})")
    return bad


def test_each_layer_imports_only_what_the_table_allows():
    bad = layer_violations(graftkd_edges())
    assert not bad, "\n".join(bad)


def test_third_party_imports_of_pure_layers():
    bad = []
    for mod, path in MODULES.items():
        allowed = THIRD_PARTY.get(unit_of(mod))
        if allowed is None:
            continue
        for name, line in imports_of(path):
            top = name.split(".")[0]
            if top not in ("graftkd", "__future__") and top not in sys.stdlib_module_names and top not in allowed:
                bad.append(f"{path.relative_to(SRC)}:{line} imports {name}")
    assert not bad, "\n".join(bad)


def test_nothing_imports_the_cli():
    bad = [f"{MODULES[a].relative_to(SRC)}:{line}" for a, b, line in graftkd_edges()
           if within(b, (CLI,)) and a != "graftkd.__main__"]
    assert not bad, "the CLI is imported by " + ", ".join(bad)


# ------------------------------------------------------------------------- the checker itself
def test_circle_finder_finds_planted_circles_and_only_them():
    assert circles([("a", "b"), ("b", "c"), ("c", "a"), ("c", "d"), ("d", "e")]) == [["a", "b", "c"]]
    assert circles([("a", "a")]) == [["a"]]
    assert circles([("a", "b"), ("a", "c"), ("b", "c")]) == []


def test_function_level_relative_and_type_checking_imports_are_seen():
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from graftkd.teachers import Teacher\n"
              "def f():\n    from graftkd.methods import kd\n    from .trainer import Trainer\n    import graftkd.cli\n")
    assert imports_in(source, "graftkd.engine.launch") == [
        ("typing", 1), ("graftkd.teachers", 3), ("graftkd.methods.kd", 5), ("graftkd.engine.trainer", 6),
        ("graftkd.cli", 7)]


def test_the_table_rejects_what_the_issue_forbids():
    planted = [("graftkd.engine.trainer", "graftkd.methods.kd", 1),  # engine -> a concrete method
               ("graftkd.engine.trainer", "graftkd.eval.metrics", 2),  # engine -> eval
               ("graftkd.engine.trainer", "graftkd.data.build", 3),  # engine -> data internals
               ("graftkd.losses.kd", "graftkd.teachers.fusion", 4),  # losses -> above the ground floor
               ("graftkd.data.build", "graftkd.models.factory", 5), ("graftkd.models.factory", "graftkd.data", 6),
               ("graftkd.data.splits", "graftkd.engine.trainer", 7), ("graftkd.teachers.cache", "graftkd.engine", 8),
               ("graftkd.methods.atf", "graftkd.experiment", 9)]
    assert [v.split(" imports")[0] for v in layer_violations(planted)] == [f"{a}:{n}" for a, _, n in planted]
    allowed = [("graftkd.engine.trainer", "graftkd.methods.base", 1), ("graftkd.engine.trainer", "graftkd.data.loaders", 2),
               ("graftkd.methods.kd", "graftkd.teachers.targets", 3), ("graftkd.losses.kd", "graftkd.config", 4)]
    assert layer_violations(allowed) == []
