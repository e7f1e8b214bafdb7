"""ModelPool: which base models a server holds in memory — loaded on first use, least recently used unloaded first.

A base is loaded on a thread of its own (the engines of the other bases keep stepping meanwhile); every request for
it awaits that one load, up to a timeout. Before a load the pool makes room: while one more model would exceed
`max_models`, or the resident bytes plus the newcomer's estimate would exceed `memory_budget`, it unloads the least
recently used base that is idle — no request holds a lease on it and its engine has no work, so a running stream is
never cut. If nothing is idle the request waits for room (bounded by its timeout) and then gets a 503. A failed load
is answered with its error, and the next request for that base tries again.

It is not a loader and knows nothing of HTTP or torch: `load(name)` (given by ServerState) returns a model object
with `resident_bytes`, `busy()` and `stop()`; refusals are PoolError with the HTTP status to answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from slimlm.errors import InputError

log = logging.getLogger("slimlm.serve")


class PoolError(Exception):
    """A request the pool cannot serve now: the HTTP status, a message saying what to do, and a code."""

    def __init__(self, status: int, message: str, code: str, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.retry_after = status, message, code, retry_after


@dataclass
class Slot:
    """One base model's place in the pool: resident (`model`), loading (`loading`), or neither."""

    name: str
    model: Any = None
    loading: Future | None = None
    leases: int = 0  # requests between acquire and release; a leased model is never unloaded
    last_used: float = 0.0
    error: str | None = None  # the last load's error, until a load succeeds


class ModelPool:
    def __init__(
        self,
        load: Callable[[str], Any],
        estimate: Callable[[str], int],
        max_models: int = 0,
        memory_budget: int = 0,
        metrics=None,
    ):
        """load(name) -> a model (blocking, run on a loader thread); estimate(name) -> its resident bytes before it
        is loaded (used only to make room up front; the real size is measured after the load).
        max_models / memory_budget: 0 = no limit."""
        self._load, self._estimate = load, estimate
        self.max_models, self.memory_budget, self.metrics = max_models, memory_budget, metrics
        self._slots: dict[str, Slot] = {}
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.closed = False

    # ---- what is resident ----
    def add(self, name: str, model: Any, seconds: float = 0.0) -> None:
        """Hold `model` as resident under `name` (the server's default base, loaded at start-up in `seconds`)."""
        with self._lock:
            slot = self._slots.setdefault(name, Slot(name))
            slot.model, slot.last_used = model, time.monotonic()
        self._loaded(name, model, seconds)

    def _loaded(self, name: str, model: Any, seconds: float) -> None:
        self._event("model_loaded", name, seconds=seconds, resident_mib=model.resident_bytes / 2**20)
        if self.metrics is not None:
            self.metrics.on_load(name, seconds, model.resident_bytes)
        self._report()

    def get(self, name: str) -> Any:
        """The resident model `name`, or None; takes no lease (for probes and listings)."""
        slot = self._slots.get(name)
        return slot.model if slot is not None else None

    def resident(self) -> dict[str, Any]:
        with self._lock:
            return {s.name: s.model for s in self._slots.values() if s.model is not None}

    def status(self, name: str) -> str:
        """loaded | loading | failed (the last load raised) | unloaded."""
        slot = self._slots.get(name)
        if slot is None:
            return "unloaded"
        return (
            "loaded"
            if slot.model is not None
            else "loading"
            if slot.loading is not None
            else "failed"
            if slot.error
            else "unloaded"
        )

    # ---- leases ----
    async def acquire(self, name: str, timeout: float) -> Any:
        """The model `name` with a lease on it (release it with `release(name)`), loading it first if needed;
        PoolError 503 if it is not resident within `timeout` seconds, 500 if its load failed."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self.closed:
                    raise PoolError(503, "the server is shutting down", "draining")
                slot = self._slots.setdefault(name, Slot(name))
                if slot.model is not None:
                    slot.leases += 1
                    slot.last_used = time.monotonic()
                    return slot.model
                if slot.loading is None:
                    victims = self._make_room(name)
                    if victims is not None:
                        slot.loading = self._start_load(slot, victims)
                future = slot.loading
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._timeout(name, timeout, future is not None)
            if future is None:  # no room: every resident model is serving; wait for one to go idle
                await asyncio.sleep(min(0.05, left))
                continue
            try:
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), left)
            except TimeoutError:
                raise self._timeout(name, timeout, True) from None
            except Exception as e:  # noqa: BLE001 — the load's own error, for every request that awaited it
                raise PoolError(
                    500, f"model {name!r} failed to load: {type(e).__name__}: {e}", "model_load_failed"
                ) from None
            # Loaded: loop to take the lease (or, if it was unloaded again meanwhile, to load it again).

    def release(self, name: str) -> None:
        with self._lock:
            slot = self._slots[name]
            slot.leases -= 1
            slot.last_used = time.monotonic()

    def _timeout(self, name: str, timeout: float, loading: bool) -> PoolError:
        why = (
            f"model {name!r} is still loading"
            if loading
            else f"model {name!r} waits for room: all {len(self.resident())} resident models are serving requests"
        )
        # The load goes on meanwhile: a retry a second later waits for it again (up to --load-timeout).
        return PoolError(
            503, f"{why} after {timeout:g} s (--load-timeout); retry shortly", "model_loading", retry_after=1
        )

    # ---- loading and unloading ----
    def _make_room(self, name: str) -> list[tuple[Slot, Any]] | None:
        """The idle slots to unload (least recently used first) so that `name` fits, or None if it cannot fit
        now. Called under the lock; the victims are detached here, so no request can lease them any more."""
        held = [s for s in self._slots.values() if s.model is not None or s.loading is not None]
        used = sum(s.model.resident_bytes for s in held if s.model is not None) + sum(
            self._estimate(s.name) for s in held if s.model is None
        )
        need = self._estimate(name) if self.memory_budget else 0
        idle = sorted(
            (s for s in held if s.model is not None and s.leases == 0 and not s.model.busy()), key=lambda s: s.last_used
        )
        victims: list[Slot] = []

        def too_many() -> bool:
            return bool(self.max_models) and len(held) - len(victims) + 1 > self.max_models

        def too_big() -> bool:  # a model alone over the budget still loads; it is measured and refused after
            return bool(self.memory_budget) and used + need > self.memory_budget and len(held) > len(victims)

        while (too_many() or too_big()) and idle:
            victim = idle.pop(0)
            victims.append(victim)
            used -= victim.model.resident_bytes
        if too_many() or too_big():
            return None
        detached = []
        for victim in victims:  # detached now (a request for it awaits the unload, then loads it again)
            detached.append((victim, victim.model))
            victim.model, victim.loading = None, Future()
        return detached

    def _start_load(self, slot: Slot, victims: list[tuple[Slot, Any]]) -> Future:
        future: Future = Future()
        future.set_running_or_notify_cancel()
        thread = threading.Thread(
            target=self._run_load, args=(slot, victims, future), name=f"slimlm-load-{slot.name}", daemon=True
        )
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()
        return future

    def _run_load(self, slot: Slot, victims: list[tuple[Slot, Any]], future: Future) -> None:
        for victim, model in victims:
            self._unload(victim, model)
        if victims:
            victims.clear()  # the last references (this thread's args hold the list): the tensors are freed here
            model = None
            free_memory()
        t0 = time.perf_counter()
        try:
            model = self._load(slot.name)
            if self.memory_budget and model.resident_bytes > self.memory_budget:
                model.stop()
                raise InputError(
                    f"it takes {model.resident_bytes / 2**20:.0f} MiB resident, over the "
                    f"--memory-budget of {self.memory_budget / 2**20:.0f} MiB: raise --memory-budget "
                    "(or lower --max-batch / --max-seq-len for a smaller KV cache)"
                )
        except Exception as e:  # noqa: BLE001 — handed to the requests that await this load
            with self._lock:
                slot.loading, slot.error = None, f"{type(e).__name__}: {e}"
            self._event("load_failed", slot.name, seconds=time.perf_counter() - t0, error=slot.error)
            if self.metrics is not None:
                self.metrics.on_load(slot.name, time.perf_counter() - t0, None, error=True)
            future.set_exception(e)
            return
        seconds = time.perf_counter() - t0
        with self._lock:
            slot.model, slot.loading, slot.error, slot.last_used = model, None, None, time.monotonic()
            over = self._over_budget(slot.name)  # the estimate was low: the measured size decides
        self._loaded(slot.name, model, seconds)
        future.set_result(None)
        for victim, old in over:
            self._unload(victim, old)
        if over:
            over = old = None
            free_memory()

    def _over_budget(self, keep: str) -> list[tuple[Slot, Any]]:
        """Idle models to unload (LRU first, never `keep`) until the measured resident bytes fit the budget; under
        the lock. Busy ones stay: the pool is then over budget until they finish and the next load makes room."""
        if not self.memory_budget:
            return []
        resident = [s for s in self._slots.values() if s.model is not None]
        used = sum(s.model.resident_bytes for s in resident)
        idle = sorted(
            (s for s in resident if s.name != keep and s.leases == 0 and not s.model.busy()), key=lambda s: s.last_used
        )
        detached = []
        while used > self.memory_budget and idle:
            victim = idle.pop(0)
            used -= victim.model.resident_bytes
            detached.append((victim, victim.model))
            victim.model, victim.loading = None, Future()
        return detached

    def _unload(self, victim: Slot, model: Any) -> None:
        """Stop a detached model's engine and free its memory (the requests that finished on it hold no tensors)."""
        t0 = time.perf_counter()
        model.stop()
        with self._lock:
            unloaded, victim.loading = victim.loading, None
        unloaded.set_result(None)
        self._event(
            "model_unloaded", victim.name, seconds=time.perf_counter() - t0, resident_mib=model.resident_bytes / 2**20
        )
        if self.metrics is not None:
            self.metrics.on_unload(victim.name)
        self._report()

    def stop_leasing(self) -> None:
        """Refuse new leases from now on (503): the server drains."""
        with self._lock:
            self.closed = True

    def close(self) -> None:
        """Refuse new leases, wait for the loads under way, stop every engine (at server exit)."""
        self.stop_leasing()
        for thread in list(self._threads):
            thread.join()
        for slot in list(self._slots.values()):
            if slot.model is not None:
                slot.model.stop()

    def _report(self) -> None:
        if self.metrics is not None:
            self.metrics.models_resident.set(len(self.resident()))

    def _event(self, event: str, name: str, **fields) -> None:
        rounded = {k: round(v, 3) if isinstance(v, float) else v for k, v in fields.items()}
        log.info(json.dumps({"event": event, "model": name, **rounded, "resident": sorted(self.resident())}))


def free_memory() -> None:
    """Hand the heap pages freed by an unloaded model back to the OS (glibc keeps them otherwise, so the process's
    RSS would not fall). No gc.collect(): a model and its engine hold no reference cycles, so their tensors are
    freed as the last reference goes, and a full collection of a server's heap holds the GIL for ~0.25 s (a stall
    of every running stream). ctypes releases the GIL during the call."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
