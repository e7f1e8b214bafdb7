"""Property-based fuzzing of every route against the live server's own OpenAPI schema (schemathesis + hypothesis).

For each operation in /openapi.json, valid and invalid requests generated from the schema (3 in 4 of those with a
`model` field name the served model, so that they reach the engine) must get: a status below 500, an OpenAI error body
({"error": {"message", "type", "param", "code"}}) for every 4xx, and an answer within a timeout. Afterwards the
server still answers /health with 200 and the engine holds no running or waiting request. Hand-written inputs
the schema cannot describe (NaN, invalid UTF-8, 10 MB bodies, ...) are in test_edge_cases.py.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from serve_helpers import random_lora, running_server

from .conftest import SOAK, trials
from .http_checks import SERVED, response_problem, serve_config, wait_idle

# Every route the server has: a new route must be added here, so that it is fuzzed too.
ROUTES = [
    ("GET", "/health"),
    ("GET", "/ready"),
    ("GET", "/metrics"),
    ("GET", "/v1/models"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/load_lora_adapter"),
    ("POST", "/v1/unload_lora_adapter"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("GET", "/version"),
]
# Examples per operation; the engine routes get more (they hold nearly all the validation).
EXAMPLES = {"/v1/chat/completions": trials(100, 1000), "/v1/completions": trials(100, 1000)}
DEFAULT_EXAMPLES = trials(10, 200)
TIMEOUT_S = 30.0  # a tiny model and max_tokens <= 8: every answer comes in well under a second when nothing hangs


@pytest.fixture(scope="module")
def adapter(tiny_llama, tmp_path_factory):
    """A real LoRA adapter under a --lora-root, so that fuzzed load_lora_adapter calls can succeed."""
    root = tmp_path_factory.mktemp("lora_root")
    random_lora(tiny_llama[0], root / "fox", seed=3)
    return root, root / "fox"


@pytest.fixture(scope="module")
def server(tiny_llama, adapter):
    config = serve_config(tiny_llama[0])
    config.allow_runtime_lora, config.lora_roots = True, [str(adapter[0])]  # the admin routes on, to fuzz them
    with running_server(config) as (url, state):
        yield url, state, adapter[1]


@pytest.fixture(scope="module")
def schema(server):
    return schemathesis.openapi.from_url(server[0] + "/openapi.json")


def test_schema_lists_every_route(schema):
    """The fuzzer reaches a route only through the schema: every route must be in it (and documented)."""
    listed = sorted((op.ok().method.upper(), op.ok().path) for op in schema.get_all_operations())
    assert listed == sorted(ROUTES)
    raw = schema.raw_schema["paths"]
    for path in ("/v1/chat/completions", "/v1/completions"):  # bodies come from the pydantic models
        assert "requestBody" in raw[path]["post"], path


@pytest.mark.parametrize("method,path", ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
def test_fuzz_route(server, schema, record, method, path):
    url, state, adapter_folder = server
    operation = schema[path][method]
    tried, failures, statuses = [0], [], {}
    strategy = st.one_of(operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE))

    # `make test` replays the same inputs every run (a red CI is a regression, not a new find); `make soak`
    # draws new ones each time.
    @settings(
        max_examples=EXAMPLES.get(path, DEFAULT_EXAMPLES),
        deadline=None,
        database=None,
        derandomize=not SOAK,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],
    )
    @given(case=strategy)
    def fuzz(case):
        # 3 inputs in 4 name the served model (the real adapter): they reach the engine (the loader), not only
        # the first 400. Counted, not drawn: hypothesis draws its simplest values (False) first.
        if tried[0] % 4 and isinstance(case.body, dict):
            if "model" in case.body:
                case.body["model"] = SERVED
            if "lora_path" in case.body:
                case.body["lora_path"] = str(adapter_folder)
        tried[0] += 1
        try:
            response = case.call(base_url=url, timeout=TIMEOUT_S)
        except Exception as e:  # a timeout (hang), a dropped connection: the server failed this input
            failures.append(f"{type(e).__name__}: {e} for {case.as_curl_command()}")
            return
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        problem = response_problem(response)
        if problem:
            failures.append(f"{problem} for {case.as_curl_command()[:2000]}")

    fuzz()
    wait_idle(state)
    alive = httpx.get(url + "/health", timeout=10).status_code == 200
    leftover = len(state.engine.running) + len(state.engine.waiting)
    record(
        kind=f"fuzz: {method} {path}",
        tried=tried[0],
        failures=len(failures) + (not alive) + (leftover > 0),
        statuses={str(k): v for k, v in sorted(statuses.items())},
    )
    print(f"{method} {path}: {tried[0]} inputs, statuses {statuses}")
    assert not failures, f"{len(failures)} of {tried[0]} inputs broke the server:\n" + "\n".join(failures[:10])
    assert alive, "/health is not 200 after fuzzing"
    assert leftover == 0, f"{leftover} requests still held by the engine after fuzzing"
