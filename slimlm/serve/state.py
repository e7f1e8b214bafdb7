"""ServeConfig and ServerState: what one server process knows — its base models, adapters, keys and registry.

The default base (`--model`) loads on a background thread so that /health answers at once and /ready turns 200
only when its engine runs. More bases (`--models NAME=PATH`, and base models pushed to `--registry`) load on their
first request, each into a ServedModel (its own engine thread); serve/pool.py decides which are resident
(`--max-models`, `--memory-budget`). The `model` field of a request names what to run: `BASE`, `BASE:ADAPTER`,
`BASE:ADAPTER@3` (a version) or `BASE:ADAPTER@prod` (an alias); the `BASE:` prefix may be left out for the default
base. Registry names are looked up on every request, so a push, alias move or rollback takes effect for the next
request without a restart (a registry base is held per version: a moved head loads the new version).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slimlm.engine.core import AdapterRef, Engine, EngineConfig
from slimlm.errors import InputError
from slimlm.serve.metrics import ServeMetrics
from slimlm.serve.pool import ModelPool
from slimlm.serve.protocol import APIError

log = logging.getLogger("slimlm.serve")


@dataclass
class ServeConfig:
    model: str = "smollm2-135m"
    served_name: str | None = None  # the base model's name in the API; None: the --model value's last path part
    dtype: str = "auto"
    device: str = "cpu"
    quantize: str | None = None  # int8 | int8-dynamic | int4 | auto: quantize the base's weights after loading
    group_size: int = 64  # int4 group size
    backend: str = "torch"  # or onnxruntime: `model` is a folder from `slimlm export onnx`
    # The comments below are also `slimlm serve --help` (serve/cli.py makes the flags from these fields; the
    # metadata gives a flag's spelling where it is not the field's name).

    # LoRA adapter folders to serve, as DIR or NAME=DIR
    adapters: list[str] = field(default_factory=list, metadata={"nargs": "*", "metavar": "[NAME=]DIR"})
    registry: str | None = None  # registry root whose adapters are served by name[@version]
    api_key_file: str | None = None  # file with one API key per line; /v1/* then needs one
    # an API key /v1/* (and /tokenize, /detokenize, /version) then need, as 'Authorization: Bearer KEY'; repeatable;
    # merged with --api-key-file and the SLIMLM_API_KEY environment variable (which keeps the key out of `ps`)
    api_keys: list[str] = field(
        default_factory=list, metadata={"flag": "--api-key", "action": "append", "metavar": "KEY"}
    )
    # file with one admin key per line: the runtime LoRA routes then need one (inference keys get 403 there); admin
    # keys also work on the inference routes
    admin_key_file: str | None = None
    # turn on POST /v1/load_lora_adapter and /v1/unload_lora_adapter (off: they answer 404); needs --lora-root, and
    # --admin-key-file when API keys are set
    allow_runtime_lora: bool = False
    # with --allow-runtime-lora: runtime adapters load only from under this folder (symlinks resolved); repeatable
    lora_roots: list[str] = field(
        default_factory=list, metadata={"flag": "--lora-root", "action": "append", "metavar": "DIR"}
    )
    max_body_bytes: int = 1 << 20  # the largest request body accepted
    max_tokens_limit: int = 2048  # largest max_tokens a request may ask
    # seconds running requests get after SIGTERM
    drain_timeout_s: float = field(default=30.0, metadata={"flag": "--drain-timeout"})
    # with --speculative draft: the draft model (alias, HF folder, .gguf or hub id) — smaller, with the same
    # tokenizer as --model (e.g. a student from `slimlm distill`); loaded with the same --dtype, --device and
    # --quantize
    draft_model: str | None = field(default=None, metadata={"metavar": "PATH"})
    # more base models to serve besides --model (alias, HF folder, .gguf file or hub id), each named NAME in the API
    # and loaded on its first request; base models pushed to --registry are served by name the same way
    models: list[str] = field(default_factory=list, metadata={"nargs": "*", "metavar": "NAME=PATH"})
    # base models resident at once: loading one more unloads the least recently used idle one (never one with a
    # running request); 0 = all stay loaded
    max_models: int = 0
    memory_budget: int = 0  # bytes of weights + KV caches of the resident bases; 0 = no limit
    # how long a request waits for its base model to load (or for room to load it) before a 503 with Retry-After;
    # the load goes on
    load_timeout_s: float = field(default=120.0, metadata={"flag": "--load-timeout", "metavar": "SECONDS"})
    engine: EngineConfig = field(default_factory=EngineConfig)

    def validate(self) -> None:
        self.engine.validate()
        if self.quantize not in (None, "auto"):
            from slimlm.quantize.schemes import check_scheme

            check_scheme(self.quantize, self.group_size)
        if self.backend == "onnxruntime" and (self.adapters or self.registry or self.quantize not in (None, "auto")):
            raise InputError(
                "the onnxruntime backend serves the exported graph alone: no --adapters, --registry or "
                "--quantize (merge and quantize at export: slimlm export onnx --adapter/--quantize)"
            )
        if self.engine.speculative == "draft" and not self.draft_model:
            raise InputError("--speculative draft needs --draft-model PATH (a smaller model with the same tokenizer)")
        if self.draft_model and self.engine.speculative != "draft":
            raise InputError("--draft-model is used by draft-model speculation: add --speculative draft")
        if self.draft_model and self.backend == "onnxruntime":
            raise InputError("--draft-model needs the torch backend (--backend torch)")
        if self.max_body_bytes < 1024 or self.max_tokens_limit < 1 or self.drain_timeout_s < 0:
            raise InputError("max_body_bytes must be >= 1024, max_tokens_limit >= 1, drain_timeout_s >= 0")
        self._validate_pool()
        self._validate_admin()

    def _validate_pool(self) -> None:
        """--models names, and the pool's limits."""
        bad = []
        if self.max_models < 0:
            bad.append(f"--max-models {self.max_models}: send at least 1 (0 = every base stays resident)")
        if self.memory_budget < 0:
            bad.append(f"--memory-budget {self.memory_budget}: send a size such as 3GiB (0 = no limit)")
        if not self.load_timeout_s > 0:  # written so that NaN fails too
            bad.append(
                f"--load-timeout {self.load_timeout_s}: send the seconds a request may wait for its model to load (> 0)"
            )
        try:
            extra = parse_model_args(self.models)
        except ValueError as e:
            bad.append(str(e))
            extra = {}
        if self.name() in extra:
            bad.append(
                f"--models {self.name()}=...: that is the name of --model already; pick another NAME (or --served-name)"
            )
        if extra and self.backend == "onnxruntime":
            bad.append("--models needs the torch backend: the onnxruntime backend serves one exported graph")
        if bad:
            raise InputError("; ".join(bad))

    def _validate_admin(self) -> None:
        """The runtime-LoRA flags come together: roots that exist, and an admin key wherever inference needs keys."""
        if not self.allow_runtime_lora:
            if self.lora_roots or self.admin_key_file:
                raise InputError(
                    "--lora-root and --admin-key-file apply to runtime LoRA loading: add "
                    "--allow-runtime-lora (or drop them)"
                )
            return
        if not self.lora_roots:
            raise InputError(
                "--allow-runtime-lora needs at least one --lora-root DIR: runtime adapters are loaded "
                "only from under these folders"
            )
        missing = [r for r in self.lora_roots if not Path(r).is_dir()]
        if missing:
            raise InputError(f"--lora-root {missing[0]}: no such folder")
        if (self.api_key_file or self.api_keys) and not self.admin_key_file:
            raise InputError(
                "--allow-runtime-lora with API keys (--api-key, SLIMLM_API_KEY or --api-key-file) "
                "needs --admin-key-file: inference keys may not load adapters"
            )

    def name(self) -> str:
        return self.served_name or Path(self.model.rstrip("/")).name.removesuffix(".gguf")


def parse_model_args(items: list[str]) -> dict[str, str]:
    """`NAME=PATH` -> {name: path} for --models (PATH: an alias, HF folder, .gguf file or hub id, as --model)."""
    from slimlm.serve.registry import RegistryError, check_name

    out: dict[str, str] = {}
    for item in items:
        name, sep, source = item.partition("=")
        if not sep or not source:
            raise InputError(f"--models {item}: send NAME=PATH (e.g. small=HuggingFaceTB/SmolLM2-135M)")
        try:
            check_name(name, "--models NAME")
        except RegistryError as e:
            raise InputError(str(e)) from None
        if name in out:
            raise InputError(f"--models: two bases are named {name!r}; give each its own NAME")
        out[name] = source
    return out


def parse_adapter_args(items: list[str]) -> dict[str, Path]:
    """`DIR` or `NAME=DIR` -> {name: folder}; every folder must hold an adapter_config.json."""
    out = {}
    for item in items:
        name, _, folder = item.rpartition("=") if "=" in item else (Path(item.rstrip("/")).name, "", item)
        path = Path(folder)
        if not (path / "adapter_config.json").is_file():
            raise InputError(f"--adapters {item}: {path} has no adapter_config.json")
        if name in out:
            raise InputError(f"--adapters: two adapters are named {name!r}; use NAME=DIR to tell them apart")
        out[name] = path
    return out


class ServedModel:
    """One base model as the server runs it: its engine (on a thread of its own), tokenizer and resident bytes."""

    def __init__(self, name: str, engine: Engine, tokenizer):
        self.name, self.engine, self.tokenizer = name, engine, tokenizer
        self.resident_bytes = engine_bytes(engine)

    @property
    def vocab_size(self) -> int:
        return self.engine.model.config.vocab_size

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def busy(self) -> bool:
        """Work queued or running: the pool never unloads a busy model."""
        return self.engine.has_work()

    def stop(self) -> None:
        self.engine.stop()


def engine_bytes(engine: Engine) -> int:
    """Bytes of the tensors an engine holds: the model's parameters and buffers (the LoRA slots among them; shared
    storage counted once), the fused decode step's tensors, the slot and prefix KV caches, and the draft model's.
    An onnxruntime model's weights live in its session, outside torch: only its caches are counted."""
    tensors = _module_tensors(engine.model) + engine.cache.k + engine.cache.v
    if engine.fused is not None:
        tensors += [t for t in engine.fused.layer_tensors if isinstance(t, torch.Tensor)]
    if engine.prefix_cache is not None:
        tensors += engine.prefix_cache.k + engine.prefix_cache.v
    if engine.draft is not None:
        tensors += _module_tensors(engine.draft.model) + engine.draft.cache.k + engine.draft.cache.v
    storages = {}
    for t in tensors:
        if t.device.type != "meta":
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def _module_tensors(model) -> list[torch.Tensor]:
    if not isinstance(model, torch.nn.Module):  # an onnxruntime model
        return []
    return list(model.parameters()) + list(model.buffers())


def load_served_model(
    config: ServeConfig, source: str, name: str, metrics: ServeMetrics | None, draft: bool = True, tokenizer=None
) -> ServedModel:
    """Load the base at `source` with the server's dtype, quantization and engine settings, and start its engine.
    draft=False: no draft model (only the default base has one; draft speculation is off for the others).
    tokenizer: the base's tokenizer if the server already built it (kept across unloads)."""
    from slimlm.llm import load

    quantize, dtype = resolve_auto_quantize(config)
    kw = {} if config.backend == "onnxruntime" else {"tokenizer": tokenizer}
    llm = load(
        source,
        dtype=dtype,
        device=config.device,
        quantize=quantize,
        group_size=config.group_size,
        backend=config.backend,
        draft_model=config.draft_model if draft else None,
        **kw,
    )
    engine_config = config.engine
    if config.backend == "onnxruntime":  # no LoRA slots in an exported graph
        engine_config = dataclasses.replace(engine_config, max_loras=0)
    if not draft and engine_config.speculative == "draft":
        engine_config = dataclasses.replace(engine_config, speculative=None, draft_vocab=0)
    engine = Engine(llm.model, llm.tokenizer, engine_config, metrics, draft_model=llm.draft_model).start()
    log_engine_choice(engine, quantize, name)
    return ServedModel(name, engine, llm.tokenizer)


def weights_on_disk(source: str) -> int:
    """Bytes of a model's weight files (0 when `source` is an alias or hub id): the pool's estimate of a base it
    has not loaded yet (an upper bound once --quantize int8 shrinks fp32/bf16 weights)."""
    path = Path(source)
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        return 0
    return sum(
        f.stat().st_size
        for f in path.iterdir()
        if f.suffix in (".safetensors", ".bin", ".gguf", ".pt", ".pth") and f.is_file()
    )


class ServerState:
    def __init__(self, config: ServeConfig):
        config.validate()
        self.config, self.served_name = config, config.name()
        self.static_adapters = parse_adapter_args(config.adapters)
        from_file = _read_keys(config.api_key_file, "--api-key-file") if config.api_key_file else []
        self.api_keys = list(dict.fromkeys(from_file + [k.strip() for k in config.api_keys if k.strip()]))
        self.admin_keys = _read_keys(config.admin_key_file, "--admin-key-file") if config.admin_key_file else []
        if set(self.admin_keys) & set(self.api_keys):
            raise InputError(
                "--admin-key-file and the API keys (--api-key, SLIMLM_API_KEY or --api-key-file) "
                "share a key: admin keys must differ"
            )
        # Resolved once: a request's path is checked against the real folders (symlinks followed), see add_adapter.
        self.lora_roots = [Path(r).resolve() for r in config.lora_roots]
        self.operator_adapters = frozenset(self.static_adapters)  # from --adapters: never unloaded over HTTP
        self.registry = None
        if config.registry:
            from slimlm.serve.registry import Registry

            self.registry = Registry(Path(config.registry))
        # Every base this server may run: {pool key: source}. Registry bases join as requests name them (key
        # NAME@VERSION, so that a moved head is a different model).
        self.bases: dict[str, str] = {self.served_name: config.model, **parse_model_args(config.models)}
        self._sizes: dict[str, int] = {}  # resident bytes measured at each base's last load: the pool's estimates
        # Each base's tokenizer, built once and kept across unloads (a few MB each): building one holds the GIL for
        # ~0.2 s, a stall of every other base's streams if it happened on each lazy load.
        self._tokenizers: dict[str, object] = {}
        self.metrics: ServeMetrics | None = ServeMetrics(self.served_name)
        self.pool = ModelPool(self._load_base, self._estimate, config.max_models, config.memory_budget, self.metrics)
        self.ready = self.draining = False
        self.load_error: str | None = None
        self._checked: dict[tuple, str | None] = {}  # registry versions hashed: None = intact, else the error

    def load(self) -> None:
        """Load the default base and start its engine (call on a background thread); errors land in load_error."""
        try:
            t0 = time.perf_counter()
            model = self._load_base(self.served_name)
            if self.config.memory_budget and model.resident_bytes > self.config.memory_budget:
                model.stop()
                raise InputError(
                    f"--memory-budget {self.config.memory_budget / 2**20:.0f} MiB is smaller than "
                    f"{self.served_name} alone ({model.resident_bytes / 2**20:.0f} MiB of weights and "
                    "KV cache): raise --memory-budget, or lower --max-batch / --max-seq-len"
                )
            self.pool.add(self.served_name, model, time.perf_counter() - t0)
            self._build_tokenizers()
            self.ready = True
        except Exception as e:  # surfaced by /ready and the server log
            self.load_error = f"{type(e).__name__}: {e}"
            raise

    def _load_base(self, key: str) -> ServedModel:
        """Load base `key` (the pool calls this on a loader thread)."""
        default = key == self.served_name
        metrics = None if self.metrics is None else self.metrics if default else self.metrics.for_model(key)
        model = load_served_model(
            self.config, self.bases[key], key, metrics, draft=default, tokenizer=self._tokenizers.get(key)
        )
        self._sizes[key] = model.resident_bytes
        self._tokenizers[key] = model.tokenizer
        return model

    def _build_tokenizers(self) -> None:
        """At start-up, before /ready: the tokenizers of the --models bases that are local folders (the others are
        kept from their first load), so that a lazy load does not build one while other bases stream."""
        if self.config.backend == "onnxruntime":
            return
        from slimlm.tokenizer import Tokenizer

        for key, source in self.bases.items():
            if key not in self._tokenizers and Path(source).is_dir():
                try:
                    self._tokenizers[key] = Tokenizer.from_pretrained(source)
                except Exception:  # noqa: BLE001 - a broken base fails at its first request, with its own error
                    continue

    def _estimate(self, key: str) -> int:
        return self._sizes.get(key) or weights_on_disk(self.bases[key])

    def load_in_background(self) -> threading.Thread:
        t = threading.Thread(target=self.load, name="slimlm-load", daemon=True)
        t.start()
        return t

    def close(self) -> None:
        """Stop every engine, after the loads under way (at server exit)."""
        self.pool.close()

    def engines(self) -> list[Engine]:
        """The engines of the resident bases."""
        return [m.engine for m in self.pool.resident().values()]

    def not_ready_reason(self) -> str:
        if self.draining:
            return "the server is shutting down"
        return f"model failed to load: {self.load_error}" if self.load_error else "the model is still loading"

    @property
    def default_model(self) -> ServedModel | None:
        """The default base (--model) if it is resident."""
        return self.pool.get(self.served_name)

    @property
    def engine(self) -> Engine | None:
        model = self.default_model
        return model.engine if model is not None else None

    @property
    def tokenizer(self):
        model = self.default_model
        return model.tokenizer if model is not None else None

    @property
    def vocab_size(self) -> int:
        return self.engine.model.config.vocab_size

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def resolve_adapter(self, model: str) -> AdapterRef | None:
        """The adapter a request's `model` field names (None for a base); see resolve."""
        return self.resolve(model)[1]

    def resolve(self, model: str) -> tuple[str, AdapterRef | None]:
        """(the base's pool key, the adapter or None) that a request's `model` field names; APIError 404 if it names
        nothing, 400 if it names a registry version that cannot be served (corrupt, not an adapter)."""
        if ":" in model:
            base, name = model.split(":", 1)
            key = self._base_key(base)
            if key is None:
                raise self._unknown(model, f"no base model {base!r}; this server's bases: {self._base_names()}")
            return key, (None if name == base else self._adapter(key, model, name))
        key = self._base_key(model)
        if key is not None:
            return key, None
        return self.served_name, self._adapter(self.served_name, model, model)

    def _base_key(self, name: str) -> str | None:
        """The pool key of base `name` (--model, --models or a registry model), or None if it names no base."""
        if name in self.bases and "@" not in name:
            return name
        if self.registry is None:
            return None
        from slimlm.serve.registry import RegistryError

        try:
            entry = self.registry.resolve(name)
            if entry.kind == "adapter":
                return None
            entry = self.registry.resolve_good(name, self._checked)
        except RegistryError:
            return None  # not a registry name: an adapter lookup says what is wrong
        self.bases.setdefault(entry.ref, str(entry.path))
        return entry.ref

    def _base_names(self) -> str:
        return ", ".join(n for n in self.bases if "@" not in n)

    def _adapter(self, key: str, model: str, name: str) -> AdapterRef:
        """The adapter `name` on base `key`: --adapters and runtime adapters belong to the default base; registry
        adapters run on any base (a LoRA of other shapes is refused when it loads: the request's 400)."""
        if name in self.static_adapters:
            if key != self.served_name:
                raise self._unknown(model, f"adapter {name!r} is served with base {self.served_name!r} only")
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
                raise RegistryError(
                    f"{entry.ref} is a {entry.kind}, not an adapter; name a base model on its own "
                    f"(model: {entry.name!r})"
                )
            ref_key = (entry.name, entry.version)
        except RegistryError as e:  # it exists but cannot be served (corrupt, not an adapter): the client's 400
            raise APIError(400, f"model {model!r} cannot be served: {e}", param="model", code="adapter_error") from None
        return AdapterRef(ref_key, entry.path, entry.ref)

    def add_adapter(self, name: str, folder: str) -> None:
        """Serve the LoRA adapter in `folder` as `name` from now on (checked now, loaded on first use).

        Only for --allow-runtime-lora (the route answers 404 otherwise); `folder` must resolve to a folder under a
        --lora-root, and `name` may not shadow an adapter the operator configured (--adapters or the registry)."""
        from slimlm.peft import read_adapter_config
        from slimlm.peft.common import PeftError
        from slimlm.serve.registry import RegistryError, check_name

        if name in self.operator_adapters or (self.registry is not None and name in self.registry.names()):
            raise APIError(
                403,
                f"adapter {name!r} is configured by the operator and cannot be replaced over HTTP",
                type="permission_error",
                param="lora_name",
                code="operator_adapter",
            )
        path = self.allowed_lora_path(folder)  # before anything reads the path
        try:
            check_name(name, "adapter name")
            method, cfg, _ = read_adapter_config(path)
        except (RegistryError, PeftError, OSError) as e:
            raise APIError(400, str(e), param="lora_path") from None
        if method != "lora" or cfg.use_dora or cfg.r > self.config.engine.max_lora_rank:
            why = f"a {method} adapter" if method != "lora" else "DoRA" if cfg.use_dora else f"rank {cfg.r}"
            raise APIError(
                400,
                f"cannot serve {why}: this server serves LoRA adapters up to rank {self.config.engine.max_lora_rank}",
                param="lora_path",
            )
        if name in self.static_adapters or name in self.bases:
            raise APIError(
                400, f"an adapter or base named {name!r} is already served; unload it first", param="lora_name"
            )
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
            raise APIError(
                403,
                "lora_path is outside the folders this server loads adapters from (--lora-root)",
                type="permission_error",
                param="lora_path",
                code="path_not_allowed",
            )
        return path

    def remove_adapter(self, name: str) -> None:
        """Stop serving the runtime adapter `name`; APIError 403 for the operator's (--adapters, the registry)."""
        if name in self.operator_adapters or (self.registry is not None and name in self.registry.names()):
            raise APIError(
                403,
                f"adapter {name!r} is configured by the operator and cannot be unloaded over HTTP",
                type="permission_error",
                param="lora_name",
                code="operator_adapter",
            )
        if name not in self.static_adapters:
            raise APIError(404, f"no adapter named {name!r} was loaded", param="lora_name", code="not_found")
        del self.static_adapters[name]
        if self.engine is not None:  # else the default base is unloaded, and its LoRA slots with it
            self.engine.unload_adapter(("static", name))

    def _unknown(self, model: str, why: str) -> APIError:
        # OpenAI's answer for a model it does not have: 404, invalid_request_error, code model_not_found.
        return APIError(
            404,
            f"The model `{model}` does not exist ({why}). GET /v1/models lists what this server serves",
            param="model",
            code="model_not_found",
        )

    def list_models(self) -> list[dict]:
        """OpenAI's model cards: every base (with `status` loaded | loading | unloaded | failed, and `loaded`), then
        the default base's adapters."""
        base = self.served_name

        def card(id_, parent=None):
            return {
                "id": id_,
                "object": "model",
                "created": 0,
                "owned_by": "slimlm",
                "root": id_ if parent is None else parent,
                "parent": parent,
            }

        out = [self._base_card(card(name), name) for name in self.bases if "@" not in name]
        if self.registry is not None:
            for name in self.registry.names():
                version = self.registry.head(name)
                head = [e for e in self.registry.entries(name) if e.version == version]
                if head and head[0].kind != "adapter":
                    out.append({**self._base_card(card(name), head[0].ref), "version": head[0].version})
        out += [card(f"{base}:{n}", base) for n in sorted(self.static_adapters)]
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

    def _base_card(self, card: dict, key: str) -> dict:
        status = self.pool.status(key)
        model = self.pool.get(key)
        extra = {"resident_bytes": model.resident_bytes} if model is not None else {}
        return {**card, "status": status, "loaded": status == "loaded", **extra}


def _read_keys(path: str, flag: str) -> list[str]:
    keys = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not keys:
        raise InputError(f"{flag} {path} holds no keys (one per line)")
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


def log_engine_choice(engine: Engine, quantize: str | None = None, model: str | None = None) -> None:
    """One line per engine started with what it picked (dtype, batch, context, cache sizes, speculation)."""
    c = engine.config
    log.info(
        json.dumps(
            {
                "event": "engine",
                **({"model": model} if model else {}),
                "device": str(engine.model.device),
                "dtype": str(engine.model.dtype).removeprefix("torch."),
                "quantize": quantize,
                "fused_decode": engine.fused is not None,
                "threads": torch.get_num_threads(),
                "max_batch": c.max_batch,
                "max_seq_len": engine.max_seq_len,
                "kv_cache_mib": round(engine.cache.bytes() / 2**20, 1),
                "kv_cache_dtype": str(engine.cache.k[0].dtype).removeprefix("torch."),
                "prefix_cache_tokens": c.prefix_cache_tokens if c.prefix_cache else 0,
                "speculative": c.speculative,
                "num_speculative_tokens": c.num_speculative_tokens if c.speculative else 0,
                **(
                    {}
                    if engine.draft is None
                    else {
                        "draft_fused_decode": engine.draft.fused is not None,
                        "draft_kv_cache_mib": round(engine.draft.cache.bytes() / 2**20, 1),
                    }
                ),
                "max_loras": c.max_loras,
            }
        )
    )
