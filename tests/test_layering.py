"""The floor plan holds: no import cycles, and every import follows the documented layers.

Reads every import statement (function-level ones included) of ``distrib/`` and
``launcher/`` with ``ast``; nothing is imported. The layers and the arrows they
may take are the table in docs/ARCHITECTURE.md ("Layers"), kept in step by
``test_architecture_doc_names_every_layer``.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("distrib", "launcher")

# Lowest first. A module may import its own layer and the layers below it, except
# where ALLOWED narrows that. The first prefix that matches a module decides its layer.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "vocabulary",
        (
            "distrib._errors",
            "distrib._config",
            "distrib._validate",
            "distrib._reduce_op",
            "distrib._xp",
            "distrib._machine",
            "distrib._sched_slice",
            "distrib._record",
            "distrib._stacks",
        ),
    ),
    ("memory", ("distrib.shm", "distrib.gpu")),
    ("store", ("distrib.store",)),
    ("transport", ("distrib.transport",)),
    ("collectives", ("distrib.comm", "distrib.checkpoint")),
    (
        "library",
        ("distrib.multiprocessing", "distrib.testing", "distrib.bench", "distrib.data"),
    ),
    ("training", ("distrib.parallel", "distrib.optim", "distrib.torch")),
    ("launch", ("launcher", "distrib.ray")),
]
# Layers that may not use everything below them: memory knows no network and no
# rank; the store knows no collective; the launcher runs jobs without joining them.
ALLOWED: dict[str, set[str]] = {
    "memory": {"vocabulary"},
    "store": {"vocabulary"},
    "launch": {"vocabulary", "store", "launch"},
}
# Narrow, documented exceptions (importer prefix -> imported module).
EXCEPTIONS = {
    # the launcher removes the CUDA IPC files a killed worker left behind
    ("launcher._worker", "distrib.gpu._driver_files"),
    # distrib-run --ray hands the job to distrib.ray, which is in the launch layer
}
FACADE = "distrib"  # the package root: lazy names only, eager imports of the vocabulary


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            found[_module_name(path)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Library modules ``name`` imports, at any depth of its code."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # "from pkg import mod" imports pkg.mod; "from mod import name" imports mod
            subs = [f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in MODULES]
            targets = subs or [module]
        for target in targets:
            while target and target not in MODULES:  # "import a.b.c" names a.b.c's package
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def layer_of(module: str) -> str:
    if module == FACADE:
        return "vocabulary"
    for layer, prefixes in LAYERS:
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return layer
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and docs/ARCHITECTURE.md")


def _may_import(importer: str, imported: str) -> bool:
    if (importer, imported) in EXCEPTIONS:
        return True
    order = [layer for layer, _ in LAYERS]
    src, dst = layer_of(importer), layer_of(imported)
    if src in ALLOWED:
        return dst in ALLOWED[src] or dst == src
    return order.index(dst) <= order.index(src)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_scan_sees_the_library():
    # A scan that found nothing would pass every rule below.
    assert len(MODULES) > 100
    assert "distrib.store._client" in GRAPH["launcher._job_store"] or any(
        m.startswith("distrib.store") for m in GRAPH["launcher._job_store"]
    )
    assert "distrib.transport._engine" in GRAPH["distrib.comm._group"]


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    cycles = _cycles(GRAPH)
    assert not cycles, "import cycles between modules:\n" + "\n".join(
        " <-> ".join(c) for c in cycles
    )


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_imports_follow_the_layers():
    bad = sorted(
        f"{a} ({layer_of(a)}) imports {b} ({layer_of(b)})"
        for a, targets in GRAPH.items()
        for b in targets
        if not _may_import(a, b)
    )
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_the_layer_rules_reject_what_they_forbid():
    assert not _may_import("distrib.shm._array", "distrib.store._client")  # memory -> network
    assert not _may_import("distrib.store._client", "distrib.comm._group")  # store -> collectives
    assert not _may_import("launcher._agent", "distrib.comm._api")  # launcher -> collectives
    assert not _may_import("distrib.comm._group", "launcher._agent")  # library -> launcher
    assert not _may_import("distrib.comm._group", "distrib.parallel._ddp")  # -> training
    assert _may_import("distrib.comm._group", "distrib.transport._engine")


def test_architecture_doc_names_every_layer():
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    for layer, prefixes in LAYERS:
        assert f"**{layer}**" in doc, f"docs/ARCHITECTURE.md does not describe layer {layer}"
        for prefix in prefixes:
            assert f"`{prefix}" in doc, f"docs/ARCHITECTURE.md does not place {prefix}"


def test_the_store_and_the_launcher_load_no_collectives():
    import subprocess

    code = (
        "import sys, distrib.store, launcher._cli\n"
        "heavy = sorted(m for m in sys.modules if m.startswith(('distrib.comm', "
        "'distrib.transport', 'zmq', 'distrib.shm')))\n"
        "print(heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def _lines(path: Path) -> int:
    return sum(1 for _ in path.open())


def test_no_folder_holds_more_than_40_percent_of_the_library():
    total = sum(_lines(p) for n, p in MODULES.items() if n.startswith("distrib"))
    by_folder: dict[str, int] = defaultdict(int)
    for name, path in MODULES.items():
        if name.startswith("distrib"):
            folder = path.parent.relative_to(ROOT).as_posix()
            by_folder[folder] += _lines(path)
    worst = max(by_folder, key=by_folder.__getitem__)
    assert by_folder[worst] <= 0.40 * total, (worst, by_folder[worst], total)
