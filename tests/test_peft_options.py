"""HF PEFT LoRA options beyond r/alpha/targets: adapters made and saved by PEFT itself load here with PEFT's logits.

rank_pattern/alpha_pattern, layers_to_transform (+ layers_pattern), lora_bias and modules_to_save (lm_head and
embed_tokens, also after adding tokens); merging them; and what cannot work is refused with the reason.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import nudge_trainables_

from slimlm.checkpoint.hf import load_hf_folder
from slimlm.peft import apply_peft, load_adapter, make_config, merge_adapter, save_adapter
from slimlm.peft.common import PeftError

TOL = 1e-4
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
OPTIONS = {
    "patterns": dict(rank_pattern={"q_proj": 2, r"model\.layers\.1\.mlp\.up_proj": 8}, alpha_pattern={"v_proj": 3.0}),
    "layers": dict(layers_to_transform=[1], layers_pattern="layers"),
    "lora_bias": dict(lora_bias=True),
    "modules_to_save": dict(modules_to_save=["lm_head", "embed_tokens"]),
    "rslora_patterns": dict(use_rslora=True, rank_pattern={"down_proj": 6}, alpha_pattern={"layers.0.mlp.up_proj": 5}),
}


def ids(vocab=384, seed=0):
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


def peft_adapter(folder, arch="llama", seed=1, vocab=None, targets=TARGETS, **options):
    """An adapter trained (randomized) and saved by HF PEFT on the tiny HF model of `arch` and `seed`."""
    from conftest import make_hf_model
    from peft import LoraConfig, get_peft_model

    base = make_hf_model(arch, seed=seed)
    if vocab is not None:  # tokens were added: PEFT users resize the base before training
        base.resize_token_embeddings(vocab)
    hf = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, **options))
    g = torch.Generator().manual_seed(7)
    nudge_trainables_(hf, g)
    hf.save_pretrained(str(folder))
    return hf.eval()


@pytest.mark.parametrize("option", OPTIONS)
def test_peft_adapter_with_option_loads_with_peft_logits(option, tiny_llama, tmp_path):
    hf = peft_adapter(tmp_path / "a", **OPTIONS[option])
    _, model = load_hf_folder(tiny_llama[0])
    assert load_adapter(model, tmp_path / "a") == "lora"
    x = ids()
    with torch.no_grad():
        ref = hf(x).logits
        assert (model(x) - ref).abs().max().item() < TOL
        if option != "lora_bias":  # a bias-less Llama base has nowhere to merge lora_bias (checked below)
            merge_adapter(model)
            assert (model(x) - ref).abs().max().item() < TOL


def test_slimlm_saves_options_peft_loads_them(tiny_llama, tmp_path):
    """The other direction: trained here with the options, saved, loaded by PEFT with the same logits."""
    from conftest import make_hf_model
    from peft import PeftModel

    _, model = load_hf_folder(tiny_llama[0])
    cfg = make_config(
        "lora",
        dict(
            r=4,
            alpha=8,
            target_modules=TARGETS,
            rank_pattern={"q_proj": 2},
            alpha_pattern={"v_proj": 3.0},
            layers_to_transform=[0, 1],
            lora_bias=True,
            modules_to_save=["lm_head"],
        ),
    )
    apply_peft(model, "lora", cfg)
    g = torch.Generator().manual_seed(3)
    nudge_trainables_(model, g)
    save_adapter(model, tmp_path / "a", base_model=tiny_llama[0])
    raw = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert raw["rank_pattern"] == {"q_proj": 2} and raw["lora_bias"] and raw["modules_to_save"] == ["lm_head"]
    hf = PeftModel.from_pretrained(make_hf_model("llama", seed=1), str(tmp_path / "a")).eval()
    x = ids()
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max().item() < TOL


def test_modules_to_save_after_adding_tokens_resizes_the_vocabulary(tiny_llama, tmp_path):
    hf = peft_adapter(tmp_path / "a", vocab=400, modules_to_save=["lm_head", "embed_tokens"])
    _, model = load_hf_folder(tiny_llama[0])
    load_adapter(model, tmp_path / "a")
    x = ids(vocab=400)  # new tokens included
    with torch.no_grad():
        ref = hf(x).logits
        assert ref.shape[-1] == 400 and (model(x) - ref).abs().max().item() < TOL
        merge_adapter(model)
        assert model.config.vocab_size == 400 and (model(x) - ref).abs().max().item() < TOL


def test_slimlm_merge_of_option_adapter_loads_in_transformers(tiny_llama, tmp_path):
    """`slimlm merge` of an adapter with patterns, a layer subset and a resized vocabulary: an HF folder whose
    logits in transformers are PEFT's."""
    from transformers import AutoModelForCausalLM

    from slimlm.peft.merge import merge_to_folder

    hf = peft_adapter(
        tmp_path / "a",
        vocab=400,
        modules_to_save=["lm_head", "embed_tokens"],
        layers_to_transform=[0],
        rank_pattern={"up_proj": 2},
        alpha_pattern={"q_proj": 16},
    )
    report = merge_to_folder(tiny_llama[0], tmp_path / "a", tmp_path / "merged")
    assert report["drift_vs_unmerged"]["max_logit_diff"] < TOL
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).float().eval()
    x = ids(vocab=400)
    with torch.no_grad():
        assert (merged(x).logits - hf(x).logits).abs().max().item() < TOL


def test_modules_to_save_on_a_tied_model_unties_it(make_model_folder, tmp_path):
    from conftest import make_hf_model
    from peft import LoraConfig, get_peft_model

    folder, _ = make_model_folder("llama", seed=2, tie_word_embeddings=True)
    base = make_hf_model("llama", seed=2, tie_word_embeddings=True)
    peft_model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, modules_to_save=["lm_head"])
    )
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    peft_model.save_pretrained(str(tmp_path / "a"))
    _, model = load_hf_folder(folder)
    load_adapter(model, tmp_path / "a")
    x = ids()
    with torch.no_grad():
        assert (model(x) - peft_model.eval()(x).logits).abs().max().item() < TOL
    assert not model.config.tie_word_embeddings


def test_lora_bias_merges_into_a_base_bias_and_is_refused_without_one(make_model_folder, tiny_llama, tmp_path):
    folder, _ = make_model_folder("qwen2", seed=3)  # Qwen2's q/k/v have biases
    hf = peft_adapter(tmp_path / "q", arch="qwen2", seed=3, targets=["q_proj", "k_proj", "v_proj"], lora_bias=True)
    _, model = load_hf_folder(folder)
    load_adapter(model, tmp_path / "q")
    x = ids()
    with torch.no_grad():
        ref = hf(x).logits
        assert (model(x) - ref).abs().max().item() < TOL
        merge_adapter(model)
        assert (model(x) - ref).abs().max().item() < TOL
    peft_adapter(tmp_path / "l", lora_bias=True)
    _, llama = load_hf_folder(tiny_llama[0])
    load_adapter(llama, tmp_path / "l")
    with pytest.raises(PeftError, match="cannot merge lora_bias into .*no bias"):
        merge_adapter(llama)


def test_options_that_cannot_work_are_refused_by_name(tiny_llama, tmp_path):
    peft_adapter(tmp_path / "a", vocab=400, modules_to_save=["embed_tokens"])
    _, model = load_hf_folder(tiny_llama[0])
    with pytest.raises(PeftError, match="resize the vocabulary .* not both embed_tokens and lm_head"):
        load_adapter(model, tmp_path / "a")
    with pytest.raises(PeftError, match="lora_bias does not go with use_dora"):
        make_config("lora", dict(lora_bias=True, use_dora=True))
    with pytest.raises(PeftError, match=r"rank_pattern\['q_proj'\] = 0"):
        make_config("lora", dict(rank_pattern={"q_proj": 0}))
    with pytest.raises(PeftError, match=r"modules_to_save \['score'\] match no module"):
        apply_peft(load_hf_folder(tiny_llama[0])[1], "lora", make_config("lora", dict(modules_to_save=["score"])))


def test_options_are_finetune_flags():
    from slimlm.cli import build_parser
    from slimlm.recipe import apply_flags
    from slimlm.train.finetune import FinetuneConfig

    args = build_parser().parse_args(
        [
            "finetune",
            "--lora.rank_pattern",
            "q_proj=2,up_proj=8",
            "--lora.alpha_pattern",
            "v_proj=3",
            "--lora.layers_to_transform",
            "0,1",
            "--lora.lora_bias",
            "--lora.modules_to_save",
            "lm_head,embed_tokens",
            "--base-name",
            "org/base",
        ]
    )
    cfg = apply_flags(FinetuneConfig(), args)
    cfg.lora.validate()
    assert cfg.lora.rank_pattern == {"q_proj": 2, "up_proj": 8} and cfg.lora.alpha_pattern == {"v_proj": 3.0}
    assert cfg.lora.layers_to_transform == [0, 1] and cfg.lora.lora_bias
    assert cfg.lora.modules_to_save == ["lm_head", "embed_tokens"] and cfg.base_name == "org/base"
