"""The registry detects a corrupted artifact by its hash and keeps serving the last good version (issue 15).

Every push records a sha256 over the stored files; `resolve_good` (what the server uses) checks it once per version.
A bit flip or a truncation in a pushed version is named as corrupt; a bare NAME whose head is corrupt resolves to
the newest intact version, while NAME@N and NAME@ALIAS, which ask for one version, are refused.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from slimlm.serve.registry import Registry, RegistryError


def _adapter(path: Path, seed: int) -> Path:
    """A small HF PEFT LoRA folder (the layout slimlm.peft.save_adapter writes)."""
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": 2,
                "lora_alpha": 4,
                "target_modules": ["q_proj"],
                "lora_dropout": 0.0,
                "base_model_name_or_path": "tiny",
            }
        )
    )
    save_file(
        {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.full((2, 64), float(seed))},
        str(path / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    return path


def _flip_bit(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[:-7])


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    reg = Registry(tmp_path / "registry")
    for v in (1, 2):
        reg.push("ad", _adapter(tmp_path / f"a{v}", v))
    return reg


@pytest.mark.parametrize("damage", [_flip_bit, _truncate], ids=["bit-flip", "truncation"])
def test_corrupt_head_is_detected_and_the_last_good_version_serves(damage, reg, caplog):
    head = reg.resolve("ad")
    assert head.version == 2 and reg.resolve_good("ad") == head
    damage(head.path / "adapter_model.safetensors")
    with pytest.raises(RegistryError, match="ad@2 is corrupt: hash mismatch"):
        reg.verify(head)
    with caplog.at_level(logging.WARNING, logger="slimlm.registry"):
        assert reg.resolve_good("ad").version == 1  # the head is skipped, the previous version serves
    assert "ad@2 is corrupt" in caplog.text and "serving ad@1" in caplog.text
    with pytest.raises(RegistryError, match="ad@2 is corrupt"):
        reg.resolve_good("ad@2")  # a pinned version is never swapped for another
    reg.alias("ad@2", "prod")
    with pytest.raises(RegistryError, match="ad@2 is corrupt"):
        reg.resolve_good("ad@prod")


def test_every_version_corrupt_is_refused(reg):
    for e in reg.entries("ad"):
        _flip_bit(e.path / "adapter_model.safetensors")
    with pytest.raises(RegistryError, match="ad@2 is corrupt.*no earlier version is intact"):
        reg.resolve_good("ad")


def test_verdicts_are_kept_per_version(reg, monkeypatch):
    checked: dict = {}
    assert reg.resolve_good("ad", checked).version == 2
    calls = []
    monkeypatch.setattr(reg, "verify", lambda e: calls.append(e))
    assert reg.resolve_good("ad", checked).version == 2 and calls == []  # hashed once, not on every request


def test_server_keeps_serving_the_last_good_adapter(reg, tiny_llama):
    """What `slimlm serve --registry` does with a request for the adapter after its newest push was damaged."""
    from slimlm.serve.protocol import APIError
    from slimlm.serve.state import ServeConfig, ServerState

    state = ServerState(ServeConfig(model=str(tiny_llama[0]), registry=str(reg.root)))
    assert state.resolve_adapter("ad").name == "ad@2"
    _flip_bit(reg.resolve("ad@1").path / "adapter_model.safetensors")
    assert state.resolve_adapter("ad").name == "ad@2"  # v1's damage does not matter while v2 is intact

    fresh = ServerState(ServeConfig(model=str(tiny_llama[0]), registry=str(reg.root)))
    _flip_bit(reg.resolve("ad@2").path / "adapter_model.safetensors")
    _flip_bit(reg.resolve("ad@1").path / "adapter_model.safetensors")  # v1 intact again (flipped back)
    ref = fresh.resolve_adapter("ad")
    assert ref.name == "ad@1" and ref.key == ("ad", 1)
    with pytest.raises(APIError, match="ad@2 is corrupt"):
        fresh.resolve_adapter("ad@2")


def test_push_refuses_a_folder_that_holds_the_registry(tmp_path):
    reg = Registry(tmp_path / "src" / "registry")
    _adapter(tmp_path / "src" / "ad", 0)
    with pytest.raises(RegistryError, match="contains the registry"):
        reg.push("x", tmp_path / "src")
