"""No code path may unpickle or execute what it reads (issue 15): an audit of the source, by syntax tree.

Every .py file under slimlm/, scripts/ and bench/ is parsed with `ast` and searched for: pickle-family imports
(pickle, dill, shelve, marshal, ...), `torch.load` without `weights_only=True`, `yaml.load` without a safe
loader (and `yaml.unsafe_load` / `full_load`), `numpy.load(..., allow_pickle=True)`, and calls of the builtins
`eval` / `exec`. Methods of the same name (`model.eval()`) are not calls of the builtin, so the tree, not a
regex, decides. A self-test plants each violation in a string to prove the audit would catch it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
AUDITED = ("slimlm", "scripts", "bench")
UNSAFE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "marshal", "shelve"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}
# Exemptions, as "path:line": keep this empty; a real need goes here with a comment saying why it is safe.
EXEMPT: set[str] = set()


def _dotted(node: ast.AST) -> str:
    """`torch.load` for Attribute(Name('torch'), 'load'); '' for anything that is not a plain dotted name."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _kwarg(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _call_problem(call: ast.Call, aliases: dict[str, str], shadowed: set[str]) -> str | None:
    """Why this call is unsafe (None if it is not). `aliases` maps local names to modules (np -> numpy)."""
    name = _dotted(call.func)
    head, _, rest = name.partition(".")
    full = f"{aliases.get(head, head)}.{rest}" if rest else aliases.get(head, head)
    if isinstance(call.func, ast.Name) and name in ("eval", "exec") and name not in shadowed:
        return f"builtin {name}() runs arbitrary code"
    if full == "torch.load" and not _is_true(_kwarg(call, "weights_only")):
        return "torch.load without weights_only=True unpickles arbitrary objects"
    if full in ("yaml.unsafe_load", "yaml.unsafe_load_all", "yaml.full_load", "yaml.full_load_all"):
        return f"{full} constructs arbitrary Python objects; use yaml.safe_load"
    if full in ("yaml.load", "yaml.load_all"):
        loader = _kwarg(call, "Loader") or (call.args[1] if len(call.args) > 1 else None)
        if loader is None or _dotted(loader).rpartition(".")[2] not in SAFE_YAML_LOADERS:
            return f"{full} without a safe Loader; use yaml.safe_load"
    if (
        full == "numpy.load"
        and _kwarg(call, "allow_pickle") is not None
        and not (isinstance(_kwarg(call, "allow_pickle"), ast.Constant) and _kwarg(call, "allow_pickle").value is False)
    ):
        return "numpy.load with allow_pickle unpickles arbitrary objects"
    return None


def audit_source(source: str, filename: str = "<string>") -> list[str]:
    """Every unsafe import or call in `source`, as "filename:line: what"."""
    tree = ast.parse(source, filename)
    aliases = {"np": "numpy"}
    shadowed = set()  # modules that define or import their own `eval`/`exec` do not call the builtin
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[(a.asname or a.name).split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
                if a.name.split(".")[0] in UNSAFE_MODULES:
                    problems.append(f"{filename}:{node.lineno}: import {a.name}")
        elif isinstance(node, ast.ImportFrom):
            module = (node.module or "").split(".")[0]
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
                shadowed.add(a.asname or a.name)
            if module in UNSAFE_MODULES:
                problems.append(f"{filename}:{node.lineno}: from {node.module} import ...")
    for node in tree.body:  # module-level definitions of eval/exec shadow the builtins for the whole module
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            shadowed.add(node.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and (why := _call_problem(node, aliases, shadowed)):
            problems.append(f"{filename}:{node.lineno}: {why}")
    return problems


def _files() -> list[Path]:
    return sorted(p for d in AUDITED if (ROOT / d).is_dir() for p in (ROOT / d).rglob("*.py"))


def test_no_unsafe_loads_in_the_code():
    files = _files()
    assert len(files) > 50, f"found only {len(files)} files under {AUDITED}: is ROOT ({ROOT}) right?"
    problems = []
    for f in files:
        rel = f.relative_to(ROOT)
        problems += [
            p for p in audit_source(f.read_text(encoding="utf-8"), str(rel)) if ":".join(p.split(":")[:2]) not in EXEMPT
        ]  # "path:line"
    assert not problems, "unsafe loads:\n" + "\n".join(problems)


PLANTED = """
import pickle
import dill as d
from shelve import open as shelf_open
import marshal
import torch, yaml
import numpy as np
from torch import load as tload

torch.load(path)
torch.load(path, weights_only=False)
yaml.load(text)
yaml.load(text, Loader=yaml.Loader)
yaml.unsafe_load(text)
yaml.full_load(text)
np.load(path, allow_pickle=True)
eval("1 + 1")
exec("x = 1")
tload(path)
"""

SAFE = """
import torch, yaml
import numpy as np

model.eval()
runner.exec(cmd)
torch.load(path, weights_only=True)
torch.load(path, map_location="cpu", weights_only=True)
yaml.safe_load(text)
yaml.load(text, Loader=yaml.SafeLoader)
yaml.load(text, yaml.CSafeLoader)
np.load(path)
np.load(path, allow_pickle=False)
x = "eval(torch.load(pickle))"  # in a string: not code
"""


def test_audit_catches_planted_violations():
    problems = audit_source(PLANTED, "planted.py")
    lines = sorted(int(p.split(":")[1]) for p in problems)
    expected = [2, 3, 4, 5, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]  # every planted line, the import at 8 via 19
    assert lines == expected, "\n".join(problems)
    assert any("torch.load without weights_only" in p and ":19:" in p for p in problems)  # an aliased torch.load


def test_audit_passes_safe_code():
    assert audit_source(SAFE, "safe.py") == []


def test_local_eval_function_is_not_the_builtin():
    assert audit_source("def eval(x):\n    return x\n\neval(1)\n") == []
