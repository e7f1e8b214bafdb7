"""OpenAI request bodies (pydantic) and the response / stream-chunk bodies the server writes.

Fields OpenAI has and slimlm cannot honour (n > 1, best_of, suffix, tools) are refused with a 400 that names
them rather than ignored. vLLM's extensions top_k, min_p, repetition_penalty and ignore_eos are accepted.
Structured output comes as OpenAI's `response_format` (text, json_object, json_schema), vLLM's `guided_json`,
`guided_regex`, `guided_grammar`, `guided_choice`, or vLLM >= 0.10's `structured_outputs: {json, regex, grammar,
choice, json_object}`; `structured_output()` turns whichever was sent into one engine/structured.py constraint.

Every limit is declared on the field, so that it is both checked here (a 400 naming the field, never a 500 from
deeper down) and written into /openapi.json, which the fuzz suite (tests/robustness/test_fuzz_api.py) generates
requests from. Numbers must be finite (JSON's NaN / Infinity are refused); stop strings are capped in number and
length because matching them runs on the engine thread for every token of every request.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from slimlm.engine.structured import StructuredOutput, StructuredOutputError, one_of
from slimlm.errors import InputError


def _unicode(s: str) -> str:
    """Refuse a lone surrogate ("\\ud800" in the JSON, which Python's parser lets through): no tokenizer or
    UTF-8 writer can take it."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"text must be valid Unicode; it holds a lone surrogate at character {e.start}") from None
    return s


Text = Annotated[str, AfterValidator(_unicode)]
MAX_STOP_STRINGS = 16  # OpenAI allows 4; vLLM has no cap, but each one is searched for after every token
MAX_STOP_CHARS = 256
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS), AfterValidator(_unicode)]
TokenId = Annotated[int, Field(ge=0)]
PromptText = Annotated[str, Field(min_length=1), AfterValidator(_unicode)]


class APIError(Exception):
    """An error the client caused (or must wait out); rendered as OpenAI's {"error": {...}} body."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class JSONSchemaFormat(BaseModel):
    """OpenAI's response_format.json_schema; `strict` is accepted and always honoured (the schema is enforced)."""

    model_config = ConfigDict(populate_by_name=True)
    name: Text = "response"
    description: Text | None = None
    schema_: dict | bool = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None  # with type json_schema


class StructuredOutputs(BaseModel):
    """vLLM >= 0.10's structured_outputs: one of json (a schema), regex, grammar (EBNF), choice, json_object."""

    model_config = ConfigDict(populate_by_name=True)
    json_: dict | bool | Text | None = Field(default=None, alias="json")
    regex: Text | None = None
    grammar: Text | None = None
    choice: Annotated[list[Text], Field(min_length=1)] | None = None
    json_object: bool | None = None


class SamplingFields(BaseModel):
    # Unknown fields are ignored, as OpenAI and vLLM do; NaN and Infinity (which Python's JSON parser accepts) are not.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: Text
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1, lt=2**63)  # the engine holds it in an int64 tensor
    min_p: float = Field(default=0.0, ge=0.0, lt=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(default=None, ge=0, lt=2**64)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Documented as exactly 1 (so the fuzzer knows), checked by check_unsupported with a message that says why.
    n: int = Field(default=1, json_schema_extra={"minimum": 1, "maximum": 1})
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)  # vLLM: stop tokens are suppressed until this many tokens exist
    user: Text | None = None
    response_format: ResponseFormat | None = None
    guided_json: dict | bool | Text | None = None  # vLLM's extra fields (< 0.10; still accepted there)
    guided_regex: Text | None = None
    guided_grammar: Text | None = None
    guided_choice: Annotated[list[Text], Field(min_length=1)] | None = None
    structured_outputs: StructuredOutputs | None = None

    def structured_output(self) -> StructuredOutput | None:
        """The output constraint the request sent (None: free text); APIError 400 naming the field if it is
        malformed or given twice. Whether xgrammar can compile it is checked later (serve/api.py)."""
        S, so = StructuredOutput, self.structured_outputs
        rf = None if self.response_format is None else self.response_format.model_dump(by_alias=True)
        given = [
            ("response_format", rf, S.from_response_format),
            ("guided_json", self.guided_json, S.json_schema),
            ("guided_regex", self.guided_regex, S.regex),
            ("guided_grammar", self.guided_grammar, S.grammar),
            ("guided_choice", self.guided_choice, S.choice),
        ]
        if so is not None:
            given += [
                ("structured_outputs.json", so.json_, S.json_schema),
                ("structured_outputs.regex", so.regex, S.regex),
                ("structured_outputs.grammar", so.grammar, S.grammar),
                ("structured_outputs.choice", so.choice, S.choice),
                ("structured_outputs.json_object", so.json_object or None, lambda _, param: S.json_object(param)),
            ]
        try:
            return one_of([make(value, param=name) for name, value, make in given if value is not None])
        except StructuredOutputError as e:
            raise APIError(400, str(e), param=e.param) from None

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def check_unsupported(self, names: tuple[str, ...]) -> None:
        if self.n != 1:
            raise APIError(400, "n must be 1: slimlm returns one choice per request", param="n")
        extra = self.model_extra or {}
        for name in names:
            if extra.get(name) not in (None, False, 1, [], ""):
                raise APIError(400, f"{name} is not supported by slimlm", param=name)


class TextPart(BaseModel):
    """A content part; slimlm serves text models, so the only kind is {"type": "text", "text": ...}."""

    type: Literal["text"]
    text: Text


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int = Field(default=0, ge=0, le=20)


TokenIds = Annotated[list[TokenId], Field(min_length=1)]
MAX_PROMPTS = 256  # prompts in one completions request (a batch): each is one engine request


class CompletionRequest(SamplingFields):
    # One prompt (text or token ids) or a batch of them (one choice each, `index` in order), as OpenAI takes.
    prompt: (
        PromptText
        | TokenIds
        | Annotated[list[PromptText], Field(min_length=1, max_length=MAX_PROMPTS)]
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    )
    # OpenAI's default of 16; 0 only with echo and logprobs (scoring the prompt: lm-evaluation-harness loglikelihood)
    max_tokens: int | None = Field(default=16, ge=0)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False  # the prompt's text (and with logprobs its tokens' logprobs) before the completion

    def prompts(self) -> list[str | list[int]]:
        """The prompts of the request: one, or each of a batch."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class TokenizeRequest(BaseModel):
    """vLLM's POST /tokenize: `prompt` (text) or `messages` (through the chat template), one of the two."""

    model_config = ConfigDict(extra="allow")
    model: Text | None = None
    prompt: Text | None = None
    messages: list[Message] | None = None
    add_generation_prompt: bool = True  # with messages
    add_special_tokens: bool = True  # with prompt (a BOS the tokenizer adds); the chat template writes its own


class DetokenizeRequest(BaseModel):
    """vLLM's POST /detokenize: token ids -> {"prompt": text}."""

    model_config = ConfigDict(extra="allow")
    model: Text | None = None
    tokens: list[TokenId]


class LoadAdapter(BaseModel):
    lora_name: Text
    lora_path: Text


class UnloadAdapter(BaseModel):
    lora_name: Text


def document_limits(schema: dict, max_tokens_limit: int, vocab_size: int | None = None) -> dict:
    """Write a server's limits (settings and the model's vocabulary, unknown to the pydantic models) into its
    OpenAPI schema: max_tokens, and the largest token id a completions prompt (or /detokenize) may hold."""
    models = schema.get("components", {}).get("schemas", {})
    for branch in models.get("CompletionRequest", {}).get("properties", {}).get("prompt", {}).get("anyOf", []):
        items = branch.get("items", {})
        items = items.get("items", {}) if items.get("type") == "array" else items  # a batch of token-id lists
        if vocab_size and items.get("type") == "integer":
            items["maximum"] = vocab_size - 1
    tokens = models.get("DetokenizeRequest", {}).get("properties", {}).get("tokens", {}).get("items", {})
    if vocab_size and tokens.get("type") == "integer":
        tokens["maximum"] = vocab_size - 1
    for name in ("ChatRequest", "CompletionRequest"):
        props = models.get(name, {}).get("properties", {})
        for field in ("max_tokens", "max_completion_tokens", "min_tokens"):
            spec = props.get(field, {})
            for branch in spec.get("anyOf", [spec]):
                if branch.get("type") == "integer":
                    branch["maximum"] = max_tokens_limit
    return schema


def validation_error(errors: list[dict]) -> APIError:
    """pydantic's errors for a request body -> one 400 that names a bad field, as OpenAI's `param` does.

    A value that fits no branch of a union (`content`: a string or a list of parts) gets an error per branch; the
    one that says most is not "should be a string" (a *_type error: the wrong branch) but the deepest other one."""
    err = min(errors, key=lambda e: (str(e.get("type", "")).endswith("_type"), -len(e.get("loc", ()))))
    if err.get("type") == "json_invalid":
        where = err.get("loc", ("body", None))[-1]
        return APIError(400, f"the body is not valid JSON: {err.get('ctx', {}).get('error', '')} at character {where}")
    # Drop the union-branch labels pydantic puts in the location ("list[TextPart]", "constrained-str").
    loc = [str(x) for x in err.get("loc", ())[1:] if not _union_branch(x)]
    param = ".".join(loc) or None
    return APIError(400, f"{param or 'body'}: {err['msg'].removeprefix('Value error, ')}", param=param)


def _union_branch(part) -> bool:
    return isinstance(part, str) and ("[" in part or "-" in part or part in ("str", "int", "float", "bool", "none"))


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


LOGPROB_FLOOR = -9999.0  # vLLM's stand-in for -inf: JSON has no infinities


def _finite(lp: float) -> float:
    """A logprob JSON can carry: -inf (a token the sampling settings rule out) and NaN become LOGPROB_FLOOR."""
    return lp if lp >= LOGPROB_FLOOR else LOGPROB_FLOOR  # NaN fails the comparison too


def chat_logprobs(entries: list[dict], token_text) -> dict:
    """OpenAI chat logprobs: {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}."""

    def item(tok: int, lp: float) -> dict:
        s = token_text(tok)
        return {"token": s, "logprob": _finite(lp), "bytes": list(s.encode())}

    return {
        "content": [
            {**item(e["token"], e["logprob"]), "top_logprobs": [item(t, lp) for t, lp in e["top"]]} for e in entries
        ]
    }


def completion_logprobs(entries: list[dict], token_text, offset: int = 0) -> dict:
    """Legacy completions logprobs: parallel lists tokens / token_logprobs / top_logprobs / text_offset."""
    tokens = [token_text(e["token"]) for e in entries]
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    # An echoed prompt's first token has no logprob (nothing comes before it): null, as OpenAI and vLLM write it.
    return {
        "tokens": tokens,
        "token_logprobs": [None if e["logprob"] is None else _finite(e["logprob"]) for e in entries],
        "top_logprobs": [
            None if e["top"] is None else {token_text(t): _finite(lp) for t, lp in e["top"]} for e in entries
        ],
        "text_offset": offsets,
    }


def chunk(kind: str, rid: str, model: str, created: int, choice: dict | None, usage_: dict | None = None) -> dict:
    """One SSE chunk body; choice None gives the usage-only chunk (`choices: []`)."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    out = {"id": rid, "object": obj, "created": created, "model": model, "choices": [] if choice is None else [choice]}
    if usage_ is not None:
        out["usage"] = usage_
    return out


def now() -> int:
    return int(time.time())
