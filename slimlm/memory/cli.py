"""`slimlm estimate`: how much memory inference, fine-tuning or training of a model needs, from its config alone.

    slimlm estimate --model smollm2-135m --mode finetune --method lora --batch 8 --seq 512
    slimlm estimate --params 7B --mode finetune --method qlora --dtype bf16 --device cuda --grad-checkpointing
    slimlm estimate --model meta-llama/Llama-3.1-8B --mode infer --dtype bf16 --batch 4 --kv-cache-tokens 8192
    slimlm estimate --params 70B --mode train --dtype bf16 --optimizer adamw8bit --json
    slimlm estimate --model smollm2-135m --mode finetune --method full --batch 8 --world-size 2 --strategy fsdp

The model is read as a config only: a preset (--params 7B, or a name such as llama-3-8b), an HF folder's or a
hub id's config.json (only that file is downloaded), or a GGUF file's metadata. No weights are loaded. The
arithmetic is slimlm.memory; this file parses flags, finds the config and prints the table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from slimlm.config import ModelConfig
from slimlm.memory import (
    DTYPE_BYTES,
    METHODS,
    MODES,
    OPTIMIZERS,
    PRESETS,
    SIZE_PRESETS,
    STRATEGIES,
    MemoryEstimate,
    MemoryQuery,
    MemoryQueryError,
    estimate_memory,
    preset_config,
)


def add_estimate_commands(sub) -> None:
    """Register `estimate` on the subparsers `sub` of the slimlm command line."""
    e = sub.add_parser(
        "estimate",
        help="memory of inference / fine-tuning / training from a model's config "
        "(weights, gradients, optimizer, activations, logits, KV cache)",
        description=__doc__.split("\n\n")[0],
    )
    src = e.add_mutually_exclusive_group()
    src.add_argument(
        "--model",
        default=None,
        help="alias, HF folder, config.json, .gguf file, HF hub id or preset name (default: smollm2-135m)",
    )
    src.add_argument(
        "--params", default=None, help=f"a preset by size ({', '.join(SIZE_PRESETS)}) or name ({', '.join(PRESETS)})"
    )
    e.add_argument(
        "--mode",
        default="finetune",
        choices=MODES,
        help="train: every weight from scratch; finetune: with --method; infer: prefill + KV cache",
    )
    e.add_argument("--method", default=None, choices=METHODS, help="fine-tuning method (default: lora)")
    e.add_argument(
        "--dtype",
        default="fp32",
        choices=list(DTYPE_BYTES),
        help="compute dtype; bf16/fp16 training = autocast over fp32 weights (mixed precision)",
    )
    e.add_argument(
        "--weights-dtype",
        default=None,
        choices=list(DTYPE_BYTES),
        help="stored weights (default: fp32 for training, --dtype for infer); = --dtype for pure "
        "low-precision training",
    )
    e.add_argument(
        "--batch",
        type=int,
        default=1,
        help="sequences per micro-batch, over all processes as `slimlm finetune --batch` (default 1)",
    )
    e.add_argument("--seq", type=int, default=512, help="tokens per sequence; the prompt for infer (default 512)")
    e.add_argument(
        "--kv-cache-tokens",
        type=int,
        default=None,
        help="infer: KV cache slots per sequence, prompt + generated (default: --seq)",
    )
    e.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS)
    e.add_argument("--grad-checkpointing", action="store_true", help="recompute each block in backward")
    e.add_argument("--device", default="cpu", help="cpu or cuda (what the total means: RSS or allocated bytes)")
    e.add_argument("--loss-chunk-size", type=int, default=1024, help="logit rows at once in the loss (default 1024)")
    e.add_argument("--lora-rank", type=int, default=16, help="lora/qlora rank (default 16)")
    e.add_argument("--lora-targets", default="all-linear", help="comma-separated projections or all-linear")
    e.add_argument("--adapter-style", default="houlsby", choices=["houlsby", "pfeiffer"])
    e.add_argument("--adapter-bottleneck", type=int, default=64)
    e.add_argument("--bitfit-train-norms", action="store_true", help="bitfit: also train RMSNorm gains")
    e.add_argument("--num-virtual-tokens", type=int, default=20, help="prefix/prompt tuning length (default 20)")
    e.add_argument(
        "--world-size",
        type=int,
        default=1,
        help="training processes (torchrun --nproc-per-node / finetune --nproc); numbers are then per "
        "rank, each running batch / world-size sequences (default 1)",
    )
    e.add_argument(
        "--strategy",
        default=None,
        choices=list(STRATEGIES),
        help="with --world-size > 1: ddp replicates the model (default), fsdp (FSDP2) shards parameters, "
        "gradients and optimizer states",
    )
    e.add_argument("--json", action="store_true", help="print the estimate as JSON")
    e.set_defaults(func=cmd_estimate)


def query_from_args(args: argparse.Namespace) -> MemoryQuery:
    """The MemoryQuery the flags describe (validated: bad values raise MemoryQueryError naming the field)."""
    return MemoryQuery(
        mode=args.mode,
        method=args.method,
        dtype=args.dtype,
        weights_dtype=args.weights_dtype,
        batch=args.batch,
        seq=args.seq,
        kv_cache_tokens=args.kv_cache_tokens,
        optimizer=args.optimizer,
        grad_checkpointing=args.grad_checkpointing,
        device=args.device.split(":")[0],
        loss_chunk_size=args.loss_chunk_size,
        lora_rank=args.lora_rank,
        lora_targets=args.lora_targets,
        adapter_style=args.adapter_style,
        adapter_bottleneck=args.adapter_bottleneck,
        bitfit_train_norms=args.bitfit_train_norms,
        num_virtual_tokens=args.num_virtual_tokens,
        world_size=args.world_size,
        strategy=args.strategy,
    )


def cmd_estimate(args: argparse.Namespace) -> int:
    query = query_from_args(args)  # flag errors first, before any file or network access
    name = args.params or args.model or "smollm2-135m"
    config = preset_config(args.params) if args.params else model_config(name)
    est = estimate_memory(config, query)
    if args.json:
        print(
            json.dumps(
                {"model": name, "config": config.to_dict(), "query": vars(query), **est.to_dict()},
                indent=2,
                default=list,
            )
        )
    else:
        print(format_estimate(est, name, query))
    return 0


def model_config(source: str) -> ModelConfig:
    """A model's config without its weights: existing path, alias (its GGUF), preset name, or hub id."""
    from slimlm.checkpoint import ALIASES, resolve

    path = Path(source).expanduser()
    if not path.exists() and source not in ALIASES:
        if SIZE_PRESETS.get(source.upper(), source.lower()) in PRESETS:
            return preset_config(source)
        if "/" in source and not source.startswith((".", "/")):
            return _hub_config(source)
    return _file_config(resolve(source))


def _file_config(path: Path) -> ModelConfig:
    """Config of an HF folder, its config.json, or a .gguf file's metadata."""
    from slimlm.checkpoint.hf import read_hf_config

    if path.suffix == ".gguf":
        return _gguf_config(path)
    if path.is_file() and path.name != "config.json":
        raise MemoryQueryError(
            f"{path} is neither config.json nor a .gguf file; pass an HF model folder, its config.json or a .gguf file"
        )
    return read_hf_config(path if path.is_dir() else path.parent)


def _gguf_config(path: Path) -> ModelConfig:
    """Config from GGUF metadata (the reader memory-maps the file; tensors are not read)."""
    from slimlm.checkpoint.gguf import _open, read_metadata

    reader = _open(path)
    config = ModelConfig.from_gguf(read_metadata(reader))
    config.tie_word_embeddings = not any(t.name == "output.weight" for t in reader.tensors)  # as load_gguf decides
    return config


def _hub_config(repo_id: str) -> ModelConfig:
    """Download only config.json of an HF hub repository (or take it from the local HF cache)."""
    from huggingface_hub import hf_hub_download

    try:
        return _file_config(Path(hf_hub_download(repo_id, "config.json")))
    except MemoryQueryError:
        raise
    except (OSError, ValueError) as e:  # network and HTTP errors, unknown repo or file, malformed id
        raise MemoryQueryError(
            f"cannot fetch config.json of {repo_id!r} from the HF hub ({type(e).__name__}); "
            "check the id and your network, or pass a local folder or --params"
        ) from None


def format_estimate(est: MemoryEstimate, name: str, q: MemoryQuery) -> str:
    """The estimate as a table: one row per component, which phase it belongs to, and the peak."""
    unit, size = ("GiB", 2**30) if est.total >= 10 * 2**30 else ("MiB", 2**20)
    what = f"{q.mode} {q.method}" if q.training else "infer" + (f" ({q.method})" if q.method else "")
    ranks = (
        (f"; {q.world_size} processes ({q.strategy}), batch {q.batch // q.world_size} each; numbers are per rank")
        if q.distributed
        else ""
    )
    lines = [
        f"{name}: {est.params / 1e6:,.1f} M params; {what}; {q.dtype}; batch {q.batch} x seq {q.seq}; "
        f"{q.device}" + ("; gradient checkpointing" if q.grad_checkpointing else "") + ranks,
        "",
        f"{'component':<27} {unit:>10}  {'phase':<17} detail",
    ]
    for r in est.rows:
        counted = r.phase in ("persistent", est.peak_phase)
        phase = r.phase if counted else f"({r.phase})"
        lines.append(f"{r.name:<27} {r.bytes / size:>10,.1f}  {phase:<17} {r.detail}")
    total = "total per rank (peak)" if q.distributed else "total (peak)"
    lines.append(
        f"{total:<27} {est.total / size:>10,.1f}  {est.peak_phase:<17} = {est.total / 2**30:,.2f} "
        "GiB: persistent rows + the largest phase (rows in parentheses are not at the peak)"
    )
    lines += [f"note: {n}" for n in est.notes]
    return "\n".join(lines)


__all__ = ["add_estimate_commands", "cmd_estimate", "format_estimate", "model_config", "query_from_args"]
