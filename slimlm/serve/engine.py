"""The continuous-batching engine: requests join and leave the running batch at token boundaries.

One engine thread owns the model. Each `step()`:
  1. drops cancelled requests (their slot is free for this very step),
  2. admits waiting requests in arrival order while a cache slot (and, for an adapter, a LoRA slot) is free,
  3. runs one prefill chunk of at most `prefill_chunk` tokens for the oldest request still reading its prompt,
     so a long prompt delays the running streams by one bounded chunk per step, not by its whole length,
  4. decodes one token for every request past its prompt, in one forward over cache slots [0, n), each row with
     its own position, adapter and sampling parameters.
Callers (the HTTP server, batch jobs, tests) `submit` a Request and receive `Output`s through its `emit`
callback, on the engine thread; they must only hand them over (e.g. loop.call_soon_threadsafe).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from slimlm.llm import StopStringText
from slimlm.model import Transformer
from slimlm.serve.cache import SlotKVCache
from slimlm.serve.multi_lora import AdapterLRU, LoraSlots, SlotsBusy
from slimlm.serve.sampling import RequestSampling, TokenCounts, sample_batch
from slimlm.tokenizer import StreamDecoder, Tokenizer

log = logging.getLogger("slimlm.serve")


@dataclass
class EngineConfig:
    max_batch: int = 8  # cache slots = sequences decoded together
    max_seq_len: int = 2048  # prompt + output tokens per sequence (capped by the model's context)
    max_queue: int = 64  # waiting requests beyond this are refused (HTTP 429)
    prefill_chunk: int = 256  # prompt tokens per engine step
    max_loras: int = 4  # adapters resident at once (LRU); 0 = no LoRA support
    max_lora_rank: int = 64

    def validate(self) -> None:
        bad = [f"{k} must be >= 1, got {getattr(self, k)}" for k in
               ("max_batch", "max_seq_len", "max_queue", "prefill_chunk", "max_lora_rank") if getattr(self, k) < 1]
        if self.max_loras < 0:
            bad.append(f"max_loras must be >= 0, got {self.max_loras}")
        if bad:
            raise ValueError("invalid engine config: " + "; ".join(bad))


class QueueFull(RuntimeError):
    """The waiting queue is at max_queue; retry later (HTTP 429)."""


class NotAccepting(RuntimeError):
    """The engine is draining or stopped (HTTP 503)."""


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
    prompt_tokens: int = 0
    completion_tokens: int = 0


_ids = itertools.count()


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    max_tokens: int
    sampling: RequestSampling = field(default_factory=RequestSampling)
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    adapter: AdapterRef | None = None
    emit: Callable[[Output], None] = lambda out: None
    request_id: str = ""
    # Engine state.
    slot: int | None = None  # KV cache slot
    lora_slot: int | None = None
    decoder: StreamDecoder | None = None  # detokenizer and stop-string matcher, made at submit
    text: StopStringText | None = None
    generator: torch.Generator | None = None
    n_prefilled: int = 0  # prompt tokens in the cache
    pending: int | None = None  # last sampled token, not yet in the cache
    n_generated: int = 0
    cancelled: bool = False
    finish_reason: str | None = None
    t_arrival: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    t_last: float | None = None
    seq: int = field(default_factory=lambda: next(_ids))

    def __post_init__(self) -> None:
        self.request_id = self.request_id or f"req-{self.seq}"


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, config: EngineConfig | None = None,
                 metrics=None, on_finish: Callable[[Request], None] | None = None):
        self.config = config or EngineConfig()
        self.config.validate()
        self.model, self.tokenizer, self.metrics, self.on_finish = model.eval(), tokenizer, metrics, on_finish
        self.max_seq_len = min(self.config.max_seq_len, model.config.max_seq_len)
        self.cache = SlotKVCache.for_model(model, self.config.max_batch, self.max_seq_len)
        self.lora = LoraSlots.attach(model, self.config.max_loras, self.config.max_lora_rank) \
            if self.config.max_loras else None
        self.lru = AdapterLRU(self.config.max_loras) if self.lora else None
        self.counts = TokenCounts(self.config.max_batch, model.config.vocab_size, device=model.device)
        self.stop_ids = set(tokenizer.stop_token_ids)
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}  # slot -> request
        self.accepting = True
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._ops: deque[Callable[[], None]] = deque()  # work other threads hand to the engine thread

    # ---- called from other threads ----
    def submit(self, req: Request) -> None:
        """Queue a request; raises ValueError (does not fit), QueueFull or NotAccepting."""
        need = len(req.prompt_ids) + req.max_tokens
        if not req.prompt_ids:
            raise ValueError("the prompt is empty")
        if need > self.max_seq_len:
            raise ValueError(f"prompt ({len(req.prompt_ids)} tokens) + max_tokens ({req.max_tokens}) = {need} exceeds "
                             f"the server's context of {self.max_seq_len} tokens; shorten the prompt or lower max_tokens")
        if req.adapter is not None and self.lora is None:
            raise ValueError("this server runs without LoRA support (max_loras=0)")
        req.decoder, req.text = StreamDecoder(self.tokenizer), StopStringText(req.stop)
        req.generator = req.sampling.make_generator(self.model.device)  # None unless seeded
        with self._lock:
            if not self.accepting:
                raise NotAccepting("the server is shutting down")
            if len(self.waiting) >= self.config.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (max_queue={self.config.max_queue})")
            self.waiting.append(req)
        self._wake.set()

    def cancel(self, req: Request) -> None:
        """Abort a request (client gone); its cache slot is freed at the start of the next step."""
        req.cancelled = True
        self._wake.set()

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="slimlm-engine", daemon=True)
        self._thread.start()
        return self

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
                    self._finish(req, "error", error="internal error in the engine (see the server log)")

    # ---- the engine thread ----
    @torch.no_grad()
    def step(self) -> None:
        """One scheduling round: reap cancelled, admit, one prefill chunk, one decode token for every stream."""
        while self._ops:
            self._ops.popleft()()
        for req in [r for r in list(self.waiting) + list(self.running.values()) if r.cancelled]:
            self._finish(req, "abort")
        self._admit()
        prefilling = [r for r in self.running.values() if r.n_prefilled < len(r.prompt_ids)]
        if prefilling:
            self._prefill_chunk(min(prefilling, key=lambda r: r.seq))
        decoding = [r for r in self.running.values() if r.pending is not None]
        if decoding:
            self._decode(decoding)
        self._report()

    def _admit(self) -> None:
        while self.waiting and self.cache.free:
            req = self.waiting[0]
            if req.adapter is not None:
                try:
                    req.lora_slot = self.lru.acquire(req.adapter.key, lambda s, f=req.adapter.folder: self.lora.load(s, f))
                except SlotsBusy:  # every LoRA slot is pinned by running requests: wait for one to finish
                    return
                except (ValueError, OSError) as e:
                    with self._lock:
                        self.waiting.popleft()
                    self._finish(req, "error", error=f"adapter {req.adapter.name or req.adapter.key}: {e}")
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

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, row_offset: int, reqs: list[Request],
                 logits_to_keep: int = 0) -> torch.Tensor:
        batch = self.cache.batch(tokens.shape[0], positions, row_offset)
        if self.lora is not None:
            self.lora.set_rows(self._adapter_rows(tokens.shape[0], row_offset, reqs))
        try:
            return self.model(tokens, cache=batch, cache_pos=positions, logits_to_keep=logits_to_keep)[:, -1].float()
        finally:
            if self.lora is not None:
                self.lora.set_rows(None)

    def _prefill_chunk(self, req: Request) -> None:
        a = req.n_prefilled
        ids = req.prompt_ids[a: a + self.config.prefill_chunk]
        dev = self.model.device
        tokens = torch.tensor([ids], dtype=torch.long, device=dev)  # [1, C]
        positions = torch.arange(a, a + len(ids), device=dev)[None]  # [1, C]
        logits = self._forward(tokens, positions, req.slot, [req], logits_to_keep=1)  # [1, V]
        req.n_prefilled += len(ids)
        if req.n_prefilled == len(req.prompt_ids):
            self._sample([req], logits)

    def _decode(self, reqs: list[Request]) -> None:
        n = max(r.slot for r in reqs) + 1
        dev = self.model.device
        tokens = torch.zeros(n, 1, dtype=torch.long, device=dev)
        positions = torch.full((n, 1), self.cache.scratch, dtype=torch.long, device=dev)  # idle rows: scratch
        for r in reqs:
            tokens[r.slot, 0] = r.pending
            positions[r.slot, 0] = len(r.prompt_ids) + r.n_generated - 1  # where the pending token goes
        logits = self._forward(tokens, positions, 0, reqs)  # [n, V]
        self._sample(reqs, logits[torch.tensor([r.slot for r in reqs], device=dev)])

    def _sample(self, reqs: list[Request], logits: torch.Tensor) -> None:
        """logits [len(reqs), V] -> one new token per request; emit it and finish requests that are done."""
        slots = [r.slot for r in reqs]
        out = sample_batch(logits, [r.sampling for r in reqs], self.counts, slots, [r.generator for r in reqs])
        self.counts.record(slots, out.tokens)
        now = time.perf_counter()
        for i, (req, tok) in enumerate(zip(reqs, out.tokens.tolist())):
            req.n_generated += 1
            if self.metrics is not None:
                self.metrics.on_token(req, now)
            req.t_first = req.t_first or now
            req.t_last = now
            stop = tok in self.stop_ids and not req.ignore_eos
            piece, hit = ("", False) if stop else req.text.add(req.decoder.push(tok))
            reason = "stop" if stop or hit else "length" if req.n_generated >= req.max_tokens else None
            if reason:
                piece += req.text.flush()
            lp = [{"token": tok, "logprob": out.logprobs[i], "top": out.top_logprobs[i]}] if req.sampling.logprobs else []
            req.emit(Output(piece, [] if stop else [tok], lp, prompt_tokens=len(req.prompt_ids),
                            completion_tokens=req.n_generated))
            req.pending = tok
            if reason:
                self._finish(req, reason)

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        req.finish_reason = reason
        if req.slot is not None and self.running.get(req.slot) is req:
            del self.running[req.slot]
            self.cache.release(req.slot)
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
        req.emit(Output("", [], finish_reason=reason, error=error, prompt_tokens=len(req.prompt_ids),
                        completion_tokens=req.n_generated))
        if self.on_finish is not None:
            self.on_finish(req)

    def _report(self) -> None:
        if self.metrics is not None:
            self.metrics.set_state(len(self.running), len(self.waiting), self.cache.usage())
