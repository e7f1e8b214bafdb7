"""Draft-model speculation: a smaller model with the same tokenizer guesses the next k tokens of each row.

`DraftModel` owns the draft `Transformer`, its own slot KV cache (same slot numbers as the engine's cache) and,
where the draft qualifies, its own fused CPU decode step. Each engine step, `propose` brings every row's draft
cache up to the row's pending token (catch-up: usually 1 or 2 tokens, batched over the rows in one call; the
prompt runs through the draft beside the target's prefill chunks, `prefill`) and then takes k - 1 more greedy steps,
batched over the rows. The guesses are the draft's argmax tokens: point-mass proposals, so engine/speculative.py's
`verify_greedy` and `verify_sampled` keep both greedy and sampled outputs exactly the target model's.

Which draft keys stay valid is read off the tokens, not told by the verifier: the draft cache of a slot holds
`length` positions of known tokens plus the guesses it fed after them (g_1 .. g_{m-1}); at the next step the fed
guesses that equal the tokens the request really has at those positions (the accepted ones) are kept, the rest is
stale and gets overwritten (each query attends only to positions <= its own, and each position is written before
a query at or past it runs — the invariant of the engine's own cache). This module knows nothing about sampling
parameters, stop tokens or which rows may speculate: the engine decides that and passes (request, room) pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from slimlm.engine.cache import SlotKVCache
from slimlm.engine.fused_decode import FusedDecode
from slimlm.errors import InputError
from slimlm.model import Transformer
from slimlm.quantize.int8 import Int8WeightOnlyLinear

if TYPE_CHECKING:
    from slimlm.engine.core import Request

CATCH_UP_ROWS = 8  # catch-ups of up to this many tokens join the batched step; longer ones (a prompt) run as prefill


@dataclass
class _SlotState:
    """What the draft cache of one slot holds: `length` known tokens, then the guesses it fed after them."""

    seq: int  # the request's Request.seq (a new request on the slot starts from nothing)
    length: int = 0
    fed: list[int] = field(default_factory=list)  # guesses at positions length, length + 1, ...


def token_at(req: Request, pos: int) -> int:
    """The request's token at cache position `pos` (prompt, then output; the pending token is the last)."""
    n = len(req.prompt_ids)
    return req.prompt_ids[pos] if pos < n else req.output_ids[pos - n]


def check_draft(speculative: str | None, model: Transformer, draft: Transformer | None) -> None:
    """speculative="draft" needs a draft model with the target's vocabulary, on its device; no draft otherwise."""
    if speculative == "draft" and draft is None:
        raise InputError(
            'speculative="draft" needs a draft model: pass Engine(..., draft_model=...) '
            "(slimlm.load(..., draft_model=PATH), slimlm serve --draft-model PATH), or use "
            'speculative="ngram"'
        )
    if draft is None:
        return
    if speculative != "draft":
        raise InputError(
            f"a draft model was given but speculative={speculative!r}; set "
            'EngineConfig(speculative="draft") to use it (slimlm serve: --speculative draft)'
        )
    bad = []
    if draft.config.vocab_size != model.config.vocab_size:
        bad.append(
            f"its vocab_size is {draft.config.vocab_size}, the target's is {model.config.vocab_size}: the "
            "draft must use the target's tokenizer (e.g. a student from `slimlm distill`)"
        )
    if draft.device != model.device:
        bad.append(f"it is on {draft.device}, the target on {model.device}; load both on one device")
    if bad:
        raise InputError("the draft model does not fit the target: " + "; ".join(bad))


def first_rows(head: nn.Module, n: int) -> nn.Module:
    """An LM head cut to its first n outputs (token ids [0, n)), sharing the weights: plain or int8 weight-only."""
    if n >= head.out_features:
        return head
    if type(head) is nn.Linear:
        cut = nn.Linear(
            head.in_features, n, bias=head.bias is not None, device=head.weight.device, dtype=head.weight.dtype
        )
        cut.weight = nn.Parameter(head.weight[:n], requires_grad=False)
        if head.bias is not None:
            cut.bias = nn.Parameter(head.bias[:n], requires_grad=False)
        return cut
    if type(head) is Int8WeightOnlyLinear:
        return Int8WeightOnlyLinear(head.qweight[:n], head.scale[:n], None if head.bias is None else head.bias[:n])
    raise InputError(
        f"draft_vocab needs a plain or int8 weight-only LM head on the draft, not "
        f"{type(head).__name__}; use draft_vocab=0"
    )


class DraftModel:
    """The draft model and its cache; `propose(rows)` -> {slot: guesses}, `release(slot)` when a request ends.

    vocab > 0 lets the draft guess only among token ids [0, vocab): its LM head — for a small draft most of the
    bytes a step reads (SmolLM2: 28 M of 49 M parameters at 6 layers) — is cut to those rows, as in FR-Spec
    (Zhao et al. 2025), with BPE ids, assigned in merge order, standing for frequency. A token outside can never be
    guessed, but is still produced by the target: outputs stay exactly the target's.
    """

    def __init__(
        self,
        model: Transformer,
        n_slots: int,
        max_len: int,
        fused_decode: bool = True,
        prefill_chunk: int = 256,
        kv_cache_dtype: str = "auto",
        vocab: int = 0,
    ):
        self.model = model.eval()
        self.head = first_rows(model.lm_head, vocab) if vocab else model.lm_head
        self.cache = SlotKVCache.for_model(model, n_slots, max_len, kv_cache_dtype)  # as the engine's cache
        self.fused = FusedDecode.for_model(model) if fused_decode else None
        if self.fused is not None:
            self.fused.lm_head = self.head
        self.prefill_chunk = prefill_chunk  # draft prompt tokens per step, over all rows catching up
        self.state: dict[int, _SlotState] = {}  # slot -> what its draft cache holds

    def release(self, slot: int) -> None:
        """Forget the slot's draft keys (its request finished or was cancelled)."""
        self.state.pop(slot, None)

    @torch.no_grad()
    def propose(self, rows: list[tuple[Request, int]]) -> dict[int, list[int]]:
        """Up to `room` greedy draft tokens after each request's pending token: {slot: [g_1 .. g_m]}.

        One batched catch-up call gives every row g_1, then k - 1 batched steps feed g_i and read g_{i + 1}.
        A row whose prompt is still being run through the draft (more than prefill_chunk tokens this step) gets
        no guesses this step and decodes plainly.
        """
        firsts: dict[int, int] = {}  # slot -> g_1
        short = []
        budget = self.prefill_chunk
        for req, room in sorted(rows, key=lambda rr: rr[0].seq):  # oldest first, as the engine prefills
            st = self.sync(req)
            behind = req.position + 1 - st.length  # known tokens without draft keys, the pending one included
            if behind <= CATCH_UP_ROWS:
                short.append((req, room))
            elif budget > 0:
                budget -= self._prefill(req, st, budget, firsts)
        if short:
            firsts.update(self._catch_up([r for r, _ in short]))
        rooms = {req.slot: room for req, room in rows if req.slot in firsts}
        guesses = {slot: [tok] for slot, tok in firsts.items()}
        reqs = {req.slot: req for req, _ in rows}
        for i in range(1, max(rooms.values(), default=0)):  # step i feeds g_i at position + i, reads g_{i+1}
            going = [s for s in guesses if rooms[s] > i]
            nxt = self._step([guesses[s][-1] for s in going], going, [reqs[s].position + i for s in going])
            for s, tok in zip(going, nxt):
                guesses[s].append(tok)
        for slot, g in guesses.items():  # fed: the known tokens up to the pending one, then g_1 .. g_{m-1}
            st = self.state[slot]
            st.length, st.fed = reqs[slot].position + 1, g[:-1]
        return guesses

    @torch.no_grad()
    def prefill(self, req: Request, upto: int) -> None:
        """Run the request's prompt tokens from the draft's length up to `upto` through the draft (the engine calls
        this after each prompt chunk of the target's prefill, so that decoding starts with a one-token catch-up)."""
        st = self.state.get(req.slot)
        if st is None or st.seq != req.seq:
            st = self.state[req.slot] = _SlotState(req.seq)
        if upto <= st.length:
            return
        dev = self.model.device
        positions = torch.arange(st.length, upto, device=dev)[None]  # [1, C]
        ids = torch.tensor([req.prompt_ids[st.length : upto]], device=dev)
        self.model.hidden(ids, cache=self.cache.batch(positions, req.slot), cache_pos=positions)
        st.length = upto

    def sync(self, req: Request) -> _SlotState:
        """The slot's state with the fed guesses that turned out to be the request's tokens counted as known.

        Verification accepts exactly the guesses that match, and the first rejected one sits at the new pending
        position, which is fed again anyway: the token check is what keeps this right whatever the verifier did.
        """
        st = self.state.get(req.slot)
        if st is None or st.seq != req.seq:
            st = self.state[req.slot] = _SlotState(req.seq)
        for tok in st.fed:  # st.fed[i] sits at position length + i (before this loop moves length)
            if st.length >= req.position or token_at(req, st.length) != tok:
                break
            st.length += 1
        st.length = min(st.length, req.position)  # the pending token is always fed: its logits give g_1
        st.fed = []
        return st

    def _prefill(self, req: Request, st: _SlotState, budget: int, firsts: dict[int, int]) -> int:
        """Run up to `budget` of the request's tokens without draft keys through the draft's forward (one chunk);
        if that reaches the pending token, its argmax is g_1. Returns how many tokens ran."""
        a = st.length
        b = min(req.position + 1, a + budget)
        ids = [token_at(req, p) for p in range(a, b)]
        dev = self.model.device
        positions = torch.arange(a, b, device=dev)[None]  # [1, C]
        hidden = self.model.hidden(
            torch.tensor([ids], device=dev), cache=self.cache.batch(positions, req.slot), cache_pos=positions
        )  # [1, C, D]
        logits = self.head(hidden[:, -1:])  # [1, 1, V]
        st.length = b
        if b == req.position + 1:
            firsts[req.slot] = int(logits[0, -1].argmax())
        return b - a

    def _catch_up(self, reqs: list[Request]) -> dict[int, int]:
        """Feed each request's tokens from its draft length to its pending token, all rows in one call: {slot: g_1}."""
        tokens, slots, positions, last = [], [], [], []
        for r in reqs:
            a = self.state[r.slot].length
            tokens += [token_at(r, p) for p in range(a, r.position + 1)]
            slots += [r.slot] * (r.position + 1 - a)
            positions += range(a, r.position + 1)
            last.append(len(tokens) - 1)
        if self.fused is not None:
            picks = self._fused(tokens, slots, positions)  # [W]
        else:
            picks = self._forward(tokens, slots, positions)
        return {r.slot: picks[i] for r, i in zip(reqs, last)}

    def _step(self, tokens: list[int], slots: list[int], positions: list[int]) -> list[int]:
        """One token per row at (slot, position) -> the draft's argmax after each."""
        if self.fused is not None:
            return self._fused(tokens, slots, positions)
        return self._forward(tokens, slots, positions)

    def _fused(self, tokens: list[int], slots: list[int], positions: list[int]) -> list[int]:
        """Rows (token, slot, position) through the fused step (several rows of a slot at consecutive positions
        allowed) -> each row's argmax [W]."""
        ids = lambda x: torch.tensor(x, dtype=torch.long, device=self.model.device)  # noqa: E731
        return self.fused(ids(tokens), ids(slots), ids(positions), self.cache.k, self.cache.v).argmax(-1).tolist()

    def _forward(self, tokens: list[int], slots: list[int], positions: list[int]) -> list[int]:
        """The same rows through the draft's forward over slots [0, n): each slot's rows padded to the longest
        (pads are written past the row's end, never read), slots without rows idle -> each row's argmax."""
        per_slot: dict[int, list[tuple[int, int, int]]] = {}  # slot -> [(row, token, position)]
        for row, (t, s, p) in enumerate(zip(tokens, slots, positions)):
            per_slot.setdefault(s, []).append((row, t, p))
        n = max(per_slot) + 1
        T = max(len(v) for v in per_slot.values())
        tok, pos, idle = [[0] * T for _ in range(n)], [[0] * T for _ in range(n)], [True] * n
        for s, items in per_slot.items():
            tok[s] = [t for _, t, _ in items] + [items[-1][1]] * (T - len(items))
            last = items[-1][2]
            pads = [min(last + j, self.cache.max_len - 1) for j in range(1, T - len(items) + 1)]
            pos[s] = [p for _, _, p in items] + pads
            idle[s] = False
        dev = self.model.device
        positions_t = torch.tensor(pos, dtype=torch.long, device=dev)  # [n, T]
        batch = self.cache.batch(positions_t, 0, torch.tensor(idle, device=dev))
        hidden = self.model.hidden(
            torch.tensor(tok, dtype=torch.long, device=dev), cache=batch, cache_pos=positions_t
        )  # [n, T, D]
        picks = self.head(hidden).argmax(-1).tolist()  # [n][T]
        out = [0] * len(tokens)
        for s, items in per_slot.items():
            for j, (row, _, _) in enumerate(items):
                out[row] = picks[s][j]
        return out
