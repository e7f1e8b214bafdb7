"""ServeConfig and ServerState: what one server process knows — its model, engine, adapters and registry.

The model loads on a background thread so that /health answers at once and /ready turns 200 only when the engine
runs. The `model` field of a request names what to run: `BASE`, `BASE:ADAPTER`, `BASE:ADAPTER@3` (a version) or
`BASE:ADAPTER@prod` (an alias); the `BASE:` prefix may be left out. Registry names are looked up on every request,
so a push, alias move or rollback takes effect for the next request without a restart.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slimlm.engine.core import AdapterRef, Engine, EngineConfig
from slimlm.serve.metrics import ServeMetrics
from slimlm.serve.protocol import APIError


@dataclass
class ServeConfig:
    model: str = "smollm2-135m"
    served_name: str | None = None  # the base's name in the API (default: the --model value's last path part)
    dtype: str = "auto"
    device: str = "cpu"
    quantize: str | None = None  # int8 | int8-dynamic | int4 | auto: quantize the base's weights after loading
    group_size: int = 64  # int4 group size
    backend: str = "torch"  # or onnxruntime: `model` is a folder from `slimlm export onnx`
    adapters: list[str] = field(default_factory=list)  # adapter folders, as DIR or NAME=DIR
    registry: str | None = None  # registry root: adapters pushed there are served by name
    api_key_file: str | None = None  # one key per line; when set, /v1/* needs `Authorization: Bearer KEY`
    api_keys: list[str] = field(default_factory=list)  # more keys (--api-key, SLIMLM_API_KEY), merged with the file's
    admin_key_file: str | None = None  # keys for the admin routes (runtime LoRA load/unload); inference keys get 403
    allow_runtime_lora: bool = False  # POST /v1/load_lora_adapter and /v1/unload_lora_adapter (else 404)
    lora_roots: list[str] = field(default_factory=list)  # runtime adapters load only from under these folders
    max_body_bytes: int = 1 << 20
    max_tokens_limit: int = 2048
    drain_timeout_s: float = 30.0
    draft_model: str | None = None  # with engine.speculative == "draft": the draft model to load (like `model`)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def validate(self) -> None:
        self.engine.validate()
        if self.quantize not in (None, "auto"):
            from slimlm.quantize.model import check_scheme

            check_scheme(self.quantize, self.group_size)
        if self.backend == "onnxruntime" and (self.adapters or self.registry or self.quantize not in (None, "auto")):
            raise ValueError("the onnxruntime backend serves the exported graph alone: no --adapters, --registry or "
                             "--quantize (merge and quantize at export: slimlm export onnx --adapter/--quantize)")
        if self.engine.speculative == "draft" and not self.draft_model:
            raise ValueError("--speculative draft needs --draft-model PATH (a smaller model with the same tokenizer)")
        if self.draft_model and self.engine.speculative != "draft":
            raise ValueError("--draft-model is used by draft-model speculation: add --speculative draft")
        if self.draft_model and self.backend == "onnxruntime":
            raise ValueError("--draft-model needs the torch backend (--backend torch)")
        if self.max_body_bytes < 1024 or self.max_tokens_limit < 1 or self.drain_timeout_s < 0:
            raise ValueError("max_body_bytes must be >= 1024, max_tokens_limit >= 1, drain_timeout_s >= 0")
        self._validate_admin()

    def _validate_admin(self) -> None:
        """The runtime-LoRA flags come together: roots that exist, and an admin key wherever inference needs keys."""
        if not self.allow_runtime_lora:
            if self.lora_roots or self.admin_key_file:
                raise ValueError("--lora-root and --admin-key-file apply to runtime LoRA loading: add "
                                 "--allow-runtime-lora (or drop them)")
            return
        if not self.lora_roots:
            raise ValueError("--allow-runtime-lora needs at least one --lora-root DIR: runtime adapters are loaded "
                             "only from under these folders")
        missing = [r for r in self.lora_roots if not Path(r).is_dir()]
        if missing:
            raise ValueError(f"--lora-root {missing[0]}: no such folder")
        if (self.api_key_file or self.api_keys) and not self.admin_key_file:
            raise ValueError("--allow-runtime-lora with API keys (--api-key, SLIMLM_API_KEY or --api-key-file) "
                             "needs --admin-key-file: inference keys may not load adapters")

    def name(self) -> str:
        return self.served_name or Path(self.model.rstrip("/")).name.removesuffix(".gguf")


def parse_adapter_args(items: list[str]) -> dict[str, Path]:
    """`DIR` or `NAME=DIR` -> {name: folder}; every folder must hold an adapter_config.json."""
    out = {}
    for item in items:
        name, _, folder = item.rpartition("=") if "=" in item else (Path(item.rstrip("/")).name, "", item)
        path = Path(folder)
        if not (path / "adapter_config.json").is_file():
            raise ValueError(f"--adapters {item}: {path} has no adapter_config.json")
        if name in out:
            raise ValueError(f"--adapters: two adapters are named {name!r}; use NAME=DIR to tell them apart")
        out[name] = path
    return out


class ServerState:
    def __init__(self, config: ServeConfig):
        config.validate()
        self.config, self.served_name = config, config.name()
        self.static_adapters = parse_adapter_args(config.adapters)
        from_file = _read_keys(config.api_key_file, "--api-key-file") if config.api_key_file else []
        self.api_keys = list(dict.fromkeys(from_file + [k.strip() for k in config.api_keys if k.strip()]))
        self.admin_keys = _read_keys(config.admin_key_file, "--admin-key-file") if config.admin_key_file else []
        if set(self.admin_keys) & set(self.api_keys):
            raise ValueError("--admin-key-file and the API keys (--api-key, SLIMLM_API_KEY or --api-key-file) "
                             "share a key: admin keys must differ")
        # Resolved once: a request's path is checked against the real folders (symlinks followed), see add_adapter.
        self.lora_roots = [Path(r).resolve() for r in config.lora_roots]
        self.operator_adapters = frozenset(self.static_adapters)  # from --adapters: never unloaded over HTTP
        self.registry = None
        if config.registry:
            from slimlm.serve.registry import Registry
            self.registry = Registry(Path(config.registry))
        self.engine: Engine | None = None
        self.tokenizer = None
        self.metrics: ServeMetrics | None = ServeMetrics(self.served_name)
        self.ready = self.draining = False
        self.load_error: str | None = None
        self._checked: dict[tuple, str | None] = {}  # registry versions hashed: None = intact, else the error

    def load(self) -> None:
        """Load the model and start the engine (call on a background thread); errors land in load_error."""
        try:
            from slimlm.llm import load

            quantize, dtype = resolve_auto_quantize(self.config)
            llm = load(self.config.model, dtype=dtype, device=self.config.device, quantize=quantize,
                       group_size=self.config.group_size, backend=self.config.backend,
                       draft_model=self.config.draft_model)
            self.tokenizer = llm.tokenizer
            engine_config = self.config.engine
            if self.config.backend == "onnxruntime":  # no LoRA slots in an exported graph
                engine_config = dataclasses.replace(engine_config, max_loras=0)
            self.engine = Engine(llm.model, llm.tokenizer, engine_config, self.metrics,
                                 draft_model=llm.draft_model).start()
            self.ready = True
            log_engine_choice(self.engine, quantize)
        except Exception as e:  # surfaced by /ready and the server log
            self.load_error = f"{type(e).__name__}: {e}"
            raise

    def load_in_background(self) -> threading.Thread:
        t = threading.Thread(target=self.load, name="slimlm-load", daemon=True)
        t.start()
        return t

    def not_ready_reason(self) -> str:
        if self.draining:
            return "the server is shutting down"
        return f"model failed to load: {self.load_error}" if self.load_error else "the model is still loading"

    @property
    def vocab_size(self) -> int:
        return self.engine.model.config.vocab_size

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def resolve_adapter(self, model: str) -> AdapterRef | None:
        """The adapter a request's `model` field names (None for the base); APIError 404 if it names nothing, 400
        if it names a registry version that cannot be served (corrupt, not an adapter)."""
        name = model
        if ":" in model:
            base, name = model.split(":", 1)
            if base != self.served_name:
                raise self._unknown(model, f"this server's base model is {self.served_name!r}")
        if name == self.served_name:
            return None
        if name in self.static_adapters:
            return AdapterRef(("static", name), self.static_adapters[name], name)
        if self.registry is None:
            raise self._unknown(model, "no such adapter")
        from slimlm.serve.registry import RegistryError
        try:
            self.registry.resolve(name)
        except RegistryError as e:
            raise self._unknown(model, str(e)) from None
        try:
            # Hashed once per version (the verdicts are kept): a corrupt version is refused, and a bare NAME whose
            # head is corrupt keeps serving the newest intact version.
            entry = self.registry.resolve_good(name, self._checked)
            if entry.kind != "adapter":
                raise RegistryError(f"{entry.ref} is a {entry.kind}, not an adapter; this server serves one base")
            key = (entry.name, entry.version)
        except RegistryError as e:  # it exists but cannot be served (corrupt, not an adapter): the client's 400
            raise APIError(400, f"model {model!r} cannot be served: {e}", param="model", code="adapter_error") \
                from None
        return AdapterRef(key, entry.path, entry.ref)

    def add_adapter(self, name: str, folder: str) -> None:
        """Serve the LoRA adapter in `folder` as `name` from now on (checked now, loaded on first use).

        Only for --allow-runtime-lora (the route answers 404 otherwise); `folder` must resolve to a folder under a
        --lora-root, and `name` may not shadow an adapter the operator configured (--adapters or the registry)."""
        from slimlm.peft import read_adapter_config
        from slimlm.peft.common import PeftError
        from slimlm.serve.registry import RegistryError, check_name

        if name in self.operator_adapters or (self.registry is not None and name in self.registry.names()):
            raise APIError(403, f"adapter {name!r} is configured by the operator and cannot be replaced over HTTP",
                           type="permission_error", param="lora_name", code="operator_adapter")
        path = self.allowed_lora_path(folder)  # before anything reads the path
        try:
            check_name(name, "adapter name")
            method, cfg, _ = read_adapter_config(path)
        except (RegistryError, PeftError, OSError) as e:
            raise APIError(400, str(e), param="lora_path") from None
        if method != "lora" or cfg.use_dora or cfg.r > self.config.engine.max_lora_rank:
            why = f"a {method} adapter" if method != "lora" else "DoRA" if cfg.use_dora else f"rank {cfg.r}"
            raise APIError(400, f"cannot serve {why}: this server serves LoRA adapters up to rank "
                                f"{self.config.engine.max_lora_rank}", param="lora_path")
        if name in self.static_adapters or name == self.served_name:
            raise APIError(400, f"an adapter named {name!r} is already served; unload it first", param="lora_name")
        self.static_adapters[name] = path

    def allowed_lora_path(self, folder: str) -> Path:
        """`folder` resolved (relative to the server's working directory, `..` and symlinks followed), or APIError
        403 if the result is not under a --lora-root. The resolved path is what gets loaded, so a symlink swapped
        after this check cannot redirect the load."""
        try:
            path = Path(folder).resolve()
        except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte
            path = None
        if path is None or not any(path.is_relative_to(root) for root in self.lora_roots):
            raise APIError(403, "lora_path is outside the folders this server loads adapters from (--lora-root)",
                           type="permission_error", param="lora_path", code="path_not_allowed")
        return path

    def remove_adapter(self, name: str) -> None:
        """Stop serving the runtime adapter `name`; APIError 403 for the operator's (--adapters, the registry)."""
        if name in self.operator_adapters or (self.registry is not None and name in self.registry.names()):
            raise APIError(403, f"adapter {name!r} is configured by the operator and cannot be unloaded over HTTP",
                           type="permission_error", param="lora_name", code="operator_adapter")
        if name not in self.static_adapters:
            raise APIError(404, f"no adapter named {name!r} was loaded", param="lora_name", code="not_found")
        del self.static_adapters[name]
        self.engine.unload_adapter(("static", name))

    def _unknown(self, model: str, why: str) -> APIError:
        # OpenAI's answer for a model it does not have: 404, invalid_request_error, code model_not_found.
        return APIError(404, f"The model `{model}` does not exist ({why}). GET /v1/models lists what this server "
                             "serves", param="model", code="model_not_found")

    def list_models(self) -> list[dict]:
        base = self.served_name
        card = lambda id_, parent=None: {"id": id_, "object": "model", "created": 0, "owned_by": "slimlm",
                                         "root": id_ if parent is None else parent, "parent": parent}
        out = [card(base)] + [card(f"{base}:{n}", base) for n in sorted(self.static_adapters)]
        if self.registry is None:
            return out
        for name in self.registry.names():
            entries = [e for e in self.registry.entries(name) if e.kind == "adapter"]
            if not entries:
                continue
            head = self.registry.head(name)
            out.append({**card(f"{base}:{name}", base), "version": head})  # the head version
            out += [{**card(f"{base}:{e.ref}", base), "version": e.version, "method": e.method} for e in entries]
            out += [{**card(f"{base}:{name}@{a}", base), "version": v} for a, v in self.registry.aliases(name).items()]
        return out


def _read_keys(path: str, flag: str) -> list[str]:
    keys = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not keys:
        raise ValueError(f"{flag} {path} holds no keys (one per line)")
    return keys


def resolve_auto_quantize(config: ServeConfig) -> tuple[str | None, str]:
    """(quantize, dtype) to load with. `auto` is int8 weight-only with fp32 activations on a CPU (the torch backend):
    the fused CPU decode step (engine/fused_decode.py) then reads a byte per weight, ~4x faster decoding than fp32
    for +0.2 % perplexity on SmolLM2 (BENCHMARKS.md); elsewhere (CUDA, onnxruntime) it quantizes nothing. A folder
    that is already quantized keeps its own layers either way."""
    if config.quantize != "auto":
        return config.quantize, config.dtype
    if config.backend == "torch" and str(config.device).startswith("cpu") and config.dtype in ("auto", "fp32"):
        return "int8", "fp32"
    return None, config.dtype


def log_engine_choice(engine: Engine, quantize: str | None = None) -> None:
    """One start-up line with what the engine picked (dtype, batch, context, cache sizes, speculation)."""
    import json
    import logging

    c = engine.config
    logging.getLogger("slimlm.serve").info(json.dumps({
        "event": "engine", "device": str(engine.model.device), "dtype": str(engine.model.dtype).removeprefix("torch."),
        "quantize": quantize, "fused_decode": engine.fused is not None,
        "threads": torch.get_num_threads(), "max_batch": c.max_batch, "max_seq_len": engine.max_seq_len,
        "kv_cache_mib": round(engine.cache.bytes() / 2**20, 1),
        "kv_cache_dtype": str(engine.cache.k[0].dtype).removeprefix("torch."),
        "prefix_cache_tokens": c.prefix_cache_tokens if c.prefix_cache else 0,
        "speculative": c.speculative, "num_speculative_tokens": c.num_speculative_tokens if c.speculative else 0,
        **({} if engine.draft is None else {"draft_fused_decode": engine.draft.fused is not None,
                                            "draft_kv_cache_mib": round(engine.draft.cache.bytes() / 2**20, 1)}),
        "max_loras": c.max_loras}))
