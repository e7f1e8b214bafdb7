"""engine/fused_decode.py + kernels/decode.cpp: the one-call decode step computes what the model's forward does."""

from __future__ import annotations

import contextlib

import pytest
import torch
from test_fuse import tiny as fuse_tiny

import slimlm
from slimlm import kernels
from slimlm.engine.cache import SlotKVCache
from slimlm.engine.core import Engine, EngineConfig, Request
from slimlm.engine.fused_decode import FusedDecode
from slimlm.engine.multi_lora import LoraSlots
from slimlm.engine.sampling import SamplingParams
from slimlm.model import Transformer
from slimlm.peft.common import ALL_LINEARS, PEFT_PREFIX, target_linears
from slimlm.prune.structured import _sizes, remove_kv_groups_, remove_mlp_channels_
from slimlm.quantize.schemes import quantize_model_


@pytest.fixture(autouse=True)
def _kernels():
    if not kernels.load():
        pytest.skip("slimlm's CPU kernels could not be built here (see the logged warning)")


def tiny(seed: int = 0, **overrides) -> Transformer:
    """test_fuse's random GQA model (4/2 heads, norm gains far from 1), with 3 layers and an MLP of 96."""
    return fuse_tiny(seed, **{"n_layers": 3, "intermediate_size": 96, **overrides})


def check_steps(
    model: Transformer,
    lengths: dict[int, int],
    steps: int = 3,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    cache_atol: float = 1e-5,
    cache_dtype: str = "fp32",
    lora: dict[int, int] | None = None,
) -> None:
    """Prefill rows (slot -> prompt length) with the model, then decode `steps` tokens per row both ways, both
    reading and writing caches of `cache_dtype`; lora: cache slot -> LoRA slot for rows that use an adapter."""
    lora = lora or {}
    select = model.lora_slots.select if getattr(model, "lora_slots", None) is not None else None
    fused = FusedDecode.for_model(model)
    assert fused is not None
    size = max(40, max(lengths.values()) + steps)
    ref_cache = SlotKVCache.for_model(model, 4, size, cache_dtype)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for slot, n in lengths.items():
            pos = torch.arange(n)[None]
            model(torch.randint(0, 256, (1, n), generator=g), cache=ref_cache.batch(pos, slot), cache_pos=pos)
    cache = SlotKVCache.for_model(model, 4, size, cache_dtype)
    for a, b in zip(cache.k + cache.v, ref_cache.k + ref_cache.v):
        a.copy_(b)
    slots = torch.tensor(sorted(lengths))
    pos = torch.tensor([lengths[int(s)] for s in slots])
    rows = [lora.get(int(s)) for s in slots]
    for _ in range(steps):
        tokens = torch.randint(0, 256, (len(slots),), generator=g)
        got = fused(tokens, slots, pos, cache.k, cache.v, rows if lora else None)  # [W, V]
        with torch.no_grad():
            for row, slot in enumerate(slots.tolist()):  # the model, one row at a time
                p = pos[row : row + 1, None]
                with select([rows[row]]) if select else contextlib.nullcontext():
                    want = model(tokens[row : row + 1, None], cache=ref_cache.batch(p, slot), cache_pos=p)[0, -1]
                torch.testing.assert_close(got[row], want, atol=atol, rtol=rtol)
        for a, b in zip(cache.k + cache.v, ref_cache.k + ref_cache.v):  # the same keys/values written
            torch.testing.assert_close(a.float(), b.float(), atol=cache_atol, rtol=rtol)
        pos = pos + 1


def test_fp32_rows_at_different_positions():
    check_steps(tiny(max_seq_len=128), {0: 5, 1: 11, 2: 70, 3: 1})  # 70: attention over two blocks of 64


def test_fp16_cache():
    """The engine's CPU default: both paths round keys and values to fp16 (nearest even) and read them back, so
    they agree as closely as with fp32; a key computed a last bit apart may round to the next fp16 value (~1e-3)."""
    model = tiny(4, max_seq_len=128)
    check_steps(model, {0: 70, 1: 11, 3: 1}, cache_dtype="fp16", cache_atol=1e-3)  # 70: more than one block of 64
    assert SlotKVCache.for_model(model, 1, 8).k[0].dtype == torch.float32  # "auto": an exact model stays exact
    quantize_model_(model, "int8")
    assert SlotKVCache.for_model(model, 1, 8).k[0].dtype == torch.float16  # "auto": quantized weights, fp32 on CPU


def test_int8_weights():
    model = tiny(1)
    quantize_model_(model, "int8")
    # Both sides round activations to int16 per row (kernels/int8_gemm.cpp); an fp32 round-off difference in a norm
    # can move one rounding by a step, so agreement is to ~1e-5 of the logits' scale, not to fp32 round-off.
    check_steps(model, {0: 7, 2: 3}, atol=1e-3, rtol=1e-3, cache_atol=1e-3)


def test_head_size_the_vector_attention_does_not_take():
    """head_dim 24 (not a multiple of the vector width): decode.cpp's scalar attention, fp32 and fp16 caches."""
    model = tiny(5, dim=96)
    assert model.config.head_dim == 24
    check_steps(model, {0: 70, 2: 3})
    check_steps(model, {0: 70, 2: 3}, cache_dtype="fp16", cache_atol=1e-3)


def test_sliding_window_and_mha():
    check_steps(tiny(2, sliding_window=4, n_kv_heads=4), {0: 9, 1: 2}, steps=4)


def test_structurally_pruned_layers():
    """Layers of different sizes (per-layer heads and MLP width), as prune/structured.py leaves them."""
    model = tiny(3)
    remove_kv_groups_(model.layers[0], torch.tensor([1]))  # layer 0: 1 KV group (2 query heads) of 2
    remove_mlp_channels_(model.layers[2], torch.arange(0, 96, 2))  # layer 2: half the MLP channels
    model.config = model.config.with_layer_sizes(_sizes(model))  # as the pruning commands record it
    check_steps(model, {0: 6, 1: 3})


def random_lora(model: Transformer, r: int, targets: list[str], seed: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """A LoRA adapter (adapter_config dict, PEFT tensors) with random A and B for `model`'s target projections."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, parent, attr in target_linears(model, tuple(targets)):
        lin = getattr(parent, attr)
        lin = getattr(lin, "base", lin)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = 0.2 * torch.randn(r, lin.in_features, generator=g)
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = 0.2 * torch.randn(lin.out_features, r, generator=g)
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": targets}
    return config, tensors


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_lora_rows(quantize):
    """Rows with different adapters (different ranks and targets) and rows without one, in one fused step."""
    model = tiny(6, max_seq_len=128)
    if quantize:
        quantize_model_(model, quantize)
    slots = LoraSlots.attach(model, n_slots=3, max_rank=8)
    slots.load(0, random_lora(model, 8, list(ALL_LINEARS), 1))
    slots.load(2, random_lora(model, 4, ["q_proj", "v_proj", "down_proj"], 2))
    tol = dict(atol=1e-3, rtol=1e-3, cache_atol=1e-3) if quantize else {}
    check_steps(model, {0: 5, 1: 70, 2: 3, 3: 9}, lora={0: 0, 1: 2, 3: 0}, **tol)  # slot 2's row: no adapter


def test_models_it_does_not_take():
    biased = tiny(attention_bias=True)
    assert FusedDecode.for_model(biased) is None
    assert FusedDecode.for_model(tiny().to(torch.bfloat16)) is None
    model = tiny()
    with kernels.disabled():
        assert FusedDecode.for_model(model) is None


def test_engine_uses_it_and_keeps_greedy_tokens(tiny_llama):
    """Same tokens with and without the fused step, LoRA slots attached (rows without an adapter take it)."""
    outs = []
    for fused in (True, False):
        llm = slimlm.load(str(tiny_llama[0]), dtype="fp32")
        engine = Engine(
            llm.model, llm.tokenizer, EngineConfig(max_batch=3, max_seq_len=96, max_loras=1, fused_decode=fused)
        )
        assert (engine.fused is not None) == fused
        reqs = [
            Request(
                llm.tokenizer.prompt_ids(f"story {i} " + "the cat " * i, chat=True),
                SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True),
            )
            for i in range(4)
        ]
        assert list(engine.generate(reqs))
        outs.append([r.output_ids for r in reqs])
    assert outs[0] == outs[1]


def test_int8_tokens_same_alone_batched_and_speculative(tiny_llama):
    """Batch-invariant matmuls: greedy tokens do not depend on the other rows, nor on verifying guesses."""
    llm = slimlm.load(str(tiny_llama[0]), dtype="fp32", quantize="int8")
    prompts = [f"story {i} " + "the cat sat on the mat " * (i + 1) for i in range(3)]
    outs = {}
    for name, cfg in {
        "batched": EngineConfig(max_loras=0),
        "alone": EngineConfig(max_loras=0, max_batch=1),
        "speculative": EngineConfig(max_loras=0, speculative="ngram"),
    }.items():
        llm.engine_config, llm._engine = cfg, None
        batch = [prompts] if name != "alone" else [[p] for p in prompts]
        outs[name] = [t for b in batch for t in llm.generate(b, max_new_tokens=24, temperature=0.0, ignore_eos=True)]
        assert llm._engine.fused is not None
    assert outs["alone"] == outs["batched"] == outs["speculative"]
    assert llm._engine.spec_proposed > 0  # the guesses were verified through the fused step


def test_int8_prefill_runs_through_the_fused_step(tiny_llama):
    """int8 weights: prompt chunks are rows of the fused step (fp32 weights keep the forward's GEMM), so a prompt's
    keys do not depend on how it was chunked or found in the prefix cache: the same tokens every way."""
    llm = slimlm.load(str(tiny_llama[0]), dtype="fp32", quantize="int8")
    assert FusedDecode.for_model(llm.model).prefills
    assert not FusedDecode.for_model(slimlm.load(str(tiny_llama[0]), dtype="fp32").model).prefills
    shared = "the cat sat on the mat and " * 6
    prompts = [llm.tokenizer.prompt_ids(shared + f"question {i}", chat=True) for i in range(3)]
    outs = {}
    for name, cfg in {
        "chunk 7": dict(prefill_chunk=7, prefix_cache=False),
        "whole": dict(prefix_cache=False),
        "prefix cache": dict(prefix_cache=True, prefix_block=4),
    }.items():
        e = Engine(llm.model, llm.tokenizer, EngineConfig(max_batch=1, max_seq_len=160, max_loras=0, **cfg))
        reqs = [Request(p, SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)) for p in prompts]
        for r in reqs:  # one at a time, so that later prompts find the first one's blocks
            list(e.generate([r]))
        outs[name] = [r.output_ids for r in reqs]
        if cfg["prefix_cache"]:
            assert e.prefix_cache.hits > 0
    assert outs["chunk 7"] == outs["whole"] == outs["prefix cache"]
