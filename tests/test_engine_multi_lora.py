"""engine/multi_lora.py: batched per-row LoRA slots against the grouped reference path, validation, LRU."""

from __future__ import annotations

import pytest
import torch

from slimlm.checkpoint.hf import load_hf_folder
from slimlm.engine.multi_lora import AdapterLRU, LoraSlots, SlotLoRALinear, SlotsBusy
from slimlm.kv_cache import KVCache
from slimlm.peft import apply_peft, make_config, save_adapter
from slimlm.peft.common import PeftError, read_adapter_files
from slimlm.peft.lora import LoraConfig, apply_lora, load_lora_state_dict, set_active_adapters

ADAPTERS = {  # name -> LoRA options; b has a different rank, targets and rsLoRA scaling
    "a": dict(r=4, alpha=8),
    "b": dict(r=2, alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True),
    "c": dict(r=8, alpha=8, target_modules=["o_proj"]),
}


def ids(batch=4, length=9, seed=0, vocab=384):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def fresh(tiny_llama):
    return load_hf_folder(tiny_llama[0])[1]


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory):
    """Adapter folders a, b, c with random non-zero B (as after training)."""
    out = tmp_path_factory.mktemp("adapters")
    for i, (name, options) in enumerate(ADAPTERS.items()):
        model = fresh(tiny_llama)
        apply_peft(model, "lora", make_config("lora", options))
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        save_adapter(model, out / name)
    return out


def reference(tiny_llama, adapters):
    """The training-side model with adapters a, b, c attached by name (one active at a time)."""
    model = fresh(tiny_llama)
    for name, options in ADAPTERS.items():
        apply_lora(model, LoraConfig(**options), name=name)
        load_lora_state_dict(model, read_adapter_files(adapters / name)[1], name=name)
    return model


def slotted(tiny_llama, adapters, n_slots=3, max_rank=8):
    model = fresh(tiny_llama)
    slots = LoraSlots.attach(model, n_slots=n_slots, max_rank=max_rank)
    for slot, name in enumerate(list(ADAPTERS)[:n_slots]):
        slots.load(slot, adapters / name)
    return model, slots


@torch.no_grad()
def test_mixed_batch_matches_grouped_reference_and_base_rows_are_exact(tiny_llama, adapters):
    x = ids()
    rows = ["a", None, "b", "a"]
    ref_model = reference(tiny_llama, adapters)
    base = fresh(tiny_llama)(x)
    alone = {None: base}  # each row's reference: its adapter alone over the whole batch
    for name in ("a", "b"):
        set_active_adapters(ref_model, name)
        alone[name] = ref_model(x)
    ref = torch.stack([alone[name][i] for i, name in enumerate(rows)])
    model, slots = slotted(tiny_llama, adapters)
    assert torch.equal(model(x), base)  # nothing selected: the slot path is skipped
    with slots.select([0, None, 1, 0]):
        out = model(x)
    assert (out - ref).abs().max().item() <= 1e-5
    assert torch.equal(out[1], base[1])  # a row without an adapter is the base model exactly
    assert (out[0] - base[0]).abs().max().item() > 1e-3 and (out[2] - out[0]).abs().max().item() > 1e-3
    with slots.select([None] * 4):
        assert torch.equal(model(x), base)
    assert torch.equal(model(x), base)  # select restored "no adapters"


@torch.no_grad()
def test_kv_cache_decode_matches_full_forward(tiny_llama, adapters):
    x = ids(3, 10, seed=1)
    model, slots = slotted(tiny_llama, adapters)
    cache = KVCache.for_model(model, batch_size=3, max_len=16)
    cache.reset()
    with slots.select([2, 0, None]):
        full = model(x)
        steps = [model(x[:, :6], cache=cache, cache_pos=torch.arange(6))[:, -1]]
        for t in range(6, 10):  # T = 1 decode steps
            steps.append(model(x[:, t : t + 1], cache=cache, cache_pos=torch.tensor([t]))[:, -1])
    decoded = torch.stack(steps[1:], dim=1)  # logits of positions 6..9
    assert (decoded - full[:, 6:10]).abs().max().item() <= 1e-5
    assert (steps[0] - full[:, 5]).abs().max().item() <= 1e-5


def test_refusals_name_the_problem(tiny_llama, adapters, tmp_path):
    model = fresh(tiny_llama)
    slots = LoraSlots.attach(model, n_slots=2, max_rank=4)
    with pytest.raises(PeftError, match="rank 8 but the slots' max_rank is 4"):
        slots.load(0, adapters / "c")
    dora = fresh(tiny_llama)
    apply_peft(dora, "lora", make_config("lora", dict(r=2, use_dora=True)))
    save_adapter(dora, tmp_path / "dora")
    with pytest.raises(PeftError, match="DoRA.*slimlm merge"):
        slots.load(0, tmp_path / "dora")
    # an adapter for a base with a different hidden size
    other = load_hf_folder(tiny_llama[0])[1]
    cfg, tensors = read_adapter_files(adapters / "a")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    wrong = {**tensors, key: torch.zeros(4, 32)}
    with pytest.raises(PeftError, match=r"different base model: layers\.0\.self_attn\.q_proj expects in=64.*got in=32"):
        slots.load(0, (cfg, wrong))
    with pytest.raises(PeftError, match="unknown keys.*lm_head"):
        slots.load(0, (cfg, {**tensors, "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)}))
    with pytest.raises(PeftError, match="peft_type 'PREFIX_TUNING'"):
        slots.load(0, ({**cfg, "peft_type": "PREFIX_TUNING"}, tensors))
    with pytest.raises(PeftError, match="uses alpha_pattern, lora_bias, which slots cannot run"):
        slots.load(0, ({**cfg, "alpha_pattern": {"q_proj": 2}, "lora_bias": True}, tensors))
    with pytest.raises(PeftError, match="slot 2 out of range"):
        slots.load(2, adapters / "a")
    with pytest.raises(PeftError, match=r"slots \[1\], which hold no adapter"):
        slots.set_rows([1, None])
    with pytest.raises(PeftError, match="already has LoRA slots"):
        LoraSlots.attach(model, n_slots=2, max_rank=4)
    with pytest.raises(PeftError, match="n_slots must be >= 1.*max_rank must be >= 1"):
        LoraSlots.attach(other, n_slots=0, max_rank=0)
    assert not slots.occupied  # nothing was written by a refused load
    assert all(not layer.A.any() for layer in slots.layers.values())


@torch.no_grad()
def test_load_writes_in_place_and_untargeted_modules_are_zero(tiny_llama, adapters):
    model = fresh(tiny_llama)
    slots = LoraSlots.attach(model, n_slots=2, max_rank=8)
    buffers = {n: (m.A.data_ptr(), m.B.data_ptr(), m.A) for n, m in slots.layers.items()}
    slots.load(1, adapters / "a")
    slots.load(1, adapters / "b")  # replace a with b in the same slot
    for n, m in slots.layers.items():
        assert (m.A.data_ptr(), m.B.data_ptr()) == buffers[n][:2] and m.A is buffers[n][2]
        targeted = n.rsplit(".", 1)[1] in ADAPTERS["b"]["target_modules"]
        assert bool(m.A[1].any()) == targeted and bool(m.B[1].any()) == targeted
        assert not m.A[1, 2:].any() and not m.B[1, 2:].any()  # rank 2 zero-padded to max_rank 8
        assert not m.A[-1].any() and not m.B[-1].any()  # the zero slot stays zero
    assert not any(name.endswith((".A", ".B")) for name in model.state_dict())  # slots are not checkpoint state
    assert isinstance(model.layers[0].mlp.down_proj, SlotLoRALinear)
    slots.clear(1)
    assert not any(m.A.any() or m.B.any() for m in slots.layers.values()) and not slots.occupied


def test_lru_eviction_pinning_reload_and_unload(tiny_llama, adapters):
    model = fresh(tiny_llama)
    slots = LoraSlots.attach(model, n_slots=2, max_rank=8)
    lru = AdapterLRU(capacity=2)
    loads = []

    def loader(name):
        def load(slot):
            loads.append((name, slot))
            slots.load(slot, adapters / name)

        return load

    x = ids(1, 8, seed=3)
    sa = lru.acquire("a", loader("a"))
    with torch.no_grad(), slots.select([sa]):
        first_a = model(x)
    sb = lru.acquire("b", loader("b"))
    assert {sa, sb} == {0, 1} and lru.loaded() == ["a", "b"]
    assert lru.acquire("a", loader("a")) == sa and lru.pins("a") == 2 and lru.loaded() == ["b", "a"]  # hit
    with pytest.raises(SlotsBusy, match="all 2 LoRA slots"):  # both pinned: c must wait
        lru.acquire("c", loader("c"))
    lru.release("b")
    assert lru.acquire("c", loader("c")) == sb and lru.loaded() == ["a", "c"]  # b (idle) evicted, a stays pinned
    lru.release("a"), lru.release("a"), lru.release("c")
    assert lru.acquire("b", loader("b")) == sa and lru.loaded() == ["c", "b"]  # now a is least recently used
    lru.release("b")
    assert lru.acquire("a", loader("a")) == sb and lru.slot_of("c") is None  # c evicted; a reloaded elsewhere
    with torch.no_grad(), slots.select([sb]):
        assert torch.equal(model(x), first_a)  # reload after eviction gives the same outputs
    with pytest.raises(SlotsBusy, match="in use by 1"):
        lru.unload("a")
    lru.release("a")
    freed = lru.unload("a")
    slots.clear(freed)
    assert freed == sb and lru.loaded() == ["b"]
    assert lru.acquire("c", loader("c")) == freed  # the freed slot is used before evicting b
    assert [n for n, _ in loads] == ["a", "b", "c", "b", "a", "c"]
    with pytest.raises(KeyError, match="without a matching acquire"):
        lru.release("b")
    with pytest.raises(KeyError, match="not loaded"):
        lru.unload("zzz")
