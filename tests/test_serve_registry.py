"""The versioned registry: push/resolve/alias/rollback, immutability, atomic pushes, names, corruption, threads."""

from __future__ import annotations

import argparse
import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from slimlm.serve import registry as reg_mod
from slimlm.serve.cli import add_registry_commands
from slimlm.serve.registry import Registry, RegistryError, hash_artifact


def _model_folder(path: Path, seed: int = 0, quantized: bool = False) -> Path:
    path.mkdir(parents=True)
    cfg = {"model_type": "llama", "hidden_size": 8}
    if quantized:
        cfg["quantization_config"] = {"quant_method": "int8"}
    (path / "config.json").write_text(json.dumps(cfg))
    save_file({"w": torch.full((2, 2), float(seed))}, str(path / "model.safetensors"))
    (path / "sub").mkdir()
    (path / "sub" / "note.txt").write_text(f"seed {seed}")
    return path


def _adapter_folder(path: Path, base: str = "tiny-base") -> Path:
    """A hand-written HF PEFT LoRA folder (what slimlm.peft.save_adapter writes, minus the real weights)."""
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": 2,
                "lora_alpha": 4,
                "target_modules": ["q_proj"],
                "lora_dropout": 0.0,
                "base_model_name_or_path": base,
            }
        )
    )
    save_file(
        {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 8)},
        str(path / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    (path / "summary.json").write_text(json.dumps({"final_loss": 0.5, "eval": {"accuracy": 0.9}}))
    return path


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry")


def test_push_resolve_and_immutability(reg: Registry, tmp_path: Path) -> None:
    src = _model_folder(tmp_path / "m")
    v1 = reg.push("tiny", src)
    assert (v1.ref, v1.kind, v1.version) == ("tiny@1", "model", 1)
    assert v1.path == reg.root / "artifacts" / "tiny" / "v1" and v1.path.is_absolute()
    assert v1.sha256 == hash_artifact(src) and (v1.path / "sub" / "note.txt").read_text() == "seed 0"
    (src / "sub" / "note.txt").write_text("changed")  # the registry holds a copy: the source may change
    v2 = reg.push("tiny", src)
    assert v2.version == 2 and v2.sha256 != v1.sha256
    assert reg.resolve("tiny") == v2 and reg.resolve("tiny@1") == v1
    assert (v1.path / "sub" / "note.txt").read_text() == "seed 0"
    reg.verify(reg.resolve("tiny@1"))
    assert [e.version for e in reg.entries("tiny")] == [1, 2] and reg.names() == ["tiny"]
    assert Registry(reg.root).resolve("tiny") == v2  # persisted


def test_kinds_metrics_and_gguf(reg: Registry, tmp_path: Path) -> None:
    a = reg.push("my-lora", _adapter_folder(tmp_path / "a"))
    assert (a.kind, a.method, a.parent_base) == ("adapter", "lora", "tiny-base")
    assert a.metrics == {"final_loss": 0.5, "eval": {"accuracy": 0.9}}
    q = reg.push("q", _model_folder(tmp_path / "q", quantized=True))
    assert (q.kind, q.method) == ("quantized", "int8")
    assert reg.push("k", tmp_path / "q", kind="quantized", parent_base="tiny", method="gptq").method == "gptq"
    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF" + bytes(16))
    e = reg.push("gg", g)
    assert e.kind == "model" and e.path == reg.root / "artifacts" / "gg" / "v1" / "m.gguf"
    reg.verify(e)
    (tmp_path / "x.bin").write_bytes(b"x")
    with pytest.raises(RegistryError, match="not a .gguf"):
        reg.push("x", tmp_path / "x.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RegistryError, match="no adapter_config.json or config.json.*--kind"):
        reg.push("x", tmp_path / "empty")
    with pytest.raises(RegistryError, match="does not exist"):
        reg.push("x", tmp_path / "nope")


def test_run_summary_in_parent_folder(reg: Registry, tmp_path: Path) -> None:
    """`slimlm finetune` writes OUT/adapter and OUT/summary.json whose "output" names the adapter."""
    a = _adapter_folder(tmp_path / "run" / "adapter")
    (a / "summary.json").unlink()
    (tmp_path / "run" / "summary.json").write_text(json.dumps({"output": str(a), "final_loss": 0.25}))
    assert reg.push("ft", a).metrics["final_loss"] == 0.25
    (tmp_path / "run" / "summary.json").write_text(json.dumps({"output": "elsewhere", "final_loss": 1.0}))
    assert reg.push("ft", a).metrics == {}


def test_alias_and_rollback(reg: Registry, tmp_path: Path) -> None:
    src = _model_folder(tmp_path / "m")
    for _ in range(3):
        reg.push("tiny", src)
    assert reg.alias("tiny@1", "prod").version == 1 and reg.resolve("tiny@prod").version == 1
    reg.alias("tiny@2", "prod")  # re-point
    assert reg.resolve("tiny@prod").version == 2 and reg.aliases("tiny") == {"prod": 2}
    assert reg.rollback("tiny").version == 2 and reg.resolve("tiny").version == 2
    assert reg.rollback("tiny").version == 1
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        reg.rollback("tiny")
    assert reg.push("tiny", src).version == 4 and reg.resolve("tiny").version == 4  # a push is head again
    assert [h["action"] for h in reg.history("tiny")] == ["push"] * 3 + ["alias"] * 2 + ["rollback"] * 2 + ["push"]
    with pytest.raises(RegistryError, match="no alias 'staging'.*aliases: prod"):
        reg.resolve("tiny@staging")
    with pytest.raises(RegistryError, match=r"no version 9 \(versions: 1, 2, 3, 4\)"):
        reg.resolve("tiny@9")
    with pytest.raises(RegistryError, match="no artifact named 'other'.*registry push other PATH"):
        reg.resolve("other")
    with pytest.raises(RegistryError, match="ends with '@'"):
        reg.resolve("tiny@")
    with pytest.raises(RegistryError, match="all digits"):
        reg.alias("tiny@1", "42")


@pytest.mark.parametrize("bad", ["../x", "..", "a/b", "a..b", ".hidden", "-x", "", "a@b", "x" * 65, "a b"])
def test_bad_names(reg: Registry, tmp_path: Path, bad: str) -> None:
    src = _model_folder(tmp_path / "m")
    with pytest.raises(RegistryError, match="invalid name"):
        reg.push(bad, src)
    with pytest.raises(RegistryError, match="invalid name" if "@" not in bad else "has no alias"):
        reg.resolve(bad)
    reg.push("ok", src)
    if bad and "@" not in bad:
        with pytest.raises(RegistryError, match="invalid alias"):
            reg.alias("ok@1", bad)
    assert [p.name for p in (reg.root / "artifacts").iterdir()] == ["ok"]


def test_push_failure_mid_copy_leaves_previous_version(reg: Registry, tmp_path: Path, monkeypatch) -> None:
    src = _model_folder(tmp_path / "m")
    v1 = reg.push("tiny", src)
    calls = []

    def failing_copy(a: Path, b: Path) -> None:
        calls.append(a)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        real_copy(a, b)

    real_copy = reg_mod._copy_file
    monkeypatch.setattr(reg_mod, "_copy_file", failing_copy)
    with pytest.raises(OSError, match="disk full"):
        reg.push("tiny", src)
    assert reg.resolve("tiny") == v1 and [e.version for e in reg.entries("tiny")] == [1]
    assert not (reg.root / "artifacts" / "tiny" / "v2").exists() and not any((reg.root / ".tmp").iterdir())
    monkeypatch.setattr(reg_mod, "_copy_file", real_copy)
    assert reg.push("tiny", src).version == 2


def test_crash_leftovers_are_cleaned_on_open(reg: Registry, tmp_path: Path) -> None:
    """A SIGKILL mid-push leaves a temp folder (or a renamed folder with no row): the next open removes both."""
    v1 = reg.push("tiny", _model_folder(tmp_path / "m"))
    (reg.root / ".tmp" / "tiny.v2-abc" / "sub").mkdir(parents=True)
    (reg.root / "artifacts" / "tiny" / "v2").mkdir()
    reopened = Registry(reg.root)
    assert not any((reg.root / ".tmp").iterdir()) and not (reg.root / "artifacts" / "tiny" / "v2").exists()
    assert reopened.resolve("tiny") == v1 and reopened.push("tiny", tmp_path / "m").version == 2


def test_corrupt_detection(reg: Registry, tmp_path: Path) -> None:
    e = reg.push("tiny", _model_folder(tmp_path / "m"))
    assert reg.verify(e) == e
    (e.path / "sub" / "note.txt").write_text("tampered")
    with pytest.raises(RegistryError, match="tiny@1 is corrupt: hash mismatch"):
        reg.verify(e)
    (e.path / "sub" / "note.txt").unlink()
    with pytest.raises(RegistryError, match="corrupt: hash mismatch"):
        reg.verify(e)
    (e.path / "sub" / "note.txt").write_text("seed 0")
    (e.path / "sub" / "note.txt").rename(e.path / "note.txt")  # same bytes, different path
    with pytest.raises(RegistryError, match="corrupt: hash mismatch"):
        reg.verify(e)


def test_concurrent_resolve_from_two_threads(reg: Registry, tmp_path: Path) -> None:
    """The server resolves from the asyncio thread and the engine thread while a push/alias may land."""
    src = _model_folder(tmp_path / "m")
    reg.push("tiny", src)
    errors, seen = [], [set(), set()]

    def worker(i: int) -> None:
        try:
            for _ in range(200):
                seen[i].add(reg.resolve("tiny").version)
                assert reg.resolve("tiny@1").version == 1
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    reg.push("tiny", src)
    reg.alias("tiny@2", "prod")
    for t in threads:
        t.join()
    assert errors == [] and all(s <= {1, 2} for s in seen)
    assert reg.resolve("tiny@prod").version == 2


def _cli(root: Path, *argv: str) -> int:
    parser = argparse.ArgumentParser(prog="slimlm")
    add_registry_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["registry", "--root", str(root), *argv])
    return args.func(args)


def test_cli(tmp_path: Path, capsys, monkeypatch) -> None:
    root = tmp_path / "r"
    assert _cli(root, "list") == 0 and "is empty" in capsys.readouterr().out
    assert _cli(root, "push", "my-lora", str(_adapter_folder(tmp_path / "a"))) == 0
    assert "pushed my-lora@1 (adapter, lora)" in capsys.readouterr().out
    assert _cli(root, "push", "my-lora", str(tmp_path / "a"), "--parent-base", "other") == 0
    assert _cli(root, "alias", "my-lora@1", "prod") == 0 and "my-lora@prod -> my-lora@1" in capsys.readouterr().out
    assert _cli(root, "rollback", "my-lora") == 0 and "head -> my-lora@1" in capsys.readouterr().out
    _cli(root, "list")
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["NAME", "HEAD", "VERSIONS"] and "prod=v1" in out
    _cli(root, "show", "my-lora")
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:3] == ["v1", "*", "prod"] and "eval.accuracy=0.9" in lines[1] and "other" in lines[2]
    _cli(root, "show", "my-lora", "--json")
    shown = json.loads(capsys.readouterr().out)
    assert shown["head"] == 1 and shown["aliases"] == {"prod": 1} and len(shown["versions"]) == 2
    monkeypatch.setenv("SLIMLM_REGISTRY", str(root))  # default root; --root also works after the sub-command
    parser = argparse.ArgumentParser()
    add_registry_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["registry", "list", "--json"])
    assert args.func(args) == 0 and json.loads(capsys.readouterr().out)[0]["ref"] == "my-lora@1"
    with pytest.raises(RegistryError, match="invalid name '../x'"):
        _cli(root, "push", "../x", str(tmp_path / "a"))
