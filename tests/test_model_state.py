"""The state other packages put on a Transformer is declared in its __init__ (model.py), and declaring it changed
neither the state_dict nor the submodules: the keys after each PEFT method / quantization are written out here."""

import pytest
import torch
import torch.nn as nn

from slimlm.config import ModelConfig
from slimlm.model import Transformer
from slimlm.protocol import CausalLM

# Attribute -> its value on a fresh model; each is set by the package named in model.py's comment.
DECLARED = {
    "quantization": None,
    "qat": None,
    "smoothing": None,
    "peft": None,
    "lora_selection": None,
    "bitfit_config": None,
    "prefix_encoder": None,
    "lora_slots": None,
    "gradient_checkpointing": False,
    "position_offset": 0,
}
PROJECTIONS = [
    f"layers.{i}.{p}"
    for i in range(2)
    for p in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
]
NORMS = [f"layers.{i}.{n}.weight" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")]
BASE_KEYS = {"embed_tokens.weight", "norm.weight", "lm_head.weight", *NORMS, *(f"{p}.weight" for p in PROJECTIONS)}
NF4_BUFFERS = ("codes", "absmax_codes", "absmax_scale", "absmax_offset")


def tiny_model() -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig.from_name("tiny")
    assert config.n_layers == 2 and not config.tie_word_embeddings and not config.attention_bias  # as keyed above
    return Transformer(config)


def dense_except_projections() -> set[str]:
    return BASE_KEYS - {f"{p}.weight" for p in PROJECTIONS}


def test_fresh_model_declares_its_state_with_defaults():
    model = tiny_model()
    for name, default in DECLARED.items():
        assert name in vars(model), f"{name} is not set in Transformer.__init__"
        assert getattr(model, name) == default, name
    assert "prefix_encoder" not in model._modules  # None until apply_prefix puts a module there
    assert set(model.state_dict()) == BASE_KEYS
    assert isinstance(model, CausalLM) and not isinstance(nn.Linear(2, 2), CausalLM)


def test_lora_and_qlora_keys():
    from slimlm.peft import apply_peft, merge_adapter

    lora_keys = {f"{p}.adapters.default.lora_{ab}.weight" for p in PROJECTIONS for ab in "AB"}
    model = tiny_model()
    apply_peft(model, "lora")
    assert set(model.state_dict()) == dense_except_projections() | lora_keys | {f"{p}.base.weight" for p in PROJECTIONS}
    assert model.peft.method == "lora" and model.lora_selection.names == {"default"}
    merge_adapter(model)
    assert model.peft is None and model.lora_selection is None and set(model.state_dict()) == BASE_KEYS

    model = tiny_model()
    apply_peft(model, "qlora")
    nf4 = {f"{p}.base.{b}" for p in PROJECTIONS for b in NF4_BUFFERS}
    assert set(model.state_dict()) == dense_except_projections() | lora_keys | nf4
    assert model.peft.nf4_base and model.quantization is None  # QLoRA's NF4 base is a PEFT detail, not a scheme


def test_prefix_encoder_is_a_registered_submodule():
    from slimlm.peft import apply_peft

    model = tiny_model()
    apply_peft(model, "prefix")
    assert set(model.state_dict()) == BASE_KEYS | {"prefix_encoder.embedding.weight"}
    assert model._modules["prefix_encoder"] is model.prefix_encoder and "prefix_encoder" not in vars(model)
    assert any(p is model.prefix_encoder.embedding.weight for p in model.parameters())
    model.to(torch.float64)  # .to() reaches it, as any submodule
    assert model.prefix_encoder.embedding.weight.dtype == torch.float64


def test_bitfit_prompt_and_adapter_keys():
    from slimlm.peft import apply_peft, merge_adapter

    model = tiny_model()
    apply_peft(model, "bitfit")
    assert set(model.state_dict()) == BASE_KEYS | {f"{p}.bias" for p in PROJECTIONS}
    assert model.bitfit_config is not None
    merge_adapter(model)
    assert model.bitfit_config is None and model.peft is None

    model = tiny_model()
    apply_peft(model, "prompt")
    assert set(model.state_dict()) == BASE_KEYS - {"embed_tokens.weight"} | {
        "embed_tokens.base.weight",
        "embed_tokens.soft_prompt",
    }
    model = tiny_model()
    apply_peft(model, "adapter")
    wrapped = [p for p in PROJECTIONS if p.endswith(("o_proj", "down_proj"))]  # the bottleneck sits after these
    adapter_keys = {f"{p}.adapter.{d}.{w}" for p in wrapped for d in ("down", "up") for w in ("weight", "bias")}
    assert set(model.state_dict()) == (BASE_KEYS - {f"{p}.weight" for p in wrapped}) | adapter_keys | {
        f"{p}.base.weight" for p in wrapped
    }


@pytest.mark.parametrize("scheme", ["int8", "int8-dynamic"])
def test_quantized_keys(scheme):
    from slimlm.quantize.schemes import quantize_model_

    model = tiny_model()
    quantize_model_(model, scheme, 32)
    quantized = ["embed_tokens", "lm_head", *PROJECTIONS]
    assert set(model.state_dict()) == {
        "norm.weight",
        *NORMS,
        *(f"{m}.{b}" for m in quantized for b in ("qweight", "scale")),
    }
    assert model.quantization["scheme"] == scheme


def test_serving_lora_slots_are_not_module_state():
    from slimlm.engine.multi_lora import LoraSlots

    model = tiny_model()
    slots = LoraSlots.attach(model, 2, 4)
    assert model.lora_slots is slots and "lora_slots" not in model._modules
    assert set(model.state_dict()) == dense_except_projections() | {f"{p}.base.weight" for p in PROJECTIONS}


def test_onnx_runtime_model_declares_what_generic_code_reads():
    pytest.importorskip("numpy")
    from slimlm.export.ort import OrtModel

    assert OrtModel.peft is None and OrtModel.training is False
    assert OrtModel.dtype == torch.float32 and OrtModel.device == torch.device("cpu")
    assert not hasattr(OrtModel, "embed_tokens") and not hasattr(OrtModel, "parameters")  # no fakes left
