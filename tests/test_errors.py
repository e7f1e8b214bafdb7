"""slimlm's errors (issue 19): a SlimlmError is one line on stderr with its exit status (2 bad input, 1 runtime
failure); any other exception is a bug and keeps its traceback; every slimlm error class is a SlimlmError."""

from __future__ import annotations

import ast
import importlib
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from serve_helpers import free_port

import slimlm
import slimlm.llm
from slimlm.cli import main
from slimlm.errors import InputError, SlimlmError

SLIMLM = Path(slimlm.__file__).parent

# Exceptions that never leave a command: the server turns them into an HTTP/gRPC answer, or a pass into its report.
INTERNAL_SIGNALS = {
    "PoolError",
    "APIError",
    "InferError",
    "_ReceiveError",
    "CannotFuse",
    "QueueFull",
    "NotAccepting",
    "SlotsBusy",
}


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


def test_input_error_is_a_value_error_and_a_runtime_failure_is_not():
    assert issubclass(InputError, SlimlmError) and issubclass(InputError, ValueError)
    assert not issubclass(SlimlmError, ValueError)
    assert (InputError.exit_code, SlimlmError.exit_code) == (2, 1)


def test_bad_flag_value_is_one_line_and_exit_2(capsys, tmp_path):
    assert main(["data", "task", "nope", "--out", str(tmp_path / "x")]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("slimlm data: error: unknown task 'nope'"), lines


def test_bad_recipe_is_one_line_and_exit_2(capsys, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("lora:\n  rank: 8\n")  # the field is `r`
    assert main(["finetune", str(recipe), "--out", str(tmp_path / "out")]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("slimlm finetune: error: ") and "rank" in lines[0], lines
    assert "Traceback" not in "\n".join(lines)


def test_missing_path_is_one_line_and_exit_2(capsys, tmp_path):
    assert main(["data", "check", str(tmp_path / "missing.jsonl"), "--model", str(tmp_path / "no-model")]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("slimlm data: error: "), lines


def test_busy_port_is_a_runtime_failure_one_line_and_exit_1(capsys, tiny_llama):
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        assert main(["serve", "--model", str(tiny_llama[0]), "--port", str(port)]) == 1
    lines = error_lines(capsys.readouterr().err)
    assert lines[-1] == f"slimlm serve: error: port {port} on 127.0.0.1 is in use; pick another --port", lines


@pytest.mark.parametrize("bug", [ValueError("boom"), TypeError("boom"), KeyError("boom")])
def test_a_bug_is_not_swallowed(monkeypatch, capsys, bug):
    def broken_load(*args, **kwargs):
        raise bug

    monkeypatch.setattr(slimlm.llm, "load", broken_load)
    with pytest.raises(type(bug), match="boom"):
        main(["generate", "--prompt", "hi", "--model", "any"])
    assert "error:" not in capsys.readouterr().err  # not turned into a one-line user error


def test_a_bug_shows_its_traceback_and_exits_1():
    code = (
        "import sys, slimlm.llm\n"
        "def broken_load(*a, **k):\n"
        "    raise ValueError('boom: a bad unpack')\n"
        "slimlm.llm.load = broken_load\n"
        "from slimlm.cli import main\n"
        "sys.exit(main(['generate', '--prompt', 'hi', '--model', 'any']))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, (p.returncode, p.stderr)
    assert "Traceback" in p.stderr and "ValueError: boom: a bad unpack" in p.stderr, p.stderr


def exception_classes() -> list[tuple[str, str]]:
    """(module, class name) of every top-level class in slimlm/ whose bases look like exceptions."""
    found = []
    for path in sorted(SLIMLM.rglob("*.py")):
        module = ".".join(path.relative_to(SLIMLM.parent).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            bases = [ast.unparse(b).split(".")[-1] for b in getattr(node, "bases", [])]
            if isinstance(node, ast.ClassDef) and any(
                b.endswith(("Error", "Exception")) or b == "CannotListen" for b in bases
            ):
                found.append((module, node.name))
    return found


def test_every_slimlm_error_class_is_a_slimlm_error():
    classes = exception_classes()
    names = {name for _, name in classes}
    assert {"RecipeError", "ConfigError", "PeftError", "DataError", "CannotListen"} <= names, names  # the scan works
    assert INTERNAL_SIGNALS <= names, INTERNAL_SIGNALS - names  # the exemptions name classes that still exist
    not_slimlm = []
    for module, name in classes:
        try:
            cls = getattr(importlib.import_module(module), name)
        except ImportError:  # an optional dependency (grpc, ray) missing here
            continue
        if issubclass(cls, BaseException) and name not in INTERNAL_SIGNALS and not issubclass(cls, SlimlmError):
            not_slimlm.append(f"{module}.{name}")
    assert not not_slimlm, f"error classes that do not subclass slimlm.errors.SlimlmError: {not_slimlm}"


def _on_rank0_worker(rank: int, init_file: str, results: dict) -> None:
    import torch.distributed as dist

    from slimlm.train.distributed import on_rank0

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        for name, error in (("input", InputError("--out is taken")), ("bug", ValueError("boom"))):

            def fail(error=error):
                raise error

            try:
                on_rank0(fail)
            except ValueError as e:
                results[(name, rank)] = (type(e).__name__, str(e))
    finally:
        dist.destroy_process_group()


def test_on_rank0_raises_rank0s_error_on_every_rank_and_keeps_it_user_facing_or_not(tmp_path):
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_on_rank0_worker, args=(str(tmp_path / "init"), results), nprocs=2)
        results = dict(results)
    for rank in (0, 1):
        assert results[("input", rank)] == ("InputError", "--out is taken"), results
        assert results[("bug", rank)] == ("ValueError", "boom"), results  # a bug stays a bug: its traceback shows
