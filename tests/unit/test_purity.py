"""The pure modules stay pure: no I/O, no threads, no clock, no shared memory, no broker.

A pure module computes from its arguments only (bytes in, values or bytes out), so it is
tested with plain bytearrays, without processes, sleeps or a broker (README "Pure
modules"). This test parses each one (``ast``: nothing is imported or run) and fails if
it imports, anywhere but under ``if TYPE_CHECKING:`` (never run), a module of
``DENIED``, or a module of this package that is not itself in ``PURE``.

``DENIED`` and why:

* I/O and the operating system: ``os``, ``io``, ``pathlib``, ``shutil``, ``tempfile``,
  ``stat``, ``pwd``, ``fcntl``, ``mmap``, ``socket``, ``ssl``, ``select``,
  ``selectors``, ``signal``, ``subprocess``, ``multiprocessing``, ``logging``
  (a handler writes: a pure module returns what happened and its caller logs it);
* threads and event loops: ``threading``, ``_thread``, ``concurrent``, ``asyncio``;
* the clock: ``time``, ``datetime`` - a pure module is handed ``now`` (or an
  ``expires_at``) by its caller, so its tests neither sleep nor race a clock;
* shared memory and the broker: ``posix_ipc``, ``aiormq``, ``pamqp``.

Randomness (``secrets``: a channel name's local part) and hashing are allowed: they do
no I/O and need no cleanup. A module listed in ``PURE`` that does not exist fails (it
is never skipped).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "hybrid_layer"

#: the pure modules (paths from the repository root); keep README "Pure modules" in step
PURE = (
    "hybrid_layer/names.py",
    "hybrid_layer/routing.py",
    "hybrid_layer/envelope.py",
    "hybrid_layer/errors.py",
    "hybrid_layer/shm/layout.py",
    "hybrid_layer/shm/ring.py",
    "hybrid_layer/shm/groupset.py",
    "hybrid_layer/amqp/wire.py",
    "hybrid_layer/amqp/topology.py",
    "hybrid_layer/amqp/amqpframes.py",
)

DENIED = frozenset(
    {
        # I/O and the operating system
        "os",
        "io",
        "pathlib",
        "shutil",
        "tempfile",
        "stat",
        "pwd",
        "fcntl",
        "mmap",
        "socket",
        "ssl",
        "select",
        "selectors",
        "signal",
        "subprocess",
        "multiprocessing",
        "logging",
        # threads and event loops
        "threading",
        "_thread",
        "concurrent",
        "asyncio",
        # the clock
        "time",
        "datetime",
        # shared memory and the broker
        "posix_ipc",
        "aiormq",
        "pamqp",
    }
)


def _dotted(path: str) -> str:
    return path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


PURE_MODULES = frozenset(_dotted(p) for p in PURE)


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that can run (``if TYPE_CHECKING:`` bodies excluded)."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _is_module(dotted: str) -> bool:
    rel = Path(*dotted.split("."))
    return (ROOT / rel.with_suffix(".py")).is_file() or (ROOT / rel / "__init__.py").is_file()


def _imported(module: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The dotted names of the modules ``node`` imports, relative ones resolved."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level == 0:
        assert node.module is not None
        base = node.module
    else:
        parts = module.split(".")
        keep = len(parts) - node.level + (1 if is_package else 0)
        base = ".".join(parts[:keep] + ([node.module] if node.module else []))
    # ``from . import layout``: the names may be modules themselves
    subs = [f"{base}.{a.name}" for a in node.names if _is_module(f"{base}.{a.name}")]
    return subs or [base]


def _problems(path: str) -> list[str]:
    source = (ROOT / path).read_text()
    module = _dotted(path)
    is_package = path.endswith("__init__.py")
    out = []
    for node in _runtime_imports(ast.parse(source, filename=path)):
        for name in _imported(module, is_package, node):
            top = name.split(".")[0]
            if top in DENIED:
                out.append(f"line {node.lineno}: imports {name} (denied: see this test)")
            elif top == PACKAGE and name not in PURE_MODULES and _is_impure_part(name):
                out.append(
                    f"line {node.lineno}: imports {name}, which is not a pure module "
                    "(PURE in this test)"
                )
    return out


def _is_impure_part(name: str) -> bool:
    """A module of the package outside ``PURE`` (its empty ``__init__`` packages are
    fine: ``hybrid_layer.shm`` runs nothing)."""
    rel = Path(*name.split("."))
    init = ROOT / rel / "__init__.py"
    if init.is_file():
        return bool(init.read_text().strip()) and name != PACKAGE
    return True


@pytest.mark.parametrize("path", PURE)
def test_pure_module_imports_no_io_threads_clock_or_impure_module(path: str) -> None:
    assert (ROOT / path).is_file(), (
        f"{path} is listed as a pure module but does not exist: it arrives with the split "
        "of the link (issue 15); if it was renamed or removed, update PURE and the README"
    )
    assert _problems(path) == [], f"{path} is listed as pure"


def test_the_checker_sees_what_it_must() -> None:
    """The checker itself: denied and impure imports are found, relative ones resolved,
    ``TYPE_CHECKING`` blocks and allowed modules are not."""
    tree = ast.parse(
        "import os.path\n"
        "from typing import TYPE_CHECKING\n"
        "from . import layout as L\n"
        "from .segment import Segment\n"
        "from ..names import parse\n"
        "import hashlib, secrets\n"
        "if TYPE_CHECKING:\n"
        "    import asyncio\n"
        "def f():\n"
        "    import time\n"
    )
    names = [
        n for node in _runtime_imports(tree) for n in _imported("hybrid_layer.shm.x", False, node)
    ]
    assert names == [
        "os.path",
        "typing",
        "hybrid_layer.shm.layout",
        "hybrid_layer.shm.segment",
        "hybrid_layer.names",
        "hashlib",
        "secrets",
        "time",
    ]
    assert _is_impure_part("hybrid_layer.shm.segment")
    assert not _is_impure_part("hybrid_layer.shm")
