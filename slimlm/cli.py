"""The `slimlm` command line: generate, chat, info, finetune, merge, data, serve, batch, registry, bench, eval, quantize,
prune, distill, compress, fuse, export, estimate, deploy.
Thin: parses flags, calls the API, prints.

Errors a user can fix (bad paths, bad flags, bad configs) print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Sequence

from slimlm.checkpoint import CheckpointError
from slimlm.checkpoint.atomic import OVERWRITE_HELP, atomic_folder, check_output
from slimlm.config import ConfigError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="alias (smollm2-135m), HF model folder, .gguf file or HF hub id (default: smollm2-135m)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="weights and compute dtype; auto = bf16 where the hardware runs it natively, else fp32")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (first call compiles for a minute or more; then faster)")
    p.add_argument("--adapter", default=None, help="fine-tuned adapter folder to attach (slimlm or HF PEFT layout)")
    p.add_argument("--quantize", default=None, choices=["int8", "int8-dynamic", "int4"],
                   help="quantize the weights after loading (int4: --group-size, default 64)")
    p.add_argument("--group-size", type=int, default=64, help="int4 group size: 32, 64 or 128")
    p.add_argument("--backend", default="torch", choices=["torch", "onnxruntime"],
                   help="onnxruntime: --model is a folder from `slimlm export onnx`, run by ONNX Runtime")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _sampling(args: argparse.Namespace, **extra):
    from slimlm.engine.sampling import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          seed=args.seed, stop=list(args.stop), **extra)


def _load(args: argparse.Namespace):
    from slimlm.llm import load

    return load(args.model, dtype=args.dtype, device=args.device, compile=args.compile, adapter=args.adapter,
                quantize=args.quantize, group_size=args.group_size, backend=args.backend)


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        raise ValueError("empty prompt: pass --prompt TEXT or pipe text on stdin")
    params = _sampling(args, ignore_eos=args.ignore_eos)  # validate flags before the slow load
    t0 = time.perf_counter()
    llm = _load(args)
    load_s = time.perf_counter() - t0
    chat = None if args.chat is None else args.chat
    if args.json:
        c = llm.complete([prompt], params, chat=chat)[0]
        out = {"model": args.model, "text": c.text, "finish_reason": c.finish_reason,
               "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
               "load_s": round(load_s, 3), "prefill_s": round(c.prefill_s, 4), "decode_s": round(c.decode_s, 4),
               "prefill_tokens_per_s": round(c.prefill_tokens_per_s, 2),
               "decode_tokens_per_s": round(c.decode_tokens_per_s, 2),
               "dtype": str(llm.model.dtype).removeprefix("torch."), "device": str(llm.model.device),
               "compiled": args.compile}
        print(json.dumps(out, ensure_ascii=False))
        return 0
    for _, piece, done in llm.stream_batch([prompt], params, chat=chat):
        print(piece, end="", flush=True)
        if done is not None:
            print()
            if args.verbose:
                print(f"[{done.prompt_tokens} prompt tokens, {done.completion_tokens} generated, "
                      f"prefill {done.prefill_tokens_per_s:.0f} tok/s, decode {done.decode_tokens_per_s:.1f} tok/s, "
                      f"{done.finish_reason}]", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    llm = _load(args)
    params = _sampling(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print(f"slimlm chat with {args.model} — /reset clears the history, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        reply = []
        for piece in llm.stream(messages, params):
            reply.append(piece)
            print(piece, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})


def cmd_info(args: argparse.Namespace) -> int:
    from pathlib import Path

    from slimlm.checkpoint import model_folder
    from slimlm.checkpoint.hf import read_hf_config

    if (Path(args.model) / "adapter_config.json").is_file():
        return _adapter_info(Path(args.model), args.json)
    folder = model_folder(args.model)
    config = read_hf_config(folder)
    n = config.num_params()
    bytes_per = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1, "int4": 0.5}
    info = {
        "model": args.model, "path": str(folder), "config": config.to_dict(), "parameters": n,
        "weights_bytes": {k: int(n * b) for k, b in bytes_per.items()},
        "kv_cache_bytes_per_token": {"fp32": config.kv_cache_bytes_per_token(4),
                                     "bf16": config.kv_cache_bytes_per_token(2)},
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model       {args.model}\npath        {folder}")
    print(f"parameters  {n:,} ({n / 1e6:.1f} M)")
    for k, v in config.to_dict().items():
        print(f"  {k:<20} {v}")
    print("weights     " + ", ".join(f"{k} {v / 2**20:,.1f} MiB" for k, v in info["weights_bytes"].items()))
    kv = info["kv_cache_bytes_per_token"]
    print(f"kv cache    {kv['bf16']:,} bytes/token in bf16, {kv['fp32']:,} in fp32")
    return 0


def _adapter_info(folder, as_json: bool) -> int:
    from slimlm.peft import read_adapter_config
    from slimlm.peft.common import read_adapter_files
    from slimlm.recipe import to_dict

    method, cfg, raw = read_adapter_config(folder)
    _, tensors = read_adapter_files(folder)
    n = sum(t.numel() for t in tensors.values())
    notes = {"bitfit": "BitFit adds zero-initialised biases to the listed Llama projections (which have none) and "
                       "trains only those (and RMSNorm gains if train_norms); merging gives a model with biases.",
             "adapter": "bottleneck adapters are not linear in the base weights: they cannot be merged.",
             "prefix": "prefixes are extra keys/values, not weights: they cannot be merged.",
             "prompt": "soft prompts are extra input embeddings, not weights: they cannot be merged."}
    info = {"adapter": str(folder), "method": method, "peft_type": raw.get("peft_type"),
            "base_model": raw.get("base_model_name_or_path"), "config": to_dict(cfg), "parameters": n,
            "tensors": len(tensors), "note": notes.get(method, "")}
    if as_json:
        print(json.dumps(info, indent=2))
        return 0
    for k, v in info.items():
        if v not in ("", None):
            print(f"{k:<11} {v:,}" if isinstance(v, int) else f"{k:<11} {v}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from slimlm.recipe import apply_flags, load_recipe
    from slimlm.train.checkpoint import check_run_folder
    from slimlm.train.distributed import init_distributed, launched_by_torchrun, on_rank0
    from slimlm.train.finetune import FinetuneConfig, finetune

    cfg = load_recipe(FinetuneConfig, args.recipe) if args.recipe else FinetuneConfig()
    cfg = apply_flags(cfg, args)
    cfg.validate()  # flag errors before the --out check, which may remove old checkpoints (--overwrite)
    if args.nproc is not None and not launched_by_torchrun():
        return _run_torchrun(args, cfg.train.batch_size)
    info = init_distributed(timeout_s=cfg.train.dist_timeout_s)  # a world of 1 unless launched by torchrun
    on_rank0(check_run_folder, cfg.out, resume=cfg.resume, overwrite=args.overwrite,
             inputs=[cfg.model, cfg.data, cfg.eval_data])
    with peer_failure_message("finetune", cfg.out, info):
        res = finetune(cfg, progress=not args.quiet)
    t = res.train
    if info.is_main:
        print(f"done: {t.steps} steps, final loss {t.final_loss:.4f}, {t.tokens_per_s:.0f} tokens/s, "
              f"{t.elapsed_s:.0f} s; eval {t.eval_metrics or '-'}")
        print(f"saved {res.output}")
    return 0


# torchrun's flags that `slimlm finetune --nproc N` passes through (multi-node: --nnodes, --node-rank, --rdzv-*).
_LAUNCH_FLAGS = ("--nnodes", "--node-rank", "--rdzv-endpoint", "--rdzv-backend", "--rdzv-id", "--master-addr",
                 "--master-port")


def _add_launch_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("several processes (runs torchrun; or launch `torchrun --nproc-per-node N -m slimlm ...`)")
    g.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train on N processes on this machine (torchrun --nproc-per-node N); --train.strategy "
                        "ddp|fsdp picks how; the global batch stays train.batch_size x train.grad_accum")
    for flag in _LAUNCH_FLAGS:
        g.add_argument(flag, default=None, help="passed to torchrun")


def _run_torchrun(args: argparse.Namespace, batch_size: int) -> int:
    """Run this same command under torchrun with --nproc-per-node N (the launch flags go to torchrun, the rest to
    `python -m slimlm`); returns torchrun's exit status, non-zero when any rank failed."""
    import os
    import subprocess

    if args.nproc < 1:
        raise ValueError(f"--nproc must be a positive number of processes, got {args.nproc}")
    nodes = int(args.nnodes or 1) if str(args.nnodes or 1).isdigit() else 1  # "1:4" (elastic): checked by each rank
    if batch_size % (args.nproc * nodes):
        raise ValueError(f"--train.batch_size {batch_size} is the global micro-batch, split over {args.nproc * nodes} "
                         f"processes: make it a multiple of {args.nproc * nodes}")
    launch = [f"{flag}={getattr(args, flag[2:].replace('-', '_'))}" for flag in _LAUNCH_FLAGS
              if getattr(args, flag[2:].replace("-", "_")) is not None]
    single_node = args.nnodes in (None, "1") and args.rdzv_endpoint is None and args.master_port is None
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}",
           *(["--standalone"] if single_node else []), *launch, "-m", "slimlm", *_strip_launch_flags(args.argv)]
    env = dict(os.environ)
    # torchrun would give each rank 1 thread; share this machine's cores instead (OMP_NUM_THREADS set wins).
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    print("slimlm: " + " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd, env=env).returncode


@contextmanager
def peer_failure_message(command: str, out: str, info) -> Iterator[None]:
    """Several processes: a collective that fails (a peer died: connection reset; or hung: timeout) exits this rank
    with status 1 and one line saying what happened and how to resume, instead of a traceback per rank."""
    try:
        yield
    except RuntimeError as e:
        if not info.distributed:
            raise
        cause = " ".join(str(e).split())[:300]
        print(f"slimlm {command}: error: rank {info.rank} of {info.world_size} stopped: a collective failed, so "
              f"another rank probably died or hung (see its log). Complete checkpoints in {out}/checkpoints stay "
              f"valid: rerun with --resume and the same number of processes. Cause: {cause}", file=sys.stderr)
        raise SystemExit(1) from None


def _strip_launch_flags(argv: list[str]) -> list[str]:
    """argv without --nproc and the torchrun flags (each as `--flag V` or `--flag=V`)."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token in ("--nproc", *_LAUNCH_FLAGS):
            skip = True
        elif not token.startswith(tuple(f"{f}=" for f in ("--nproc", *_LAUNCH_FLAGS))):
            out.append(token)
    return out


def cmd_merge(args: argparse.Namespace) -> int:
    from slimlm.peft.merge import merge_to_folder

    check_output(args.out, overwrite=args.overwrite, inputs=[args.model, args.adapter])
    report = merge_to_folder(args.model, args.adapter, args.out, dtype=args.dtype)
    print(json.dumps(report, indent=2))
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from slimlm.checkpoint import model_folder
    from slimlm.tokenizer import Tokenizer
    from slimlm.train.data import DataConfig, check_file

    cfg = DataConfig(max_seq_len=args.max_seq_len, train_on_prompt=args.train_on_prompt, format=args.format)
    cfg.validate()
    tokenizer = Tokenizer.from_pretrained(model_folder(args.model))
    print(check_file(args.file, tokenizer, cfg))
    return 0


def cmd_data_task(args: argparse.Namespace) -> int:
    from slimlm.tasks import TASKS

    if args.task not in TASKS:
        raise ValueError(f"unknown task {args.task!r}; bundled tasks: {', '.join(TASKS)}")
    out = check_output(args.out, overwrite=args.overwrite)
    with atomic_folder(out) as tmp:  # like every output folder: replaced whole, never half-written
        paths = TASKS[args.task].write_splits(tmp, n_train=args.train, n_val=args.val, n_test=args.test,
                                              seed=args.seed)
    for split, path in paths.items():
        print(f"{split:<6} {out / path.name}")
    return 0


def _finetune_epilog(config_cls: type) -> str:
    """The methods (from the PEFT registry, each with the flag section of its options) and what --data takes."""
    import dataclasses
    import textwrap
    import typing

    from slimlm.peft import PEFT_METHODS

    sections = {t: name for name, t in typing.get_type_hints(config_cls).items() if dataclasses.is_dataclass(t)}
    lines = ["methods (--method):"]
    for name, method in PEFT_METHODS.items():
        cls = method.config_cls  # its docstring, else its module's; dataclass writes "Cls(field: type, ...)" if none
        doc = cls.__doc__ if cls.__doc__ and not cls.__doc__.startswith(f"{cls.__name__}(") else None
        summary = (doc or sys.modules[cls.__module__].__doc__ or "").strip().split("\n")[0].rstrip(".")
        if name == "qlora":  # the same code and options as lora, on a frozen NF4 base
            summary = "QLoRA: lora on a frozen NF4 4-bit base"
        section = sections.get(method.config_cls)
        options = f"; options --{section}.*" if section else ""
        lines += textwrap.wrap(f"{name:<8} {summary}{options}", 100, initial_indent="  ", subsequent_indent=" " * 11,
                               break_on_hyphens=False)
    lines += ["", *textwrap.wrap(
        '--data / --eval-data: a JSONL file (one record per line), a .parquet, .csv or .json file, a folder of '
        'them, or a Hugging Face dataset name (--dataset.split, --dataset.eval_split, --dataset.subset); records in '
        'one of four formats (auto-detected from the keys or columns; --dataset.format): chat {"messages": '
        '[{"role": "user", "content": ...}, ...]}, alpaca {"instruction", "input", "output"}, {"prompt", '
        '"completion"} or {"text"}. Other column names: --dataset.columns prompt=question,completion=answer. See '
        'README.md, "Fine-tuning" > "Data"; check a file with `slimlm data check FILE`.', 100,
        break_on_hyphens=False)]
    return "\n".join(lines)


def _add_finetune_parser(sub) -> None:
    from slimlm.recipe import add_flags
    from slimlm.train.finetune import FinetuneConfig

    f = sub.add_parser("finetune", help="fine-tune with full, lora, qlora, adapter, bitfit, prefix or prompt",
                       description="Fine-tune a model. Flags mirror the YAML recipe keys (nested keys with dots:\n"
                                   "--train.lr 1e-4, --lora.r 8) and override the recipe.",
                       epilog=_finetune_epilog(FinetuneConfig), formatter_class=argparse.RawDescriptionHelpFormatter)
    f.add_argument("recipe", nargs="?", default=None, help="YAML recipe (optional)")
    add_flags(f, FinetuneConfig, short=("model", "method", "data", "eval_data", "out", "nf4_base", "dtype",
                                        "device", "task", "eval_generate", "eval_max_new_tokens", "resume",
                                        "base_name"))
    f.add_argument("--overwrite", action="store_true",
                   help="start over in a non-empty --out (its old checkpoints are removed); --resume continues it")
    f.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_launch_args(f)
    f.set_defaults(func=cmd_finetune)

    m = sub.add_parser("merge", help="fold a LoRA/DoRA/QLoRA or BitFit adapter into the base; save an HF folder")
    m.add_argument("--model", default="smollm2-135m", help="the base model the adapter was trained on")
    m.add_argument("--adapter", required=True, help="adapter folder")
    m.add_argument("--out", required=True, help="folder for the merged model")
    m.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="dtype of the saved weights")
    m.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    m.set_defaults(func=cmd_merge)

    d = sub.add_parser("data", help="check training data; write a bundled task's splits")
    dsub = d.add_subparsers(dest="data_command", required=True)
    c = dsub.add_parser("check", help="validate a JSONL file and show a rendered sample with the trained tokens marked")
    c.add_argument("file")
    c.add_argument("--model", default="smollm2-135m", help="whose tokenizer and chat template to use")
    c.add_argument("--max-seq-len", type=int, default=1024)
    c.add_argument("--train-on-prompt", action="store_true")
    c.add_argument("--format", default="auto", help="auto, chat, alpaca, prompt_completion or text")
    c.set_defaults(func=cmd_data_check)
    t = dsub.add_parser("task", help="write train/val/test JSONL of a bundled task (e.g. extract_json)")
    t.add_argument("task")
    t.add_argument("--out", required=True)
    t.add_argument("--train", type=int, default=2000)
    t.add_argument("--val", type=int, default=100)
    t.add_argument("--test", type=int, default=200)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    t.set_defaults(func=cmd_data_task)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimlm", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--version", action="version", version=f"slimlm {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text for one prompt")
    _add_model_args(g)
    _add_sampling_args(g)
    g.add_argument("--prompt", help="prompt text (default: read stdin)")
    g.add_argument("--chat", dest="chat", action="store_true", default=None,
                   help="wrap the prompt in the chat template (default when the tokenizer has one)")
    g.add_argument("--raw", dest="chat", action="store_false", help="plain text continuation, no chat template")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past stop tokens (benchmarks)")
    g.add_argument("--json", action="store_true", help="print text, token counts and timings as JSON")
    g.add_argument("-v", "--verbose", action="store_true", help="print token counts and speed on stderr")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat with streaming replies")
    _add_model_args(c)
    _add_sampling_args(c)
    c.add_argument("--system", default=None, help="system prompt")
    c.set_defaults(func=cmd_chat)

    i = sub.add_parser("info", help="config, parameter count and memory per dtype (weights are not loaded); "
                                    "or what an adapter folder holds")
    i.add_argument("--model", default="smollm2-135m", help="alias, HF folder, .gguf file, HF hub id or adapter folder")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)
    _add_finetune_parser(sub)
    from slimlm.compress.cli import add_compress_commands
    from slimlm.deploy.cli import add_deploy_commands
    from slimlm.eval.cli import add_eval_commands
    from slimlm.export.cli import add_export_commands
    from slimlm.fuse.cli import add_fuse_commands
    from slimlm.merge.cli import add_merge_models_commands
    from slimlm.memory.cli import add_estimate_commands
    from slimlm.prune.cli import add_prune_commands
    from slimlm.quantize.cli import add_quantize_commands
    from slimlm.serve.bench import add_bench_commands
    from slimlm.serve.commands import add_serve_commands
    from slimlm.serve.registry_cli import add_registry_commands
    from slimlm.train.distill_cli import add_distill_commands

    add_serve_commands(sub)
    add_registry_commands(sub)
    add_bench_commands(sub)
    add_eval_commands(sub)
    add_quantize_commands(sub)
    add_prune_commands(sub)
    add_distill_commands(sub)
    add_compress_commands(sub)
    add_fuse_commands(sub)
    add_merge_models_commands(sub)
    add_export_commands(sub)
    add_estimate_commands(sub)
    add_deploy_commands(sub)
    return parser


def _version() -> str:
    """The installed distribution's version (slimlm.__version__ when running from a source tree)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("slimlm")
    except PackageNotFoundError:
        from slimlm import __version__

        return __version__


def _innermost_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub-)sub-command parser that `args` came through, e.g. `slimlm export onnx`'s."""
    for action in parser._actions:  # argparse keeps subparsers only here
        if isinstance(action, argparse._SubParsersAction) and getattr(args, action.dest, None) in action.choices:
            return _innermost_parser(action.choices[getattr(args, action.dest)], args)
    return parser


def _unknown_flags_error(parser: argparse.ArgumentParser, extras: list[str]) -> None:
    """Exit 2 with the sub-command's own usage, the unknown flags and the closest known ones."""
    import difflib

    known = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    hints = []
    for flag in (e.split("=")[0] for e in extras if e.startswith("--")):
        tail = flag[2:].replace("-", "_")  # --lr -> --train.lr; --max-steps -> --train.max_steps
        hints += [o for o in known if o.endswith(f".{tail}")] or difflib.get_close_matches(flag, known, n=2)
    hint = f" (did you mean {', '.join(dict.fromkeys(hints))}?)" if hints else ""
    parser.error(f"unrecognized arguments: {' '.join(extras)}{hint}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as typed: `--nproc` re-runs it under torchrun
    if extras:  # parse_args would print the top-level usage; the user needs the sub-command's
        _unknown_flags_error(_innermost_parser(parser, args), extras)
    try:
        return args.func(args)
    # User-fixable (bad paths, flags, configs and files): one line, status 2. The loaders wrap third-party errors
    # (safetensors, gguf, json, UTF-8) into these types with the file's path, so no traceback reaches the user.
    except (CheckpointError, ConfigError, ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError,
            PermissionError) as e:
        print(f"slimlm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
