"""`slimlm prune`: load a model, prune it (unstructured, N:M, or structured removal), save the HF folder."""

from __future__ import annotations

import argparse
import time

from slimlm.checkpoint.atomic import OVERWRITE_HELP, check_output
from slimlm.eval.corpus import add_calibration_args, calibration_ids

METHODS = ("magnitude", "wanda", "2:4", "4:8")
STRUCTURES = ("mlp", "heads", "layers")
DENSE_NOTE = ("note: the zeros are stored densely and slimlm's dense kernels multiply them like any weight: this "
              "model is no smaller on disk and no faster (use --structured for real speed-ups)")


def add_prune_commands(sub) -> None:
    """Register `prune` on the CLI's subparsers `sub`."""
    p = sub.add_parser("prune", help="prune a model: zero weights (magnitude, wanda, 2:4, 4:8) or remove "
                                     "MLP channels / attention heads / layers (--structured), and save it")
    p.add_argument("--model", default="smollm2-135m", help="alias, HF folder, .gguf file or HF hub id")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--method", choices=METHODS, help="unstructured (magnitude, wanda) or N:M (2:4, 4:8) zeros")
    what.add_argument("--structured", choices=STRUCTURES, help="remove MLP channels, KV groups of heads, or layers")
    p.add_argument("--sparsity", type=float, default=0.5, help="--method magnitude/wanda: fraction of weights zeroed")
    p.add_argument("--scope", default="layer", choices=["layer", "global"],
                   help="layer: every linear pruned to --sparsity; global: one magnitude threshold over all linears")
    p.add_argument("--nm-score", default="wanda", choices=["magnitude", "wanda"], help="--method 2:4/4:8: scores")
    p.add_argument("--ratio", type=float, default=0.25,
                   help="--structured mlp/heads: fraction of MLP channels / KV groups removed")
    p.add_argument("--non-uniform", action="store_true",
                   help="--structured mlp/heads: rank units over all layers (layers lose different counts; "
                        "only slimlm loads the result) instead of the same count per layer")
    p.add_argument("--multiple-of", type=int, default=8, help="--structured mlp: kept channels rounded to this")
    p.add_argument("--n-drop", type=int, default=4, help="--structured layers: layers removed (lowest influence)")
    add_calibration_args(p, "wanda and --structured")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="dtype to load, prune and save in")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(func=cmd_prune)


def _needs_calibration(args: argparse.Namespace) -> bool:
    if args.structured:
        return True
    return args.method == "wanda" or (args.method in ("2:4", "4:8") and args.nm_score == "wanda")


def _check_args(args: argparse.Namespace) -> None:
    """Flag errors before the slow load."""
    from slimlm.prune.structured import check_ratio
    from slimlm.prune.unstructured import check_sparsity

    if args.method in ("magnitude", "wanda"):
        check_sparsity(args.sparsity)
        if args.scope == "global" and args.method != "magnitude":
            raise ValueError("--scope global is for --method magnitude (Wanda compares weights within a row)")
    if args.structured in ("mlp", "heads"):
        check_ratio(args.ratio, "MLP channels" if args.structured == "mlp" else "KV groups")
    if args.multiple_of < 1:
        raise ValueError(f"--multiple-of must be >= 1, got {args.multiple_of}")


def run_prune(model, args: argparse.Namespace, calib) -> dict:
    """Dispatch the parsed flags to the pruning API; returns its summary."""
    from slimlm import prune

    if args.method in ("magnitude", "wanda"):
        return prune.prune_unstructured_(model, args.method, args.sparsity, calib, args.scope)
    if args.method:
        return prune.prune_nm_(model, args.method, args.nm_score, calib)
    if args.structured == "mlp":
        return prune.prune_mlp_channels_(model, args.ratio, calib, not args.non_uniform, args.multiple_of)
    if args.structured == "heads":
        return prune.prune_heads_(model, args.ratio, calib, not args.non_uniform)
    return prune.prune_layers_(model, args.n_drop, calib)


def describe(info: dict) -> str:
    """Human-readable lines of a pruning summary."""
    if info["kind"] in ("unstructured", "nm"):
        what = info.get("pattern") or f"{info['target_sparsity']:.0%} ({info['scope']} scope)"
        return (f"{info['method']} {what}: {info['linear_zeros']:,} of {info['linear_params']:,} block-linear "
                f"weights are zero ({info['linear_sparsity']:.2%}); {info['zeros']:,} of {info['params']:,} "
                f"parameters ({info['sparsity']:.2%})\n{DENSE_NOTE}")
    params = (f"parameters {info['params_before']:,} -> {info['params_after']:,} "
              f"(-{info['param_reduction']:.1%})")
    if info["kind"] == "layers":
        return f"dropped layers {info['dropped']} (lowest block influence): {params}"
    unit = "MLP channels" if info["kind"] == "mlp" else "KV groups"
    return (f"removed {info['removed']:,} of {info['total_before']:,} {unit}; per layer "
            f"{info['per_layer_before']} -> {info['per_layer_after']}: {params}")


def cmd_prune(args: argparse.Namespace) -> int:
    from slimlm.checkpoint import model_folder, save_hf_folder
    from slimlm.config import NON_UNIFORM_NOTE
    from slimlm.llm import load

    _check_args(args)  # shared with compress's prune stage, which has no --out of its own
    check_output(args.out, overwrite=args.overwrite, inputs=[args.model, args.calib_file])
    t0 = time.perf_counter()
    llm = load(args.model, dtype=args.dtype)
    calib = None
    if _needs_calibration(args):
        calib = calibration_ids(llm.tokenizer, args.calib_file, args.calib_samples, args.calib_seq_len)
    info = run_prune(llm.model, args, calib)
    folder = save_hf_folder(llm.model, args.out, llm.tokenizer)
    print(describe(info))
    if llm.model.config.layer_sizes is not None:
        print(f"warning: {NON_UNIFORM_NOTE}")
    print(f"{model_folder(args.model).name} -> {folder} ({time.perf_counter() - t0:.1f} s)")
    return 0
