"""LLM: a loaded model with its tokenizer, and text-in/text-out generation (blocking, streaming, batched).

This is the public face of slimlm.load(). Generation runs on the engine (engine/core.py), the same scheduler,
cache and sampler `slimlm serve` uses, through its offline front: greedy output is the same on every front.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slimlm.checkpoint import load_model
from slimlm.config import ModelConfig
from slimlm.device import resolve_device, resolve_dtype
from slimlm.engine.core import Engine, EngineConfig, Request
from slimlm.engine.sampling import SamplingParams
from slimlm.engine.structured import StructuredOutput, one_of
from slimlm.errors import InputError
from slimlm.model import Transformer
from slimlm.protocol import CausalLM
from slimlm.tokenizer import Messages, Tokenizer

Prompt = str | Messages | list[int]  # text, chat messages, or token ids as they are
STRUCTURED_KWARGS = ("response_format", "json_schema", "regex", "grammar", "choice")
CACHE_BUCKET = 256  # engine context lengths are multiples of this


@dataclass
class Completion:
    """One finished generation with its token counts and timings (seconds)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (stop token or string) or "length"
    prefill_s: float = 0.0  # time to first token
    decode_s: float = 0.0  # the remaining tokens
    token_ids: list[int] = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.completion_tokens - 1) / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0


class LLM:
    """A model ready to generate: `.model` (nn.Module, ids [B,T] -> logits [B,T,V]), `.tokenizer`, `.config`."""

    def __init__(
        self,
        model: CausalLM,
        tokenizer: Tokenizer,
        path: Path | None = None,
        engine_config: EngineConfig | None = None,
        draft_model: Transformer | None = None,
    ):
        self.model, self.tokenizer, self.path = model, tokenizer, path
        # Offline defaults: no LoRA slots (adapters attach to the model itself), no queue limit, prompts prefilled
        # in chunks of up to 1024 tokens (no streams wait behind them, and fewer, larger matmuls run faster);
        # prefix caching and speculation as configured (EngineConfig(speculative="ngram") turns prompt lookup on;
        # a draft model turns on speculative="draft" unless engine_config says otherwise).
        self.draft_model = draft_model  # the smaller model that guesses tokens for speculative="draft"
        self.engine_config = engine_config or EngineConfig(
            max_loras=0, prefill_chunk=1024, speculative="draft" if draft_model is not None else None
        )
        self._engine: Engine | None = None
        self.adapter: Path | None = None

    def load_adapter(self, folder: str | Path) -> str:
        """Attach a fine-tuned adapter (slimlm's or HF PEFT's) to this model; returns its method name."""
        from slimlm.peft import load_adapter

        method = load_adapter(self.model, folder, self.tokenizer)
        self.adapter = Path(folder)
        self._engine = None  # cached prefixes were computed without the adapter
        return method

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def compile(self) -> LLM:
        """torch.compile the model's forward for the engine's decode steps (inductor, frozen pre-packed weights).

        The first calls compile (a minute or more on 2 cores); shapes that change (batch rows, attended length)
        recompile, with dynamic shapes after the first change. Where the engine's fused CPU decode step applies
        (engine/fused_decode.py: fp32 activations on a CPU) decode steps do not call the forward, so this then
        speeds up prefill only."""
        self.model.forward = torch.compile(self.model.forward, options={"freezing": True})
        return self

    def engine_for(self, rows: int, need: int) -> Engine:
        """The offline engine, reused while it has >= rows slots of >= need tokens and is not far too large.

        Context lengths are rounded up to CACHE_BUCKET so that most calls reuse one engine (and its prefix cache).
        """
        e = self._engine
        if e is None or e.config.max_batch < rows or e.max_seq_len < need or e.max_seq_len > 2 * need + CACHE_BUCKET:
            size = max(need, min(-(-need // CACHE_BUCKET) * CACHE_BUCKET, self.config.max_seq_len))
            cfg = dataclasses.replace(
                self.engine_config, max_batch=max(rows, e.config.max_batch if e else 1), max_seq_len=size
            )
            draft = self.draft_model if cfg.speculative == "draft" else None
            e = self._engine = Engine(self.model, self.tokenizer, cfg, draft_model=draft)
        return e

    def _prompt_ids(self, prompt: Prompt, chat: bool | None) -> list[int]:
        from slimlm.peft.prompt import input_prefix_ids

        return input_prefix_ids(self.model) + self._user_ids(prompt, chat)  # prompt tuning's virtual tokens first

    def _user_ids(self, prompt: Prompt, chat: bool | None) -> list[int]:
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            if max(prompt) >= self.config.vocab_size or min(prompt) < 0:
                raise InputError(
                    f"token ids must be in [0, {self.config.vocab_size}), got {min(prompt)}..{max(prompt)}"
                )
            return list(prompt)
        if chat is None:
            chat = self.tokenizer.has_chat_template
        ids = self.tokenizer.prompt_ids(prompt, chat=chat)
        if not ids:
            raise InputError("the prompt is empty after tokenization")
        return ids

    def _params(self, params: SamplingParams | None, kwargs: dict) -> SamplingParams:
        """SamplingParams from params= or keyword arguments; the structured-output keywords (response_format,
        json_schema, regex, grammar, choice) go with either."""
        structured = _structured(kwargs)
        if params is not None and kwargs:
            raise InputError("pass either params=SamplingParams(...) or keyword arguments, not both")
        params = params or SamplingParams(**kwargs)
        if structured is None:
            return params
        if params.structured is not None:
            raise InputError("the output constraint is given twice: in params.structured and as a keyword")
        return dataclasses.replace(params, structured=structured)

    def stream_batch(
        self, prompts: Sequence[Prompt], params: SamplingParams, chat: bool | None = None
    ) -> Iterator[tuple[int, str, Completion | None]]:
        """Yield (row, new text, None) as text is produced and (row, '', Completion) when a row finishes."""
        ids = [self._prompt_ids(p, chat) for p in prompts]
        need = max(len(i) for i in ids) + params.max_new_tokens
        if need > self.config.max_seq_len:
            raise InputError(
                f"prompt ({need - params.max_new_tokens} tokens) + max_new_tokens ({params.max_new_tokens}) "
                f"exceeds the model's context of {self.config.max_seq_len} tokens; shorten the prompt or "
                "lower max_new_tokens"
            )
        engine = self.engine_for(min(len(ids), 64), need)
        reqs = [Request(i, params) for i in ids]
        row_of = {id(r): row for row, r in enumerate(reqs)}
        texts = {row: "" for row in range(len(reqs))}
        t0 = time.perf_counter()
        for req, out in engine.generate(reqs):
            row = row_of[id(req)]
            if out.text:
                texts[row] += out.text
                yield row, out.text, None
            if out.finish_reason is not None:
                if out.error:
                    raise RuntimeError(out.error)
                t_first = req.t_first or time.perf_counter()
                ids_out = [t for t in req.output_ids if not (t in engine.stop_ids and not params.ignore_eos)]
                yield (
                    row,
                    "",
                    Completion(
                        texts[row],
                        len(req.prompt_ids),
                        req.n_generated,
                        out.finish_reason,
                        t_first - max(t0, req.t_arrival),
                        (req.t_last or t_first) - t_first,
                        ids_out,
                    ),
                )

    def generate(
        self, prompt: Prompt | list[Prompt], params: SamplingParams | None = None, chat: bool | None = None, **kwargs
    ) -> str | list[str]:
        """Text for one prompt (a string, chat messages or token ids), or a list of texts for a list of prompts.

        Keyword arguments are SamplingParams fields: max_new_tokens, temperature, top_k, top_p, min_p,
        repetition_penalty, seed, stop, min_new_tokens, ignore_eos. chat=None applies the chat template when the
        tokenizer has one.

        Structured output (one of, engine/structured.py): response_format (OpenAI's dict, e.g. {"type":
        "json_object"} or {"type": "json_schema", "json_schema": {"schema": {...}}}, or a pydantic model class),
        json_schema (a dict, JSON text or pydantic model class), regex, grammar (EBNF, root rule `root`) or choice
        (a list of strings). The output then always follows it (compact JSON), unless max_new_tokens cuts it
        short (finish_reason "length").
        """
        single = isinstance(prompt, str) or (bool(prompt) and isinstance(prompt[0], (dict, int)))
        prompts = [prompt] if single else list(prompt)
        out = self.complete(prompts, params, chat, **kwargs)
        return out[0].text if single else [c.text for c in out]

    def complete(
        self, prompts: Sequence[Prompt], params: SamplingParams | None = None, chat: bool | None = None, **kwargs
    ) -> list[Completion]:
        """Like generate for a list of prompts, returning Completions with token counts and timings."""
        params = self._params(params, kwargs)
        results: list[Completion | None] = [None] * len(prompts)
        for row, _, done in self.stream_batch(prompts, params, chat):
            if done is not None:
                results[row] = done
        return results  # type: ignore[return-value]

    def stream(
        self, prompt: Prompt, params: SamplingParams | None = None, chat: bool | None = None, **kwargs
    ) -> Iterator[str]:
        """Yield pieces of text as they are generated for one prompt."""
        params = self._params(params, kwargs)
        for _, piece, _ in self.stream_batch([prompt], params, chat):
            if piece:
                yield piece


BACKENDS = ("torch", "onnxruntime")


def load(
    model: str | Path = "smollm2-135m",
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    compile: bool = False,
    adapter: str | Path | None = None,
    quantize: str | None = None,
    group_size: int = 64,
    backend: str = "torch",
    draft_model: str | Path | None = None,
    tokenizer: Tokenizer | None = None,
) -> LLM:
    """Load a model by alias (`smollm2-135m`), HF folder, .gguf file or HF hub id, with its tokenizer.

    dtype: auto | fp32 | bf16 | fp16. compile=True compiles the decode step (slower first call, faster decoding).
    adapter: a fine-tuned adapter folder to attach (LoRA/DoRA/QLoRA, prefix, prompt, bottleneck adapter, BitFit).
    quantize: int8 | int8-dynamic | int4 (group_size 32/64/128) quantizes the weights after loading (see
    slimlm.quantize.schemes); a folder written by save_quantized loads quantized without it.
    backend: torch, or onnxruntime to run a folder written by `slimlm export onnx` (export/ort.py) through the same
    generation code; adapters, quantization and compile are then settled at export time.
    draft_model: a smaller model with the same tokenizer (alias, folder, .gguf or hub id; e.g. a student from
    `slimlm distill`), loaded with the same dtype, device and quantization: generation then runs draft-model
    speculative decoding (engine/draft.py; greedy output unchanged, sampled output keeps its distribution).
    tokenizer: the model's tokenizer, already built (the server keeps one per base across unloads: building it
    holds the GIL for ~0.2 s, which would stall the other bases' streams); default: built from the model's files.
    """
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "onnxruntime":
        if draft_model is not None:
            raise InputError("draft_model needs the torch backend; drop it for an onnxruntime model")
        return _load_onnxruntime(model, dtype, device, compile, adapter, quantize)
    if quantize == "int8-static":
        raise InputError(
            "int8-static needs calibration: write a quantized folder with `slimlm quantize --scheme "
            "int8-static --out DIR` and load that folder"
        )
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    path, net = _load_torch(model, dtype, device, quantize, group_size)
    draft = None
    if draft_model is not None:
        from slimlm.engine.draft import check_draft

        draft = _load_torch(draft_model, dtype, device, quantize, group_size)[1]
        check_draft("draft", net, draft)  # now, not at the first generate
    llm = LLM(net, tokenizer or Tokenizer.from_pretrained(path), path, draft_model=draft)
    if adapter is not None:
        llm.load_adapter(adapter)
    return llm.compile() if compile else llm


def _load_torch(
    source: str | Path, dtype: torch.dtype, device: torch.device, quantize: str | None, group_size: int
) -> tuple[Path, Transformer]:
    """(folder or file read, model) loaded and, if asked, quantized."""
    path, _, net = load_model(source, dtype, device)
    if quantize is not None:
        from slimlm.quantize.schemes import quantize_model_

        quantize_model_(net, quantize, group_size)
    return path, net


def load_onnx_llm(folder: str | Path, threads: int = 0) -> LLM:
    """An LLM whose model is the exported graph in `folder` (export/onnx.py), with the folder's tokenizer."""
    from slimlm.export.ort import OrtModel

    return LLM(OrtModel(folder, threads), Tokenizer.from_pretrained(folder), Path(folder))


def _load_onnxruntime(model, dtype, device, compile: bool, adapter, quantize) -> LLM:
    settled = [
        flag
        for flag, used in (
            ("--compile", compile),
            ("--adapter", adapter is not None),
            ("--quantize", quantize is not None),
            ("--dtype", str(dtype) not in ("auto", "fp32", "torch.float32")),
            ("--device", str(device) != "cpu"),
        )
        if used
    ]
    if settled:
        raise InputError(
            f"{', '.join(settled)} cannot be used with the onnxruntime backend: the exported graph "
            "fixes them (merge adapters and quantize at export: slimlm export onnx --adapter/--quantize)"
        )
    return load_onnx_llm(model)


def _structured(kwargs: dict) -> StructuredOutput | None:
    """Pop the structured-output keywords from kwargs -> the one constraint they give (None: no keyword)."""
    given = {k: v for k in STRUCTURED_KWARGS if (v := kwargs.pop(k, None)) is not None}
    make = {
        "response_format": StructuredOutput.from_response_format,
        "json_schema": StructuredOutput.json_schema,
        "regex": StructuredOutput.regex,
        "grammar": StructuredOutput.grammar,
        "choice": StructuredOutput.choice,
    }
    return one_of([make[k](v, param=k) for k, v in given.items()])
