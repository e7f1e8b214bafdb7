"""Structured output: constrain a request's tokens to a JSON schema, any JSON object, a regex, an EBNF grammar or a
list of choices, with xgrammar.

Three pieces, used by the engine (engine/core.py) and the fronts that validate requests (serve/api.py, llm.py):
- `StructuredOutput`: what the user asked for, a small frozen value (also the compile cache's key). It rides on
  SamplingParams.structured.
- `GrammarCompiler`: one per (tokenizer, model vocabulary): xgrammar's TokenizerInfo, built once, and an LRU of
  compiled grammars (schemas repeat across requests). `compile` raises `StructuredOutputError` (a ValueError that
  names the request parameter) for anything xgrammar cannot compile, so fronts can answer 400 before queueing.
- `GrammarState`: one xgrammar GrammarMatcher per running sequence; `mask_logits_` masks the rows of one step's
  logits [B, V] that have one, so that every sampling setting (greedy, temperature, top-k/p, penalties, logprobs)
  sees only tokens the grammar allows. Stop tokens are allowed only where the grammar can end.

JSON is generated compact (xgrammar's any_whitespace=False: no spaces or newlines between tokens): a small model
given the freedom of whitespace tends to emit it forever and run into max_tokens.

This module knows nothing of slots, scheduling or HTTP. xgrammar is imported only when a grammar is compiled.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from slimlm.errors import InputError

if TYPE_CHECKING:
    from slimlm.tokenizer import Tokenizer

KINDS = ("json_schema", "json_object", "regex", "grammar", "choice")
CACHE_SIZE = 256  # compiled grammars kept per compiler (a small JSON schema takes ~10 ms to compile for SmolLM2)


class StructuredOutputError(InputError):
    """A structured-output request xgrammar cannot serve; `param` names the request field (for a 400's `param`)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class StructuredOutput:
    """One request's output constraint. `value`: the schema as JSON text (json_schema; key order kept, as it is the
    order properties are generated in), the regex, the EBNF grammar (root rule `root`), or a tuple of choices; None
    for json_object. `param` (not part of the cache key) is the request field it came from, named in errors."""

    kind: str
    value: str | tuple[str, ...] | None = None
    param: str = field(default="structured", compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise StructuredOutputError(
                f"{self.param}: the kind must be one of {', '.join(KINDS)}, got {self.kind!r}", self.param
            )
        ok = {
            "json_object": self.value is None,
            "choice": isinstance(self.value, tuple)
            and bool(self.value)
            and all(isinstance(c, str) and c for c in self.value),
        }.get(self.kind, isinstance(self.value, str) and bool(self.value))
        if not ok:
            need = {"json_object": "no value", "choice": "a non-empty list of non-empty strings"}.get(
                self.kind, "a non-empty string"
            )
            raise StructuredOutputError(f"{self.param}: {self.kind} needs {need}, got {self.value!r}", self.param)

    @classmethod
    def json_schema(cls, schema: dict | str | type, param: str = "json_schema") -> StructuredOutput:
        """From a JSON schema: a dict, JSON text, or a pydantic model class (its model_json_schema())."""
        if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
            schema = schema.model_json_schema()
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise StructuredOutputError(f"{param}: the schema is not valid JSON ({e})", param) from None
        if not isinstance(schema, (dict, bool)):
            raise StructuredOutputError(
                f"{param}: a JSON schema must be an object (or a pydantic model class), got {type(schema).__name__}",
                param,
            )
        return cls("json_schema", json.dumps(schema, ensure_ascii=False), param)

    @classmethod
    def json_object(cls, param: str = "response_format") -> StructuredOutput:
        return cls("json_object", None, param)

    @classmethod
    def regex(cls, pattern: str, param: str = "regex") -> StructuredOutput:
        return cls("regex", pattern, param)

    @classmethod
    def grammar(cls, ebnf: str, param: str = "grammar") -> StructuredOutput:
        return cls("grammar", ebnf, param)

    @classmethod
    def choice(cls, choices: Sequence[str], param: str = "choice") -> StructuredOutput:
        if isinstance(choices, str):
            raise StructuredOutputError(f"{param}: give a list of strings, not one string", param)
        return cls("choice", tuple(choices), param)

    @classmethod
    def from_response_format(
        cls, response_format: dict | type | None, param: str = "response_format"
    ) -> StructuredOutput | None:
        """OpenAI's response_format ({"type": "text" | "json_object" | "json_schema", "json_schema": {"schema":
        ...}}) or a pydantic model class; None for "text" (no constraint)."""
        if response_format is None:
            return None
        if isinstance(response_format, type):
            return cls.json_schema(response_format, param)
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        if kind == "text":
            return None
        if kind == "json_object":
            return cls.json_object(param)
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict) or "schema" not in spec:
                raise StructuredOutputError(
                    f'{param}: type "json_schema" needs "json_schema": {{"name": ..., "schema": {{...}}}}', param
                )
            return cls.json_schema(spec["schema"], param)
        raise StructuredOutputError(
            f'{param}: "type" must be "text", "json_object" or "json_schema" (or pass a '
            f"pydantic model class), got {response_format!r}"[:300],
            param,
        )


def one_of(specs: Sequence[StructuredOutput | None]) -> StructuredOutput | None:
    """The one constraint a request gave (None if none); StructuredOutputError naming both if it gave two."""
    given = [s for s in specs if s is not None]
    if len(given) > 1:
        raise StructuredOutputError(
            f"{given[0].param} and {given[1].param} both constrain the output: give one", given[1].param
        )
    return given[0] if given else None


def choice_grammar(choices: Sequence[str]) -> str:
    """An EBNF grammar whose language is exactly the given strings (JSON string escapes are EBNF's too)."""
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


# A JSON string's character, as xgrammar 0.2.9 writes it, admits what JSON text must not hold: for length-bounded
# strings (maxLength / minLength) [^"\\\r\n] lets raw control characters U+0000..U+001F through (json.loads refuses
# them), and both that class and the unbounded strings' [^\0-\x1f"\\\r\n] take UTF-8-encoded surrogates (bytes
# ED A0..BF xx, invalid UTF-8: the text decodes to U+FFFD and breaks maxLength). We swap in a class without either.
_STRING_CHARS = (r"[^\"\\\r\n]", r"[^\0-\x1f\"\\\r\n]")
_JSON_STRING_CHAR = r"[^\0-\x1f\"\\\r\n\ud800-\udfff]"


def json_grammar(spec: StructuredOutput) -> Any:
    """The xgrammar Grammar of a json_schema or json_object spec: compact (no free whitespace; the separators are
    ", " and ": "), strict for schemas (no properties beyond the schema's), any object for json_object."""
    import xgrammar as xgr

    if spec.kind == "json_object":  # the builtin JSON grammar takes any value; json_object promises an object
        grammar = xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
    else:
        grammar = xgr.Grammar.from_json_schema(spec.value, any_whitespace=False, strict_mode=True)
    text = str(grammar)
    fixed = text
    for loose in _STRING_CHARS:
        fixed = fixed.replace(loose, _JSON_STRING_CHAR)
    return grammar if fixed == text else xgr.Grammar.from_ebnf(fixed)


_XGR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


class GrammarCompiler:
    """Compiles StructuredOutputs for one tokenizer and model vocabulary; thread-safe, with an LRU cache."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_token_ids: Sequence[int]):
        import xgrammar as xgr

        # vocab_size is the model's (its embedding may be larger than the tokenizer's vocabulary): ids past the
        # tokenizer's are never allowed in a structured row.
        self.vocab_size = vocab_size
        self.info = xgr.TokenizerInfo.from_huggingface(
            tokenizer.hf, vocab_size=vocab_size, stop_token_ids=sorted(stop_token_ids) or None
        )
        self._xgr = xgr.GrammarCompiler(self.info, cache_enabled=False)  # our LRU is the cache
        self._cache: OrderedDict[StructuredOutput, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def compile(self, spec: StructuredOutput) -> Any:
        """spec -> xgrammar CompiledGrammar (cached); StructuredOutputError naming spec.param if it cannot."""
        with self._lock:
            if spec in self._cache:
                self._cache.move_to_end(spec)
                self.hits += 1
                return self._cache[spec]
        compiled = self._compile(spec)  # outside the lock: compiling one schema must not hold up the others
        with self._lock:
            self.misses += 1
            self._cache[spec] = compiled
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, spec: StructuredOutput) -> Any:
        c = self._xgr
        try:
            if spec.kind in ("json_schema", "json_object"):
                return c.compile_grammar(json_grammar(spec))
            if spec.kind == "regex":
                return c.compile_regex(spec.value)
            text = choice_grammar(spec.value) if spec.kind == "choice" else spec.value
            return c.compile_grammar(text)
        except Exception as e:  # noqa: BLE001 — xgrammar raises RuntimeError for all of them; the client's input
            why = _XGR_PREFIX.sub("", str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
            what = {"json_schema": "JSON schema", "grammar": "EBNF grammar"}.get(spec.kind, spec.kind)
            raise StructuredOutputError(f"{spec.param}: cannot compile this {what}: {why[:300]}", spec.param) from None

    def state(self, spec: StructuredOutput) -> GrammarState:
        """A fresh matcher for one sequence following spec."""
        return GrammarState(self.compile(spec))


_compilers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {(vocab, stops): compiler}
_compilers_lock = threading.Lock()


def compiler_for(tokenizer: Tokenizer, vocab_size: int, stop_token_ids: Sequence[int]) -> GrammarCompiler:
    """The GrammarCompiler of this tokenizer and vocabulary, built once (its TokenizerInfo takes ~0.25 s for a
    49k vocabulary) and shared by every engine over the tokenizer."""
    key = (vocab_size, tuple(sorted(stop_token_ids)))
    with _compilers_lock:
        per = _compilers.setdefault(tokenizer, {})
        if key not in per:
            per[key] = GrammarCompiler(tokenizer, vocab_size, stop_token_ids)
        return per[key]


class GrammarState:
    """The grammar matcher of one running sequence: which tokens may come next, and the tokens taken so far."""

    def __init__(self, compiled: Any):
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(compiled)

    def accept(self, token: int) -> None:
        """Advance past a sampled token; ValueError if the grammar forbids it (a masking bug, not user input)."""
        if not self.matcher.accept_token(token):
            raise ValueError(f"token {token} is not allowed by the request's grammar")

    @property
    def terminated(self) -> bool:
        """True once the grammar is complete and a stop token has been accepted."""
        return self.matcher.is_terminated()


def mask_logits_(logits: torch.Tensor, states: Sequence[GrammarState | None]) -> None:
    """Set to -inf, in place, the logits [B, V] (float32) of tokens each row's grammar forbids next; rows whose
    state is None are left untouched (and cost nothing)."""
    import xgrammar as xgr

    rows = [i for i, s in enumerate(states) if s is not None]
    if not rows:
        return
    bitmask = xgr.allocate_token_bitmask(len(states), logits.shape[-1])  # [B, ceil(V / 32)] int32, on the CPU
    for i in rows:
        states[i].matcher.fill_next_token_bitmask(bitmask, i)
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True), indices=rows)
