"""KServe v2 / Triton GRPCInferenceService over slimlm's engine, for Triton and KServe clients (tritonclient.grpc).

A `grpc.aio` server on the HTTP server's event loop, sharing its ServerState: the same engine, adapters, API keys,
metrics and drain. Tensors are those of Triton's LLM backends (vLLM, TensorRT-LLM): input `text_input` (BYTES,
shape [1] or [1, 1]; the raw prompt, no chat template, as /v1/completions) and the optional scalars `max_tokens`
(INT32/INT64), `temperature` and `top_p` (FP32/FP64), `stream` (BOOL), `stop` (BYTES, one or more strings) and
`ignore_eos` (BOOL, as vLLM's sampling parameter);
output `text_output` (BYTES, shape [1]). The model name is the HTTP `model` string (`BASE`, `BASE:ADAPTER`,
`BASE:ADAPTER@VERSION`); a non-empty model_version is read as `NAME@VERSION`. A base that is not resident loads on
its first ModelInfer (serve/pool.py); ModelReady says whether a name can be served (a servable base that is not
loaded yet is ready: it loads on demand, within --load-timeout).

RPCs: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer (one response with the whole
text) and Triton's bidirectional ModelStreamInfer (one response per piece of text, the last one flagged with the
parameter `triton_final_response`, as Triton's decoupled models). Status codes: no or a wrong key UNAUTHENTICATED
(`authorization: Bearer KEY` metadata, as the HTTP header; ServerLive/ServerReady need none), unknown model
NOT_FOUND, a malformed request INVALID_ARGUMENT, a full queue RESOURCE_EXHAUSTED, not ready or draining
UNAVAILABLE, the request timeout DEADLINE_EXCEEDED, an engine fault INTERNAL. It is not Triton's model repository,
shared-memory, statistics or trace API.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import math
import struct
import time

import grpc
import numpy as np

from slimlm.engine.core import NotAccepting, Output, QueueFull, Request
from slimlm.engine.sampling import SamplingParams
from slimlm.errors import SlimlmError
from slimlm.serve.grpc_proto import pb, pb_grpc
from slimlm.serve.pool import PoolError
from slimlm.serve.protocol import APIError
from slimlm.serve.state import ServedModel, ServerState

log = logging.getLogger("slimlm.serve.requests")

INPUTS = {
    "text_input": ("BYTES",),
    "max_tokens": ("INT32", "INT64", "UINT32", "UINT64"),
    "temperature": ("FP32", "FP64"),
    "top_p": ("FP32", "FP64"),
    "stream": ("BOOL",),
    "stop": ("BYTES",),
    "ignore_eos": ("BOOL",),
}
OUTPUT = "text_output"
DEFAULT_MAX_TOKENS = 16  # as /v1/completions (OpenAI's default) and Triton's vLLM backend
# Element types of the typed `contents` fields and of raw_input_contents (little-endian, as Triton's wire format).
CONTENTS = {
    "BOOL": "bool_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
RAW_DTYPES = {
    "BOOL": np.bool_,
    "INT32": "<i4",
    "INT64": "<i8",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "FP32": "<f4",
    "FP64": "<f8",
}
HTTP_TO_GRPC = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


class InferError(Exception):
    """A request refused or failed: the gRPC status to end it with and a message saying what to fix."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def _bad(message: str) -> InferError:
    return InferError(grpc.StatusCode.INVALID_ARGUMENT, message)


@dataclasses.dataclass
class InferSpec:
    """What one ModelInferRequest asks for, checked."""

    model: str
    prompt: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stream: bool = False
    stop: list[str] = dataclasses.field(default_factory=list)
    ignore_eos: bool = False


# ---- request parsing: tensors to an InferSpec ----


def _raw_values(datatype: str, raw: bytes, name: str) -> list:
    """The elements of a raw_input_contents buffer: BYTES are a 4-byte little-endian length then the bytes."""
    if datatype != "BYTES":
        dtype = np.dtype(RAW_DTYPES[datatype])
        if len(raw) % dtype.itemsize:
            raise _bad(f"input {name!r}: raw contents of {len(raw)} bytes is not a whole number of {datatype}")
        return np.frombuffer(raw, dtype).tolist()
    out, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise _bad(f"input {name!r}: BYTES raw contents end inside a 4-byte length prefix")
        (n,) = struct.unpack_from("<I", raw, i)
        if i + 4 + n > len(raw):
            raise _bad(f"input {name!r}: a BYTES element claims {n} bytes past the end of the raw contents")
        out.append(raw[i + 4 : i + 4 + n])
        i += 4 + n
    return out


def tensor_values(tensor, raw: bytes | None) -> list:
    """A request tensor's elements (typed contents or its raw buffer); INVALID_ARGUMENT if they do not match its
    datatype and shape."""
    name, datatype = tensor.name, tensor.datatype
    if datatype not in INPUTS[name]:
        raise _bad(f"input {name!r} has datatype {datatype or '(none)'}; send {' or '.join(INPUTS[name])}")
    if any(d < 0 for d in tensor.shape):
        raise _bad(f"input {name!r} has shape {list(tensor.shape)}; dimensions must be >= 0")
    values = _raw_values(datatype, raw, name) if raw is not None else list(getattr(tensor.contents, CONTENTS[datatype]))
    if len(values) != math.prod(tensor.shape):
        raise _bad(f"input {name!r} has shape {list(tensor.shape)} but {len(values)} elements")
    return values


def _one(tensor, values: list):
    """The single element of a scalar input, which Triton's LLM backends shape [1] or [1, 1]."""
    if list(tensor.shape) not in ([1], [1, 1]):
        raise _bad(f"input {tensor.name!r} has shape {list(tensor.shape)}; send shape [1] or [1, 1]")
    return values[0]


def _text(name: str, value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad(f"input {name!r} is not UTF-8 text") from None


def parse_request(request) -> InferSpec:
    """The InferSpec of a ModelInferRequest; InferError(INVALID_ARGUMENT) naming the input to fix."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise _bad(f"raw_input_contents has {len(raw)} buffers for {len(request.inputs)} inputs; send one per input")
    values: dict[str, tuple] = {}
    for i, tensor in enumerate(request.inputs):
        if tensor.name not in INPUTS:
            raise _bad(f"unknown input {tensor.name!r}; this model takes {', '.join(INPUTS)}")
        if tensor.name in values:
            raise _bad(f"input {tensor.name!r} is sent twice")
        values[tensor.name] = (tensor, tensor_values(tensor, raw[i] if raw else None))
    for out in request.outputs:
        if out.name != OUTPUT:
            raise _bad(f"unknown output {out.name!r}; this model returns {OUTPUT!r}")
    if "text_input" not in values:
        raise _bad("input 'text_input' (BYTES, shape [1]) is missing: send the prompt there")
    model = request.model_name + (f"@{request.model_version}" if request.model_version else "")
    spec = InferSpec(model=model, prompt=_text("text_input", _one(*values["text_input"])))
    if "stop" in values:
        tensor, stop = values["stop"]
        spec.stop = [_text("stop", s) for s in stop]
    for name in ("max_tokens", "temperature", "top_p", "stream", "ignore_eos"):
        if name in values:
            setattr(spec, name, _one(*values[name]))
    return _check_values(spec)


def _check_values(spec: InferSpec) -> InferSpec:
    if not spec.prompt:
        raise _bad("input 'text_input' is empty; send a prompt")
    if spec.max_tokens is not None and spec.max_tokens < 1:
        raise _bad(f"input 'max_tokens' is {spec.max_tokens}; send at least 1")
    if not (math.isfinite(spec.temperature) and spec.temperature >= 0):
        raise _bad(f"input 'temperature' is {spec.temperature}; send a number >= 0 (0 = greedy)")
    if not (math.isfinite(spec.top_p) and 0 < spec.top_p <= 1):
        raise _bad(f"input 'top_p' is {spec.top_p}; send a number in (0, 1]")
    if any(not s for s in spec.stop):
        raise _bad("input 'stop' holds an empty string; send non-empty stop strings")
    return spec


# ---- responses ----


def bytes_tensor(texts: list[str]) -> bytes:
    """Triton's raw BYTES encoding: per element a 4-byte little-endian length, then the UTF-8 bytes."""
    return b"".join(struct.pack("<I", len(b)) + b for b in (t.encode("utf-8") for t in texts))


def infer_response(request, text: str, final: bool | None = None) -> pb.ModelInferResponse:
    """A response with text_output = [text]; `final` (streams only) sets Triton's triton_final_response flag."""
    resp = pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version, id=request.id)
    resp.outputs.add(name=OUTPUT, datatype="BYTES", shape=[1])
    resp.raw_output_contents.append(bytes_tensor([text]))
    if final is not None:
        resp.parameters["triton_final_response"].bool_param = final
    return resp


def empty_final_response(request) -> pb.ModelInferResponse:
    resp = pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version, id=request.id)
    resp.parameters["triton_final_response"].bool_param = True
    return resp


# ---- the service ----


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """GRPCInferenceService's handlers over a ServerState (its engine runs on its own thread)."""

    def __init__(self, state: ServerState):
        self.state = state

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.state.ready and not self.state.draining)

    async def ModelReady(self, request, context):
        await self._authorize(context)
        if not self.state.ready or self.state.draining:
            return pb.ModelReadyResponse(ready=False)
        try:  # a bool, as Triton answers (tritonclient's is_model_ready): an unknown name is not ready
            await self._resolve(request.name + (f"@{request.version}" if request.version else ""))
        except InferError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request, context):
        from slimlm.version import __version__

        await self._authorize(context)
        return pb.ServerMetadataResponse(name="slimlm", version=__version__, extensions=[])

    async def ModelMetadata(self, request, context):
        await self._authorize(context)
        await self._guard(context, self._require_ready())
        await self._guard(context, self._resolve(request.name + (f"@{request.version}" if request.version else "")))
        meta = pb.ModelMetadataResponse(
            name=request.name, versions=[request.version] if request.version else [], platform="slimlm"
        )
        for name, types in INPUTS.items():
            meta.inputs.add(name=name, datatype=types[0], shape=[-1] if name == "stop" else [1])
        meta.outputs.add(name=OUTPUT, datatype="BYTES", shape=[1])
        return meta

    async def ModelInfer(self, request, context):
        await self._authorize(context)
        t0 = time.perf_counter()
        try:
            spec = parse_request(request)
            if spec.stream:
                raise _bad(
                    "stream=true needs the streaming RPC ModelStreamInfer (tritonclient: start_stream and "
                    "async_stream_infer); drop stream for ModelInfer"
                )
            req, queue, engine = await self._submit(spec, request.id)
        except InferError as e:
            self._log("ModelInfer", request, t0, error=e.message)
            await context.abort(e.code, e.message)
        try:
            text, out = "", None
            while out is None or out.finish_reason is None:
                out = await queue.get()
                text += out.text
            if out.error:
                e = _engine_error(out)
                self._log("ModelInfer", request, t0, req, out, error=e.message)
                await context.abort(e.code, e.message)
        finally:
            if req.finish_reason is None:  # the client cancelled or went away: free the slot
                engine.cancel(req)
        self._log("ModelInfer", request, t0, req, out)
        return infer_response(request, text)

    async def ModelStreamInfer(self, request_iterator, context):
        """Triton's decoupled stream: every request gets its text as pieces, in responses of its own id, the last
        flagged triton_final_response; a refused request gets one response with error_message, and the stream
        goes on. A client that cancels the stream cancels its requests."""
        await self._authorize(context)
        responses: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()

        async def read_requests() -> None:
            try:
                async for request in request_iterator:
                    task = asyncio.create_task(self._stream_one(request, responses))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                while tasks:  # the client closed its side: finish what it sent
                    await asyncio.gather(*list(tasks), return_exceptions=True)
            finally:  # done, or the client's side broke: end the stream (the handler's finally cancels the rest)
                responses.put_nowait(None)

        reader = asyncio.create_task(read_requests())
        try:
            while (item := await responses.get()) is not None:
                yield item
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    async def _stream_one(self, request, responses: asyncio.Queue) -> None:
        t0, req, out, engine = time.perf_counter(), None, None, None
        try:
            spec = parse_request(request)
            req, queue, engine = await self._submit(spec, request.id)
            empty_final = _bool_param(request, "triton_enable_empty_final_response")
            while out is None or out.finish_reason is None:
                out = await queue.get()
                if out.error:
                    raise _engine_error(out)
                last = out.finish_reason is not None
                if out.text or (last and not empty_final):
                    responses.put_nowait(
                        pb.ModelStreamInferResponse(
                            infer_response=infer_response(request, out.text, last and not empty_final)
                        )
                    )
            if empty_final:
                responses.put_nowait(pb.ModelStreamInferResponse(infer_response=empty_final_response(request)))
            self._log("ModelStreamInfer", request, t0, req, out)
        except InferError as e:
            self._log("ModelStreamInfer", request, t0, req, out, error=e.message)
            responses.put_nowait(pb.ModelStreamInferResponse(error_message=e.message))
        except Exception:  # a bug must end this request with an answer, not leave the client waiting
            logging.getLogger("slimlm.serve").exception("gRPC stream request failed")
            responses.put_nowait(pb.ModelStreamInferResponse(error_message="internal error (see the server log)"))
        finally:
            if req is not None and req.finish_reason is None:
                engine.cancel(req)

    # ---- shared steps ----

    async def _authorize(self, context) -> None:
        """As the HTTP inference routes: with API keys set, `authorization: Bearer KEY` metadata (an API or admin
        key) or UNAUTHENTICATED."""
        allowed = self.state.api_keys + self.state.admin_keys
        if not self.state.api_keys:
            return
        auth = dict(context.invocation_metadata() or ()).get("authorization", "")
        key = auth[7:] if auth.lower().startswith("bearer ") else ""
        if not any(hmac.compare_digest(key.encode(), k.encode()) for k in allowed):
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or invalid API key: send the metadata 'authorization: Bearer KEY'",
            )

    async def _guard(self, context, step):
        try:
            return await step
        except InferError as e:
            await context.abort(e.code, e.message)

    async def _require_ready(self) -> None:
        if not self.state.ready or self.state.draining:
            raise InferError(grpc.StatusCode.UNAVAILABLE, self.state.not_ready_reason())

    async def _resolve(self, model: str) -> tuple:
        """(the base's pool key, the AdapterRef or None) a model name picks, off the event loop (a registry version
        is hashed)."""
        try:
            return await asyncio.to_thread(self.state.resolve, model)
        except APIError as e:
            message = e.message.replace("GET /v1/models lists", "GET /v1/models (HTTP) lists")
            raise InferError(HTTP_TO_GRPC.get(e.status, grpc.StatusCode.INVALID_ARGUMENT), message) from None

    async def _submit(self, spec: InferSpec, request_id: str):
        """Tokenize, check and queue one request on its base's engine (loading the base first if need be);
        (the engine request, the queue its Outputs arrive on, the engine). The base is leased until the request is
        queued; then its engine has work, and the pool does not unload it."""
        await self._require_ready()
        key, adapter = await self._resolve(spec.model)
        try:
            served = await self.state.pool.acquire(key, self.state.config.load_timeout_s)
        except PoolError as e:
            if e.status == 503:
                self._rejected(e.status)
            raise InferError(HTTP_TO_GRPC.get(e.status, grpc.StatusCode.INTERNAL), e.message) from None
        try:
            req, queue = await self._queue(served, spec, adapter, request_id)
        finally:
            self.state.pool.release(key)
        return req, queue, served.engine

    async def _queue(self, served: ServedModel, spec: InferSpec, adapter, request_id: str):
        prompt = await asyncio.to_thread(served.tokenizer.encode, spec.prompt)
        max_tokens = self._max_tokens(served, spec, len(prompt))
        try:
            params = SamplingParams(
                max_new_tokens=max_tokens,
                temperature=spec.temperature,
                top_p=spec.top_p,
                stop=spec.stop,
                ignore_eos=spec.ignore_eos,
            )
        except ValueError as e:
            raise _bad(str(e)) from None
        queue: asyncio.Queue[Output] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        req = Request(
            prompt,
            params,
            adapter,
            emit=lambda out: loop.call_soon_threadsafe(queue.put_nowait, out),
            request_id=request_id,
        )
        try:
            served.engine.submit(req)
        except QueueFull as e:
            self._rejected(429)
            raise InferError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"server busy: {e}; retry later") from None
        except NotAccepting as e:
            self._rejected(503)
            raise InferError(grpc.StatusCode.UNAVAILABLE, str(e)) from None
        except ValueError as e:
            raise _bad(str(e)) from None
        return req, queue

    def _max_tokens(self, served: ServedModel, spec: InferSpec, n_prompt: int) -> int:
        limit, context = self.state.config.max_tokens_limit, served.engine.max_seq_len
        if spec.max_tokens is not None and spec.max_tokens > limit:
            raise _bad(f"input 'max_tokens' is {spec.max_tokens}; this server allows at most {limit}")
        if n_prompt >= context:
            raise _bad(f"the prompt has {n_prompt} tokens; the server's context is {context}: shorten text_input")
        return spec.max_tokens if spec.max_tokens is not None else min(DEFAULT_MAX_TOKENS, limit)

    def _rejected(self, status: int) -> None:
        if self.state.metrics is not None:
            self.state.metrics.on_rejected(status)

    def _log(
        self,
        rpc: str,
        request,
        t0: float,
        req: Request | None = None,
        out: Output | None = None,
        error: str | None = None,
    ) -> None:
        """One JSON line per inference request, as the HTTP requests' (path = grpc:RPC)."""
        entry = {
            "request_id": request.id or None,
            "path": f"grpc:{rpc}",
            "model": request.model_name,
            "e2e_s": round(time.perf_counter() - t0, 4),
        }
        if out is not None:
            entry.update(
                prompt_tokens=out.prompt_tokens,
                completion_tokens=out.completion_tokens,
                finish_reason=out.finish_reason,
            )
        if req is not None:
            entry["engine_request_id"] = req.request_id
        if error is not None:
            entry["error"] = error
        log.info(json.dumps(entry))


def _bool_param(request, key: str) -> bool:
    return key in request.parameters and request.parameters[key].bool_param


def _engine_error(out: Output) -> InferError:
    """The status of a request the engine ended with an error (as api._engine_error's HTTP statuses)."""
    if out.error_type == "timeout":
        return InferError(grpc.StatusCode.DEADLINE_EXCEEDED, out.error)
    if out.error_type == "internal":
        return InferError(grpc.StatusCode.INTERNAL, out.error)
    return InferError(grpc.StatusCode.INVALID_ARGUMENT, out.error)


async def start_grpc_server(state: ServerState, host: str, port: int) -> grpc.aio.Server:
    """Start the gRPC service on host:port on the running event loop; stop it with `await server.stop(grace)`.

    SO_REUSEPORT is off so that a port another process listens on fails to bind instead of being shared; messages
    are capped at --max-body-bytes, as HTTP bodies (gRPC answers RESOURCE_EXHAUSTED past it)."""
    server = grpc.aio.server(
        options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", state.config.max_body_bytes)]
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(state), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        server.add_insecure_port(address)
    except RuntimeError as e:
        raise SlimlmError(f"cannot listen for gRPC on {address}: {e}; pick another --grpc-port") from None
    await server.start()
    return server
