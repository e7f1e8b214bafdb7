"""Tokenizer: the HF tokenizer of a model folder (or GGUF file), its chat template and its stop tokens.

Tokenization is transformers' job; this wrapper adds what generation needs: the set of token ids that end a turn,
and incremental detokenization for streaming. It is not a tokenizer implementation.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from slimlm.errors import InputError

Messages = list[dict[str, str]]

# Fast tokenizer classes transformers 4.x resolves by name from tokenizer_config.json (4.x tries NAME + "Fast" first,
# so the slow names v5 writes, e.g. GPT2Tokenizer, load there too). transformers 5 writes `TokenizersBackend`, a
# class 4.x does not have ("Tokenizer class TokenizersBackend does not exist"), which breaks Optimum and every tool
# pinned to 4.x; files we write name a class from this list instead (PreTrainedTokenizerFast is the generic one).
TRANSFORMERS4_FAST_CLASSES = (
    "PreTrainedTokenizerFast",
    "GPT2TokenizerFast",
    "LlamaTokenizerFast",
    "CodeLlamaTokenizerFast",
    "GemmaTokenizerFast",
    "Qwen2TokenizerFast",
    "GPTNeoXTokenizerFast",
    "BloomTokenizerFast",
    "CohereTokenizerFast",
    "T5TokenizerFast",
    "BertTokenizerFast",
)
# Keys v5 leaks into tokenizer_config.json from the load call; 4.x would pass them to the tokenizer's __init__.
_LOAD_ONLY_KEYS = ("is_local", "local_files_only")


class _PackedFolderNotice(logging.Filter):
    """Drops transformers' "You are using a model of type `slimlm-quantized...`" warning. AutoTokenizer reads
    config.json, whose model_type a packed quantized folder sets so that transformers refuses its weights
    (quantize/schemes.py); its tokenizer files are ordinary, so loading them says nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "model of type `slimlm-quantized" not in record.getMessage()


_PACKED_FOLDER_NOTICE = _PackedFolderNotice()

# Tokens that chat templates use to end an assistant turn; whichever exist in the vocabulary stop generation.
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<|end|>",
    "<end_of_turn>",
    "</s>",
)


class Tokenizer:
    def __init__(self, hf_tokenizer: Any, extra_stop_ids: Sequence[int] = ()):
        self.hf = hf_tokenizer
        vocab = hf_tokenizer.get_vocab()
        stops = {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}
        if hf_tokenizer.eos_token_id is not None:
            stops.add(hf_tokenizer.eos_token_id)
        self.stop_token_ids: set[int] = stops | set(extra_stop_ids)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load from an HF folder (tokenizer files + generation_config.json) or a .gguf file."""
        from transformers import AutoTokenizer

        from slimlm.errors import CheckpointError
        from slimlm.jsonl import read_json_object

        path = Path(path)
        extra = []
        gen = path / "generation_config.json"
        if path.suffix != ".gguf" and gen.is_file():
            eos = read_json_object(gen).get("eos_token_id")
            extra = [eos] if type(eos) is int else [i for i in eos if type(i) is int] if isinstance(eos, list) else []
        try:
            if path.suffix == ".gguf":
                return cls(AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name))
            logging.getLogger("transformers.configuration_utils").addFilter(_PACKED_FOLDER_NOTICE)  # once
            return cls(AutoTokenizer.from_pretrained(str(path)), extra)
        except Exception as e:  # transformers raises many types for bad files (JSONDecodeError, OSError, ...)
            why = " ".join(f"{type(e).__name__}: {e}".split())
            raise CheckpointError(
                f"{path}: its tokenizer cannot be loaded ({why}); re-download the model or fix "
                "tokenizer.json / tokenizer_config.json"
            ) from None

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def pad_id(self) -> int:
        pad = self.hf.pad_token_id
        return pad if pad is not None else min(self.stop_token_ids, default=0)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def apply_chat_template(self, messages: Messages, add_generation_prompt: bool = True) -> list[int]:
        """Render messages with the model's own chat template and tokenize (the template adds special tokens)."""
        if not self.has_chat_template:
            raise InputError("this tokenizer has no chat template; pass a plain prompt string instead of messages")
        text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        return self.encode(text, add_special_tokens=False)

    def prompt_ids(self, prompt: str | Messages, chat: bool | None = None) -> list[int]:
        """Token ids for a plain string or a list of chat messages; chat=True wraps a string as one user turn."""
        if isinstance(prompt, str):
            if chat:
                return self.apply_chat_template([{"role": "user", "content": prompt}])
            return self.encode(prompt)
        return self.apply_chat_template(list(prompt))

    def save_pretrained(self, folder: str | Path) -> None:
        save_tokenizer(self.hf, folder)


def save_tokenizer(tokenizer: Any, folder: str | Path) -> None:
    """Save an HF tokenizer (or our wrapper) so that transformers 4.4x and 5.x both load it.

    transformers 5 saves `tokenizer_class: TokenizersBackend` and keeps the chat template only in
    chat_template.jinja; we rewrite tokenizer_config.json with a class 4.x knows (v5 maps it back to the same
    backend) and the chat template inline too (4.x before 4.50 reads it only from there). tokenizer.json, which
    holds the vocabulary and added tokens, is left as transformers wrote it.
    """
    hf = getattr(tokenizer, "hf", tokenizer)
    hf.save_pretrained(str(folder))
    path = Path(folder) / "tokenizer_config.json"
    config = json.loads(path.read_text())
    name = config.get("tokenizer_class") or ""
    if name not in TRANSFORMERS4_FAST_CLASSES and f"{name}Fast" not in TRANSFORMERS4_FAST_CLASSES:
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    template = getattr(hf, "chat_template", None)
    if isinstance(template, str) and "chat_template" not in config:
        config["chat_template"] = template
    for key in _LOAD_ONLY_KEYS:
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


class StreamDecoder:
    """Turns token ids arriving one by one into text pieces, holding back incomplete UTF-8 characters.

    Decodes a short window of recent tokens each time, so the cost per token stays constant (as in vLLM's
    detokenizer): `prefix` is text already emitted, `read` where the window starts.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tok, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start
        self.read_offset = 0  # tokens before this are emitted

    def push(self, token_id: int) -> str:
        """Add one token; return the new text it completes ('' while a character is still incomplete)."""
        self.ids.append(token_id)
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset], self.skip)
        full = self.tok.decode(self.ids[self.prefix_offset :], self.skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix) :]
        return ""


class StopStringText:
    """One row's text as it grows, cut before the first stop string even when one spans two pieces.

    Streaming holds back the end of the text only while it could still be the beginning of a stop string.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops, self.text, self.sent = list(stops), "", 0
        self.hold = max((len(s) for s in self.stops), default=1) - 1

    def add(self, piece: str) -> tuple[str, bool]:
        """Append a piece; return (text now safe to emit, whether a stop string was hit)."""
        search_from = max(0, len(self.text) - self.hold)  # a stop ending in `piece` starts no earlier
        self.text += piece
        hits = [i for i in (self.text.find(s, search_from) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return self.flush(), True
        return self._emit(len(self.text) - self._open_prefix()), False

    def flush(self) -> str:
        """Everything not yet emitted (the row has finished)."""
        return self._emit(len(self.text))

    def _open_prefix(self) -> int:
        """Length of the longest end of the text that begins some stop string."""
        for k in range(min(self.hold, len(self.text)), 0, -1):
            if any(s.startswith(self.text[-k:]) for s in self.stops):
                return k
        return 0

    def _emit(self, upto: int) -> str:
        out = self.text[self.sent : upto]
        self.sent = max(self.sent, upto)
        return out
