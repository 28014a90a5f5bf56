"""The package's imports only go down its layers, and no module imports itself round a cycle.

Every ``import`` in src/elbolab (at module level or inside a function) is read with ``ast``,
resolved to the elbolab module it names, and checked against the layer order below. The
package's own ``__init__`` is the public facade and may import anything; nothing inside
the package may import the facade.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "elbolab"

#: bottom first; a module may import its own layer and the ones below
LAYERS: tuple[tuple[str, ...], ...] = (
    ("version", "startup", "errors", "limits", "registry", "config", "bounds", "distributions", "fastpaths", "files",
     "devices", "rng", "sweep", "progress"),
    ("priors", "likelihoods", "flows", "models", "data", "adapters"),
    ("objectives", "evaluation", "optimizers", "schedules", "fused", "fused_cpp"),
    ("runs", "preflight", "sinks", "training"),
    ("diagnostics", "reproduce", "speed", "api"),
    ("cli",),
)
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The elbolab modules ``path`` imports (``from . import x`` counts as module ``x`` when
    x is one, else as the package it comes from)."""
    name = module_name(path)
    package = name if is_package(path) else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "elbolab")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "elbolab":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
    found.discard(name)
    return found


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYER_OF.get(parts[1]) if len(parts) > 1 else None


def test_every_top_level_module_has_a_layer() -> None:
    tops = {m.split(".")[1] for m in all_modules() if m != "elbolab"}
    assert tops <= set(LAYER_OF), f"modules without a layer in this test: {sorted(tops - set(LAYER_OF))}"


def test_imports_only_go_down() -> None:
    modules = all_modules()
    upward = []
    for name, path in modules.items():
        if name == "elbolab":
            continue  # the facade
        own = layer(name)
        for target in imports_of(path, modules):
            if target == "elbolab":
                upward.append(f"{name} imports the package facade (elbolab/__init__.py)")
            elif (t := layer(target)) is not None and own is not None and t > own:
                upward.append(f"{name} (layer {own}) imports {target} (layer {t})")
    assert not upward, "upward imports:\n" + "\n".join(sorted(upward))


def test_no_import_cycles() -> None:
    modules = all_modules()
    graph = {name: imports_of(path, modules) & set(modules) for name, path in modules.items() if name != "elbolab"}
    # a package's __init__ re-exporting its submodules is not a cycle with them
    graph = {n: {t for t in ts if not (n.startswith(t + ".") and t in graph)} for n, ts in graph.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for t in sorted(graph.get(node, ())):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[node] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("bad", ["upward", "cycle"])
def test_the_checks_can_fail(tmp_path, monkeypatch, bad: str) -> None:
    """A planted upward import and a planted cycle are each caught."""
    pkg = tmp_path / "elbolab"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models" / "__init__.py").write_text("")
    if bad == "upward":
        (pkg / "models" / "one.py").write_text("def f():\n    from ..training import Trainer\n")
        (pkg / "training.py").write_text("")
        monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path)
        monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
        with pytest.raises(AssertionError, match="models.one .layer 1. imports elbolab.training"):
            test_imports_only_go_down()
    else:
        (pkg / "runs.py").write_text("from .training import x\n")
        (pkg / "training.py").write_text("from . import runs\n")
        monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path)
        monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
        with pytest.raises(AssertionError, match="elbolab.runs -> elbolab.training -> elbolab.runs"):
            test_no_import_cycles()


def test_registries_are_all_loaded_with_the_package() -> None:
    """Config validation reads names through the registry index: every concept is there."""
    import elbolab  # noqa: F401
    from elbolab.registry import INDEX

    assert {"dataset", "model", "prior", "likelihood", "activation", "objective", "gradient estimator",
            "schedule", "optimizer"} <= set(INDEX)
