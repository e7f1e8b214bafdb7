"""The OpenAI-compatible HTTP API (FastAPI) over the engine.

Routes: POST /v1/chat/completions, POST /v1/completions (both with `stream`; completions also takes a list of
prompts and `echo`), GET /v1/models, GET /health, GET /ready, GET /metrics, vLLM's POST /tokenize, POST /detokenize
and GET /version, and vLLM's POST /v1/load_lora_adapter and /v1/unload_lora_adapter (the admin routes:
404 unless --allow-runtime-lora, and an admin key when --admin-key-file is set). Every response carries
X-Request-Id (the client's, or a new one) and every request writes one JSON log line. Each base model's engine runs
on its own thread; a handler leases the base its `model` field names from the pool (serve/pool.py: loading it
first, up to --load-timeout, else 503), hands requests to its engine and awaits their outputs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from slimlm.engine.core import NotAccepting, Output, QueueFull, Request
from slimlm.engine.multi_lora import SlotsBusy
from slimlm.engine.sampling import SamplingParams
from slimlm.engine.structured import StructuredOutputError
from slimlm.serve import protocol as P
from slimlm.serve.pool import PoolError
from slimlm.serve.protocol import APIError
from slimlm.serve.state import ServedModel, ServerState
from slimlm.version import __version__

log = logging.getLogger("slimlm.serve.requests")


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="slimlm", docs_url=None, redoc_url=None)
    app.state.slimlm = state
    app.add_middleware(RequestContext, state=state)
    fastapi_openapi = app.openapi

    def openapi() -> dict:  # the schema (which clients and the fuzz suite read) with this server's limits in it
        vocab = state.vocab_size if state.engine is not None else None
        return P.document_limits(fastapi_openapi(), state.config.max_tokens_limit, vocab)

    app.openapi = openapi

    @app.exception_handler(APIError)
    async def api_error(request: HTTPRequest, e: APIError):
        request.state.log["error"] = e.message
        if e.status in (429, 503) and state.metrics is not None:
            state.metrics.on_rejected(e.status)
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: HTTPRequest, e: RequestValidationError):
        error = P.validation_error(e.errors())
        request.state.log["error"] = error.message
        return _error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: HTTPRequest, e: StarletteHTTPException):
        # FastAPI's own errors (404/405, a body that is not UTF-8) in OpenAI's error body too, not {"detail": ...}
        if isinstance(e, _ReceiveError):
            request.state.log["error"] = e.error.message
            return _error_response(e.error)
        parse = "the body could not be parsed: send UTF-8 JSON nested at most ~1000 deep"
        message = parse if e.status_code == 400 else str(e.detail)
        request.state.log["error"] = message
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(e.status_code, message, type=kind, headers=dict(e.headers or {})))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if not state.ready or state.draining:
            raise APIError(503, state.not_ready_reason(), type="service_unavailable", code="not_ready")
        return {"status": "ready", "model": state.served_name}

    @app.get("/metrics")
    async def metrics():
        body = state.metrics.render() if state.metrics is not None else b""
        return Response(body, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        _require_ready(state)
        return {"object": "list", "data": await run_in_threadpool(state.list_models)}

    @app.post("/tokenize")
    async def tokenize(body: P.TokenizeRequest):
        _require_ready(state)
        async with _leased(state, body.model) as (m, _):  # 404 for a model this server lacks
            if (body.prompt is None) == (body.messages is None):
                raise APIError(
                    400, "send either prompt (text) or messages (a chat), not both or neither", param="prompt"
                )
            if body.messages is not None:
                messages = [{"role": x.role, "content": x.text()} for x in body.messages]
                template = lambda: m.tokenizer.apply_chat_template(messages, body.add_generation_prompt)  # noqa: E731
                ids = await run_in_threadpool(_template_or_400, template)
            else:
                ids = await run_in_threadpool(m.tokenizer.encode, body.prompt, body.add_special_tokens)
            return {"count": len(ids), "max_model_len": m.engine.max_seq_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: P.DetokenizeRequest):
        _require_ready(state)
        async with _leased(state, body.model) as (m, _):
            if body.tokens and max(body.tokens) >= m.vocab_size:
                raise APIError(400, f"tokens must be ids in [0, {m.vocab_size})", param="tokens")
            return {"prompt": await run_in_threadpool(m.tokenizer.decode, body.tokens, False)}

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: P.LoadAdapter):
        _require_runtime_lora(state)
        _require_ready(state)
        await run_in_threadpool(state.add_adapter, body.lora_name, body.lora_path)
        return Response(f"Success: LoRA adapter '{body.lora_name}' added successfully.", media_type="text/plain")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: P.UnloadAdapter):
        _require_runtime_lora(state)
        _require_ready(state)
        state.remove_adapter(body.lora_name)
        return Response(f"Success: LoRA adapter '{body.lora_name}' removed successfully.", media_type="text/plain")

    @app.post("/v1/chat/completions")
    async def chat(body: P.ChatRequest, request: HTTPRequest):
        body.check_unsupported(("tools", "functions", "tool_choice", "audio"))
        _require_ready(state)
        async with _leased(state, body.model) as (m, adapter):
            structured = await _structured(m, body)
            prompt = await run_in_threadpool(_chat_prompt, m, body.messages)  # 1 MB of text: seconds of work
            max_tokens = body.max_completion_tokens or body.max_tokens
            sampling = _sampling(body, logprobs=body.logprobs, top=body.top_logprobs, structured=structured)
            return await _serve(state, m, adapter, request, "chat", body, prompt, max_tokens, sampling)

    @app.post("/v1/completions")
    async def completions(body: P.CompletionRequest, request: HTTPRequest):
        body.check_unsupported(("suffix", "best_of"))
        _check_completion_options(body)
        _require_ready(state)
        async with _leased(state, body.model) as (m, adapter):
            structured = await _structured(m, body)
            prompts = [await _completion_prompt(m, p) for p in body.prompts()]
            sampling = _sampling(
                body, logprobs=body.logprobs is not None, top=body.logprobs or 0, structured=structured
            )
            max_tokens = body.max_tokens  # OpenAI's default of 16, unless this server allows fewer
            if "max_tokens" not in body.model_fields_set:
                max_tokens = min(max_tokens, state.config.max_tokens_limit)
            if len(prompts) == 1 and (body.stream or not body.echo):
                return await _serve(state, m, adapter, request, "completion", body, prompts[0], max_tokens, sampling)
            return await _complete_batch(state, m, adapter, request, body, prompts, max_tokens, sampling)

    return app


@contextlib.asynccontextmanager
async def _leased(state: ServerState, model: str | None):
    """`async with _leased(state, body.model) as (served model, adapter)`: the base the model field names, loaded
    first if it is not resident (the request waits up to --load-timeout, then 503 with Retry-After), and leased
    while the handler runs so that the pool does not unload it; None names the default base. A stream outlives
    the lease, but its request is in the engine then, and the pool never unloads an engine with work."""
    key, adapter = await run_in_threadpool(state.resolve, model if model is not None else state.served_name)
    try:
        served = await state.pool.acquire(key, state.config.load_timeout_s)
    except PoolError as e:
        kind = "service_unavailable" if e.status == 503 else "server_error"
        headers = {"Retry-After": str(e.retry_after)} if e.retry_after else None
        raise APIError(e.status, e.message, type=kind, code=e.code, headers=headers) from None
    try:
        yield served, adapter
    finally:
        state.pool.release(key)


def _chat_prompt(m: ServedModel, messages: list[P.Message]) -> list[int]:
    """The messages through the model's chat template."""
    chat = [{"role": x.role, "content": x.text()} for x in messages]
    return _template_or_400(lambda: m.tokenizer.prompt_ids(chat, chat=True))


def _template_or_400(apply) -> list[int]:
    """apply() runs the model's chat template, the model's code on the client's messages: whatever it raises
    (`raise_exception('...')` on a role it does not take, a missing template) is the client's 400 with the
    template's own message, not a 500."""
    try:
        return apply()
    except Exception as e:
        raise APIError(
            400, f"the model's chat template refused these messages: {e}", param="messages", code="chat_template_error"
        ) from None


async def _structured(m: ServedModel, body: P.SamplingFields):
    """The request's output constraint, compiled now (off the event loop; cached for the engine) so that a schema,
    regex or grammar xgrammar cannot compile is a 400 naming its field before anything is queued."""
    spec = body.structured_output()
    if spec is not None:
        try:
            await run_in_threadpool(m.engine.check_structured, spec)
        except StructuredOutputError as e:
            raise APIError(400, str(e), param=e.param, code="invalid_structured_output") from None
    return spec


def _sampling(body: P.SamplingFields, logprobs: bool, top: int, structured=None) -> dict:
    """The request's SamplingParams fields other than max_new_tokens (known only once the prompt is)."""
    return dict(
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=max(body.top_k, 0),
        min_p=body.min_p,
        repetition_penalty=body.repetition_penalty,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        seed=body.seed,
        logprobs=logprobs,
        top_logprobs=top,
        stop=body.stop_list(),
        ignore_eos=body.ignore_eos,
        min_new_tokens=body.min_tokens,
        structured=structured,
    )


async def _serve(
    state: ServerState,
    m: ServedModel,
    adapter,
    http: HTTPRequest,
    kind: str,
    body: P.SamplingFields,
    prompt: list[int],
    max_tokens: int | None,
    sampling: dict,
):
    http.state.log.update(model=body.model, adapter=adapter.name if adapter else None)
    rid = P.new_id("chatcmpl" if kind == "chat" else "cmpl")
    # A streamed echo: the prompt (and its logprobs) first, computed before the 200 so that its errors are statuses.
    prefix = None
    if kind == "completion" and body.echo:
        _check_fit(state, m, kind, prompt, max_tokens)  # before a forward over the prompt
        prefix = await _echo_prefix(m, body, 0, prompt, adapter)
    req, queue, first = await _start(state, m, http, kind, prompt, adapter, max_tokens, sampling)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _sse(m, http, kind, rid, body.model, req, queue, first, include_usage, prefix),
            media_type="text/event-stream",
        )
    text, lps, out = await _collect(m, http, req, queue, first)
    choice = {"index": 0, "finish_reason": out.finish_reason, "logprobs": _logprobs(m, kind, req, lps)}
    if kind == "chat":
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    obj = "chat.completion" if kind == "chat" else "text_completion"
    return {
        "id": rid,
        "object": obj,
        "created": P.now(),
        "model": body.model,
        "choices": [choice],
        "usage": P.usage(out.prompt_tokens, out.completion_tokens),
    }


def _check_fit(state: ServerState, m: ServedModel, kind: str, prompt: list[int], max_tokens: int | None) -> int:
    """max_tokens for this prompt (the room left in the context when the client sent none); 400 if it cannot fit."""
    limit = state.config.max_tokens_limit
    room = m.engine.max_seq_len - len(prompt)
    if room < (1 if max_tokens != 0 else 0):
        raise APIError(
            400,
            f"the prompt has {len(prompt)} tokens; the server's context is {m.engine.max_seq_len}",
            param="messages" if kind == "chat" else "prompt",
            code="context_length_exceeded",
        )
    if max_tokens is not None and max_tokens > limit:
        raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most {limit}", param="max_tokens")
    return max_tokens if max_tokens is not None else min(limit, room)


async def _start(
    state: ServerState,
    m: ServedModel,
    http: HTTPRequest,
    kind: str,
    prompt: list[int],
    adapter,
    max_tokens: int | None,
    sampling: dict,
    started: list[Request] | None = None,
) -> tuple[Request, asyncio.Queue, Output]:
    """Submit one prompt to the engine of `m`; (request, its output queue, its first output) or an APIError. The
    request is appended to `started` once submitted, so that a batch can cancel it if another prompt fails."""
    max_tokens = _check_fit(state, m, kind, prompt, max_tokens)
    queue: asyncio.Queue[Output] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    try:
        params = SamplingParams(max_new_tokens=max_tokens, **sampling)
    except ValueError as e:
        raise APIError(400, str(e)) from None
    req = Request(
        prompt,
        params,
        adapter,
        emit=lambda out: loop.call_soon_threadsafe(queue.put_nowait, out),
        request_id=http.state.rid,
    )
    try:
        m.engine.submit(req)
    except StructuredOutputError as e:  # checked before (_structured): only if the compile cache dropped it
        raise APIError(400, str(e), param=e.param, code="invalid_structured_output") from None
    except ValueError as e:
        raise APIError(400, str(e), param="max_tokens", code="context_length_exceeded") from None
    except QueueFull as e:
        raise APIError(
            429,
            f"server busy: {e}; retry later",
            type="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": "1"},
        ) from None
    except NotAccepting as e:
        raise APIError(503, str(e), type="service_unavailable", code="draining") from None
    if started is not None:
        started.append(req)
    first = await _next_output(m, http, req, queue)
    if first.error:
        _log_done(http, req, first)
        raise _engine_error(first)
    return req, queue, first


def _check_completion_options(body: P.CompletionRequest) -> None:
    """The combinations of echo, max_tokens 0, stream and a batch of prompts that slimlm serves."""
    if body.max_tokens == 0 and not (body.echo and body.logprobs is not None):
        raise APIError(
            400,
            "max_tokens must be at least 1; 0 is only for scoring a prompt (echo: true with logprobs set)",
            param="max_tokens",
        )
    if body.stream and len(body.prompts()) > 1:
        raise APIError(
            400,
            "stream with a list of prompts is not supported by slimlm: send one streaming request "
            "per prompt, or drop stream",
            param="stream",
        )
    if body.stream and body.max_tokens == 0:
        raise APIError(400, "max_tokens 0 (scoring the prompt) is not streamed: drop stream", param="stream")


async def _completion_prompt(m: ServedModel, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        return await run_in_threadpool(m.tokenizer.encode, prompt)  # 1 MB of text: seconds of work
    V = m.vocab_size
    if max(prompt) >= V:
        raise APIError(400, f"prompt token ids must be a non-empty list in [0, {V})", param="prompt")
    return list(prompt)


async def _complete_batch(
    state: ServerState,
    m: ServedModel,
    adapter,
    http: HTTPRequest,
    body: P.CompletionRequest,
    prompts: list[list[int]],
    max_tokens: int | None,
    sampling: dict,
) -> dict:
    """Completions for a list of prompts (one choice each, `index` in order) and for echo: all prompts are
    submitted before any is awaited, so that they decode together; any refusal cancels the others."""
    http.state.log.update(model=body.model, adapter=adapter.name if adapter else None)
    started: list[Request] = []

    async def one(i: int, prompt: list[int]) -> tuple[dict, int]:
        if max_tokens == 0:  # scoring only: the prompt, its logprobs, nothing generated
            _check_fit(state, m, "completion", prompt, 0)
            return await _echo_choice(m, body, i, prompt, adapter, "", [], "length"), 0
        req, queue, first = await _start(state, m, http, "completion", prompt, adapter, max_tokens, sampling, started)
        text, lps, out = await _collect(m, http, req, queue, first)
        if body.echo:
            return await _echo_choice(m, body, i, prompt, adapter, text, lps, out.finish_reason), out.completion_tokens
        choice = {
            "index": i,
            "text": text,
            "finish_reason": out.finish_reason,
            "logprobs": _logprobs(m, "completion", req, lps),
        }
        return choice, out.completion_tokens

    tasks = [asyncio.ensure_future(one(i, p)) for i, p in enumerate(prompts)]
    try:
        results = await asyncio.gather(*tasks)
    except BaseException:  # one prompt refused or failed, or the client went away: the others stop too
        for task in tasks:
            task.cancel()
        for req in started:
            m.engine.cancel(req)
        await asyncio.gather(*tasks, return_exceptions=True)  # collected: no "exception never retrieved" later
        raise
    n_prompt, n_out = sum(len(p) for p in prompts), sum(n for _, n in results)
    http.state.log.update(prompt_tokens=n_prompt, completion_tokens=n_out, prompts=len(prompts))
    return {
        "id": P.new_id("cmpl"),
        "object": "text_completion",
        "created": P.now(),
        "model": body.model,
        "choices": [c for c, _ in results],
        "usage": P.usage(n_prompt, n_out),
    }


async def _echo_choice(
    m: ServedModel,
    body: P.CompletionRequest,
    index: int,
    prompt: list[int],
    adapter,
    text: str,
    lps: list[dict],
    finish_reason: str | None,
) -> dict:
    """A choice with the prompt before the completion, as OpenAI's legacy echo."""
    prompt_text, entries = await _echo_prefix(m, body, index, prompt, adapter)
    logprobs = None
    if entries is not None:  # the completion's offsets count from the end of the prompt's text, as when streamed
        head = P.completion_logprobs(entries, m.token_text)
        tail = P.completion_logprobs(lps, m.token_text, len(prompt_text))
        logprobs = {k: head[k] + tail[k] for k in head}
    return {"index": index, "text": prompt_text + text, "finish_reason": finish_reason, "logprobs": logprobs}


async def _echo_prefix(
    m: ServedModel, body: P.CompletionRequest, index: int, prompt: list[int], adapter
) -> tuple[str, list[dict] | None]:
    """What echo puts first: the prompt's text, and with logprobs its tokens' logprob entries (computed by a forward
    over the prompt on the engine thread; the first token's is None), else None."""
    prompt_text = body.prompts()[index]
    if not isinstance(prompt_text, str):
        prompt_text = await run_in_threadpool(m.tokenizer.decode, prompt, False)
    if body.logprobs is not None:
        try:
            entries = await asyncio.wrap_future(m.engine.prompt_logprobs(prompt, adapter, body.logprobs))
        except SlotsBusy as e:
            raise APIError(
                429,
                f"server busy: {e}; retry later",
                type="rate_limit_error",
                code="lora_slots_busy",
                headers={"Retry-After": "1"},
            ) from None
        except (ValueError, OSError) as e:
            raise APIError(
                400, f"adapter {adapter.name if adapter else body.model}: {e}", param="model", code="adapter_error"
            ) from None
        return prompt_text, entries
    return prompt_text, None


async def _next_output(
    m: ServedModel, http: HTTPRequest, req: Request, queue: asyncio.Queue, watch: bool = True
) -> Output:
    """The next Output; cancels the request (and raises) if the client disconnects while we wait.

    watch=False (a stream under way) waits without polling for a disconnect: the next write to a gone client
    raises instead, and _sse's cleanup frees the slot — one await per token instead of a timed wait."""
    if not watch:
        return await queue.get()
    while True:
        try:
            return await asyncio.wait_for(queue.get(), timeout=0.25)
        except TimeoutError:
            if await http.is_disconnected():
                m.engine.cancel(req)
                raise asyncio.CancelledError("client disconnected") from None


async def _collect(m: ServedModel, http, req: Request, queue, out: Output) -> tuple[str, list[dict], Output]:
    """The rest of a blocking request's outputs: (text, logprob entries, the last Output); its error raised."""
    text, lps = out.text, list(out.logprobs)
    while out.finish_reason is None:
        out = await _next_output(m, http, req, queue)
        text += out.text
        lps += out.logprobs
    _log_done(http, req, out)
    if out.error:  # the text so far is not an answer: the request failed (timeout, NaN logits, an engine fault)
        raise _engine_error(out)
    return text, lps, out


async def _sse(
    m: ServedModel,
    http,
    kind,
    rid,
    model,
    req,
    queue,
    out: Output,
    include_usage: bool,
    prefix: tuple[str, list[dict] | None] | None = None,
) -> AsyncIterator[str]:
    created, sent, lps = P.now(), 0, []
    try:
        if prefix is not None:  # echo: the prompt's text (and logprobs) as the first chunk
            lp = None if prefix[1] is None else P.completion_logprobs(prefix[1], m.token_text)
            yield _event(
                P.chunk(
                    kind, rid, model, created, {"index": 0, "text": prefix[0], "logprobs": lp, "finish_reason": None}
                )
            )
            sent = len(prefix[0])
        if kind == "chat":
            yield _event(
                P.chunk(
                    kind,
                    rid,
                    model,
                    created,
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    },
                )
            )
        while True:
            if out.error:  # as vLLM: the status is already sent, so an error event (OpenAI's body), then [DONE]
                http.state.log["error"] = out.error
                yield _event(_engine_error(out).body())
                break
            lps += out.logprobs  # tokens whose text is still held back (a partial character) wait for it
            if out.text or out.finish_reason is not None:
                lp = _logprobs(m, kind, req, lps, sent)
                lps = []
                piece = {"content": out.text} if kind == "chat" else None
                choice = {"index": 0, "logprobs": lp, "finish_reason": out.finish_reason}
                choice.update({"delta": piece if out.text else {}} if kind == "chat" else {"text": out.text})
                yield _event(P.chunk(kind, rid, model, created, choice))
                sent += len(out.text)
            if out.finish_reason is not None:
                break
            out = await _next_output(m, http, req, queue, watch=False)
        if include_usage:
            yield _event(P.chunk(kind, rid, model, created, None, P.usage(out.prompt_tokens, out.completion_tokens)))
        yield "data: [DONE]\n\n"
        _log_done(http, req, out)
    finally:
        if req.finish_reason is None:  # the client went away mid-stream: free the slot
            m.engine.cancel(req)
            http.state.log["finish_reason"] = "client_disconnected"


def _engine_error(out: Output) -> APIError:
    """The HTTP error for a request the engine ended with an error: its adapter (400), the request timeout (504),
    or a fault in the engine or the model's numbers (500)."""
    if out.error_type == "timeout":
        return APIError(504, out.error, type="server_error", code="request_timeout")
    if out.error_type == "internal":
        return APIError(500, out.error, type="server_error", code="internal_error")
    return APIError(400, out.error, param="model", code="adapter_error")


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _logprobs(m: ServedModel, kind, req, entries, offset: int = 0):
    if not req.params.logprobs:
        return None
    text = m.token_text
    return P.chat_logprobs(entries, text) if kind == "chat" else P.completion_logprobs(entries, text, offset)


def _log_done(http: HTTPRequest, req: Request, out: Output) -> None:
    ttft = None if req.t_first is None else round(req.t_first - req.t_arrival, 4)
    http.state.log.update(
        prompt_tokens=out.prompt_tokens,
        completion_tokens=out.completion_tokens,
        finish_reason=out.finish_reason,
        ttft_s=ttft,
        engine_request_id=req.request_id,
    )


def _require_ready(state: ServerState) -> None:
    if state.draining:
        raise APIError(503, "the server is shutting down", type="service_unavailable", code="draining")
    if not state.ready:
        raise APIError(503, state.not_ready_reason(), type="service_unavailable", code="not_ready")


ADMIN_ROUTES = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")
UTILITY_ROUTES = ("/tokenize", "/detokenize", "/version")  # vLLM's; keyed as the inference routes are


def _keyed(path: str) -> bool:
    """Routes that need a key (when keys are set) and write a request log line: /v1/* and the utility routes."""
    return path.startswith("/v1/") or path.rstrip("/") in UTILITY_ROUTES


def _require_runtime_lora(state: ServerState) -> None:
    # 404, as vLLM answers when VLLM_ALLOW_RUNTIME_LORA_UPDATING is off: the route does not exist on this server.
    if not state.config.allow_runtime_lora:
        raise APIError(
            404,
            "runtime LoRA loading is off on this server (the operator starts it with "
            "--allow-runtime-lora --lora-root DIR)",
            code="not_found",
        )


def _check_auth(state: ServerState, path: str, headers: dict) -> None:
    """Inference routes (/v1/*, /tokenize, /detokenize, /version) need an API key or an admin key when API keys
    are set (--api-key, SLIMLM_API_KEY, --api-key-file); the admin routes need
    an admin key when --admin-key-file is set (an inference key gets 403 there). Probes need none."""
    if not _keyed(path):
        return
    admin = path.rstrip("/") in ADMIN_ROUTES
    allowed = state.admin_keys if admin and state.admin_keys else state.api_keys + state.admin_keys
    if not allowed or (not state.api_keys and not admin):
        return
    auth = headers.get("authorization", "")
    key = auth[7:] if auth.lower().startswith("bearer ") else ""
    if any(hmac.compare_digest(key.encode(), k.encode()) for k in allowed):
        return
    if admin and any(hmac.compare_digest(key.encode(), k.encode()) for k in state.api_keys):
        raise APIError(
            403,
            "this API key may not call the admin routes: send an admin key (--admin-key-file)",
            type="permission_error",
            code="admin_key_required",
        )
    raise APIError(
        401,
        "missing or invalid API key: send 'Authorization: Bearer KEY'",
        type="authentication_error",
        code="invalid_api_key",
    )


class RequestContext:
    """ASGI middleware: request id, API key and body-size checks, and one JSON log line when the response ends.

    Plain ASGI rather than @app.middleware, so streaming responses pass through untouched and the log line is
    written after the last chunk (with the token counts the handler recorded).
    """

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        rid = headers.get("x-request-id") or P.new_id("req")[:24]
        path = _route_path(scope)
        entry = {"request_id": rid, "path": path}
        scope.setdefault("state", {}).update(rid=rid, log=entry)
        t0, status = time.perf_counter(), [500]

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
                status[0] = message["status"]
            await send(message)

        try:
            _check_auth(self.state, path, headers)
            receive = _limit_body(self.state, headers, receive)
        except APIError as e:
            entry["error"] = e.message
            await _error_response(e)(scope, receive, send_with_id)
        else:
            await self.app(scope, receive, send_with_id)
        finally:
            if _keyed(path):
                log.info(json.dumps({**entry, "status": status[0], "e2e_s": round(time.perf_counter() - t0, 4)}))


def _route_path(scope) -> str:
    """The path the app routes on: behind a proxy that mounts the app under a prefix (ASGI root_path, e.g. Ray
    Serve's route_prefix) the full path starts with the prefix, and the key check must see "/v1/..." all the same."""
    path, root = scope["path"], scope.get("root_path", "").rstrip("/")
    return path[len(root) :] if root and path.startswith(root + "/") else path


def _limit_body(state: ServerState, headers: dict, receive):
    """Refuse a body over max_body_bytes: at once from Content-Length, else while a chunked body arrives."""
    limit = state.config.max_body_bytes
    too_big = APIError(413, f"the request body is over the limit of {limit} bytes", code="body_too_large")
    if "content-length" in headers:
        if int(headers["content-length"]) > limit:
            raise too_big
        return receive
    seen = [0]

    async def counting_receive():
        message = await receive()
        seen[0] += len(message.get("body", b""))
        if seen[0] > limit:
            raise _ReceiveError(too_big)
        return message

    return counting_receive


class _ReceiveError(StarletteHTTPException):
    """An APIError raised inside receive(): FastAPI passes an HTTPException from there on to the handlers (any
    other exception it turns into its own 400 "error parsing the body", which would hide a 413)."""

    def __init__(self, error: APIError):
        super().__init__(error.status, error.message, error.headers)
        self.error = error


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)
