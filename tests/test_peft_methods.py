"""peft/adapter.py, bitfit.py, prefix.py, prompt.py: trainable sets, zero-start, training, save/load, configs,
HF PEFT parity (prefix and prompt tuning), prefix tuning with the KV cache, BitFit merge -> HF reload."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from slimlm.checkpoint import load_model, save_hf_folder
from slimlm.generate import SamplingParams, generate_tokens, left_pad
from slimlm.kv_cache import KVCache
from slimlm.peft import adapter as adapter_mod
from slimlm.peft import bitfit as bitfit_mod
from slimlm.peft import prefix as prefix_mod
from slimlm.peft import prompt as prompt_mod
from slimlm.peft.adapter import AdapterConfig, AdapterOut, apply_adapter
from slimlm.peft.bitfit import BitFitConfig, apply_bitfit, merge_bitfit
from slimlm.peft.common import PeftError, read_adapter_files, save_adapter_files, trainable_summary
from slimlm.peft.prefix import PrefixConfig, apply_prefix
from slimlm.peft.prompt import PromptConfig, apply_prompt, input_prefix_ids
from slimlm.tokenizer import Tokenizer

TOL = 1e-4  # fp32 parity with HF
P = 5  # virtual tokens in the prefix / prompt tests

# name -> (module, its verbs' suffix, a config exercising it)
METHODS = {
    "adapter-houlsby": (adapter_mod, "adapter", AdapterConfig(style="houlsby", bottleneck=8)),
    "adapter-pfeiffer": (adapter_mod, "adapter", AdapterConfig(style="pfeiffer", bottleneck=8, activation="relu")),
    "bitfit": (bitfit_mod, "bitfit", BitFitConfig()),
    "bitfit-norms": (bitfit_mod, "bitfit", BitFitConfig(targets=["q_proj", "down_proj"], train_norms=True)),
    "prefix": (prefix_mod, "prefix", PrefixConfig(num_virtual_tokens=P)),
    "prefix-projection": (
        prefix_mod,
        "prefix",
        PrefixConfig(num_virtual_tokens=P, projection=True, encoder_hidden_size=16),
    ),
    "prompt": (prompt_mod, "prompt", PromptConfig(num_virtual_tokens=P)),
}


def verbs(name: str):
    """(config, apply, state_dict, adapter_config, config_from_adapter, load_state_dict) of a METHODS entry."""
    mod, x, cfg = METHODS[name]
    names = ("apply_{}", "{}_state_dict", "{}_adapter_config", "{}_config_from_adapter", "load_{}_state_dict")
    return (cfg, *(getattr(mod, n.format(x)) for n in names))


def random_ids(batch: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def base(folder):
    return load_model(folder)[2]


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the real tokens ids [B, T]: virtual prompt ids (if any) are prepended and their logits dropped."""
    pre = input_prefix_ids(model)
    x = torch.cat([torch.tensor(pre, dtype=torch.long).expand(ids.shape[0], -1), ids], dim=1)
    with torch.no_grad():
        return model(x)[:, len(pre) :]


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    pre = input_prefix_ids(model)
    x = torch.cat([torch.tensor(pre, dtype=torch.long).expand(ids.shape[0], -1), ids], dim=1)
    h = model.hidden(x)[:, len(pre) :]
    out = model.lm_head(h[:, :-1])
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1))


def randomize_trainables(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


# ---- every method: training, save/load, config round trip, load errors ----


@pytest.mark.parametrize("name", METHODS)
def test_training_steps_lower_the_loss(tiny_llama, name):
    cfg, apply, *_ = verbs(name)
    model = base(tiny_llama[0]).train()
    apply(model, cfg)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    ids = random_ids(2, 12, model.config.vocab_size, seed=1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = lm_loss(model, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen), "base weights moved"


@pytest.mark.parametrize("name", METHODS)
def test_save_then_load_into_fresh_base_gives_identical_logits(tiny_llama, tmp_path, name):
    cfg, apply, state_dict, adapter_config, config_from_adapter, load = verbs(name)
    model = base(tiny_llama[0])
    apply(model, cfg)
    randomize_trainables(model)
    save_adapter_files(tmp_path / "a", adapter_config(model, cfg), state_dict(model))

    d, tensors = read_adapter_files(tmp_path / "a")
    fresh = base(tiny_llama[0])
    apply(fresh, config_from_adapter(d))
    load(fresh, tensors)
    ids = random_ids(2, 10, model.config.vocab_size, seed=2)
    ours, again = logits(model, ids), logits(fresh, ids)
    if name == "prefix-projection":  # the file holds the MLP's output table: same numbers up to rounding
        assert max_diff(ours, again) <= 1e-5
    else:
        assert torch.equal(ours, again)


@pytest.mark.parametrize("name", METHODS)
def test_adapter_config_round_trip(tiny_llama, name):
    cfg, apply, _, adapter_config, config_from_adapter, _ = verbs(name)
    model = base(tiny_llama[0])
    apply(model, cfg)
    d = json.loads(json.dumps(adapter_config(model, cfg)))
    back = config_from_adapter(d)
    if name == "prefix-projection":  # the file holds the table, so the loaded adapter is a plain one
        assert back == PrefixConfig(num_virtual_tokens=P)
    elif name == "bitfit":
        assert back == BitFitConfig(targets=list(bitfit_mod.ALL_LINEARS))
    elif name == "bitfit-norms":
        assert back == BitFitConfig(targets=["q_proj", "down_proj"], train_norms=True)
    else:
        assert back == cfg
    with pytest.raises(PeftError, match="peft_type"):
        config_from_adapter({**d, "peft_type": "LORA"})


@pytest.mark.parametrize("name", METHODS)
def test_load_errors_name_the_keys_and_shapes(tiny_llama, name):
    cfg, apply, state_dict, _, _, load = verbs(name)
    model = base(tiny_llama[0])
    apply(model, cfg)
    good = {k: v.clone() for k, v in state_dict(model).items()}
    if name == "prefix-projection":  # a projection encoder cannot take a table
        with pytest.raises(PeftError, match="projection"):
            load(model, good)
        return
    first = min(good)
    with pytest.raises(PeftError, match=rf"missing {first}.*unexpected bogus\.weight"):
        load(model, {**{k: v for k, v in good.items() if k != first}, "bogus.weight": torch.zeros(1)})
    with pytest.raises(PeftError, match=rf"shape mismatch {first}: file \(3,\)"):
        load(model, {**good, first: torch.zeros(3)})


@pytest.mark.parametrize("name", METHODS)
def test_methods_train_on_an_nf4_base(tiny_llama, name):
    from slimlm.quantize.nf4 import NF4Linear, quantize_model_nf4_

    cfg, apply, state_dict, *_ = verbs(name)
    model = base(tiny_llama[0])
    quantize_model_nf4_(model)
    apply(model, cfg)
    assert isinstance(model.layers[0].self_attn.q_proj, NF4Linear)
    lm_loss(model, random_ids(2, 8, model.config.vocab_size)).backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
    assert sum(t.numel() for t in state_dict(model).values()) > 0


def test_configs_collect_every_error():
    with pytest.raises(PeftError, match="style.*bottleneck.*activation.*dropout"):
        AdapterConfig(style="x", bottleneck=0, activation="swish", dropout=1.5).validate()
    with pytest.raises(PeftError, match="targets.*wq.*train_norms"):
        BitFitConfig(targets="wq", train_norms="yes").validate()
    with pytest.raises(PeftError, match="num_virtual_tokens.*projection.*encoder_hidden_size"):
        PrefixConfig(num_virtual_tokens=0, projection=1, encoder_hidden_size=-1).validate()
    with pytest.raises(PeftError, match="num_virtual_tokens.*init_text"):
        PromptConfig(num_virtual_tokens=-2, init_text="  ").validate()
    with pytest.raises(PeftError, match="task_type.*num_transformer_submodules"):
        prefix_mod.prefix_config_from_adapter(
            {
                "peft_type": "PREFIX_TUNING",
                "task_type": "SEQ_2_SEQ_LM",
                "num_transformer_submodules": 2,
                "num_virtual_tokens": 4,
            }
        )


# ---- bottleneck adapters ----


@pytest.mark.parametrize(
    "style,slots", [("houlsby", ("self_attn.o_proj", "mlp.down_proj")), ("pfeiffer", ("mlp.down_proj",))]
)
def test_adapter_trainables_shapes_and_zero_start(tiny_llama, style, slots):
    model = base(tiny_llama[0])
    ids = random_ids(2, 10, model.config.vocab_size)
    before, total = logits(model, ids), trainable_summary(model).total
    apply_adapter(model, AdapterConfig(style=style, bottleneck=8))
    D, L = model.config.dim, model.config.n_layers
    expected = {
        f"layers.{i}.{s}.adapter.{p}"
        for i in range(L)
        for s in slots
        for p in ("down.weight", "down.bias", "up.weight", "up.bias")
    }
    assert trainable_names(model) == expected
    assert set(adapter_mod.adapter_state_dict(model)) == expected
    wrapped = model.layers[0].mlp.down_proj
    assert isinstance(wrapped, AdapterOut) and wrapped.adapter.down.weight.shape == (8, D)
    assert wrapped.adapter.up.weight.shape == (D, 8) and wrapped.out_features == D
    n = L * len(slots) * (2 * 8 * D + 8 + D)
    summary = trainable_summary(model)
    assert (summary.trainable, summary.total) == (n, total + n)
    assert torch.equal(logits(model, ids), before), "up is zero-initialised: the adapted model starts as the base"


# ---- BitFit ----


def test_bitfit_adds_zero_biases_and_starts_at_base(tiny_llama):
    model = base(tiny_llama[0])
    ids = random_ids(2, 10, model.config.vocab_size)
    before, total = logits(model, ids), trainable_summary(model).total
    apply_bitfit(model, BitFitConfig(targets="q_proj,v_proj", train_norms=True))
    L = model.config.n_layers
    expected = (
        {f"layers.{i}.self_attn.{m}_proj.bias" for i in range(L) for m in "qv"}
        | {f"layers.{i}.{n}.weight" for i in range(L) for n in ("input_layernorm", "post_attention_layernorm")}
        | {"norm.weight"}
    )
    assert trainable_names(model) == expected == set(bitfit_mod.bitfit_state_dict(model))
    q, v = model.layers[0].self_attn.q_proj, model.layers[0].self_attn.v_proj
    assert q.bias.shape == (q.out_features,) and not q.bias.any() and model.layers[0].self_attn.k_proj.bias is None
    n_bias = L * (q.out_features + v.out_features)
    summary = trainable_summary(model)
    assert summary.total == total + n_bias
    assert summary.trainable == n_bias + (2 * L + 1) * model.config.dim
    assert max_diff(logits(model, ids), before) <= 1e-6


def test_bitfit_unfreezes_existing_qwen2_biases(make_model_folder):
    model = base(make_model_folder("qwen2", seed=2, tokenizer=False)[0])
    qb = model.layers[0].self_attn.q_proj.bias.detach().clone()
    apply_bitfit(model, BitFitConfig(targets="all-linear"))
    attn = model.layers[0].self_attn
    assert torch.equal(attn.q_proj.bias, qb) and attn.q_proj.bias.requires_grad  # kept, now trainable
    assert attn.o_proj.bias is not None and not attn.o_proj.bias.any()  # added
    assert len(trainable_names(model)) == 7 * model.config.n_layers


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_bitfit_merge_then_hf_reload_matches(make_model_folder, tmp_path, arch):
    from transformers import AutoModelForCausalLM

    model = base(make_model_folder(arch, seed=3, tokenizer=False)[0])
    apply_bitfit(model, BitFitConfig(targets="q_proj,o_proj,up_proj", train_norms=True))
    randomize_trainables(model, seed=4)
    ids = random_ids(2, 12, model.config.vocab_size, seed=5)
    before = logits(model, ids)
    merge_bitfit(model)
    assert model.config.attention_bias and model.config.mlp_bias and model.config.model_type == "llama"
    assert all(
        getattr(m, p).bias is not None
        for layer in model.layers
        for m, ps in (
            (layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
            (layer.mlp, ("gate_proj", "up_proj", "down_proj")),
        )
        for p in ps
    )
    assert torch.equal(logits(model, ids), before)
    save_hf_folder(model, tmp_path / "merged")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), attn_implementation="eager").float().eval()
    with torch.no_grad():
        ref = hf(ids).logits
    assert max_diff(ref, before) <= TOL
    assert max_diff(base(tmp_path / "merged")(ids), before) <= 1e-5  # and slimlm reads it back too


def test_bitfit_merge_refuses_a_sliding_window(make_model_folder):
    model = base(make_model_folder("mistral", seed=2, tokenizer=False, sliding_window=8)[0])
    apply_bitfit(model, BitFitConfig())
    with pytest.raises(PeftError, match="sliding window"):
        merge_bitfit(model)


# ---- prefix tuning ----


@pytest.mark.parametrize("projection", [False, True], ids=["table", "projection"])
def test_prefix_trainables_and_shapes(tiny_llama, projection):
    model = base(tiny_llama[0])
    total = trainable_summary(model).total
    apply_prefix(model, PrefixConfig(num_virtual_tokens=P, projection=projection))
    c = model.config
    token_dim = c.n_kv_heads * c.head_dim
    names = {"prefix_encoder.embedding.weight"}
    if projection:
        names |= {f"prefix_encoder.transform.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    assert trainable_names(model) == names
    assert model.position_offset == P
    n = sum(p.numel() for p in model.prefix_encoder.parameters())
    assert trainable_summary(model).trainable == n and trainable_summary(model).total == total + n
    table = prefix_mod.prefix_state_dict(model)["prompt_embeddings"]
    assert table.shape == (P, c.n_layers * 2 * token_dim)
    k, v = model.prefix_encoder.layer_kv(1)
    assert k.shape == v.shape == (c.n_kv_heads, P, c.head_dim)
    # layer 1's values are rows block 2*1+1 of PEFT's view(P, L*2, Hkv, hd)
    assert max_diff(v, table.view(P, c.n_layers * 2, c.n_kv_heads, c.head_dim)[:, 3].transpose(0, 1)) <= 1e-6


@pytest.mark.parametrize("projection", [False, True], ids=["table", "projection"])
def test_prefix_matches_hf_peft(tiny_llama, tmp_path, projection):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = tiny_llama[0]
    model = base(folder)
    cfg = PrefixConfig(num_virtual_tokens=P, projection=projection, encoder_hidden_size=24 if projection else None)
    apply_prefix(model, cfg)
    randomize_trainables(model, seed=7)
    save_adapter_files(
        tmp_path / "a", prefix_mod.prefix_adapter_config(model, cfg), prefix_mod.prefix_state_dict(model)
    )
    hf = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager").float().eval()
    peft_model = PeftModel.from_pretrained(hf, str(tmp_path / "a")).eval()
    ids = random_ids(2, 11, model.config.vocab_size, seed=8)
    ours = logits(model, ids)
    with torch.no_grad():
        ref_masked = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        ref = peft_model(input_ids=ids).logits
    assert ref.abs().max() > 0.5
    assert max_diff(ours, ref_masked) <= TOL
    assert max_diff(ours, ref) <= TOL


def test_prefix_with_kv_cache_matches_full_forward(tiny_llama):
    model = base(tiny_llama[0])
    apply_prefix(model, PrefixConfig(num_virtual_tokens=P))
    randomize_trainables(model, seed=9)
    ids = random_ids(2, 16, model.config.vocab_size, seed=10)
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.for_model(model, batch_size=2, max_len=20)
        cache.reset()
        steps = [model(ids[:, :7], cache=cache, cache_pos=torch.arange(7))]
        for t in range(7, 16):
            steps.append(model(ids[:, t : t + 1], cache=cache, cache_pos=torch.tensor([t])))
    assert max_diff(torch.cat(steps, dim=1), full) <= 1e-5


def test_prefix_left_padded_batch_matches_each_prompt_alone(tiny_llama):
    model = base(tiny_llama[0])
    apply_prefix(model, PrefixConfig(num_virtual_tokens=P, projection=True))
    randomize_trainables(model, seed=11)
    V = model.config.vocab_size
    prompts = [random_ids(1, 9, V, seed=12)[0].tolist(), random_ids(1, 4, V, seed=13)[0].tolist()]
    ids, start = left_pad(prompts, pad_id=0, device=torch.device("cpu"))
    T = ids.shape[1]
    nxt = torch.tensor([[17], [23]])
    with torch.no_grad():
        cache = KVCache.for_model(model, batch_size=2, max_len=T + 1)
        cache.reset(start)
        batch = model(ids, cache=cache, cache_pos=torch.arange(T))
        step = model(nxt, cache=cache, cache_pos=torch.tensor([T]))
        for i, p in enumerate(prompts):
            alone = model(torch.tensor([p + [nxt[i, 0].item()]]))
            assert max_diff(batch[i, T - len(p) :], alone[0, :-1]) <= 1e-5, f"row {i} prefill"
            assert max_diff(step[i, -1], alone[0, -1]) <= 1e-5, f"row {i} decode"
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    together = list(generate_tokens(model, prompts, params))
    for i, p in enumerate(prompts):
        assert [s[i] for s in together] == [s[0] for s in generate_tokens(model, [p], params)]


def test_prefix_trains_with_gradient_checkpointing(tiny_llama):
    model = base(tiny_llama[0])
    apply_prefix(model, PrefixConfig(num_virtual_tokens=P, projection=True))
    ids = random_ids(2, 8, model.config.vocab_size)
    lm_loss(model, ids).backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    model.gradient_checkpointing = True
    lm_loss(model, ids).backward()
    assert all(max_diff(p.grad, plain[n]) <= 1e-6 for n, p in model.named_parameters() if p.requires_grad)


# ---- prompt tuning ----


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_prompt_trainables_ids_and_embedding_access(make_model_folder, tied):
    model = base(make_model_folder("llama", seed=4, tokenizer=False, tie_word_embeddings=tied)[0])
    weight, total = model.embed_tokens.weight, trainable_summary(model).total
    apply_prompt(model, PromptConfig(num_virtual_tokens=P))
    V, D = model.config.vocab_size, model.config.dim
    assert trainable_names(model) == {"embed_tokens.soft_prompt"}
    assert trainable_summary(model).trainable == P * D and trainable_summary(model).total == total + P * D
    assert input_prefix_ids(model) == list(range(V, V + P))
    assert model.embed_tokens.weight is weight and model.dtype == torch.float32
    assert (model.lm_head.weight is weight) == tied
    assert model(torch.tensor([input_prefix_ids(model) + [5, 6]])).shape == (1, P + 2, V)  # never predicts virtual ids
    emb = model.embed_tokens(torch.tensor([[V + 2, 7]]))
    assert torch.equal(emb[0, 0], model.embed_tokens.soft_prompt[2]) and torch.equal(emb[0, 1], weight[7])
    assert input_prefix_ids(base(make_model_folder("llama", seed=4, tokenizer=False)[0])) == []


def test_prompt_text_init_copies_token_embeddings(tiny_llama, hf_tokenizer):
    tok = Tokenizer(hf_tokenizer)
    model = base(tiny_llama[0])
    text = "the cat sat"
    ids = tok.encode(text, add_special_tokens=False)
    n = 2 * len(ids) + 1  # repeated, then truncated
    apply_prompt(model, PromptConfig(num_virtual_tokens=n, init_text=text), tokenizer=tok)
    want = (ids * 3)[:n]
    assert torch.equal(model.embed_tokens.soft_prompt, model.embed_tokens.weight[want])
    cfg = PromptConfig(num_virtual_tokens=n, init_text=text)
    d = prompt_mod.prompt_adapter_config(model, cfg)
    assert (d["prompt_tuning_init"], d["prompt_tuning_init_text"]) == ("TEXT", text)
    assert d["tokenizer_name_or_path"] == hf_tokenizer.name_or_path
    model.embed_tokens.tokenizer_name_or_path = None  # PEFT refuses TEXT without a tokenizer path: say RANDOM
    d = prompt_mod.prompt_adapter_config(model, cfg)
    assert (d["prompt_tuning_init"], d["prompt_tuning_init_text"]) == ("RANDOM", text)
    assert prompt_mod.prompt_config_from_adapter(d) == PromptConfig(num_virtual_tokens=n)  # loading needs no tokenizer
    with pytest.raises(PeftError, match="needs the tokenizer"):
        apply_prompt(base(tiny_llama[0]), PromptConfig(init_text=text))


@pytest.mark.parametrize("init_text", [None, "the quick brown fox"], ids=["random", "text"])
def test_prompt_matches_hf_peft(tiny_llama, tmp_path, hf_tokenizer, init_text):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = tiny_llama[0]
    model = base(folder)
    cfg = PromptConfig(num_virtual_tokens=P, init_text=init_text)
    apply_prompt(model, cfg, tokenizer=Tokenizer(hf_tokenizer))
    randomize_trainables(model, seed=6)
    save_adapter_files(
        tmp_path / "a", prompt_mod.prompt_adapter_config(model, cfg), prompt_mod.prompt_state_dict(model)
    )
    hf = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager").float().eval()
    peft_model = PeftModel.from_pretrained(hf, str(tmp_path / "a")).eval()
    ids = random_ids(2, 11, model.config.vocab_size, seed=8)
    with torch.no_grad():
        ref = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert ref.shape == (2, P + 11, model.config.vocab_size)  # PEFT returns the virtual positions too
    assert max_diff(logits(model, ids), ref[:, P:]) <= TOL


def test_prompt_generation_with_kv_cache_matches_full_forward(tiny_llama):
    model = base(tiny_llama[0])
    apply_prompt(model, PromptConfig(num_virtual_tokens=P))
    pre = input_prefix_ids(model)
    prompt = pre + random_ids(1, 6, model.config.vocab_size, seed=3)[0].tolist()
    out = [s[0] for s in generate_tokens(model, [prompt], SamplingParams(max_new_tokens=5, ignore_eos=True))]
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(5):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[len(prompt) :]
