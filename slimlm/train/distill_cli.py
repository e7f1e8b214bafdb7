"""`slimlm distill`: the command line of train/distill.py. Thin: flags mirror DistillConfig (recipe.py), then
`distill(cfg)` runs and a one-line result is printed."""

from __future__ import annotations

import argparse

SHORT_FLAGS = ("teacher", "teacher_adapter", "student", "student_layers", "alpha", "temperature", "kl",
               "teacher_cache", "top_k", "teacher_cache_path", "kd_chunk_size", "data", "eval_data", "out", "device",
               "task", "eval_generate", "eval_max_new_tokens", "resume")


def cmd_distill(args: argparse.Namespace) -> int:
    from slimlm.cli import _run_torchrun, peer_failure_message
    from slimlm.recipe import apply_flags, load_recipe
    from slimlm.train.checkpoint import check_run_folder
    from slimlm.train.distill import DistillConfig, distill
    from slimlm.train.distributed import init_distributed, launched_by_torchrun, on_rank0

    cfg = load_recipe(DistillConfig, args.recipe) if args.recipe else DistillConfig()
    cfg = apply_flags(cfg, args)
    cfg.validate()  # flag errors before the --out check, which may remove old checkpoints (--overwrite)
    if args.nproc is not None and not launched_by_torchrun():
        return _run_torchrun(args, cfg.train.batch_size)
    info = init_distributed(timeout_s=cfg.train.dist_timeout_s)  # a world of 1 unless launched by torchrun
    on_rank0(check_run_folder, cfg.out, resume=cfg.resume, overwrite=args.overwrite,
             inputs=[cfg.teacher, cfg.teacher_adapter, cfg.student, cfg.data, cfg.eval_data])
    with peer_failure_message("distill", cfg.out, info):
        res = distill(cfg, progress=not args.quiet)
    if res is None:  # not rank 0: rank 0 prints
        return 0
    t = res.train
    print(f"done: {t.steps} steps, final loss {t.final_loss:.4f}, {t.tokens_per_s:.0f} tokens/s, {t.elapsed_s:.0f} s; "
          f"student {res.student_params:,} params (teacher {res.teacher_params:,}); exact match teacher "
          f"{res.teacher_eval or '-'} student {res.student_eval or '-'}")
    print(f"saved {res.output}")
    return 0


def add_distill_commands(sub) -> None:
    """Register `slimlm distill [RECIPE.yaml] --teacher T --student S|--student-layers N --data D --out DIR ...`."""
    from slimlm.recipe import add_flags
    from slimlm.train.distill import DistillConfig

    p = sub.add_parser("distill", help="knowledge distillation: train a smaller student on a teacher's outputs",
                       description="Distil a teacher (plus --teacher-adapter) into a student: a model folder, "
                                   "preset:NAME (random init) or --student-layers N of the teacher's layers. Flags "
                                   "mirror the YAML recipe keys (--train.lr 1e-4) and override the recipe.")
    p.add_argument("recipe", nargs="?", default=None, help="YAML recipe (optional)")
    add_flags(p, DistillConfig, short=SHORT_FLAGS)
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a non-empty --out (its old checkpoints are removed); --resume continues it")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    from slimlm.cli import _add_launch_args

    _add_launch_args(p)
    p.set_defaults(func=cmd_distill)
