"""OpenAI request bodies (pydantic) and the response / stream-chunk bodies the server writes.

Fields OpenAI has and slimlm cannot honour (n > 1, echo, best_of, suffix, tools) are refused with a 400 that names
them rather than ignored. vLLM's extensions top_k, min_p, repetition_penalty and ignore_eos are accepted.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class APIError(Exception):
    """An error the client caused (or must wait out); rendered as OpenAI's {"error": {...}} body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields are ignored, as OpenAI and vLLM do

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)
    min_p: float = Field(default=0.0, ge=0.0, lt=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)  # vLLM: stop tokens are suppressed until this many tokens exist
    user: str | None = None

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stops):
            raise APIError(400, "stop strings must be non-empty", param="stop")
        return stops

    def check_unsupported(self, names: tuple[str, ...]) -> None:
        if self.n != 1:
            raise APIError(400, "n must be 1: slimlm returns one choice per request", param="n")
        extra = self.model_extra or {}
        for name in names:
            if extra.get(name) not in (None, False, 1, [], ""):
                raise APIError(400, f"{name} is not supported by slimlm", param=name)


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = [p.get("text", "") for p in self.content if p.get("type") == "text"]
        if len(parts) != len(self.content):
            raise APIError(400, "only text content parts are supported", param="messages")
        return "".join(parts)


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int = Field(default=0, ge=0, le=20)


class CompletionRequest(SamplingFields):
    prompt: str | list[int]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False


class LoadAdapter(BaseModel):
    lora_name: str
    lora_path: str


class UnloadAdapter(BaseModel):
    lora_name: str


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_logprobs(entries: list[dict], token_text) -> dict:
    """OpenAI chat logprobs: {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}."""
    def item(tok: int, lp: float) -> dict:
        s = token_text(tok)
        return {"token": s, "logprob": lp, "bytes": list(s.encode())}
    return {"content": [{**item(e["token"], e["logprob"]), "top_logprobs": [item(t, lp) for t, lp in e["top"]]}
                        for e in entries]}


def completion_logprobs(entries: list[dict], token_text, offset: int = 0) -> dict:
    """Legacy completions logprobs: parallel lists tokens / token_logprobs / top_logprobs / text_offset."""
    tokens = [token_text(e["token"]) for e in entries]
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{token_text(t): lp for t, lp in e["top"]} for e in entries], "text_offset": offsets}


def chunk(kind: str, rid: str, model: str, created: int, choice: dict | None, usage_: dict | None = None) -> dict:
    """One SSE chunk body; choice None gives the usage-only chunk (`choices: []`)."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    out = {"id": rid, "object": obj, "created": created, "model": model,
           "choices": [] if choice is None else [choice]}
    if usage_ is not None:
        out["usage"] = usage_
    return out


def now() -> int:
    return int(time.time())
