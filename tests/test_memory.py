"""slimlm.memory: published numbers on paper, trainable counts against the real PEFT methods, and the activation
formula against the bytes autograd actually saves in a tiny model's forward (exact, deterministic)."""

from __future__ import annotations

import argparse
import contextlib
import json

import pytest
import torch

from slimlm.config import ModelConfig
from slimlm.memory import MemoryQuery, MemoryQueryError, estimate_memory, preset_config
from slimlm.memory.activations import activations, autocast_copies
from slimlm.memory.distributed import fsdp_groups
from slimlm.memory.plan import (
    Plan,
    Precision,
    all_projections,
    make_plan,
    nf4_bytes,
    trainable_params,
    weight_bytes,
)
from slimlm.model import Transformer
from slimlm.peft import apply_peft, make_config

# Sizes chosen so that every projection has a distinct width and NF4's 64-value blocks divide every weight.
TINY = ModelConfig(vocab_size=256, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, intermediate_size=192, max_seq_len=256)
METHOD_OPTIONS = {  # the PEFT config each method gets in the model, and the same settings as MemoryQuery fields
    "full": ({}, {}),
    "lora": ({"r": 8}, {"lora_rank": 8}),
    "qlora": (
        {"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        {"lora_rank": 4, "lora_targets": ("q_proj", "v_proj", "down_proj")},
    ),
    "adapter": ({"bottleneck": 16}, {"adapter_bottleneck": 16}),
    "bitfit": ({"train_norms": True}, {"bitfit_train_norms": True}),
    "prefix": ({"num_virtual_tokens": 5}, {"num_virtual_tokens": 5}),
    "prompt": ({"num_virtual_tokens": 6}, {"num_virtual_tokens": 6}),
}


def _model(method: str, dtype: torch.dtype = torch.float32) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(TINY).to(dtype)
    apply_peft(model, method, make_config(method, METHOD_OPTIONS[method][0]))
    return model


def _query(method: str, **kw) -> MemoryQuery:
    mode = "train" if method == "full" else "finetune"
    return MemoryQuery(mode=mode, method=method, **METHOD_OPTIONS[method][1], **kw)


# ---- published points --------------------------------------------------------------------------------------------


def test_kv_cache_of_smollm2_135m_in_bf16_is_23040_bytes_per_token():
    config = preset_config("smollm2-135m")
    assert config.kv_cache_bytes_per_token(2) == 23_040  # 2 (k, v) x 30 layers x 3 KV heads x 64 x 2 bytes
    est = estimate_memory(config, MemoryQuery(mode="infer", dtype="bf16", batch=2, seq=100, kv_cache_tokens=1000))
    assert est.row("KV cache") == 2 * 1000 * 23_040


@pytest.mark.parametrize("dtype,weights,per_param", [("bf16", "fp32", 16), ("fp32", "fp32", 16), ("bf16", "bf16", 8)])
def test_adam_full_training_bytes_per_param(dtype, weights, per_param):
    # Mixed precision: 4 (fp32 weights = the master) + 4 (fp32 grads) + 8 (AdamW m, v) = 16 B/param, the same total
    # as the textbook 2 (bf16 weights) + 2 (grads) + 4 (master) + 8; pure bf16: 2 + 2 + 4 = 8.
    config = preset_config("7B")
    est = estimate_memory(config, MemoryQuery(mode="train", dtype=dtype, weights_dtype=weights))
    rows = ("weights", "trainable params", "gradients", "optimizer states", "fp32 master copies")
    assert sum(est.row(r) for r in rows) == per_param * config.num_params()


def test_presets_match_published_parameter_counts():
    counts = {
        "7B": 6_738_415_616,
        "13B": 13_015_864_320,
        "70B": 68_976_648_192,
        "llama-3-8b": 8_030_261_248,
        "135M": 134_515_008,
    }
    assert {k: preset_config(k).num_params() for k in counts} == counts


# ---- trainable parameters and weights vs the real methods ---------------------------------------------------------


@pytest.mark.parametrize("method", list(METHOD_OPTIONS))
def test_trainable_count_matches_the_applied_method(method):
    model = _model(method)
    params = {id(p): p for p in model.parameters()}.values()
    trained = sum(p.numel() for p in params if p.requires_grad)
    est = estimate_memory(TINY, _query(method, batch=1, seq=8))
    assert est.trainable == trained == trainable_params(TINY, make_plan(_query(method)))
    nf4 = sum(getattr(m, "num_weight_elements", 0) for m in model.modules())
    assert est.params == sum(p.numel() for p in params) + nf4


def test_adapter_pfeiffer_and_default_lora_counts():
    for method, options, fields in [
        ("adapter", {"style": "pfeiffer"}, {"adapter_style": "pfeiffer"}),
        ("lora", {}, {}),
    ]:
        model = Transformer(TINY)
        apply_peft(model, method, make_config(method, options))
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert trainable_params(TINY, make_plan(MemoryQuery(method=method, **fields))) == trained


def test_nf4_weight_bytes_are_what_the_model_stores():
    from slimlm.quantize import nf4

    assert (nf4.BLOCK_SIZE, nf4.SCALE_GROUP) == (64, 256)
    assert all(nf4_bytes(n) == nf4.nf4_bytes(n) for n in (4096, 64 * 256 * 3, 64 * 7))
    model = Transformer(TINY)
    nf4.quantize_model_nf4_(model)
    stored = sum(
        t.numel() * t.element_size()
        for name, t in [*model.named_parameters(), *model.named_buffers()]
        if name != "inv_freq"
    )
    assert weight_bytes(TINY, Plan(nf4=True), 4) == stored


# ---- activations vs what autograd saves ------------------------------------------------------------------------


def _saved_bytes(model: Transformer, ids: torch.Tensor, autocast: bool) -> int:
    """Bytes of every distinct non-parameter storage autograd saves during the forward (block activations, and
    autocast's bf16 weight copies)."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        model.hidden(ids)
    return sum(saved.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16", "autocast"])
@pytest.mark.parametrize("method", list(METHOD_OPTIONS))
def test_activation_formula_equals_the_bytes_autograd_saves(method, precision):
    if method == "qlora" and precision == "bf16":
        pytest.skip("QLoRA's adapters are fp32 (NF4 dequantizes to fp32): it trains under autocast, not pure bf16")
    batch, seq = 3, 24
    model = _model(method, torch.bfloat16 if precision == "bf16" else torch.float32).train()
    ids = torch.randint(0, TINY.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    if method == "prompt":
        from slimlm.peft.prompt import input_prefix_ids

        ids[:, :6] = torch.tensor(input_prefix_ids(model))
    q = _query(
        method,
        batch=batch,
        seq=seq,
        dtype="fp32" if precision == "fp32" else "bf16",
        weights_dtype="bf16" if precision == "bf16" else "fp32",
    )
    plan, p = make_plan(q), Precision.of(q)
    predicted = activations(TINY, q, plan, p, checkpointing=False)[0] + autocast_copies(TINY, q, plan, p, False)
    assert predicted == _saved_bytes(model, ids, autocast=precision == "autocast")


def test_checkpointing_keeps_block_inputs_and_one_block():
    q = MemoryQuery(mode="train", batch=2, seq=64)
    est = estimate_memory(TINY, q)
    block = est.activations_per_layer
    assert est.activations_checkpointed == 2 * 64 * TINY.n_layers * TINY.dim * 4 + block + (
        est.activations_full - TINY.n_layers * block
    )  # fixed terms (cos/sin, final norm, ids) are kept either way
    assert est.activations_checkpointed < est.activations_full


def test_the_total_is_persistent_rows_plus_the_larger_phase():
    small = estimate_memory(TINY, MemoryQuery(mode="train", batch=1, seq=4))
    assert small.peak_phase == "optimizer step"  # full training of a tiny batch: gradients + AdamW dominate
    big = estimate_memory(TINY, MemoryQuery(mode="train", batch=8, seq=256))
    assert big.peak_phase == "forward/backward"
    for est in (small, big):
        assert est.total == est.phase_total("persistent") + est.phase_total(est.peak_phase)


# ---- validation and the command line -------------------------------------------------------------------------------


def test_notes_follow_the_device():
    cpu = estimate_memory(TINY, MemoryQuery(mode="infer", batch=1, seq=8))
    cuda = estimate_memory(TINY, MemoryQuery(mode="train", batch=1, seq=8, device="cuda"))
    assert "Python process" in cpu.notes[0] and not any("CUDA" in n for n in cpu.notes)
    assert "CUDA context" in cuda.notes[0] and cuda.row("optimizer step temporaries") == 4 * TINY.num_params()


def test_query_errors_name_every_bad_field():
    with pytest.raises(MemoryQueryError, match=r"mode must be one of train, finetune, infer, got 'serve'"):
        MemoryQuery(mode="serve")
    with pytest.raises(MemoryQueryError, match=r"batch must be a positive integer, got -2.*seq must be"):
        MemoryQuery(batch=-2, seq=0)
    with pytest.raises(MemoryQueryError, match=r"fp16 training needs device cuda"):
        MemoryQuery(dtype="fp16")
    with pytest.raises(MemoryQueryError, match=r"mode train trains every weight; for method 'lora' use mode finetune"):
        MemoryQuery(mode="train", method="lora")
    with pytest.raises(MemoryQueryError, match=r"lora_targets \['qkv'\] are not projections"):
        MemoryQuery(lora_targets="qkv")
    with pytest.raises(MemoryQueryError, match=r"kv_cache_tokens applies to mode infer only"):
        MemoryQuery(kv_cache_tokens=10)
    with pytest.raises(MemoryQueryError, match=r"unknown preset '9B'"):
        preset_config("9B")


def _cli(*argv: str) -> argparse.Namespace:
    from slimlm.memory.cli import add_estimate_commands

    parser = argparse.ArgumentParser(prog="slimlm")
    add_estimate_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["estimate", *argv])


def test_cli_prints_a_table_and_json(capsys, tmp_path):
    args = _cli(
        "--params",
        "7B",
        "--mode",
        "finetune",
        "--method",
        "qlora",
        "--dtype",
        "bf16",
        "--device",
        "cuda",
        "--batch",
        "2",
        "--seq",
        "1024",
        "--grad-checkpointing",
    )
    assert args.func(args) == 0
    table = capsys.readouterr().out
    assert "total (peak)" in table and "CUDA context" in table and "NF4" in table
    (tmp_path / "config.json").write_text(json.dumps(TINY.to_hf()))
    args = _cli("--model", str(tmp_path), "--mode", "infer", "--batch", "2", "--seq", "16", "--json")
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    kv = next(r for r in out["rows"] if r["name"] == "KV cache")
    assert kv["bytes"] == 2 * 16 * TINY.kv_cache_bytes_per_token(4) and out["params"] == TINY.num_params()


def test_cli_rejects_bad_numbers_before_reading_the_model():
    args = _cli("--model", "/does/not/exist", "--batch", "0")
    with pytest.raises(MemoryQueryError, match="batch must be a positive integer"):
        args.func(args)


# ---- several processes: DDP and FSDP2, per rank ------------------------------------------------------------------


def _ranks(method: str, world_size: int, strategy: str | None, batch: int = 4, **kw) -> MemoryQuery:
    return _query(method, batch=batch, seq=32, world_size=world_size, strategy=strategy, **kw)


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("world_size", [2, 4])
def test_fsdp_keeps_one_shard_of_weights_gradients_and_optimizer_states(method, world_size):
    one = estimate_memory(TINY, _query(method, batch=4, seq=32))
    fsdp = estimate_memory(TINY, _ranks(method, world_size, "fsdp"))
    for name in ("weights", "trainable params", "optimizer states", "gradients"):
        assert fsdp.row(name) == -(-one.row(name) // world_size), name  # padding ignored: rounded up only
    assert fsdp.row("activations") == estimate_memory(TINY, _query(method, batch=4 // world_size, seq=32)).row(
        "activations"
    )  # each rank runs its share of the micro-batch
    assert fsdp.total < one.total and fsdp.total == fsdp.phase_total("persistent") + fsdp.phase_total(fsdp.peak_phase)


def test_fsdp_gathers_the_root_for_the_forward_and_holds_its_gradient_to_the_end():
    root = TINY.vocab_size * TINY.dim * 2 + TINY.dim  # untied embedding and head, final norm: the root group
    lora = estimate_memory(TINY, _query("lora", batch=16, seq=128, world_size=2, strategy="fsdp"))  # loss moment
    block = fsdp_groups(TINY, make_plan(_query("lora")), lora.trainable).block
    assert lora.row("FSDP gathered parameters") == 4 * (root + block)
    assert lora.row("FSDP root at backward end") == 4 * root
    full = estimate_memory(TINY, _ranks("full", 2, "fsdp", batch=2))
    # end of backward: the gathered root + its unsharded gradient twice, and the blocks' gradient shards
    assert full.row("FSDP root at backward end") == 3 * 4 * root
    block = fsdp_groups(TINY, make_plan(_query("full")), TINY.num_params()).block  # + its reduce-scatter input:
    assert full.row("sharded block gradients") == 4 * (TINY.num_params() - root) // 2 + 4 * block


def test_fsdp_counts_three_gathered_blocks_when_the_block_backward_holds_more_than_the_loss():
    wide = ModelConfig(
        vocab_size=64, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=1024, max_seq_len=64
    )  # big blocks, a small vocabulary and 2 tokens per rank
    est = estimate_memory(wide, MemoryQuery(mode="train", batch=2, seq=2, world_size=2, strategy="fsdp"))
    groups = fsdp_groups(wide, make_plan(MemoryQuery(mode="train")), wide.num_params())
    # root + 3 blocks + the root's gradient + the previous block's reduce-scatter input (full: a whole block)
    assert est.row("FSDP gathered parameters") == 4 * (groups.root + 4 * groups.block + groups.root_trainable)
    assert est.row("logits and loss") == 2 * 2 * wide.dim * 4  # d(hidden) twice, the loss's buffers are gone
    small = estimate_memory(TINY, MemoryQuery(mode="train", batch=16, seq=64, world_size=2, strategy="fsdp"))
    root = fsdp_groups(TINY, make_plan(MemoryQuery(mode="train")), TINY.num_params()).root
    block = fsdp_groups(TINY, make_plan(MemoryQuery(mode="train")), TINY.num_params()).block
    # small blocks, big logits: the loss moment, the root + the last block's all-gather buffer
    assert small.row("FSDP gathered parameters") == 4 * (root + block)


def test_ddp_replicates_and_adds_its_gradient_buckets():
    for method in ("full", "lora"):
        one = estimate_memory(TINY, _query(method, batch=2, seq=32))
        ddp = estimate_memory(TINY, _ranks(method, 2, "ddp"))  # 4 sequences over 2 ranks: 2 each
        assert ddp.row("DDP gradient buckets") == 4 * ddp.trainable
        assert ddp.total == one.total + ddp.row("DDP gradient buckets")


def test_qlora_under_fsdp_keeps_the_nf4_codes_whole_on_every_rank():
    one = estimate_memory(TINY, _query("qlora", batch=2, seq=32, dtype="bf16"))
    fsdp = estimate_memory(TINY, _ranks("qlora", 2, "fsdp", dtype="bf16"))
    codes = sum(nf4_bytes(a * b) for a, b in all_projections(TINY))
    assert fsdp.row("weights") == codes + -(-(one.row("weights") - codes) // 2)


@pytest.mark.parametrize("method", ["full", "lora", "qlora", "prompt", "bitfit"])
def test_fsdp_groups_match_the_model_split_as_wrap_model_shards_it(method):
    """Root group = parameters outside any Block (what fully_shard(root) takes); blocks = the rest; the largest
    block = the most parameters one Block holds (NF4 codes are buffers, not parameters)."""
    from slimlm.model import Block

    model = _model(method)
    in_blocks = {id(p) for m in model.modules() if isinstance(m, Block) for p in m.parameters()}
    root = [p for p in model.parameters() if id(p) not in in_blocks]
    blocks = [sum(p.numel() for p in m.parameters()) for m in model.modules() if isinstance(m, Block)]
    q = _query(method, batch=2, seq=8, **({"dtype": "bf16"} if method == "qlora" else {}))
    trainable = trainable_params(TINY, make_plan(q))
    groups = fsdp_groups(TINY, make_plan(q), trainable)
    assert groups.root == sum(p.numel() for p in root)
    assert groups.root_trainable == sum(p.numel() for p in root if p.requires_grad)
    assert groups.block == max(blocks)
    assert groups.block_trainable == sum(
        p.numel() for m in model.modules() if isinstance(m, Block) for p in m.parameters() if p.requires_grad
    )


def test_distributed_query_errors_say_what_to_change():
    assert MemoryQuery(batch=4, world_size=2).strategy == "ddp"  # the trainer's default
    with pytest.raises(
        MemoryQueryError,
        match=r"strategy fsdp splits training over several processes; add "
        r"world_size N > 1",
    ):
        MemoryQuery(strategy="fsdp")
    with pytest.raises(MemoryQueryError, match=r"strategy must be one of ddp, fsdp, got 'zero3'"):
        MemoryQuery(batch=2, world_size=2, strategy="zero3")
    with pytest.raises(MemoryQueryError, match=r"batch \(3\) is the micro-batch over all 2 processes.*multiple of 2"):
        MemoryQuery(batch=3, world_size=2)
    with pytest.raises(MemoryQueryError, match=r"world_size must be a positive integer, got 0"):
        MemoryQuery(world_size=0)
    with pytest.raises(MemoryQueryError, match=r"world_size applies to training"):
        MemoryQuery(mode="infer", batch=2, world_size=2)


def test_cli_says_the_numbers_are_per_rank(capsys):
    args = _cli(
        "--params", "smollm2-135m", "--method", "full", "--batch", "4", "--world-size", "2", "--strategy", "fsdp"
    )
    assert args.func(args) == 0
    table = capsys.readouterr().out
    assert "2 processes (fsdp), batch 2 each; numbers are per rank" in table
    assert "total per rank (peak)" in table and "FSDP2 keeps 1/2 of each parameter" in table
    args = _cli("--params", "smollm2-135m", "--world-size", "2", "--batch", "2", "--json")
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["query"]["strategy"] == "ddp" and any(r["name"] == "DDP gradient buckets" for r in out["rows"])


_RANK_SCRIPT = """
import json, sys
import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.tensor import DTensor
from slimlm.config import ModelConfig
from slimlm.model import Transformer
from slimlm.peft import apply_peft, make_config
from slimlm.train.resume import trainable_parameters
from slimlm.train.distributed import dist_info, init_distributed, shutdown, wrap_model
from slimlm.train.trainer import StepLoss, TrainConfig, accumulate_step, make_optimizer, optimizer_step


def local_bytes(tensors):
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in local)


def one_step(method, strategy, config):
    torch.manual_seed(0)
    model = Transformer(config)
    apply_peft(model, method, make_config(method, {"r": 8} if method == "lora" else {}))
    cfg = TrainConfig(batch_size=4, strategy=strategy)
    wrapped = wrap_model(StepLoss(model, None, cfg.loss_chunk_size), strategy)
    buckets = []
    if strategy == "ddp":  # DDP hands each flat gradient bucket to its communication hook
        def record(state, bucket):
            buckets.append(bucket.buffer().numel() * bucket.buffer().element_size())
            return default_hooks.allreduce_hook(state, bucket)
        wrapped.register_comm_hook(None, record)
    params = trainable_parameters(model)
    optimizer, scheduler = make_optimizer(params, cfg)
    ids = torch.randint(3, config.vocab_size, (2, 16))
    accumulate_step(wrapped, [{"input_ids": ids, "labels": ids}], cfg, step_tokens=64, world_size=2)
    grads = local_bytes(p.grad for p in params.values())
    optimizer_step(optimizer, scheduler, None, list(params.values()), 0.0)
    states = local_bytes(v for s in optimizer.state.values() for k, v in s.items() if k != "step")
    return {"params": local_bytes(model.parameters()), "grads": grads, "states": states, "buckets": sum(buckets)}


init_distributed("gloo")
config = ModelConfig(**json.loads(sys.argv[2]))
got = {f"{method} {strategy}": one_step(method, strategy, config) for method in ("full", "lora")
       for strategy in ("fsdp", "ddp")}
if dist_info().rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(got, f)
# Both ranks done with every collective before either tears gloo down (a rank that destroys its group while the
# other still runs one has aborted with "terminate called without an active exception").
torch.distributed.barrier()
shutdown()
"""


def test_per_rank_rows_match_what_ddp_and_fully_shard_keep_on_a_rank(tmp_path):
    """Two gloo processes wrap a tiny model as the trainer does (full and LoRA, FSDP2 and DDP); rank 0's local
    parameter, gradient and AdamW state bytes, and DDP's bucket bytes, are the estimate's per-rank rows (the dims
    are even: no FSDP padding)."""
    import os
    import subprocess
    import sys

    script, out = tmp_path / "rank.py", tmp_path / "rank0.json"
    script.write_text(_RANK_SCRIPT)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        str(script),
        str(out),
        json.dumps(TINY.to_dict()),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert len(results) == 4
    for point, got in results.items():
        method, strategy = point.split()
        est = estimate_memory(TINY, _query(method, batch=4, seq=16, world_size=2, strategy=strategy))
        assert got["params"] == est.row("weights") + est.row("trainable params"), point
        assert got["grads"] == est.row("gradients"), point
        assert got["states"] == est.row("optimizer states"), point
        assert got["buckets"] == est.row("DDP gradient buckets"), point  # 0 under FSDP2
