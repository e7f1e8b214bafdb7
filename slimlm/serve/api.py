"""The OpenAI-compatible HTTP API (FastAPI) over the engine.

Routes: POST /v1/chat/completions, POST /v1/completions (both with `stream`), GET /v1/models, GET /health,
GET /ready, GET /metrics, and vLLM's POST /v1/load_lora_adapter and /v1/unload_lora_adapter (the admin routes:
404 unless --allow-runtime-lora, and an admin key when --admin-key-file is set). Every response carries
X-Request-Id (the client's, or a new one) and every request writes one JSON log line. The engine runs on its own
thread; handlers hand requests over and await their outputs.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from typing import AsyncIterator

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from slimlm.serve import protocol as P
from slimlm.engine.core import NotAccepting, Output, QueueFull, Request
from slimlm.serve.protocol import APIError
from slimlm.engine.sampling import SamplingParams
from slimlm.serve.state import ServerState

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
        body.check_unsupported(("tools", "functions", "tool_choice", "response_format", "audio"))
        _require_ready(state)
        prompt = await run_in_threadpool(_chat_prompt, state, body.messages)  # 1 MB of text: seconds of work
        max_tokens = body.max_completion_tokens or body.max_tokens
        sampling = _sampling(body, logprobs=body.logprobs, top=body.top_logprobs)
        return await _serve(state, request, "chat", body, prompt, max_tokens, sampling)

    @app.post("/v1/completions")
    async def completions(body: P.CompletionRequest, request: HTTPRequest):
        body.check_unsupported(("suffix", "best_of"))
        if body.echo:
            raise APIError(400, "echo is not supported by slimlm", param="echo")
        _require_ready(state)
        if isinstance(body.prompt, list):
            V = state.vocab_size
            if not body.prompt or min(body.prompt) < 0 or max(body.prompt) >= V:
                raise APIError(400, f"prompt token ids must be a non-empty list in [0, {V})", param="prompt")
            prompt = list(body.prompt)
        else:
            prompt = await run_in_threadpool(state.tokenizer.encode, body.prompt)  # off the event loop, as above
        sampling = _sampling(body, logprobs=body.logprobs is not None, top=body.logprobs or 0)
        max_tokens = body.max_tokens  # OpenAI's default of 16, unless this server allows fewer
        if "max_tokens" not in body.model_fields_set:
            max_tokens = min(max_tokens, state.config.max_tokens_limit)
        return await _serve(state, request, "completion", body, prompt, max_tokens, sampling)

    return app


def _chat_prompt(state: ServerState, messages: list[P.Message]) -> list[int]:
    """The messages through the model's chat template. The template is the model's code run on the client's
    messages: whatever it raises (`raise_exception('...')` on a role it does not take, a missing template) is the
    client's 400 with the template's own message, not a 500."""
    try:
        return state.tokenizer.prompt_ids([{"role": m.role, "content": m.text()} for m in messages], chat=True)
    except Exception as e:
        raise APIError(400, f"the model's chat template refused these messages: {e}", param="messages",
                       code="chat_template_error") from None


def _sampling(body: P.SamplingFields, logprobs: bool, top: int) -> dict:
    """The request's SamplingParams fields other than max_new_tokens (known only once the prompt is)."""
    return dict(temperature=body.temperature, top_p=body.top_p, top_k=max(body.top_k, 0), min_p=body.min_p,
                repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty, seed=body.seed, logprobs=logprobs, top_logprobs=top,
                stop=body.stop_list(), ignore_eos=body.ignore_eos, min_new_tokens=body.min_tokens)


async def _serve(state: ServerState, http: HTTPRequest, kind: str, body: P.SamplingFields, prompt: list[int],
                 max_tokens: int | None, sampling: dict):
    adapter = await run_in_threadpool(state.resolve_adapter, body.model)
    limit = state.config.max_tokens_limit
    room = state.engine.max_seq_len - len(prompt)
    if room < 1:
        raise APIError(400, f"the prompt has {len(prompt)} tokens; the server's context is {state.engine.max_seq_len}",
                       param="messages" if kind == "chat" else "prompt", code="context_length_exceeded")
    if max_tokens is not None and max_tokens > limit:
        raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most {limit}", param="max_tokens")
    max_tokens = max_tokens if max_tokens is not None else min(limit, room)
    http.state.log.update(model=body.model, adapter=adapter.name if adapter else None)
    queue: asyncio.Queue[Output] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    try:
        params = SamplingParams(max_new_tokens=max_tokens, **sampling)
    except ValueError as e:
        raise APIError(400, str(e)) from None
    req = Request(prompt, params, adapter,
                  emit=lambda out: loop.call_soon_threadsafe(queue.put_nowait, out), request_id=http.state.rid)
    try:
        state.engine.submit(req)
    except ValueError as e:
        raise APIError(400, str(e), param="max_tokens", code="context_length_exceeded") from None
    except QueueFull as e:
        raise APIError(429, f"server busy: {e}; retry later", type="rate_limit_error", code="queue_full",
                       headers={"Retry-After": "1"}) from None
    except NotAccepting as e:
        raise APIError(503, str(e), type="service_unavailable", code="draining") from None
    rid = P.new_id("chatcmpl" if kind == "chat" else "cmpl")
    first = await _next_output(state, http, req, queue)
    if first.error:
        _log_done(http, req, first)
        raise _engine_error(first)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_sse(state, http, kind, rid, body.model, req, queue, first, include_usage),
                                 media_type="text/event-stream")
    return await _complete(state, http, kind, rid, body.model, req, queue, first)


async def _next_output(state: ServerState, http: HTTPRequest, req: Request, queue: asyncio.Queue,
                       watch: bool = True) -> Output:
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
                state.engine.cancel(req)
                raise asyncio.CancelledError("client disconnected")


async def _complete(state, http, kind, rid, model, req, queue, out: Output) -> dict:
    text, lps = out.text, list(out.logprobs)
    while out.finish_reason is None:
        out = await _next_output(state, http, req, queue)
        text += out.text
        lps += out.logprobs
    _log_done(http, req, out)
    if out.error:  # the text so far is not an answer: the request failed (timeout, NaN logits, an engine fault)
        raise _engine_error(out)
    choice = {"index": 0, "finish_reason": out.finish_reason, "logprobs": _logprobs(state, kind, req, lps)}
    if kind == "chat":
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    obj = "chat.completion" if kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": P.now(), "model": model, "choices": [choice],
            "usage": P.usage(out.prompt_tokens, out.completion_tokens)}


async def _sse(state, http, kind, rid, model, req, queue, out: Output, include_usage: bool) -> AsyncIterator[str]:
    created, sent, lps = P.now(), 0, []
    try:
        if kind == "chat":
            yield _event(P.chunk(kind, rid, model, created, {"index": 0, "delta": {"role": "assistant", "content": ""},
                                                              "logprobs": None, "finish_reason": None}))
        while True:
            if out.error:  # as vLLM: the status is already sent, so an error event (OpenAI's body), then [DONE]
                http.state.log["error"] = out.error
                yield _event(_engine_error(out).body())
                break
            lps += out.logprobs  # tokens whose text is still held back (a partial character) wait for it
            if out.text or out.finish_reason is not None:
                lp = _logprobs(state, kind, req, lps, sent)
                lps = []
                piece = {"content": out.text} if kind == "chat" else None
                choice = {"index": 0, "logprobs": lp, "finish_reason": out.finish_reason}
                choice.update({"delta": piece if out.text else {}} if kind == "chat" else {"text": out.text})
                yield _event(P.chunk(kind, rid, model, created, choice))
                sent += len(out.text)
            if out.finish_reason is not None:
                break
            out = await _next_output(state, http, req, queue, watch=False)
        if include_usage:
            yield _event(P.chunk(kind, rid, model, created, None, P.usage(out.prompt_tokens, out.completion_tokens)))
        yield "data: [DONE]\n\n"
        _log_done(http, req, out)
    finally:
        if req.finish_reason is None:  # the client went away mid-stream: free the slot
            state.engine.cancel(req)
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


def _logprobs(state, kind, req, entries, offset: int = 0):
    if not req.params.logprobs:
        return None
    text = state.token_text
    return P.chat_logprobs(entries, text) if kind == "chat" else P.completion_logprobs(entries, text, offset)


def _log_done(http: HTTPRequest, req: Request, out: Output) -> None:
    ttft = None if req.t_first is None else round(req.t_first - req.t_arrival, 4)
    http.state.log.update(prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
                          finish_reason=out.finish_reason, ttft_s=ttft, engine_request_id=req.request_id)


def _require_ready(state: ServerState) -> None:
    if state.draining:
        raise APIError(503, "the server is shutting down", type="service_unavailable", code="draining")
    if not state.ready:
        raise APIError(503, state.not_ready_reason(), type="service_unavailable", code="not_ready")


ADMIN_ROUTES = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")


def _require_runtime_lora(state: ServerState) -> None:
    # 404, as vLLM answers when VLLM_ALLOW_RUNTIME_LORA_UPDATING is off: the route does not exist on this server.
    if not state.config.allow_runtime_lora:
        raise APIError(404, "runtime LoRA loading is off on this server (the operator starts it with "
                            "--allow-runtime-lora --lora-root DIR)", code="not_found")


def _check_auth(state: ServerState, path: str, headers: dict) -> None:
    """Inference routes (/v1/*) need an API key or an admin key when --api-key-file is set; the admin routes need
    an admin key when --admin-key-file is set (an inference key gets 403 there). Probes need none."""
    if not path.startswith("/v1/"):
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
        raise APIError(403, "this API key may not call the admin routes: send an admin key (--admin-key-file)",
                       type="permission_error", code="admin_key_required")
    raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer KEY'",
                   type="authentication_error", code="invalid_api_key")


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
        entry = {"request_id": rid, "path": scope["path"]}
        scope.setdefault("state", {}).update(rid=rid, log=entry)
        t0, status = time.perf_counter(), [500]

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
                status[0] = message["status"]
            await send(message)

        try:
            _check_auth(self.state, scope["path"], headers)
            receive = _limit_body(self.state, headers, receive)
        except APIError as e:
            entry["error"] = e.message
            await _error_response(e)(scope, receive, send_with_id)
        else:
            await self.app(scope, receive, send_with_id)
        finally:
            if scope["path"].startswith("/v1/"):
                log.info(json.dumps({**entry, "status": status[0], "e2e_s": round(time.perf_counter() - t0, 4)}))


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
