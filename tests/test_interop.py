"""Artifacts other tools load: tokenizer files for transformers 4.x and 5.x, adapter_config.json's base model."""

from __future__ import annotations

import json

import torch
from conftest import nudge_trainables_

from slimlm.tokenizer import TRANSFORMERS4_FAST_CLASSES, Tokenizer, save_tokenizer

TEXTS = ["hello world", "the quick brown fox jumps over the lazy dog 42", "café 日本語 😀", "<|im_start|>user\nhi"]


def _assert_same_tokenizer(a, b) -> None:
    for t in TEXTS:
        assert a.encode(t) == b.encode(t)
    assert a.chat_template == b.chat_template
    assert a.special_tokens_map == b.special_tokens_map
    assert len(a) == len(b)


def test_saved_tokenizer_loads_in_transformers_4_and_5(tokenizer_dir, tmp_path):
    from tokenizers import Tokenizer as RustTokenizer
    from transformers import AutoTokenizer

    original = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    save_tokenizer(Tokenizer(original), tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    # transformers 4.x's AutoTokenizer looks tokenizer_class up by name (NAME + "Fast" first).
    name = config["tokenizer_class"]
    assert name in TRANSFORMERS4_FAST_CLASSES or f"{name}Fast" in TRANSFORMERS4_FAST_CLASSES, name
    assert config["chat_template"] == original.chat_template  # 4.x before 4.50 reads it only from here
    assert not {"is_local", "local_files_only"} & set(config)
    RustTokenizer.from_file(str(tmp_path / "tokenizer.json"))  # 4.x's fast tokenizers read this file as is
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path))  # transformers 5.x
    assert type(reloaded) is type(original)
    _assert_same_tokenizer(reloaded, original)
    messages = [{"role": "user", "content": "hi"}]
    rendered = original.apply_chat_template(messages, tokenize=False)
    assert reloaded.apply_chat_template(messages, tokenize=False) == rendered


def test_model_and_adapter_folders_write_4x_tokenizer_class(tiny_llama, tmp_path):
    from slimlm.checkpoint.hf import load_hf_folder, save_hf_folder
    from slimlm.peft import apply_peft, save_adapter

    tok = Tokenizer.from_pretrained(tiny_llama[0])
    _, model = load_hf_folder(tiny_llama[0])
    save_hf_folder(model, tmp_path / "model", tok.hf)
    apply_peft(model, "lora")
    save_adapter(model, tmp_path / "adapter", base_model=str(tiny_llama[0]), tokenizer=tok)
    for folder in ("model", "adapter"):
        config = json.loads((tmp_path / folder / "tokenizer_config.json").read_text())
        assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
        _assert_same_tokenizer(Tokenizer.from_pretrained(tmp_path / folder).hf, tok.hf)


def test_adapter_base_model_name_resolved_or_overridden(tiny_llama, tmp_path, monkeypatch):
    from peft import PeftConfig

    from slimlm.checkpoint import base_model_name
    from slimlm.checkpoint.hf import load_hf_folder
    from slimlm.peft import apply_peft, save_adapter

    monkeypatch.chdir(tiny_llama[0].parent)
    assert base_model_name(tiny_llama[0].name) == str(tiny_llama[0].resolve())  # relative folder -> absolute
    assert base_model_name("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"  # alias -> its hub id
    assert base_model_name("org/some-model") == "org/some-model"  # hub id as is
    _, model = load_hf_folder(tiny_llama[0])
    apply_peft(model, "lora")
    cases = {
        "rel": (tiny_llama[0].name, None, str(tiny_llama[0].resolve())),
        "alias": ("smollm2-135m", None, "HuggingFaceTB/SmolLM2-135M-Instruct"),
        "override": (tiny_llama[0].name, "me/my-base", "me/my-base"),
    }
    for folder, (source, override, expected) in cases.items():
        save_adapter(model, tmp_path / folder, base_model=source, base_name=override)
        assert PeftConfig.from_pretrained(str(tmp_path / folder)).base_model_name_or_path == expected


def test_auto_peft_model_loads_our_adapter_with_same_logits(tiny_llama, tmp_path):
    from peft import AutoPeftModelForCausalLM

    from slimlm.checkpoint.hf import load_hf_folder
    from slimlm.peft import apply_peft, make_config, save_adapter

    _, model = load_hf_folder(tiny_llama[0])
    apply_peft(model, "lora", make_config("lora", dict(r=4, alpha=8)))
    g = torch.Generator().manual_seed(0)
    nudge_trainables_(model, g)
    save_adapter(model, tmp_path / "adapter", base_model=tiny_llama[0])
    hf = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter")).float().eval()
    x = torch.randint(0, 384, (2, 12), generator=g)
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max().item() < 1e-4
