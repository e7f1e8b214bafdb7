"""The package's shape: no import cycles, and imports flow one way through the layers (ARCHITECTURE.md).

The import graph is read from the source with `ast` (every import, at module level or inside a function, except
those under `if TYPE_CHECKING:`), so a lazy import that hides a cycle at run time still counts.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "slimlm"

# Low to high: a module may import its own layer and the layers before it, never one after it. The command code
# (slimlm/cli.py, every `<area>/cli.py`, `python -m slimlm`, the package's public __init__) is the top layer.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "base",
        (
            "slimlm.errors",
            "slimlm.config",
            "slimlm.recipe",
            "slimlm.jsonl",
            "slimlm.paths",
            "slimlm.device",
            "slimlm.version",
            "slimlm.load_config",
            "slimlm.kernels",
        ),
    ),
    ("model", ("slimlm.model", "slimlm.protocol", "slimlm.kv_cache", "slimlm.tokenizer")),
    ("layer formats", ("slimlm.quantize",)),
    ("checkpoint", ("slimlm.checkpoint",)),
    ("adapt", ("slimlm.peft", "slimlm.fuse", "slimlm.merge", "slimlm.prune")),
    ("engine", ("slimlm.engine", "slimlm.generate", "slimlm.compile")),
    ("export", ("slimlm.export",)),
    ("llm", ("slimlm.llm",)),
    ("eval", ("slimlm.tasks", "slimlm.eval")),
    ("train", ("slimlm.train",)),
    ("compress", ("slimlm.compress", "slimlm.memory")),
    ("serve", ("slimlm.serve",)),
    ("cli", ("slimlm", "slimlm.__main__", "slimlm.cli", "slimlm.deploy")),
]
GENERATED = ("slimlm.serve.grpc_proto",)  # protoc's output, imported by serve/grpc_server.py


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py") if not module_name(p).startswith(GENERATED)}


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _owner(name: str) -> str | None:
    """The slimlm module that `name` (a module or a module.attribute) lives in."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(name: str) -> set[str]:
    """The slimlm modules `name` imports (`from pkg import submodule` counts as the submodule only)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_lines(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in MODULES else base)
    owners = {_owner(m) for m in found if m.split(".")[0] == "slimlm"}
    return {m for m in owners if m and m != name}


GRAPH = {name: imports_of(name) for name in MODULES}


def layer_of(name: str) -> int:
    if name.split(".")[-1] == "cli":
        return len(LAYERS) - 1
    best, index = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > best:
                best, index = len(p), i
    if index is None:
        raise AssertionError(f"{name} is in no layer: add it to LAYERS here and to ARCHITECTURE.md")
    return index


def find_cycle() -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(GRAPH[v]):
            if state.get(w) == 1:
                return path[path.index(w) :] + [w]
            if w not in state and (cycle := visit(w)):
                return cycle
        path.pop()
        state[v] = 2
        return None

    for v in sorted(GRAPH):
        if v not in state and (cycle := visit(v)):
            return cycle
    return None


def test_the_graph_is_read():
    # guards the checks below against an empty or broken graph
    assert len(MODULES) > 100
    assert "slimlm.model" in GRAPH["slimlm.llm"]
    assert "slimlm.engine.core" in GRAPH["slimlm.llm"]


def test_no_import_cycles():
    cycle = find_cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_flow_down_the_layers():
    upward = []
    for name, deps in sorted(GRAPH.items()):
        for dep in sorted(deps):
            if layer_of(dep) > layer_of(name):
                upward.append(f"{name} ({LAYERS[layer_of(name)][0]}) imports {dep} ({LAYERS[layer_of(dep)][0]})")
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_the_layer_check_catches_an_upward_import():
    assert layer_of("slimlm.model") < layer_of("slimlm.llm") < layer_of("slimlm.serve.api")
    assert layer_of("slimlm.quantize.cli") == len(LAYERS) - 1


PROBE = re.compile(r"\b(getattr|hasattr)\((self\.)?(model|llm\.model|student|teacher), \"")


def test_model_state_is_declared_not_probed():
    """Model attributes are declared on Transformer (or the CausalLM protocol): code reads them, never probes."""
    probes = [
        f"{p.relative_to(ROOT.parent)}:{i}: {line.strip()}"
        for p in MODULES.values()
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if PROBE.search(line)
    ]
    assert not probes, "getattr/hasattr probes of model state:\n" + "\n".join(probes)


@pytest.mark.parametrize("name", ["slimlm.quantize.int8", "slimlm.quantize.int4", "slimlm.quantize.nf4"])
def test_layer_formats_import_no_training_or_files(name):
    """PEFT's QLoRA uses NF4, and checkpoint loading builds int8/int4 layers: the formats need only torch."""
    reach, todo = set(), [name]
    while todo:
        for dep in GRAPH[todo.pop()]:
            if dep not in reach:
                reach.add(dep)
                todo.append(dep)
    heavy = sorted(
        m
        for m in reach
        if m.startswith(("slimlm.train", "slimlm.checkpoint", "slimlm.eval", "slimlm.llm", "slimlm.compress"))
    )
    assert not heavy, f"{name} reaches {heavy}"
