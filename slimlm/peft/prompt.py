"""Prompt tuning (Lester et al. 2021) with HF PEFT's PROMPT_TUNING semantics and file layout.

P learned input embeddings (a "soft prompt") precede every input. PEFT concatenates them to the input embeddings
inside its forward; slimlm instead never changes sequence lengths inside the model, so that the KV cache, packing
and serving see ordinary token sequences:
  - `model.embed_tokens` becomes `PromptEmbedding(base, soft_prompt)`, which maps the *virtual token ids*
    V .. V+P-1 (V = the vocabulary size) to the soft prompt rows and every other id to the base embedding;
  - callers prepend `input_prefix_ids(model)` (empty without prompt tuning) to each sequence: the trainer (with
    labels ignored there) and generation. Virtual tokens thus take positions 0..P-1, as in PEFT.
The LM head stays tied to (or separate from) the base embedding matrix; it never predicts a virtual id.

Init: RANDOM is PEFT's default (nn.Embedding's N(0, 1)); with `init_text` the text is tokenized without special
tokens, repeated / truncated to P tokens, and those tokens' embedding rows are copied (PEFT's TEXT init; PEFT's
own tokenizer call would also add special tokens such as BOS).

Adapter folder (HF PEFT's layout, loadable by `peft.PeftModel.from_pretrained`):
  adapter_config.json: {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": P,
    "token_dim": dim, "num_transformer_submodules": 1, "num_attention_heads", "num_layers",
    "prompt_tuning_init": "RANDOM" | "TEXT", "prompt_tuning_init_text", "tokenizer_name_or_path"}
  adapter_model.safetensors: `prompt_embeddings` [P, dim].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from slimlm.model import Transformer
from slimlm.peft.common import PeftError, copy_checked, freeze, prompt_learning_config_errors
from slimlm.protocol import CausalLM

PEFT_TYPE = "PROMPT_TUNING"
WEIGHTS_KEY = "prompt_embeddings"


@dataclass
class PromptConfig:
    num_virtual_tokens: int = 20  # P, the length of the soft prompt
    init_text: str | None = None  # None: random init; else copy the embeddings of this text's tokens

    def validate(self) -> None:
        """Raise one PeftError naming every bad field."""
        errors = []
        P = self.num_virtual_tokens
        if not isinstance(P, int) or isinstance(P, bool) or P < 1:
            errors.append(f"num_virtual_tokens must be a positive integer, got {P!r}")
        if self.init_text is not None and (not isinstance(self.init_text, str) or not self.init_text.strip()):
            errors.append(f"init_text must be a non-empty string or null, got {self.init_text!r}")
        if errors:
            raise PeftError("invalid prompt-tuning config: " + "; ".join(errors))


class PromptEmbedding(nn.Module):
    """Token embedding that also knows P virtual tokens: ids [B, T] -> [B, T, D].

    Ids < V go to the base embedding, ids V..V+P-1 to soft_prompt rows. `weight` is the base matrix, so code
    reading `model.embed_tokens.weight` (dtype, device, weight tying) keeps working.
    """

    def __init__(self, base: nn.Embedding, soft_prompt: torch.Tensor):
        super().__init__()
        self.base = base
        self.soft_prompt = nn.Parameter(soft_prompt)  # [P, D]
        self.tokenizer_name_or_path: str | None = None  # recorded for the adapter config (PEFT's TEXT init needs it)
        self.init_text: str | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings  # the real vocabulary V, which the LM head predicts

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    def virtual_ids(self) -> list[int]:
        V = self.base.num_embeddings
        return list(range(V, V + self.soft_prompt.shape[0]))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        V, P = self.base.num_embeddings, self.soft_prompt.shape[0]
        virtual = ids >= V  # [B, T]
        real = self.base(torch.where(virtual, 0, ids))  # [B, T, D]
        soft = self.soft_prompt[(ids - V).clamp(0, P - 1)].to(real.dtype)  # [B, T, D]
        return torch.where(virtual[..., None], soft, real)


def input_prefix_ids(model: CausalLM | nn.Module) -> list[int]:
    """The virtual token ids to put in front of every input sequence; [] when the model has no prompt tuning.

    Only a slimlm Transformer can carry prompt tuning; for any other model (an ONNX graph: adapters are merged or
    refused at export; a plain nn.Module) the answer is [].
    """
    if not isinstance(model, Transformer):
        return []
    embed = model.embed_tokens
    return embed.virtual_ids() if isinstance(embed, PromptEmbedding) else []


def _init_ids(text: str, tokenizer, P: int) -> list[int]:
    """PEFT's TEXT init: the text's tokens, truncated or repeated to exactly P ids."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise PeftError(f"init_text {text!r} tokenizes to no tokens; give a longer text or init_text: null")
    return (ids * math.ceil(P / len(ids)))[:P]


def apply_prompt(model: nn.Module, cfg: PromptConfig, tokenizer=None) -> None:
    """Freeze the model and wrap its token embedding with a trainable soft prompt (in place)."""
    cfg.validate()
    base = model.embed_tokens
    if isinstance(base, PromptEmbedding):
        raise PeftError("this model already has prompt tuning; load a fresh base model before applying again")
    if cfg.init_text is not None and tokenizer is None:
        raise PeftError(
            "prompt tuning with init_text needs the tokenizer (apply_prompt(..., tokenizer=...)); "
            "set init_text to null for a random init"
        )
    freeze(model)
    P, w = cfg.num_virtual_tokens, base.weight
    if cfg.init_text is None:
        soft = torch.randn(P, w.shape[1], device=w.device).to(w.dtype)  # nn.Embedding's N(0, 1), as PEFT's RANDOM
    else:
        ids = torch.tensor(_init_ids(cfg.init_text, tokenizer, P), device=w.device)
        bad = ids[ids >= w.shape[0]]
        if len(bad):
            raise PeftError(
                f"init_text token ids {bad.tolist()} are outside the model's vocabulary of "
                f"{w.shape[0]}; is the tokenizer the model's own?"
            )
        soft = w.detach()[ids].clone()
    embed = PromptEmbedding(base, soft)
    embed.init_text = cfg.init_text
    hf = getattr(tokenizer, "hf", tokenizer)
    embed.tokenizer_name_or_path = getattr(hf, "name_or_path", None) or None
    model.embed_tokens = embed


def _prompt(model: nn.Module) -> PromptEmbedding:
    if not isinstance(model.embed_tokens, PromptEmbedding):
        raise PeftError("the model has no prompt tuning; call apply_prompt first")
    return model.embed_tokens


def prompt_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{"prompt_embeddings": [P, dim]}."""
    return {WEIGHTS_KEY: _prompt(model).soft_prompt.detach()}


def prompt_adapter_config(model: nn.Module, cfg: PromptConfig) -> dict:
    """adapter_config.json content with HF PEFT's PromptTuningConfig fields."""
    c, embed = model.config, _prompt(model)
    # PEFT refuses a TEXT config without tokenizer_name_or_path even when it only loads trained weights, so a
    # text init whose tokenizer has no known path is recorded as RANDOM (the text is kept for the record).
    text = cfg.init_text is not None and embed.tokenizer_name_or_path is not None
    return {
        "peft_type": PEFT_TYPE,
        "task_type": "CAUSAL_LM",
        "inference_mode": True,
        "num_virtual_tokens": cfg.num_virtual_tokens,
        "token_dim": c.dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": c.n_heads,
        "num_layers": c.n_layers,
        "prompt_tuning_init": "TEXT" if text else "RANDOM",
        "prompt_tuning_init_text": cfg.init_text,
        "tokenizer_name_or_path": embed.tokenizer_name_or_path,
    }


def prompt_config_from_adapter(d: dict) -> PromptConfig:
    """The config to apply before loading the folder's weights.

    init_text is dropped: the saved soft prompt overwrites any init, and loading then needs no tokenizer.
    """
    errors = prompt_learning_config_errors(d, PEFT_TYPE, "prompts")
    if errors:
        raise PeftError("unsupported prompt-tuning adapter_config.json: " + "; ".join(errors))
    cfg = PromptConfig(num_virtual_tokens=d.get("num_virtual_tokens"))
    cfg.validate()
    return cfg


def load_prompt_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy a saved `prompt_embeddings` soft prompt into a model prepared by apply_prompt."""
    copy_checked({WEIGHTS_KEY: _prompt(model).soft_prompt}, tensors, "prompt-tuning")
