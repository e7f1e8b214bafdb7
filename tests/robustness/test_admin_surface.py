"""The admin surface (issue 15): runtime LoRA load/unload is off by default, confined to --lora-root folders, never
touches the operator's adapters, and needs an admin key (not an inference key) when keys are configured."""

from __future__ import annotations

import os

import httpx
import pytest
from serve_helpers import random_lora, running_server

from slimlm.engine.core import EngineConfig
from slimlm.serve.state import ServeConfig, ServerState

LOAD, UNLOAD = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"


def config(model, **kw) -> ServeConfig:
    engine = EngineConfig(max_batch=2, max_seq_len=64, max_loras=2, max_lora_rank=8, prefix_cache=False)
    return ServeConfig(
        model=str(model), served_name="tiny", dtype="fp32", quantize=None, max_tokens_limit=8, engine=engine, **kw
    )


def post(url, path, body, key=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(url + path, json=body, headers=headers, timeout=30)


def is_openai_error(r, status) -> bool:
    err = r.json().get("error", {})
    return r.status_code == status and {"message", "type", "param", "code"} <= set(err)


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory):
    """root/inside (an adapter under the root), outside/secret (one outside it), and a symlink in root to outside."""
    base = tmp_path_factory.mktemp("admin")
    root, outside = base / "root", base / "outside"
    inside = random_lora(tiny_llama[0], root / "inside", seed=1)
    secret = random_lora(tiny_llama[0], outside / "secret", seed=2)
    os.symlink(secret, root / "link")
    return root, inside, secret


def test_runtime_lora_is_off_by_default(tiny_llama, adapters):
    _, inside, _ = adapters
    with running_server(config(tiny_llama[0])) as (url, state):
        r = post(url, LOAD, {"lora_name": "x", "lora_path": str(inside)})
        assert is_openai_error(r, 404) and "--allow-runtime-lora" in r.json()["error"]["message"]
        assert is_openai_error(post(url, UNLOAD, {"lora_name": "x"}), 404)
        assert "x" not in state.static_adapters


def test_flags_are_checked_at_start(tiny_llama, adapters, tmp_path):
    root, _, _ = adapters
    with pytest.raises(ValueError, match="--allow-runtime-lora needs at least one --lora-root"):
        config(tiny_llama[0], allow_runtime_lora=True).validate()
    with pytest.raises(ValueError, match="no such folder"):
        config(tiny_llama[0], allow_runtime_lora=True, lora_roots=[str(tmp_path / "nope")]).validate()
    with pytest.raises(ValueError, match="add --allow-runtime-lora"):
        config(tiny_llama[0], lora_roots=[str(root)]).validate()
    keys = tmp_path / "keys"
    keys.write_text("k\n")
    with pytest.raises(ValueError, match="needs --admin-key-file"):
        config(tiny_llama[0], allow_runtime_lora=True, lora_roots=[str(root)], api_key_file=str(keys)).validate()
    with pytest.raises(ValueError, match="share a key"):
        ServerState(
            config(
                tiny_llama[0],
                allow_runtime_lora=True,
                lora_roots=[str(root)],
                api_key_file=str(keys),
                admin_key_file=str(keys),
            )
        )


def test_paths_outside_the_roots_are_refused_unread(tiny_llama, adapters, monkeypatch, record):
    root, inside, secret = adapters
    read = []
    import slimlm.peft

    real = slimlm.peft.read_adapter_config
    monkeypatch.setattr(slimlm.peft, "read_adapter_config", lambda p: (read.append(str(p)), real(p))[1])
    cfg = config(tiny_llama[0], allow_runtime_lora=True, lora_roots=[str(root)])
    with running_server(cfg) as (url, state):
        escapes = [
            str(secret),  # absolute, outside
            str(root / ".." / "outside" / "secret"),  # `..` out of the root
            str(root / "link"),  # a symlink in the root that points outside
            os.path.relpath(secret),  # relative to the server's working directory
            str(root) + "x/inside",  # a sibling whose name starts with the root's
            "/etc",
        ]
        wrong = []
        for path in escapes:
            r = post(url, LOAD, {"lora_name": "evil", "lora_path": path})
            if not (is_openai_error(r, 403) and r.json()["error"]["code"] == "path_not_allowed"):
                wrong.append((path, r.status_code, r.text))
        record(kind="admin: lora_path outside --lora-root", tried=len(escapes), failures=len(wrong))
        assert wrong == []
        assert read == [] and "evil" not in state.static_adapters  # refused before anything was read
        r = post(url, LOAD, {"lora_name": "good", "lora_path": str(root / "x" / ".." / "inside")})
        assert r.status_code == 200, r.text
        assert state.static_adapters["good"] == inside.resolve()
        r = post(url, "/v1/completions", {"model": "tiny:good", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200, r.text
        assert post(url, UNLOAD, {"lora_name": "good"}).status_code == 200


def test_operator_adapters_cannot_be_unloaded_or_replaced(tiny_llama, adapters):
    root, inside, _ = adapters
    cfg = config(tiny_llama[0], allow_runtime_lora=True, lora_roots=[str(root)], adapters=[f"ops={inside}"])
    with running_server(cfg) as (url, state):
        r = post(url, UNLOAD, {"lora_name": "ops"})
        assert is_openai_error(r, 403) and r.json()["error"]["code"] == "operator_adapter"
        r = post(url, LOAD, {"lora_name": "ops", "lora_path": str(inside)})
        assert is_openai_error(r, 403) and r.json()["error"]["code"] == "operator_adapter"
        assert state.static_adapters["ops"] == inside
        assert post(url, "/v1/completions", {"model": "tiny:ops", "prompt": "hi", "max_tokens": 2}).status_code == 200


def test_registry_adapters_cannot_be_shadowed(tiny_llama, adapters, tmp_path):
    from slimlm.serve.registry import Registry

    root, inside, _ = adapters
    Registry(tmp_path / "reg").push("reg-ad", inside)
    cfg = config(tiny_llama[0], allow_runtime_lora=True, lora_roots=[str(root)], registry=str(tmp_path / "reg"))
    with running_server(cfg) as (url, state):
        r = post(url, LOAD, {"lora_name": "reg-ad", "lora_path": str(inside)})
        assert is_openai_error(r, 403) and "reg-ad" not in state.static_adapters
        assert is_openai_error(post(url, UNLOAD, {"lora_name": "reg-ad"}), 403)


def test_admin_key_is_separate_from_inference_keys(tiny_llama, adapters, tmp_path):
    root, inside, _ = adapters
    (tmp_path / "keys").write_text("user-key\n")
    (tmp_path / "admin").write_text("admin-key\n")
    cfg = config(
        tiny_llama[0],
        allow_runtime_lora=True,
        lora_roots=[str(root)],
        api_key_file=str(tmp_path / "keys"),
        admin_key_file=str(tmp_path / "admin"),
    )
    with running_server(cfg) as (url, _):
        body = {"lora_name": "a", "lora_path": str(inside)}
        assert is_openai_error(post(url, LOAD, body), 401)
        r = post(url, LOAD, body, key="user-key")
        assert is_openai_error(r, 403) and r.json()["error"]["code"] == "admin_key_required"
        assert is_openai_error(post(url, UNLOAD, {"lora_name": "a"}, key="user-key"), 403)
        assert post(url, LOAD, body, key="admin-key").status_code == 200
        completion = {"model": "tiny:a", "prompt": "hi", "max_tokens": 2}
        assert post(url, "/v1/completions", completion, key="user-key").status_code == 200
        assert post(url, "/v1/completions", completion, key="admin-key").status_code == 200
        assert is_openai_error(post(url, "/v1/completions", completion), 401)
        assert post(url, UNLOAD, {"lora_name": "a"}, key="admin-key").status_code == 200


def test_admin_key_alone_leaves_inference_open(tiny_llama, adapters, tmp_path):
    root, inside, _ = adapters
    (tmp_path / "admin").write_text("admin-key\n")
    cfg = config(tiny_llama[0], allow_runtime_lora=True, lora_roots=[str(root)], admin_key_file=str(tmp_path / "admin"))
    with running_server(cfg) as (url, _):
        assert post(url, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2}).status_code == 200
        assert is_openai_error(post(url, LOAD, {"lora_name": "a", "lora_path": str(inside)}), 401)
        assert post(url, LOAD, {"lora_name": "a", "lora_path": str(inside)}, key="admin-key").status_code == 200


def test_open_admin_surface_warns_at_start(tiny_llama, adapters, caplog):
    from slimlm.serve.server import warn_open_admin

    root, _, _ = adapters
    state = ServerState(config(tiny_llama[0], allow_runtime_lora=True, lora_roots=[str(root)]))
    with caplog.at_level("WARNING", logger="slimlm.serve"):
        warn_open_admin(state, "0.0.0.0")
    assert "ANY client" in caplog.text and "--admin-key-file" in caplog.text
