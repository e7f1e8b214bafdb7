"""`slimlm finetune` and `slimlm distill`: the command lines of train/finetune.py and train/distill.py. Thin: flags
mirror FinetuneConfig / DistillConfig (recipe.py), then `finetune(cfg)` / `distill(cfg)` runs (on N processes with
--nproc: train/launch.py) and a one-line result is printed."""

from __future__ import annotations

import argparse
import sys

from slimlm.train.launch import add_launch_args, peer_failure_message, run_torchrun

SHORT_FLAGS = (
    "teacher",
    "teacher_adapter",
    "student",
    "student_layers",
    "alpha",
    "temperature",
    "kl",
    "teacher_cache",
    "top_k",
    "teacher_cache_path",
    "kd_chunk_size",
    "data",
    "eval_data",
    "out",
    "device",
    "task",
    "eval_generate",
    "eval_max_new_tokens",
    "resume",
)


def cmd_distill(args: argparse.Namespace) -> int:
    from slimlm.recipe import apply_flags, load_recipe
    from slimlm.train.distill import DistillConfig, distill
    from slimlm.train.distributed import init_distributed, launched_by_torchrun, on_rank0
    from slimlm.train.resume import check_run_folder

    cfg = load_recipe(DistillConfig, args.recipe) if args.recipe else DistillConfig()
    cfg = apply_flags(cfg, args)
    cfg.validate()  # flag errors before the --out check, which may remove old checkpoints (--overwrite)
    if args.nproc is not None and not launched_by_torchrun():
        return run_torchrun(args, cfg.train.batch_size)
    info = init_distributed(timeout_s=cfg.train.dist_timeout_s)  # a world of 1 unless launched by torchrun
    on_rank0(
        check_run_folder,
        cfg.out,
        resume=cfg.resume,
        overwrite=args.overwrite,
        inputs=[cfg.teacher, cfg.teacher_adapter, cfg.student, cfg.data, cfg.eval_data],
    )
    with peer_failure_message("distill", cfg.out, info):
        res = distill(cfg, progress=not args.quiet)
    if res is None:  # not rank 0: rank 0 prints
        return 0
    t = res.train
    print(
        f"done: {t.steps} steps, final loss {t.final_loss:.4f}, {t.tokens_per_s:.0f} tokens/s, {t.elapsed_s:.0f} s; "
        f"student {res.student_params:,} params (teacher {res.teacher_params:,}); exact match teacher "
        f"{res.teacher_eval or '-'} student {res.student_eval or '-'}"
    )
    print(f"saved {res.output}")
    return 0


def add_distill_commands(sub) -> None:
    """Register `slimlm distill [RECIPE.yaml] --teacher T --student S|--student-layers N --data D --out DIR ...`."""
    from slimlm.recipe import add_flags
    from slimlm.train.distill import DistillConfig

    p = sub.add_parser(
        "distill",
        help="knowledge distillation: train a smaller student on a teacher's outputs",
        description="Distil a teacher (plus --teacher-adapter) into a student: a model folder, "
        "preset:NAME (random init) or --student-layers N of the teacher's layers. Flags "
        "mirror the YAML recipe keys (--train.lr 1e-4) and override the recipe.",
    )
    p.add_argument("recipe", nargs="?", default=None, help="YAML recipe (optional)")
    add_flags(p, DistillConfig, short=SHORT_FLAGS)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in a non-empty --out (its old checkpoints are removed); --resume continues it",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_launch_args(p)
    p.set_defaults(func=cmd_distill)


def cmd_finetune(args: argparse.Namespace) -> int:
    from slimlm.recipe import apply_flags, load_recipe
    from slimlm.train.distributed import init_distributed, launched_by_torchrun, on_rank0
    from slimlm.train.finetune import FinetuneConfig, finetune
    from slimlm.train.resume import check_run_folder

    cfg = load_recipe(FinetuneConfig, args.recipe) if args.recipe else FinetuneConfig()
    cfg = apply_flags(cfg, args)
    cfg.validate()  # flag errors before the --out check, which may remove old checkpoints (--overwrite)
    if args.nproc is not None and not launched_by_torchrun():
        return run_torchrun(args, cfg.train.batch_size)
    info = init_distributed(timeout_s=cfg.train.dist_timeout_s)  # a world of 1 unless launched by torchrun
    on_rank0(
        check_run_folder,
        cfg.out,
        resume=cfg.resume,
        overwrite=args.overwrite,
        inputs=[cfg.model, cfg.data, cfg.eval_data],
    )
    with peer_failure_message("finetune", cfg.out, info):
        res = finetune(cfg, progress=not args.quiet)
    t = res.train
    if info.is_main:
        print(
            f"done: {t.steps} steps, final loss {t.final_loss:.4f}, {t.tokens_per_s:.0f} tokens/s, "
            f"{t.elapsed_s:.0f} s; eval {t.eval_metrics or '-'}"
        )
        print(f"saved {res.output}")
    return 0


def finetune_epilog(config_cls: type) -> str:
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
        lines += textwrap.wrap(
            f"{name:<8} {summary}{options}",
            100,
            initial_indent="  ",
            subsequent_indent=" " * 11,
            break_on_hyphens=False,
        )
    lines += [
        "",
        *textwrap.wrap(
            "--data / --eval-data: a JSONL file (one record per line), a .parquet, .csv or .json file, a folder of "
            "them, or a Hugging Face dataset name (--dataset.split, --dataset.eval_split, --dataset.subset); "
            "records in "
            'one of four formats (auto-detected from the keys or columns; --dataset.format): chat {"messages": '
            '[{"role": "user", "content": ...}, ...]}, alpaca {"instruction", "input", "output"}, {"prompt", '
            '"completion"} or {"text"}. Other column names: --dataset.columns prompt=question,completion=answer. See '
            'README.md, "Fine-tuning" > "Data"; check a file with `slimlm data check FILE`.',
            100,
            break_on_hyphens=False,
        ),
    ]
    return "\n".join(lines)


def add_finetune_commands(sub) -> None:
    """Register `slimlm finetune [RECIPE.yaml] --model M --method lora --data D --out DIR ...`."""
    from slimlm.recipe import add_flags
    from slimlm.train.finetune import FinetuneConfig

    f = sub.add_parser(
        "finetune",
        help="fine-tune with full, lora, qlora, adapter, bitfit, prefix or prompt",
        description="Fine-tune a model. Flags mirror the YAML recipe keys (nested keys with dots:\n"
        "--train.lr 1e-4, --lora.r 8) and override the recipe.",
        epilog=finetune_epilog(FinetuneConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    f.add_argument("recipe", nargs="?", default=None, help="YAML recipe (optional)")
    add_flags(
        f,
        FinetuneConfig,
        short=(
            "model",
            "method",
            "data",
            "eval_data",
            "out",
            "nf4_base",
            "dtype",
            "device",
            "task",
            "eval_generate",
            "eval_max_new_tokens",
            "resume",
            "base_name",
        ),
    )
    f.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in a non-empty --out (its old checkpoints are removed); --resume continues it",
    )
    f.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_launch_args(f)
    f.set_defaults(func=cmd_finetune)
