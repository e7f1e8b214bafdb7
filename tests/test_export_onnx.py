"""ONNX export and the ONNX Runtime backend: graph parity, quantized files, same greedy text as PyTorch."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from slimlm.export.onnx import METADATA_FILE, ONNX_FILE, export_onnx  # noqa: E402
from slimlm.export.ort import OrtModel, graph_attention_mask  # noqa: E402
from slimlm.generate import SamplingParams  # noqa: E402
from slimlm.kv_cache import KVCache  # noqa: E402
from slimlm.llm import (  # noqa: E402
    LLM,
    load,
    load_onnx_llm,  # noqa: E402
)


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return load(tiny_llama[0], dtype="fp32")


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "fp32"
    meta = export_onnx(tiny.model, tiny.tokenizer, out)
    return out, meta


def test_export_writes_folder_and_graph_matches_pytorch(exported):
    out, meta = exported
    assert (out / ONNX_FILE).is_file() and (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert json.loads((out / METADATA_FILE).read_text())["layout"] == "hf-decoder-with-past"
    assert meta["parity"]["max_logit_diff"] <= 1e-3  # left-padded prefill + 2 decode steps, fp32


def test_graph_has_dynamic_kv_io(exported):
    import onnxruntime as ort

    out, _ = exported
    s = ort.InferenceSession(str(out / ONNX_FILE))
    names = [i.name for i in s.get_inputs()]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3] == "past_key_values.0.key" and [o.name for o in s.get_outputs()][1] == "present.0.key"
    batch, heads, past, hd = s.get_inputs()[3].shape
    assert isinstance(batch, str) and isinstance(past, str) and heads == 2 and hd == 16


def test_ort_model_full_forward_matches_model(tiny, exported):
    ids = torch.randint(3, 300, (2, 9))
    ort_logits = OrtModel(exported[0])(ids)
    assert (ort_logits - tiny.model(ids)).abs().max() <= 1e-4


def test_ort_backend_generates_the_same_text(tiny, exported):
    ort_llm = load_onnx_llm(exported[0])
    prompts = ["the cat sat on the mat", "hello world what is the capital of France and why"]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    want = tiny.complete(prompts, params, chat=False)
    got = ort_llm.complete(prompts, params, chat=False)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]  # batched, left-padded, greedy


def test_attention_mask_for_left_padded_prefill_and_decode():
    cache = KVCache(1, 2, 1, 4, 8)
    cache.reset(torch.tensor([2, 0]))  # row 0 has 2 pad slots
    pos, m4 = cache.positions_and_mask(torch.arange(4), None, 4)
    mask, P = graph_attention_mask(torch.arange(4).expand(2, 4), m4)
    assert P == 0 and mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    pos, m4 = cache.positions_and_mask(torch.tensor([4]), None, 5)
    mask, P = graph_attention_mask(torch.tensor([4]).expand(2, 1), m4)
    assert P == 4 and mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_export_keeps_low_bit_weights(tiny_llama, tmp_path, scheme):
    import onnx

    llm = load(tiny_llama[0], dtype="fp32", quantize=scheme, group_size=32)
    meta = export_onnx(llm.model, llm.tokenizer, tmp_path / scheme, int8_compute=False)
    g = onnx.load(str(tmp_path / scheme / ONNX_FILE))
    nbits = [n for n in g.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 2 * 7 + 1  # every block linear and the LM head
    assert {a.i for n in nbits for a in n.attribute if a.name == "bits"} == ({8} if scheme == "int8" else {4, 8})
    big_float = [
        i.name
        for i in g.graph.initializer
        if i.data_type == onnx.TensorProto.FLOAT and int(torch.tensor(i.dims).prod()) >= 64 * 64
    ]
    assert big_float == []  # no weight matrix is stored in fp32
    assert meta["parity"]["max_logit_diff"] <= 1e-3  # same codes, fp32 arithmetic on both sides
    ort_llm = load_onnx_llm(tmp_path / scheme)
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    got = ort_llm.complete(["the quick brown fox"], params, chat=False)[0]
    assert got.completion_tokens == 8
    # The default: ORT's int8-compute kernels (activations quantized per block): close, not exact.
    fast = export_onnx(llm.model, llm.tokenizer, tmp_path / f"{scheme}-fast")
    levels = {
        a.i
        for n in onnx.load(str(tmp_path / f"{scheme}-fast" / ONNX_FILE)).graph.node
        if n.op_type == "MatMulNBits"
        for a in n.attribute
        if a.name == "accuracy_level"
    }
    assert levels == {4} and fast["int8_compute"] and 0 < fast["parity"]["max_logit_diff"] <= 0.5


def test_export_refuses_unmerged_adapter(tiny_llama, tmp_path):
    from slimlm.peft import apply_peft

    llm = load(tiny_llama[0], dtype="fp32")
    apply_peft(llm.model, "lora")
    with pytest.raises(ValueError, match="unmerged lora adapter"):
        export_onnx(llm.model, llm.tokenizer, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_served_by_onnxruntime_same_text_as_torch(tiny_llama, exported):
    """A real HTTP server on the ORT backend: concurrent requests (continuous batching over the slot cache) get
    the same greedy completions as the PyTorch server."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from serve_helpers import running_server

    from slimlm.engine.core import EngineConfig
    from slimlm.serve.state import ServeConfig

    prompts = ["the cat sat", "hello world what is", "a big red fox jumps over the lazy dog and", "tell me"]

    def completions(config: ServeConfig) -> list[str]:
        with running_server(config) as (url, _):

            def one(p):
                body = {"model": "tiny", "prompt": p, "max_tokens": 10, "ignore_eos": True, "temperature": 0}
                return httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]

            with ThreadPoolExecutor(4) as pool:
                return list(pool.map(one, prompts))

    engine = dict(max_batch=4, max_seq_len=64, prefill_chunk=4)  # prompts take several chunks, rows interleave
    want = completions(
        ServeConfig(model=str(tiny_llama[0]), served_name="tiny", dtype="fp32", engine=EngineConfig(**engine))
    )
    got = completions(
        ServeConfig(model=str(exported[0]), served_name="tiny", backend="onnxruntime", engine=EngineConfig(**engine))
    )
    assert got == want


def test_generate_cli_onnxruntime_backend(tiny_llama, exported, capsys):
    from slimlm.cli import main

    args = ["generate", "--prompt", "the cat sat on", "--raw", "--max-new-tokens", "8", "--ignore-eos", "--json"]
    assert main(args + ["--model", str(tiny_llama[0]), "--dtype", "fp32"]) == 0
    want = json.loads(capsys.readouterr().out)["text"]
    assert main(args + ["--model", str(exported[0]), "--backend", "onnxruntime"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == want
    assert main(args + ["--model", str(exported[0]), "--backend", "onnxruntime", "--quantize", "int8"]) == 2
    assert "cannot be used with the onnxruntime backend" in capsys.readouterr().err


def test_tensorrt_needs_cuda_and_tensorrt(exported, tmp_path):
    from slimlm.export.tensorrt import build_tensorrt_engine

    if torch.cuda.is_available():
        pytest.importorskip("tensorrt")
        info = build_tensorrt_engine(exported[0], tmp_path / "trt", max_batch=2, max_len=64)
        assert (tmp_path / "trt" / "model.plan").stat().st_size > 0 and info["format"] == "tensorrt"
    else:
        with pytest.raises(ValueError, match=r"requires CUDA \+ tensorrt: a CUDA GPU"):
            build_tensorrt_engine(exported[0], tmp_path / "trt")


def test_fused_and_head_pruned_model_exports(tiny_llama, tmp_path):
    """Fused projections and per-layer KV head counts (non-uniform pruning) go through the same graph."""
    from slimlm.fuse import fuse_model_
    from slimlm.prune import prune_heads_

    llm = load(tiny_llama[0], dtype="fp32")
    prune_heads_(llm.model, 0.25, torch.randint(3, 300, (4, 16)), uniform=False)
    heads = [layer.self_attn.n_kv_heads for layer in llm.model.layers]
    assert len(set(heads)) == 2  # one layer lost its group
    fuse_model_(llm.model, "norms,qkv,gate_up")
    meta = export_onnx(llm.model, llm.tokenizer, tmp_path / "o")
    assert meta["parity"]["max_logit_diff"] <= 1e-3
    ort_llm = load_onnx_llm(tmp_path / "o")
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    want = LLM(llm.model, llm.tokenizer).complete(["the cat sat"], params, chat=False)[0].token_ids
    assert ort_llm.complete(["the cat sat"], params, chat=False)[0].token_ids == want
