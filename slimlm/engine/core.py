"""The engine core: one scheduler, cache and sampler behind every front (LLM.generate, `slimlm serve`, batch jobs).

Requests join and leave the running batch at token boundaries (continuous batching). Each `step()`:
  1. runs work other threads handed over, drops cancelled requests (their slot is free for this very step),
  2. admits waiting requests in arrival order while a cache slot (and, for an adapter, a LoRA slot) is free,
  3. runs at most `prefill_chunk` prompt tokens, oldest request first (one forward per request; with int8 weights
     on a CPU, rows of the fused step instead), each request first taking the longest cached prefix of its prompt
     from the prefix cache (engine/prefix_cache.py) — so a long prompt delays the running streams by one bounded
     chunk per step, not by its whole length,
  4. decodes every request past its prompt in one forward over cache slots [0, n), each row with its own position,
     adapter and sampling parameters; with speculative decoding on, rows that have a guess (engine/speculative.py:
     prompt lookup, or engine/draft.py: a draft model) verify up to k guessed tokens in the same forward and may
     advance several tokens.
A request with SamplingParams.structured (a JSON schema, regex, grammar or choice: engine/structured.py) carries a
grammar matcher: its row's logits are masked to the tokens the grammar allows before sampling (both decode paths and
prefill share `_sample_rows`), each emitted token advances the matcher, and the request ends ("stop") once the
grammar is complete and a stop token taken. Structured rows do not speculate (their guesses would need the matcher
to check and roll back); the other rows of the batch do, and pay nothing for the grammar.
Two fronts drive it. Online (the HTTP server): `start()` runs `step()` on an engine thread; callers `submit` a
Request and receive `Output`s through its `emit` callback on that thread, and must only hand them over (e.g.
loop.call_soon_threadsafe). Offline (LLM.generate, eval): `generate(requests)` steps the engine in the calling
thread and yields (request, Output) pairs as they are produced.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slimlm.engine.cache import KV_CACHE_DTYPES, SlotKVCache, kv_cache_dtype
from slimlm.engine.draft import DraftModel, check_draft
from slimlm.engine.fused_decode import FusedDecode
from slimlm.engine.multi_lora import AdapterLRU, LoraSlots, SlotsBusy
from slimlm.engine.prefix_cache import PrefixCache
from slimlm.engine.sampling import SamplingParams, TokenCounts, sample_batch
from slimlm.engine.speculative import ngram_propose, verify_greedy, verify_sampled
from slimlm.engine.structured import GrammarCompiler, GrammarState, StructuredOutput, compiler_for, mask_logits_
from slimlm.errors import InputError
from slimlm.model import Transformer
from slimlm.protocol import CausalLM
from slimlm.tokenizer import StopStringText, StreamDecoder, Tokenizer

log = logging.getLogger("slimlm.serve")

SPECULATIVE_METHODS = ("ngram", "draft")
NAN_LOGITS = "the model produced NaN/Inf logits for this request (a numerical overflow, or broken weights)"


@dataclass
class EngineConfig:
    max_batch: int = 8  # cache slots = sequences decoded together; 0 = pick for the device (auto_config)
    max_seq_len: int = 2048  # prompt + output tokens per sequence (capped by the model's context); 0 = auto
    max_queue: int = 64  # waiting requests beyond this are refused (HTTP 429)
    prefill_chunk: int = 256  # prompt tokens per engine step
    max_loras: int = 4  # adapters resident at once (LRU); 0 = no LoRA support
    max_lora_rank: int = 64  # the largest LoRA rank a served adapter may have
    # reuse the KV of prompt prefixes seen before, e.g. a shared system prompt or chat history (automatic prefix
    # caching; hit rate in /metrics)
    prefix_cache: bool = field(default=True, metadata={"negatable": True})
    prefix_cache_tokens: int = 8192  # pool size in tokens (its memory: config.kv_cache_bytes_per_token each)
    prefix_block: int = 16  # tokens per cached block: prefixes are reused in whole blocks
    # speculative decoding, guesses verified in one forward (greedy output unchanged, sampled output keeps its
    # distribution): ngram = prompt lookup (guesses copied from the context; helps when outputs repeat the input);
    # draft = a smaller model's greedy guesses (Engine(draft_model=...); slimlm serve: --draft-model); None: off
    speculative: str | None = field(default=None, metadata={"choices": SPECULATIVE_METHODS})
    num_speculative_tokens: int = 4  # k: guesses verified per step (ngram and draft)
    draft_vocab: int = 0  # speculative="draft": guess among token ids < N only (the draft's head cut; 0 = all)
    ngram_max: int = 3  # prompt lookup matches the last ngram_max .. ngram_min tokens
    ngram_min: int = 1
    fused_decode: bool = True  # CPU fp32: decode steps run all layers in one C++ call where the model qualifies
    # element type of the KV cache: auto = fp16 for quantized weights with fp32 activations on a CPU (half the
    # memory and the bytes each decode step reads, as llama.cpp's default; keys and values rounded to fp16), else
    # the model's dtype; fp32 keeps them exact
    kv_cache_dtype: str = field(default="auto", metadata={"choices": ("auto", *KV_CACHE_DTYPES)})
    request_timeout_s: float = 0.0  # a request older than this (queue time included) ends with an error; 0 = none

    def validate(self) -> None:
        bad = [
            f"{k} must be >= 0 (0 = auto), got {getattr(self, k)}"
            for k in ("max_batch", "max_seq_len")
            if getattr(self, k) < 0
        ]
        bad += [
            f"{k} must be >= 1, got {getattr(self, k)}"
            for k in (
                "max_queue",
                "prefill_chunk",
                "max_lora_rank",
                "prefix_block",
                "num_speculative_tokens",
                "ngram_min",
            )
            if getattr(self, k) < 1
        ]
        if self.draft_vocab < 0:
            bad.append(f"draft_vocab must be >= 0 (0 = the draft's whole vocabulary), got {self.draft_vocab}")
        if self.draft_vocab and self.speculative != "draft":
            bad.append(
                'draft_vocab applies to draft-model speculation: set speculative="draft" (slimlm serve: '
                "--speculative draft) or draft_vocab=0"
            )
        if self.max_loras < 0:
            bad.append(f"max_loras must be >= 0, got {self.max_loras}")
        if self.prefix_cache and self.prefix_cache_tokens < self.prefix_block:
            bad.append(
                f"prefix_cache_tokens must be >= prefix_block ({self.prefix_block}), got "
                f"{self.prefix_cache_tokens}; or turn the prefix cache off"
            )
        if self.speculative is not None and self.speculative not in SPECULATIVE_METHODS:
            bad.append(f"speculative must be one of {', '.join(SPECULATIVE_METHODS)} or None, got {self.speculative!r}")
        if self.kv_cache_dtype != "auto" and self.kv_cache_dtype not in KV_CACHE_DTYPES:
            bad.append(
                f"kv_cache_dtype must be auto or one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}"
            )
        if self.ngram_max < self.ngram_min:
            bad.append(f"ngram_max ({self.ngram_max}) must be >= ngram_min ({self.ngram_min})")
        if not self.request_timeout_s >= 0:  # written so that NaN fails too
            bad.append(f"request_timeout_s must be >= 0 (0 = no limit), got {self.request_timeout_s}")
        if bad:
            raise InputError("invalid engine config: " + "; ".join(bad))


def auto_config(config: EngineConfig, model) -> EngineConfig:
    """Fill max_batch / max_seq_len left at 0 for this model and device.

    Batch: 16 slots on a CPU (decode of a small model is bound by reading the weights, so 16 rows cost little more
    than one), 64 on a GPU. Context: the model's, at most 4096, shrunk until the KV cache (slots x context x
    bytes per token) plus the prefix cache take at most a quarter of the free memory.
    """
    import dataclasses

    gpu = model.device.type == "cuda"
    batch = config.max_batch or (64 if gpu else 16)
    seq = config.max_seq_len or min(model.config.max_seq_len, 4096)
    if not config.max_seq_len:
        dtype = kv_cache_dtype(config.kv_cache_dtype, model)
        per_token = model.config.kv_cache_bytes_per_token(torch.tensor([], dtype=dtype).element_size())
        free = torch.cuda.mem_get_info(model.device)[0] if gpu else _available_ram()
        prefix = config.prefix_cache_tokens if config.prefix_cache else 0
        while seq > 256 and (batch * seq + prefix) * per_token > free / 4:
            seq //= 2
    return dataclasses.replace(config, max_batch=batch, max_seq_len=seq)


def _available_ram() -> int:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def _keep_allowed_(tokens: torch.Tensor, masked: torch.Tensor, structured: list[bool]) -> None:
    """Replace a structured row's token that its grammar masked out by the row's best allowed one, in place.

    tokens [B]; masked [B, V] the grammar-masked logits the tokens were sampled from. Sampling never picks a masked
    token with sane settings, but extreme ones can turn a row's numbers into inf/NaN (a temperature near 0 with
    huge logits, a repetition penalty of 1e-300), and then the pick is arbitrary: the output must still parse."""
    rows = torch.tensor([i for i, s in enumerate(structured) if s], device=tokens.device)
    bad = rows[masked[rows, tokens[rows]] == float("-inf")]
    if len(bad):
        tokens[bad] = masked[bad].argmax(dim=-1)


class QueueFull(RuntimeError):
    """The waiting queue is at max_queue; retry later (HTTP 429)."""


class NotAccepting(RuntimeError):
    """The engine is draining or stopped (HTTP 503)."""


class CacheAllocationError(InputError):
    """The KV cache does not fit in memory: a user-fixable error (`slimlm serve` prints it as one line, exit 2)."""


@dataclass
class AdapterRef:
    """Which LoRA adapter a request uses: a cache key (name, version) and the folder to load it from."""

    key: tuple
    folder: Path
    name: str = ""


@dataclass
class Output:
    """What a request gets after each step: new text and tokens, and at the end the finish reason and usage."""

    text: str
    token_ids: list[int]
    logprobs: list[dict] = field(default_factory=list)  # per new token: {"token", "logprob", "top": [(id, lp)]}
    finish_reason: str | None = None  # stop | length | abort | error
    error: str | None = None
    error_type: str | None = None  # with an error: "adapter" (the request's adapter), "timeout" or "internal"
    prompt_tokens: int = 0
    completion_tokens: int = 0


_ids = itertools.count()


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter: AdapterRef | None = None
    emit: Callable[[Output], None] = lambda out: None
    request_id: str = ""
    # Engine state.
    slot: int | None = None  # KV cache slot
    lora_slot: int | None = None
    decoder: StreamDecoder | None = None  # detokenizer and stop-string matcher, made at submit
    text: StopStringText | None = None
    generator: torch.Generator | None = None
    grammar: GrammarState | None = None  # with params.structured: the matcher of this sequence, made at submit
    n_prefilled: int = 0  # prompt tokens in the cache
    n_cached: int = 0  # of those, taken from the prefix cache
    pending: int | None = None  # last sampled token, not yet in the cache
    output_ids: list[int] = field(default_factory=list)  # every sampled token, the pending one included
    cancelled: bool = False
    finish_reason: str | None = None
    t_arrival: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    t_last: float | None = None
    seq: int = field(default_factory=lambda: next(_ids))

    def __post_init__(self) -> None:
        self.request_id = self.request_id or f"req-{self.seq}"

    @property
    def max_tokens(self) -> int:
        return self.params.max_new_tokens

    @property
    def n_generated(self) -> int:
        return len(self.output_ids)

    @property
    def position(self) -> int:
        """Where the pending token goes in the cache (= tokens already in it)."""
        return len(self.prompt_ids) + len(self.output_ids) - 1

    @property
    def adapter_key(self) -> tuple | None:
        return None if self.adapter is None else self.adapter.key


class Engine:
    def __init__(
        self,
        model: CausalLM,
        tokenizer: Tokenizer | None,
        config: EngineConfig | None = None,
        metrics=None,
        on_finish: Callable[[Request], None] | None = None,
        draft_model: Transformer | None = None,
    ):
        """tokenizer None: token ids only (Output.text stays empty, no stop tokens or strings; eval/speed.py).
        draft_model: the smaller model (same tokenizer) that speculative="draft" guesses with (engine/draft.py)."""
        self.config = config or EngineConfig()
        self.config.validate()
        check_draft(self.config.speculative, model, draft_model)
        self.config = auto_config(self.config, model)
        self.model, self.tokenizer, self.metrics, self.on_finish = model.eval(), tokenizer, metrics, on_finish
        self.max_seq_len = min(self.config.max_seq_len, model.config.max_seq_len)
        self.cache, self.prefix_cache = self._allocate_caches(model)
        self.lora = (
            LoraSlots.attach(model, self.config.max_loras, self.config.max_lora_rank) if self.config.max_loras else None
        )
        self.lru = AdapterLRU(self.config.max_loras) if self.lora else None
        # After the LoRA slots are attached, so that it reads their base layers.
        self.fused = FusedDecode.for_model(model) if self.config.fused_decode else None
        self.counts = TokenCounts(self.config.max_batch, model.config.vocab_size, device=model.device)
        self.stop_ids = set(tokenizer.stop_token_ids) if tokenizer is not None else set()
        self._stop_tensor = torch.tensor(sorted(self.stop_ids), dtype=torch.long, device=model.device)
        self.spec_proposed = self.spec_accepted = 0  # speculative tokens guessed / kept
        self.draft = (
            None
            if draft_model is None
            else DraftModel(
                draft_model,
                self.config.max_batch,
                self.max_seq_len,
                self.config.fused_decode,
                self.config.prefill_chunk,
                self.config.kv_cache_dtype,
                self.config.draft_vocab,
            )
        )
        self._grammars: GrammarCompiler | None = None  # built at the first structured request
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}  # slot -> request
        self.accepting = True
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._ops: deque[Callable[[], None]] = deque()  # work other threads hand to the engine thread

    def _allocate_caches(self, model: CausalLM) -> tuple[SlotKVCache, PrefixCache | None]:
        """The slot KV cache and the prefix cache; CacheAllocationError naming the bytes and the knobs if they do
        not fit (a bare allocator error says neither)."""
        c = self.config
        try:
            cache = SlotKVCache.for_model(model, c.max_batch, self.max_seq_len, c.kv_cache_dtype)
            prefix = (
                PrefixCache(cache, c.prefix_cache_tokens // c.prefix_block, c.prefix_block) if c.prefix_cache else None
            )
        except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
            dtype = kv_cache_dtype(c.kv_cache_dtype, model)
            size = torch.tensor([], dtype=dtype).element_size()
            per_token = model.config.kv_cache_bytes_per_token(size)
            tokens = c.max_batch * self.max_seq_len + (c.prefix_cache_tokens if c.prefix_cache else 0)
            pool = f" + {c.prefix_cache_tokens} prefix-cache tokens" if c.prefix_cache else ""
            knobs = (
                "lower --max-batch or --max-seq-len"
                + (", use --kv-cache-dtype fp16" if size > 2 else "")
                + (", or shrink --prefix-cache-tokens" if c.prefix_cache else "")
            )
            why = str(e).splitlines()[0][:200] if str(e) else "out of memory"
            raise CacheAllocationError(
                f"cannot allocate the KV cache on {model.device}: {tokens * per_token} bytes "
                f"({tokens * per_token / 2**30:.2f} GiB: {c.max_batch} slots x {self.max_seq_len} tokens{pool}, "
                f"{per_token} bytes per token in {str(dtype).removeprefix('torch.')}); {knobs} "
                f"({type(e).__name__}: {why})"
            ) from None
        return cache, prefix

    # ---- called from other threads ----
    def submit(self, req: Request, queue_limit: bool = True) -> None:
        """Queue a request; raises ValueError (does not fit), QueueFull or NotAccepting."""
        self._check(req)
        with self._lock:
            if not self.accepting:
                raise NotAccepting("the server is shutting down")
            if queue_limit and len(self.waiting) >= self.config.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (max_queue={self.config.max_queue})")
            self.waiting.append(req)
        self._wake.set()

    def _check(self, req: Request) -> None:
        need = len(req.prompt_ids) + req.max_tokens
        if not req.prompt_ids:
            raise InputError("the prompt is empty")
        if need > self.max_seq_len:
            raise InputError(
                f"prompt ({len(req.prompt_ids)} tokens) + max_tokens ({req.max_tokens}) = {need} exceeds "
                f"the context of {self.max_seq_len} tokens; shorten the prompt or lower max_tokens"
            )
        if req.adapter is not None and self.lora is None:
            raise InputError("this server runs without LoRA support (max_loras=0)")
        if self.tokenizer is None and req.params.stop:
            raise InputError("stop strings need a tokenizer; this engine runs token ids only")
        req.text = StopStringText(req.params.stop)
        req.decoder = StreamDecoder(self.tokenizer) if self.tokenizer is not None else None
        req.generator = req.params.make_generator(self.model.device)  # None unless seeded
        if req.params.structured is not None:
            req.grammar = self.grammar_compiler().state(req.params.structured)  # a cache hit once a front checked it

    def grammar_compiler(self) -> GrammarCompiler:
        """The compiler of structured outputs for this engine's tokenizer and vocabulary (built once)."""
        if self.tokenizer is None:
            raise InputError("structured output needs a tokenizer; this engine runs token ids only")
        if self._grammars is None:
            self._grammars = compiler_for(self.tokenizer, self.model.config.vocab_size, sorted(self.stop_ids))
        return self._grammars

    def check_structured(self, spec: StructuredOutput) -> None:
        """Compile spec now (cached for the request that follows); StructuredOutputError naming its parameter if
        it cannot be. Thread-safe: fronts call it off the engine thread, before queueing."""
        self.grammar_compiler().compile(spec)

    def cancel(self, req: Request) -> None:
        """Abort a request (client gone); its cache slot is freed at the start of the next step."""
        req.cancelled = True
        self._wake.set()

    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="slimlm-engine", daemon=True)
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        """Its engine thread is alive (started, not stopped, not crashed): requests submitted now get decoded."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self._stop, self.accepting = True, False
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def unload_adapter(self, key: tuple) -> None:
        """Free the LoRA slot of adapter `key` before the next step (if no running request uses it)."""

        def unload() -> None:
            if self.lru is not None and self.lru.slot_of(key) is not None and self.lru.pins(key) == 0:
                self.lora.clear(self.lru.unload(key))

        self._ops.append(unload)
        self._wake.set()

    def prompt_logprobs(self, prompt_ids: list[int], adapter: AdapterRef | None, top: int) -> Future:
        """A Future of the prompt's own logprobs, one entry per prompt token as Output.logprobs has them
        ({"token", "logprob", "top": [(id, lp)]}); the first token's logprob and top are None (nothing precedes it).

        One plain forward of the model (with the request's adapter) over the whole prompt, run on the engine thread
        between steps, so that it never overlaps a step that uses the same weights, LoRA slots or LRU. It bypasses
        the KV cache: prompt scoring (echo + logprobs) is rare and correctness matters more than reuse; the streams
        running meanwhile wait one prompt-long forward. Raw logits: sampling settings do not apply (as vLLM's
        prompt_logprobs). On no engine thread (offline), it runs at once."""
        future: Future = Future()

        def op() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(self._score(prompt_ids, adapter, top))
            except Exception as e:  # noqa: BLE001 — the caller's error (a bad adapter, SlotsBusy), not the engine's
                future.set_exception(e)

        if self._thread is None:
            op()
        else:
            self._ops.append(op)
            self._wake.set()
        return future

    @torch.no_grad()
    def _score(self, prompt_ids: list[int], adapter: AdapterRef | None, top: int) -> list[dict]:
        slot = None
        if adapter is not None:
            if self.lora is None:
                raise InputError("this server runs without LoRA support (max_loras=0)")
            slot = self.lru.acquire(adapter.key, lambda s, f=adapter.folder: self.lora.load(s, f))
        try:
            rows = self.lora.select([slot]) if self.lora is not None else contextlib.nullcontext()
            with rows:
                ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.model.device)  # [1, T]
                logprobs = self.model(ids).float()[0, :-1].log_softmax(-1)  # [T-1, V]: token t+1 given 0..t
        finally:
            if adapter is not None:
                self.lru.release(adapter.key)
        nxt = torch.tensor(prompt_ids[1:], dtype=torch.long, device=logprobs.device)
        chosen = logprobs.gather(-1, nxt[:, None])[:, 0].tolist()  # [T-1]
        top_lp, top_ids = logprobs.topk(top, dim=-1) if top else (None, None)  # [T-1, top]
        out = [{"token": prompt_ids[0], "logprob": None, "top": None}]
        for i, tok in enumerate(prompt_ids[1:]):
            pairs = list(zip(top_ids[i].tolist(), top_lp[i].tolist())) if top else []
            out.append({"token": tok, "logprob": chosen[i], "top": pairs})
        return out

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._ops)

    def _loop(self) -> None:
        while not self._stop:
            if not self.has_work():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                self.step()
            except Exception:  # a bug must not hang every client: fail what is running, keep serving
                log.exception("engine step failed; aborting the running requests")
                for req in list(self.running.values()):
                    self._finish(
                        req, "error", error="internal error in the engine (see the server log)", error_type="internal"
                    )

    # ---- the offline front ----
    def generate(self, requests: Iterable[Request]) -> Iterator[tuple[Request, Output]]:
        """Run requests to completion in this thread (no engine thread may be running); yield (request, output)
        as outputs are produced. Every request is checked before any runs; the queue limit does not apply."""
        if self._thread is not None:
            raise RuntimeError("this engine runs on its own thread; submit requests to it instead")
        requests = list(requests)
        outputs: deque[tuple[Request, Output]] = deque()
        for req in requests:
            self._check(req)
            req.emit = (lambda r, own: lambda out: (own(out), outputs.append((r, out))))(req, req.emit)
        for req in requests:
            self.submit(req, queue_limit=False)
        try:
            while any(r.finish_reason is None for r in requests):
                self.step()
                while outputs:
                    yield outputs.popleft()
        finally:  # a caller that stops early (break, an exception) leaves no request behind in the engine
            for req in requests:
                if req.finish_reason is None:
                    self._finish(req, "abort")

    # ---- the engine thread ----
    @torch.no_grad()
    def step(self) -> None:
        """One scheduling round: reap cancelled, admit, one prefill chunk, one decode step for every stream."""
        while self._ops:
            self._ops.popleft()()
        self._reap()
        self._admit()
        budget = self.config.prefill_chunk  # prompt tokens per step, over one or more requests (oldest first)
        for req in sorted((r for r in self.running.values() if r.n_prefilled < len(r.prompt_ids)), key=lambda r: r.seq):
            if budget <= 0:
                break
            budget -= self._prefill_chunk(req, budget)
        decoding = [r for r in self.running.values() if r.pending is not None]
        if decoding:
            self._decode(decoding)
        self._report()

    def _reap(self) -> None:
        """Finish cancelled requests, and those past request_timeout_s (their slots are free for this step)."""
        timeout, now = self.config.request_timeout_s, time.perf_counter()
        for req in list(self.waiting) + list(self.running.values()):
            if req.cancelled:
                self._finish(req, "abort")
            elif timeout and now - req.t_arrival > timeout:
                self._finish(
                    req,
                    "error",
                    error=f"the request took longer than the server's request timeout ({timeout:g} s)",
                    error_type="timeout",
                )

    def _admit(self) -> None:
        while self.waiting and self.cache.free:
            req = self.waiting[0]
            if req.adapter is not None:
                try:
                    req.lora_slot = self.lru.acquire(
                        req.adapter.key, lambda s, f=req.adapter.folder: self.lora.load(s, f)
                    )
                except SlotsBusy:  # every LoRA slot is pinned by running requests: wait for one to finish
                    return
                except (ValueError, OSError) as e:
                    with self._lock:
                        self.waiting.popleft()
                    self._finish(
                        req, "error", error=f"adapter {req.adapter.name or req.adapter.key}: {e}", error_type="adapter"
                    )
                    continue
            with self._lock:
                self.waiting.popleft()
            req.slot = self.cache.allocate()
            self.running[req.slot] = req
            self.counts.add_row(req.slot, req.prompt_ids)

    def _adapter_rows(self, n: int, row_offset: int, reqs: list[Request]) -> list[int | None]:
        """LoRA slot (or None) for each of the n forward rows, which are cache slots row_offset + i."""
        rows: list[int | None] = [None] * n
        for r in reqs:
            rows[r.slot - row_offset] = r.lora_slot
        return rows

    def _forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        row_offset: int,
        reqs: list[Request],
        idle: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """tokens, positions [B, T] for slots [row_offset, row_offset + B) -> float logits [B, T', V]."""
        batch = self.cache.batch(positions, row_offset, idle)
        if self.lora is not None:
            self.lora.set_rows(self._adapter_rows(tokens.shape[0], row_offset, reqs))
        try:
            return self.model(tokens, cache=batch, cache_pos=positions, logits_to_keep=logits_to_keep).float()
        finally:
            if self.lora is not None:
                self.lora.set_rows(None)

    def _prefill_chunk(self, req: Request, budget: int) -> int:
        """Run up to `budget` of the request's prompt tokens into its slot; returns how many ran."""
        if req.n_prefilled == 0 and self.prefix_cache is not None:
            blocks = self.prefix_cache.lookup(req.prompt_ids, req.adapter_key)
            req.n_prefilled = req.n_cached = self.prefix_cache.load(blocks, self.cache, req.slot)
        a = req.n_prefilled
        ids = req.prompt_ids[a : a + budget]
        dev = self.model.device
        if self.fused is not None and self.fused.prefills:  # each prompt token a row: decoding's own arithmetic
            n = len(ids)
            rows = lambda x: torch.tensor(x, dtype=torch.long, device=dev)  # noqa: E731
            logits = self.fused(
                rows(ids),
                rows([req.slot] * n),
                rows(range(a, a + n)),
                self.cache.k,
                self.cache.v,
                [req.lora_slot] * n,
                logits_rows=rows([n - 1]),
            )  # [1, V]
        else:
            tokens = torch.tensor([ids], dtype=torch.long, device=dev)  # [1, C]
            positions = torch.arange(a, a + len(ids), device=dev)[None]  # [1, C]
            logits = self._forward(tokens, positions, req.slot, [req], logits_to_keep=1)[:, -1]  # [1, V]
        req.n_prefilled += len(ids)
        if self.draft is not None:  # the draft model's prompt keys too, so that decoding starts without them
            self.draft.prefill(req, req.n_prefilled)
        if req.n_prefilled == len(req.prompt_ids):
            if self.prefix_cache is not None:
                self.prefix_cache.store(req.prompt_ids, self.cache, req.slot, req.adapter_key)
            self._sample([req], logits)
        return len(ids)

    def _proposals(self, reqs: list[Request]) -> dict[int, list[int]]:
        """Speculative guesses per request slot (rows that can take them: no penalties or logprobs)."""
        cfg = self.config
        if cfg.speculative is None:
            return {}
        rows = []  # (request, how many guesses it may take)
        for r in reqs:
            p = r.params
            if p.logprobs or p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty or r.grammar:
                continue
            room = min(cfg.num_speculative_tokens, r.max_tokens - r.n_generated - 1)  # keep within max_tokens
            if room >= 1:
                rows.append((r, room))
        if self.draft is not None:
            return self.draft.propose(rows)
        out = {}
        for r, room in rows:
            guess = ngram_propose(r.prompt_ids + r.output_ids, room, cfg.ngram_max, cfg.ngram_min)
            if guess:
                out[r.slot] = guess
        return out

    def _decode(self, reqs: list[Request]) -> None:
        """One forward over slots [0, n): each decoding row feeds its pending token (+ any guesses); others idle."""
        guesses = self._proposals(reqs)
        dev = self.model.device
        if self.fused is not None:
            self._decode_fused(reqs, guesses)
            return
        n = max(r.slot for r in reqs) + 1
        T = 1 + max((len(g) for g in guesses.values()), default=0)
        tokens, positions, idle = [[0] * T for _ in range(n)], [[0] * T for _ in range(n)], [True] * n
        for r in reqs:
            row = [r.pending] + guesses.get(r.slot, [])
            tokens[r.slot] = row + [row[-1]] * (T - len(row))  # pad: written past the row's end, never read
            positions[r.slot] = [min(r.position + j, self.max_seq_len - 1) for j in range(T)]
            idle[r.slot] = False
        as_tensor = lambda x, dtype: torch.tensor(x, dtype=dtype, device=dev)  # noqa: E731 (one copy per input)
        logits = self._forward(
            as_tensor(tokens, torch.long), as_tensor(positions, torch.long), 0, reqs, as_tensor(idle, torch.bool)
        )  # [n, T, V]
        plain = [r for r in reqs if r.slot not in guesses]
        if plain:
            self._sample(plain, logits[torch.tensor([r.slot for r in plain], device=dev), 0])
        for r in reqs:
            if r.slot in guesses and r.finish_reason is None:
                self._accept_guesses(r, logits[r.slot], guesses[r.slot])

    def _decode_fused(self, reqs: list[Request], guesses: dict[int, list[int]]) -> None:
        """The same step through FusedDecode: every token is a row of its own (a request's pending token, then its
        guesses at the following positions, all in its slot), so verification needs no second code path."""
        tokens, slots, positions, loras, spans = [], [], [], [], []
        for r in reqs:
            row = [r.pending] + guesses.get(r.slot, [])
            spans.append((len(tokens), len(row)))
            tokens += row
            slots += [r.slot] * len(row)
            positions += range(r.position, r.position + len(row))
            loras += [r.lora_slot] * len(row)
        ids = lambda x: torch.tensor(x, dtype=torch.long, device=self.model.device)  # noqa: E731
        logits = self.fused(
            ids(tokens), ids(slots), ids(positions), self.cache.k, self.cache.v, loras
        )  # [len(tokens), V]
        plain = [(r, a) for r, (a, n) in zip(reqs, spans) if n == 1]
        if plain:
            self._sample([r for r, _ in plain], logits[torch.tensor([a for _, a in plain], device=logits.device)])
        for r, (a, n) in zip(reqs, spans):
            if n > 1 and r.finish_reason is None:
                self._accept_guesses(r, logits[a : a + n], guesses[r.slot])

    def _accept_guesses(self, req: Request, logits: torch.Tensor, guess: list[int]) -> None:
        """Verify a row's guesses on its logits [T, V]; emit the accepted tokens one by one."""
        logits = logits[: len(guess) + 1]
        if not bool(torch.isfinite(logits.sum())):  # one reduction, as in _sample
            self._fail(req, NAN_LOGITS)
            return
        try:
            self._verify_and_emit(req, logits, guess)
        except Exception:  # noqa: BLE001 — a fault in this request's sampling or detokenization fails it alone
            self._fail(req, exc=True)

    def _verify_and_emit(self, req: Request, logits: torch.Tensor, guess: list[int]) -> None:
        early = req.params.min_new_tokens - req.n_generated  # positions [0, early) pick tokens before min_new_tokens
        if early > 0 and len(self._stop_tensor):
            logits = logits.clone()
            logits[:early, self._stop_tensor] = float("-inf")
        if req.params.greedy:
            tokens = verify_greedy(logits, guess)
        else:
            tokens = verify_sampled(logits, guess, req.params, req.generator)
        self.spec_proposed += len(guess)
        self.spec_accepted += len(tokens) - 1
        if self.metrics is not None:
            self.metrics.on_speculation(len(guess), len(tokens) - 1)
        for tok in tokens:
            self.counts.record([req.slot], [tok])
            if self._emit(req, tok, None):
                return

    def _sample(self, reqs: list[Request], logits: torch.Tensor) -> None:
        """logits [len(reqs), V] -> one new token per request; emit it and finish requests that are done.

        A row with NaN/Inf logits, or whose sampling or detokenization raises, ends its own request with an error;
        the other rows go on."""
        # One reduction over the raw logits and one sync per step (sampling syncs anyway, in .tolist()): a NaN or
        # Inf anywhere in a row makes its sum non-finite. Masking (-inf) comes after this check.
        finite = torch.isfinite(logits.sum(dim=-1))  # [B]
        if not bool(finite.all()):
            ok = finite.tolist()
            for req in (r for r, good in zip(reqs, ok) if not good):
                self._fail(req, NAN_LOGITS)
            keep = [i for i, good in enumerate(ok) if good]
            reqs, logits = [reqs[i] for i in keep], logits[keep]
            if not reqs:
                return
        try:
            out = self._sample_rows(reqs, logits)
        except Exception:  # noqa: BLE001
            if len(reqs) == 1:
                self._fail(reqs[0], exc=True)
                return
            # Which row raised is unknown: sample the rows one by one, so that only the faulty ones fail. (A seeded
            # row that drew before the fault draws again: its output may differ from an undisturbed run.)
            for i, req in enumerate(reqs):
                self._sample([req], logits[i : i + 1])
            return
        for i, (req, tok) in enumerate(zip(reqs, out.tokens.tolist())):
            lp = {"token": tok, "logprob": out.logprobs[i], "top": out.top_logprobs[i]} if req.params.logprobs else None
            try:
                self._emit(req, tok, lp)
            except Exception:  # noqa: BLE001 — e.g. detokenization or stop-string matching of this request
                self._fail(req, exc=True)

    def _sample_rows(self, reqs: list[Request], logits: torch.Tensor):
        """sample_batch for the rows of `reqs` (min_new_tokens applied); records the tokens in the penalty counts."""
        slots = [r.slot for r in reqs]
        # min_new_tokens does not apply to structured rows: their grammar decides where the output may end.
        early = [i for i, r in enumerate(reqs) if r.n_generated < r.params.min_new_tokens and r.grammar is None]
        if early and len(self._stop_tensor):  # min_new_tokens: no stop token yet
            logits = logits.clone()
            logits[torch.tensor(early)[:, None], self._stop_tensor[None, :]] = float("-inf")
        if any(r.grammar is not None for r in reqs):  # before sampling: greedy, top-k/p, penalties, logprobs see it
            logits = logits.clone()  # the caller may slice these rows again (one-by-one retry): keep its copy raw
            mask_logits_(logits, [r.grammar for r in reqs])
        out = sample_batch(logits, [r.params for r in reqs], self.counts, slots, [r.generator for r in reqs])
        if any(r.grammar is not None for r in reqs):
            _keep_allowed_(out.tokens, logits, [r.grammar is not None for r in reqs])
        self.counts.record(slots, out.tokens)
        return out

    def _fail(self, req: Request, message: str | None = None, exc: bool = False) -> None:
        """End one request with an internal error (exc: log the exception being handled, with its request id)."""
        if exc:
            log.exception("request %s failed in sampling or detokenization; the other requests go on", req.request_id)
        if req.finish_reason is None:
            self._finish(
                req,
                "error",
                error=message or "internal error while sampling or detokenizing this request (see the server log)",
                error_type="internal",
            )

    def _emit(self, req: Request, tok: int, logprob: dict | None) -> bool:
        """Hand one new token to its request; finish the request if it is done (returns True then)."""
        now = time.perf_counter()
        if self.metrics is not None:
            self.metrics.on_token(req, now)
        req.t_first = req.t_first or now
        req.t_last = now
        req.output_ids.append(tok)
        if req.grammar is not None:
            req.grammar.accept(tok)
        # A structured row ends when its grammar does (complete, then a stop token), even with ignore_eos.
        stop = (tok in self.stop_ids and not req.params.ignore_eos) or (
            req.grammar is not None and req.grammar.terminated
        )
        piece, hit = ("", False) if stop or req.decoder is None else req.text.add(req.decoder.push(tok))
        reason = "stop" if stop or hit else "length" if req.n_generated >= req.max_tokens else None
        if reason:
            piece += req.text.flush()
        req.emit(
            Output(
                piece,
                [] if stop else [tok],
                [logprob] if logprob else [],
                prompt_tokens=len(req.prompt_ids),
                completion_tokens=req.n_generated,
            )
        )
        req.pending = tok
        if reason:
            self._finish(req, reason)
        return reason is not None

    def _finish(self, req: Request, reason: str, error: str | None = None, error_type: str | None = None) -> None:
        req.finish_reason = reason
        if req.slot is not None and self.running.get(req.slot) is req:
            if (
                self.prefix_cache is not None
                and req.n_prefilled == len(req.prompt_ids)
                and req.output_ids
                and reason != "error"
            ):  # a failed request's keys may be what failed it (NaN): not reused
                # The cache holds the prompt and every output token but the last: a next chat turn can reuse it.
                self.prefix_cache.store(req.prompt_ids + req.output_ids[:-1], self.cache, req.slot, req.adapter_key)
            del self.running[req.slot]
            self.cache.release(req.slot)
            if self.draft is not None:
                self.draft.release(req.slot)
            self.counts.free(req.slot)
            if req.adapter is not None:
                self.lru.release(req.adapter.key)
        else:
            with self._lock:
                if req in self.waiting:
                    self.waiting.remove(req)
        req.pending = None
        if self.metrics is not None:
            self.metrics.on_finish(req, time.perf_counter())
        try:
            req.emit(
                Output(
                    "",
                    [],
                    finish_reason=reason,
                    error=error,
                    error_type=error_type,
                    prompt_tokens=len(req.prompt_ids),
                    completion_tokens=req.n_generated,
                )
            )
        except Exception:  # noqa: BLE001 — the slot is already free; a failing callback must not stop the step
            log.exception("request %s: its output callback failed", req.request_id)
        if self.on_finish is not None:
            self.on_finish(req)

    def _report(self) -> None:
        if self.metrics is not None:
            self.metrics.set_state(len(self.running), len(self.waiting), self.cache.usage())
            if self.prefix_cache is not None:
                self.metrics.set_prefix_cache(self.prefix_cache.queries, self.prefix_cache.hits)
