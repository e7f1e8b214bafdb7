"""The tokenizer half of a GGUF file: BPE tokens, token types, merges, special ids, chat template, pre-tokenizer.

llama.cpp does not run the HF tokenizer: it rebuilds it from `tokenizer.ggml.*` and picks its pre-tokenizer regex
from the name in `tokenizer.ggml.pre`. A wrong name silently changes how text splits into tokens, so the name is
found the way llama.cpp's own converter finds it (`get_vocab_base_pre` in convert_hf_to_gguf.py): encode a check
string and look up the sha256 of the token ids in a table of known tokenizers. The table below is that table's
entries for the families slimlm builds (Llama 3, SmolLM, Qwen2, Mistral's Tekken, GPT-2 style byte-level BPE).
A model read from a GGUF file carries its name over instead, and an unknown tokenizer is refused with a way out.

This module writes metadata only; it knows nothing of weights.
"""

from __future__ import annotations

from hashlib import sha256
from pathlib import Path
from typing import Any

from slimlm.errors import InputError

# llama.cpp's check string (convert_hf_to_gguf_update.py), verbatim: spaces, newlines, emoji, digits, CJK, Khmer,
# Cyrillic, quotes and English contractions, so that pre-tokenizers that differ anywhere hash differently.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concate"
    "nated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在app"
    "le工作1314151天～ ------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've "
    "been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'l"
    "L"
)

# sha256(str(tokenizer.encode(CHECK_TEXT))) -> tokenizer.ggml.pre, copied from llama.cpp's get_vocab_base_pre.
PRE_TOKENIZER_HASHES = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / Qwen2 / Qwen2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3-Embedding-0.6B
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",  # R1-Distill-Qwen
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral-Nemo
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
}
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5  # gguf.TokenType values


class VocabError(InputError):
    """A tokenizer that cannot be written as a GGUF vocabulary; the message says what to do."""


def pre_tokenizer_name(hf_tokenizer: Any, source: str | Path | None = None) -> str:
    """`tokenizer.ggml.pre` for this tokenizer: carried over from a source .gguf file, else found by hash."""
    if source is not None and Path(source).suffix == ".gguf" and Path(source).is_file():
        carried = _gguf_pre(Path(source))
        if carried:
            return carried
    digest = sha256(str(hf_tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    if digest not in PRE_TOKENIZER_HASHES:
        raise VocabError(
            f"unknown pre-tokenizer (check-string hash {digest[:16]}...): llama.cpp would split text "
            "differently from this tokenizer; if you know which llama.cpp pre-tokenizer it uses, pass "
            "--tokenizer-pre NAME (e.g. llama-bpe, smollm, qwen2, gpt-2)"
        )
    return PRE_TOKENIZER_HASHES[digest]


def _gguf_pre(path: Path) -> str | None:
    import gguf

    field = gguf.GGUFReader(str(path)).fields.get("tokenizer.ggml.pre")
    return field.contents() if field is not None else None


def bpe_tokens(hf_tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """(token strings, token types) for ids 0..vocab_size-1, as llama.cpp's `get_vocab_base` makes them.

    Ids the tokenizer lacks (an embedding padded past the vocabulary) become `[PADi]` of type UNUSED; added
    tokens are CONTROL when special (or look special, `<|...|>`), else USER_DEFINED.
    """
    reverse = {i: t for t, i in hf_tokenizer.get_vocab().items()}
    added = hf_tokenizer.added_tokens_decoder  # {id: AddedToken}
    if max(reverse) >= vocab_size:
        raise VocabError(
            f"the tokenizer has ids up to {max(reverse)} but the model's vocabulary is {vocab_size}: "
            "pass the model's own tokenizer"
        )
    tokens, types = [], []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_UNUSED)
        elif i in added:
            special = added[i].special or (token.startswith("<|") and token.endswith("|>"))
            tokens.append(token)
            types.append(TOKEN_CONTROL if special else TOKEN_USER_DEFINED)
        else:
            tokens.append(token)
            types.append(TOKEN_NORMAL)
    return tokens, types


def add_tokenizer(writer: Any, hf_tokenizer: Any, folder: Path, vocab_size: int, pre: str) -> None:
    """Write the `tokenizer.*` keys of a byte-level BPE tokenizer (from `folder`'s tokenizer files) to `writer`."""
    import gguf

    tok_json = folder / "tokenizer.json"
    if not tok_json.is_file():
        raise VocabError(f"{folder} has no tokenizer.json; GGUF export needs a fast (tokenizers) BPE tokenizer")
    model_type = _tokenizer_model_type(tok_json)
    if model_type != "BPE":
        raise VocabError(
            f"{folder}: tokenizer model {model_type!r} is not supported; GGUF export writes byte-level "
            "BPE tokenizers (Llama 3, SmolLM, Qwen2), not SentencePiece/Unigram ones"
        )
    tokens, types = bpe_tokens(hf_tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise VocabError(f"{folder}/tokenizer.json holds no BPE merges; re-save the tokenizer with transformers")
    # Whether encode() adds BOS/EOS is taken from what the tokenizer does, not from config flags, so that
    # llama.cpp's default tokenization matches slimlm's.
    special.add_special_token = _adds_special(hf_tokenizer)
    chat_template = getattr(hf_tokenizer, "chat_template", None)
    if isinstance(chat_template, str):
        special.chat_template = chat_template
    special.add_to_gguf(writer, quiet=True)


def _tokenizer_model_type(tok_json: Path) -> str | None:
    import json

    return json.loads(tok_json.read_text()).get("model", {}).get("type")


def _adds_special(hf_tokenizer: Any) -> dict[str, bool]:
    """{"bos": ..., "eos": ...}: whether encode("a") puts the BOS token first / the EOS token last."""
    plain, full = hf_tokenizer.encode("a", add_special_tokens=False), hf_tokenizer.encode("a")
    bos, eos = hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id
    adds_bos = bos is not None and len(full) > len(plain) and full[0] == bos
    adds_eos = eos is not None and len(full) > len(plain) and full[-1] == eos
    return {"bos": adds_bos, "eos": adds_eos}
