"""`slimlm merge-models RECIPE.yaml --out DIR`: merge HF models of one architecture by a mergekit-style recipe.

Not to be confused with `slimlm merge`, which folds a fine-tuned adapter into its base model.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from slimlm.checkpoint.atomic import OVERWRITE_HELP, check_output
from slimlm.errors import InputError


def add_merge_models_commands(sub) -> None:
    """Register `merge-models` on the CLI's subparsers `sub`."""
    p = sub.add_parser(
        "merge-models",
        help="merge models of one architecture (linear, task_arithmetic, ties, "
        "dare_linear, dare_ties, slerp; chat vector) from a mergekit-style "
        "YAML recipe; save an HF folder",
    )
    p.add_argument("recipe", help="YAML recipe in mergekit's layout (merge_method, base_model, models, parameters)")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--seed", type=int, default=0, help="random seed of dare_linear / dare_ties drops")
    p.add_argument("--shard-size-gb", type=float, default=5.0, help="largest output safetensors file, in GB")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(func=cmd_merge_models)


def cmd_merge_models(args: argparse.Namespace) -> int:
    from slimlm.merge.merge_config import load_merge_recipe
    from slimlm.merge.run import run_merge

    recipe = load_merge_recipe(args.recipe)  # validated before anything is read or written
    if args.shard_size_gb <= 0:
        raise InputError(f"--shard-size-gb must be > 0, got {args.shard_size_gb}")
    inputs = [recipe.base_model] + [m.model for m in recipe.models]
    check_output(args.out, overwrite=args.overwrite, inputs=inputs)
    t0 = time.perf_counter()
    info = run_merge(
        recipe,
        args.out,
        seed=args.seed,
        shard_bytes=int(args.shard_size_gb * 1e9),
        recipe_text=Path(args.recipe).read_text(encoding="utf-8"),
    )
    print(
        f"{info['method']} of {len(info['models'])} models: {info['tensors']} tensors -> {info['out']} "
        f"({info['shards']} file(s), {time.perf_counter() - t0:.1f} s)"
    )
    return 0
