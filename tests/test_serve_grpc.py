"""serve/grpc_server.py over a real loopback server (HTTP and gRPC on one event loop), with tritonclient.grpc and a
raw grpcio stub: health, metadata, infer equal to /v1/completions, adapters, streaming, auth, errors, overload,
cancellation."""

from __future__ import annotations

import json
import queue
import threading
import time
from contextlib import contextmanager

import grpc
import httpx
import numpy as np
import pytest
import uvicorn
from serve_helpers import free_port, random_lora, tiny_config

from slimlm.engine.core import EngineConfig
from slimlm.serve.api import create_app
from slimlm.serve.grpc_proto import pb, pb_grpc
from slimlm.serve.server import DrainingServer
from slimlm.serve.state import ServerState

tritonclient = pytest.importorskip("tritonclient.grpc")
InferenceServerException = pytest.importorskip("tritonclient.utils").InferenceServerException

PROMPT = "the cat sat on the mat and"


@contextmanager
def running_grpc_server(config):
    """Yield (http_url, grpc_address, state): slimlm's DrainingServer with --grpc-port, in a thread."""
    state = ServerState(config)
    state.load()
    port, grpc_port = free_port(), free_port()
    server = DrainingServer(
        uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="warning"), state, grpc_port
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url, address = f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            httpx.get(url + "/health", timeout=1)
            with grpc.insecure_channel(address) as ch:
                pb_grpc.GRPCInferenceServiceStub(ch).ServerLive(pb.ServerLiveRequest(), timeout=1)
            break
        except (httpx.TransportError, grpc.RpcError):
            time.sleep(0.05)
    try:
        yield url, address, state
    finally:
        server.should_exit = True
        thread.join(10)
        state.engine.stop()


@pytest.fixture(scope="module")
def lora_dir(tiny_llama, tmp_path_factory):
    return random_lora(tiny_llama[0], tmp_path_factory.mktemp("grpc-lora") / "fox", seed=3)


@pytest.fixture(scope="module")
def server(tiny_llama, lora_dir):
    with running_grpc_server(tiny_config(tiny_llama[0], adapters=[f"fox={lora_dir}"])) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    c = tritonclient.InferenceServerClient(server[1])
    yield c
    c.close()


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server[1]) as ch:
        yield pb_grpc.GRPCInferenceServiceStub(ch)


def triton_inputs(prompt=PROMPT, max_tokens=8, stream=None, **extra):
    """tritonclient InferInputs as Triton's LLM backends take them (raw contents, shape [1])."""
    arrays = {
        "text_input": np.array([prompt.encode()], dtype=np.object_),
        "max_tokens": np.array([max_tokens], dtype=np.int32),
        "temperature": np.array([0.0], dtype=np.float32),
        "ignore_eos": np.array([True]),
    }
    if stream is not None:
        arrays["stream"] = np.array([stream])
    arrays.update(extra)
    out = []
    for name, a in arrays.items():
        i = tritonclient.InferInput(
            name,
            list(a.shape),
            {np.object_: "BYTES", np.int32: "INT32", np.float32: "FP32", np.bool_: "BOOL"}[a.dtype.type],
        )
        i.set_data_from_numpy(a)
        out.append(i)
    return out


def raw_request(model="tiny", prompt=PROMPT, max_tokens=8, **kw):
    """A ModelInferRequest built with the generated module, typed contents (not raw buffers)."""
    r = pb.ModelInferRequest(model_name=model, id=kw.pop("id", ""))
    r.inputs.add(name="text_input", datatype="BYTES", shape=[1, 1]).contents.bytes_contents.append(prompt.encode())
    r.inputs.add(name="max_tokens", datatype="INT32", shape=[1]).contents.int_contents.append(max_tokens)
    r.inputs.add(name="temperature", datatype="FP32", shape=[1]).contents.fp32_contents.append(0.0)
    r.inputs.add(name="ignore_eos", datatype="BOOL", shape=[1]).contents.bool_contents.append(True)
    return r


def http_completion(url, model="tiny", max_tokens=8, prompt=PROMPT, **headers):
    r = httpx.post(
        url + "/v1/completions",
        timeout=30,
        headers=headers,
        json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True},
    )
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def text_of(response) -> str:
    """text_output of a raw ModelInferResponse (Triton's raw BYTES: 4-byte length, then the bytes)."""
    raw = response.raw_output_contents[0]
    n = int.from_bytes(raw[:4], "little")
    assert len(raw) == 4 + n
    return raw[4:].decode()


def metric(url, name) -> float:
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_health_and_metadata(client, stub):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny") and client.is_model_ready("tiny:fox")
    assert not client.is_model_ready("nope") and not client.is_model_ready("other:fox")
    meta = client.get_server_metadata()
    assert meta.name == "slimlm" and meta.version
    model = client.get_model_metadata("tiny")
    assert {i.name: i.datatype for i in model.inputs}["text_input"] == "BYTES"
    assert [(o.name, o.datatype, list(o.shape)) for o in model.outputs] == [("text_output", "BYTES", [1])]
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name="tiny")).ready
    with pytest.raises(InferenceServerException, match="does not exist"):
        client.get_model_metadata("nope")


def test_infer_equals_http_completion_both_clients(server, client, stub):
    url = server[0]
    want = http_completion(url)
    result = client.infer(
        "tiny", triton_inputs(), request_id="r-1", outputs=[tritonclient.InferRequestedOutput("text_output")]
    )
    assert result.as_numpy("text_output")[0].decode() == want and len(want) > 0
    assert result.get_response().id == "r-1"
    assert text_of(stub.ModelInfer(raw_request())) == want


def test_adapter_model_name(server, client):
    url = server[0]
    fox = http_completion(url, model="tiny:fox")
    assert fox != http_completion(url)  # the adapter changes the output, so the name really picked it
    result = client.infer("tiny:fox", triton_inputs())
    assert result.as_numpy("text_output")[0].decode() == fox


def test_stream_pieces_concatenate_to_the_whole_text(server, client):
    whole = client.infer("tiny", triton_inputs(max_tokens=12)).as_numpy("text_output")[0].decode()
    got: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        client.async_stream_infer("tiny", triton_inputs(max_tokens=12, stream=True), request_id="s-1")
        pieces, final = [], False
        while not final:
            result, error = got.get(timeout=30)
            assert error is None, error
            response = result.get_response()
            assert response.id == "s-1"
            final = response.parameters["triton_final_response"].bool_param
            pieces.append(result.as_numpy("text_output")[0].decode())
    finally:
        client.stop_stream()
    assert len(pieces) > 3 and "".join(pieces) == whole


def test_stream_with_empty_final_response(client):
    got: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        client.async_stream_infer("tiny", triton_inputs(max_tokens=4, stream=True), enable_empty_final_response=True)
        results = []
        while not results or not results[-1].get_response().parameters["triton_final_response"].bool_param:
            result, error = got.get(timeout=30)
            assert error is None, error
            results.append(result)
    finally:
        client.stop_stream()
    assert len(results[-1].get_response().outputs) == 0  # the flag alone, as Triton's decoupled models
    assert all(len(r.get_response().outputs) == 1 for r in results[:-1])


def test_stream_reports_a_bad_request_and_goes_on(client):
    got: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        client.async_stream_infer("nope", triton_inputs(stream=True))
        result, error = got.get(timeout=30)
        assert result is None and "does not exist" in str(error)
        client.async_stream_infer("tiny", triton_inputs(max_tokens=2, stream=True))
        result, error = got.get(timeout=30)
        assert error is None and result.as_numpy("text_output") is not None
    finally:
        client.stop_stream()


def test_unknown_model_is_not_found(client, stub):
    with pytest.raises(InferenceServerException) as e:
        client.infer("nope", triton_inputs())
    assert e.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(raw_request(model="tiny:nope"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_cancelled_unary_call_frees_its_slot(server, stub):
    url, _, state = server
    real_step = state.engine.step
    state.engine.step = lambda: (time.sleep(0.03), real_step())[1]  # the call is surely running when cancelled
    try:
        call = stub.ModelInfer.future(raw_request(max_tokens=60))
        deadline = time.monotonic() + 10
        while not state.engine.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert metric(url, "vllm:num_requests_running") == 1
        call.cancel()
        while metric(url, "vllm:num_requests_running") != 0 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        del state.engine.step  # the class's step again
    assert metric(url, "vllm:num_requests_running") == 0 and state.engine.cache.usage() == 0
    assert 'finished_reason="abort"' in httpx.get(url + "/metrics").text


def _without(request, name):
    kept = [i for i in request.inputs if i.name != name]
    del request.inputs[:]
    request.inputs.extend(kept)
    return request


def _set(request, name, **field):
    tensor = next(i for i in request.inputs if i.name == name)
    for k, v in field.items():
        if k == "shape":
            tensor.ClearField("shape")
            tensor.shape.extend(v)
        else:
            tensor.datatype = v
    return request


def _with(request, name, datatype, shape, contents, values):
    getattr(request.inputs.add(name=name, datatype=datatype, shape=shape).contents, contents).extend(values)
    return request


MALFORMED = {
    "missing text_input": (lambda r: _without(r, "text_input"), "'text_input'.*missing"),
    "text_input as INT32": (lambda r: _set(r, "text_input", datatype="INT32"), "datatype INT32; send BYTES"),
    "text_input shape [2]": (lambda r: _set(r, "text_input", shape=[2]), r"shape \[2\] but 1 elements"),
    "max_tokens shape [1, 2]": (
        lambda r: _set(
            _with(_without(r, "max_tokens"), "max_tokens", "INT32", [1, 2], "int_contents", [3, 4]), "max_tokens"
        ),
        r"shape \[1, 2\]; send shape \[1\]",
    ),
    "max_tokens 0": (
        lambda r: _with(_without(r, "max_tokens"), "max_tokens", "INT32", [1], "int_contents", [0]),
        "'max_tokens' is 0; send at least 1",
    ),
    "max_tokens over the limit": (
        lambda r: _with(_without(r, "max_tokens"), "max_tokens", "INT32", [1], "int_contents", [10_000]),
        "at most 64",
    ),
    "negative temperature": (
        lambda r: _with(_without(r, "temperature"), "temperature", "FP32", [1], "fp32_contents", [-1.0]),
        "'temperature' is -1.0",
    ),
    "top_p 0": (lambda r: _with(r, "top_p", "FP32", [1], "fp32_contents", [0.0]), r"top_p.*\(0, 1\]"),
    "unknown input": (lambda r: _with(r, "prompt", "BYTES", [1], "bytes_contents", [b"x"]), "unknown input 'prompt'"),
    "unknown output": (lambda r: (r.outputs.add(name="logits"), r)[1], "unknown output 'logits'"),
    "not UTF-8": (
        lambda r: _with(_without(r, "text_input"), "text_input", "BYTES", [1], "bytes_contents", [b"\xff\xfe"]),
        "not UTF-8",
    ),
    "stream on the unary RPC": (lambda r: _with(r, "stream", "BOOL", [1], "bool_contents", [True]), "ModelStreamInfer"),
    "raw buffers miscounted": (lambda r: (r.raw_input_contents.append(b"\x00"), r)[1], "one per input"),
}


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_malformed_request_is_invalid_argument(stub, kind):
    edit, message = MALFORMED[kind]
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(edit(raw_request()))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
    assert pytest.importorskip("re").search(message, e.value.details()), e.value.details()


def test_malformed_raw_bytes_then_still_serves(client, stub):
    broken = pb.ModelInferRequest(model_name="tiny")
    broken.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    broken.raw_input_contents.append(b"\x09\x00\x00\x00abc")  # claims 9 bytes, has 3
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(broken)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "past the end" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:  # over --max-body-bytes (1 MiB here), as HTTP's 413
        stub.ModelInfer(raw_request(prompt="x" * (2 << 20)))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert client.infer("tiny", triton_inputs(max_tokens=2)).as_numpy("text_output")[0]


def test_auth(tiny_llama):
    with running_grpc_server(tiny_config(tiny_llama[0], api_keys=["sekret"])) as (url, address, _):
        client = tritonclient.InferenceServerClient(address)
        assert client.is_server_live()  # probes need no key, as /health
        with pytest.raises(InferenceServerException) as e:
            client.infer("tiny", triton_inputs())
        assert e.value.status() == "StatusCode.UNAUTHENTICATED"
        with pytest.raises(InferenceServerException, match="UNAUTHENTICATED|API key"):
            client.infer("tiny", triton_inputs(), headers={"authorization": "Bearer wrong"})
        got = client.infer("tiny", triton_inputs(), headers={"authorization": "Bearer sekret"})
        assert got.as_numpy("text_output")[0].decode() == http_completion(url, authorization="Bearer sekret")
        client.close()


def test_full_queue_is_resource_exhausted_and_cancel_frees_the_slot(tiny_llama):
    engine = EngineConfig(max_batch=1, max_queue=1, max_seq_len=120, max_loras=0, kv_cache_dtype="fp32")
    with running_grpc_server(tiny_config(tiny_llama[0], engine=engine)) as (url, address, state):
        real_step = state.engine.step

        def slow_step():  # 30 ms a step: the 60-token stream is surely still running when the test looks
            time.sleep(0.03)
            real_step()

        state.engine.step = slow_step
        with grpc.insecure_channel(address) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            # One long stream fills the batch, one unary request waits; a third finds the queue full.
            stream = stub.ModelStreamInfer(iter([_streaming(raw_request(max_tokens=60))]))
            assert text_of(next(stream).infer_response) is not None  # it runs
            waiting = stub.ModelInfer.future(raw_request(max_tokens=2))
            deadline = time.monotonic() + 10
            while not state.engine.waiting and time.monotonic() < deadline:
                time.sleep(0.01)
            with pytest.raises(grpc.RpcError) as e:
                stub.ModelInfer(raw_request(max_tokens=2))
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry later" in e.value.details()
            assert metric(url, "vllm:num_requests_running") == 1
            stream.cancel()  # the client gives up mid-stream: its slot goes to the waiting request
            assert text_of(waiting.result(timeout=30))
            deadline = time.monotonic() + 10
            while metric(url, "vllm:num_requests_running") != 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert metric(url, "vllm:num_requests_running") == 0 and metric(url, "vllm:num_requests_waiting") == 0
            assert state.engine.cache.usage() == 0
            assert 'finished_reason="abort"' in httpx.get(url + "/metrics").text  # the stream's request, cancelled


def _streaming(request):
    request.inputs.add(name="stream", datatype="BOOL", shape=[1]).contents.bool_contents.append(True)
    return request


def test_serve_process_grpc_port_drains_on_sigterm(tiny_llama, tmp_path):
    """`slimlm serve --grpc-port`: a stream running at SIGTERM finishes, new requests get UNAVAILABLE, exit 0."""
    import signal
    import subprocess
    import sys

    port, grpc_port = free_port(), free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "slimlm.cli",
            "serve",
            "--model",
            str(tiny_llama[0]),
            "--served-name",
            "tiny",
            "--dtype",
            "fp32",
            "--port",
            str(port),
            "--max-seq-len",
            "128",
            "--grpc-port",
            str(grpc_port),
            "--drain-timeout",
            "20",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    client = tritonclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if client.is_server_ready():
                    break
            except InferenceServerException:
                pass
            time.sleep(0.1)
        got: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: got.put((result, error)))
        client.async_stream_infer("tiny", triton_inputs(max_tokens=110, stream=True))
        pieces = [got.get(timeout=30)]
        proc.send_signal(signal.SIGTERM)
        while client.is_server_ready():  # the handler runs asynchronously
            time.sleep(0.01)
        with pytest.raises(InferenceServerException) as refused:
            client.infer("tiny", triton_inputs(max_tokens=2))
        while not pieces[-1][0].get_response().parameters["triton_final_response"].bool_param:
            pieces.append(got.get(timeout=30))
        client.stop_stream()
        assert refused.value.status() == "StatusCode.UNAVAILABLE" and "shutting down" in refused.value.message()
        assert all(error is None for _, error in pieces)
        assert proc.wait(timeout=30) == 0
    finally:
        client.close()
        if proc.poll() is None:
            proc.kill()
        log.close()
    records = [json.loads(x) for x in (tmp_path / "server.log").read_text().splitlines() if x.startswith("{")]
    done = [r for r in records if r.get("path") == "grpc:ModelStreamInfer" and "error" not in r]
    assert done and done[0]["completion_tokens"] == 110 and done[0]["finish_reason"] == "length"
    assert any(r.get("event") == "serving" and r.get("grpc") == f"127.0.0.1:{grpc_port}" for r in records)
