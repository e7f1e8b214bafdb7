"""Shared fixtures: a tiny byte-level BPE tokenizer trained offline, and tiny random HF model folders.

Nothing here touches the network: the tokenizer is trained from generated text, the models are random
transformers models saved with `save_pretrained`.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the suite may reach the hub

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 (as in SmolLM2)
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TOKENIZER_VOCAB = 384
# Multi-byte characters the small BPE vocabulary mostly cannot merge, so they span several byte tokens.
UNICODE_WORDS = ["café", "naïve", "日本語", "こんにちは", "Grüße", "€", "😀", "🚀", "ñandú", "Ωμέγα"]
WORDS = (
    "the a cat dog sat on mat and ran to house big small red blue green quick brown fox jumps over lazy "
    "river mountain sun moon star capital of France Paris is city hello world what how why tell me story"
).split()

# Shapes of every tiny model in the suite (vocab = the tokenizer's, so every generated id decodes).
TINY_HF_CONFIG = dict(
    vocab_size=TOKENIZER_VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def pytest_configure(config: pytest.Config) -> None:
    # The models here are tiny: one thread is fastest, and with OpenMP a second thread on a busy 2-core machine
    # turns a 64x64 matmul from microseconds into milliseconds (spin-waiting). SLIMLM_TEST_THREADS overrides.
    torch.set_num_threads(int(os.environ.get("SLIMLM_TEST_THREADS", "1")))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def _corpus(n_lines: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [
            rng.choice(UNICODE_WORDS) if rng.random() < 0.1 else rng.choice(WORDS) for _ in range(rng.randint(4, 12))
        ]
        lines.append(" ".join(words) + rng.choice(".!?,") + f" {rng.randint(0, 999)}")
    return lines


def build_hf_tokenizer():
    """A byte-level BPE (vocab 384) wrapped as transformers.PreTrainedTokenizerFast with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    assert len(hf) == TOKENIZER_VOCAB, len(hf)
    return hf


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the tiny tokenizer's files (tokenizer.json, tokenizer_config.json, chat template)."""
    folder = tmp_path_factory.mktemp("tiny_tokenizer")
    build_hf_tokenizer().save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def hf_tokenizer(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


HF_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
}


def nudge_trainables_(model: torch.nn.Module, g: torch.Generator, std: float = 0.05) -> None:
    """Add std * N(0, 1) noise (drawn from `g`) to every trainable parameter, so that a fresh adapter (LoRA's B = 0)
    changes the logits."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(std * torch.randn(p.shape, generator=g))


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int, std: float = 0.1) -> torch.nn.Module:
    """Re-draw every parameter so that nothing is left at a trivial init (norm weights 1, biases 0)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if "norm" in name:
            p.copy_(1.0 + 0.2 * noise)
        elif name.endswith("bias"):
            p.copy_(0.2 * noise)
        else:
            p.copy_(std * noise)
    return model


def make_hf_model(arch: str = "llama", seed: int = 0, **overrides: Any):
    """A random transformers model (fp32, eval, eager attention) of the tiny shape, with `overrides` in its config."""
    import transformers

    config_cls, model_cls = (getattr(transformers, n) for n in HF_CLASSES[arch])
    config = config_cls(**{**TINY_HF_CONFIG, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config)
    return randomize_(model, seed).float().eval()


def save_hf_model(model, folder: Path, tokenizer_dir: Path | None) -> Path:
    """save_pretrained (safetensors) plus the tokenizer files; returns the folder."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    assert (folder / "model.safetensors").is_file(), "save_pretrained did not write safetensors"
    if tokenizer_dir is not None:
        for f in tokenizer_dir.iterdir():
            shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture(scope="session")
def make_model_folder(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Callable[..., tuple[Path, Any]]:
    """Factory: make_model_folder(arch="llama", seed=0, tokenizer=True, **hf_config) -> (folder, hf_model)."""

    def make(arch: str = "llama", seed: int = 0, tokenizer: bool = True, **overrides: Any):
        model = make_hf_model(arch, seed, **overrides)
        folder = tmp_path_factory.mktemp(f"tiny_{arch}")
        return save_hf_model(model, folder, tokenizer_dir if tokenizer else None), model

    return make


@pytest.fixture(scope="session")
def tiny_llama(make_model_folder) -> tuple[Path, Any]:
    """One shared tiny Llama folder (GQA, untied head) with the tokenizer; read-only for tests."""
    return make_model_folder("llama", seed=1)
