"""The package's import graph: no cycle, and the link never reaches into the process.

Parsed from the source (nothing is imported). Two rules (ARCHITECTURE.md):

* the modules of ``hybrid_layer`` import each other without a cycle at run time
  (imports under ``if TYPE_CHECKING:`` are left out: they never run; imports inside a
  function are counted: they run on its first call);
* nothing under ``hybrid_layer/amqp/`` imports, even for types, the modules of the
  process side (the participant and its parts, the host thread, the layer): the link
  sees its process only through ``amqp/host.py``'s ``LinkHost``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "hybrid_layer"

#: the process side, which the link must not import (see amqp/host.py)
PROCESS_SIDE = frozenset(
    {
        "hybrid_layer.participant",
        "hybrid_layer.state",
        "hybrid_layer.sending",
        "hybrid_layer.receiving",
        "hybrid_layer.draining",
        "hybrid_layer.groups",
        "hybrid_layer.normal",
        "hybrid_layer.housekeeping",
        "hybrid_layer.leadership",
        "hybrid_layer.host_thread",
        "hybrid_layer.layer",
        "hybrid_layer.reporting",
        "hybrid_layer.shutdown",
    }
)


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(path: Path, *, with_type_checking: bool) -> set[str]:
    """The package modules ``path`` imports (``from . import x`` counts as ``pkg.x``
    when ``x`` is a module)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and _is_type_checking(node.test):
                if with_type_checking:
                    visit(node.body)
                visit(node.orelse)
                continue
            for sub in ast.walk(node):
                if isinstance(sub, ast.Import):
                    out.update(a.name for a in sub.names if a.name.startswith("hybrid_layer"))
                elif isinstance(sub, ast.ImportFrom):
                    if sub.level:
                        base = package.split(".")
                        base = base[: len(base) - (sub.level - 1)]
                        mod = ".".join(base + ([sub.module] if sub.module else []))
                    else:
                        mod = sub.module or ""
                    if not mod.startswith("hybrid_layer"):
                        continue
                    only_modules = True
                    for a in sub.names:  # `from pkg import module`
                        cand = f"{mod}.{a.name}"
                        if _exists(cand):
                            out.add(cand)
                        else:
                            only_modules = False
                    if not only_modules and _exists(mod):
                        out.add(mod)

    visit(tree.body)
    out.discard(me)
    # a package is initialised before its modules: an edge to an ancestor is no cycle
    return {m for m in out if not me.startswith(m + ".")}


def _exists(mod: str) -> bool:
    p = ROOT / Path(*mod.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def graph(*, with_type_checking: bool) -> dict[str, set[str]]:
    return {
        module_name(p): imports(p, with_type_checking=with_type_checking)
        for p in sorted(PKG.rglob("*.py"))
    }


def cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``g`` (as a path), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if m.endswith("__init__") or m not in g:
                continue
            if state.get(m) == 1:
                return [*stack[stack.index(m) :], m]
            if m not in state:
                found = dfs(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state:
            found = dfs(n)
            if found:
                return found
    return None


def test_the_package_imports_without_a_cycle() -> None:
    g = graph(with_type_checking=False)
    assert len(g) > 40
    found = cycle(g)
    assert found is None, " -> ".join(found or [])


def test_the_link_sees_its_process_only_through_link_host() -> None:
    bad = {
        name: sorted(deps & PROCESS_SIDE)
        for name, deps in graph(with_type_checking=True).items()
        if name.startswith("hybrid_layer.amqp") and deps & PROCESS_SIDE
    }
    assert bad == {}
    # and the rule is checked against modules that exist
    assert all(_exists(m) for m in PROCESS_SIDE), sorted(m for m in PROCESS_SIDE if not _exists(m))


def test_the_checker_finds_a_cycle_and_a_type_only_import(tmp_path: Path) -> None:
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None
    # a TYPE_CHECKING import is left out of the run-time graph, kept in the other
    src = PKG / "amqp" / "host.py"
    assert "hybrid_layer.stats" in imports(src, with_type_checking=True)
    assert "hybrid_layer.stats" not in imports(src, with_type_checking=False)
