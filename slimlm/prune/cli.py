"""`slimlm prune`: load a model, prune it (unstructured, N:M, or structured removal), save the HF folder."""

from __future__ import annotations

import argparse
import time

from slimlm.checkpoint.atomic import OVERWRITE_HELP, check_output
from slimlm.eval.corpus import calibration_ids
from slimlm.load_config import SAVE_SKIP, SaveLoadConfig
from slimlm.prune.config import PruneConfig, prune_by_config
from slimlm.recipe import add_command_flags, config_from_flags

WHAT = ("method", "structured")  # exactly one of these flags
DENSE_NOTE = (
    "note: the zeros are stored densely and slimlm's dense kernels multiply them like any weight: this "
    "model is no smaller on disk and no faster (use --structured for real speed-ups)"
)


def add_prune_commands(sub) -> None:
    """Register `prune` on the CLI's subparsers `sub`: its flags are PruneConfig's and SaveLoadConfig's."""
    p = sub.add_parser(
        "prune",
        help="prune a model: zero weights (magnitude, wanda, 2:4, 4:8) or remove "
        "MLP channels / attention heads / layers (--structured), and save it",
    )
    add_command_flags(p, SaveLoadConfig, skip=SAVE_SKIP)  # --model, --dtype (fp32: load, prune and save in)
    what = p.add_mutually_exclusive_group(required=True)
    add_command_flags(what, PruneConfig, skip=tuple(n for n in PruneConfig.__dataclass_fields__ if n not in WHAT))
    add_command_flags(p, PruneConfig, skip=WHAT)
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(func=cmd_prune)


def describe(info: dict) -> str:
    """Human-readable lines of a pruning summary."""
    if info["kind"] in ("unstructured", "nm"):
        what = info.get("pattern") or f"{info['target_sparsity']:.0%} ({info['scope']} scope)"
        return (
            f"{info['method']} {what}: {info['linear_zeros']:,} of {info['linear_params']:,} block-linear "
            f"weights are zero ({info['linear_sparsity']:.2%}); {info['zeros']:,} of {info['params']:,} "
            f"parameters ({info['sparsity']:.2%})\n{DENSE_NOTE}"
        )
    params = f"parameters {info['params_before']:,} -> {info['params_after']:,} (-{info['param_reduction']:.1%})"
    if info["kind"] == "layers":
        return f"dropped layers {info['dropped']} (lowest block influence): {params}"
    unit = "MLP channels" if info["kind"] == "mlp" else "KV groups"
    return (
        f"removed {info['removed']:,} of {info['total_before']:,} {unit}; per layer "
        f"{info['per_layer_before']} -> {info['per_layer_after']}: {params}"
    )


def cmd_prune(args: argparse.Namespace) -> int:
    from slimlm.checkpoint import model_folder, save_hf_folder
    from slimlm.config import NON_UNIFORM_NOTE
    from slimlm.llm import load

    cfg = config_from_flags(PruneConfig, args)
    cfg.validate()  # before the slow load
    check_output(args.out, overwrite=args.overwrite, inputs=[args.model, cfg.calib_file])
    t0 = time.perf_counter()
    llm = load(args.model, dtype=args.dtype)
    calib = None
    if cfg.needs_calibration:
        calib = calibration_ids(llm.tokenizer, cfg.calib_file, cfg.calib_samples, cfg.calib_seq_len)
    info = prune_by_config(llm.model, cfg, calib)
    folder = save_hf_folder(llm.model, args.out, llm.tokenizer)
    print(describe(info))
    if llm.model.config.layer_sizes is not None:
        print(f"warning: {NON_UNIFORM_NOTE}")
    print(f"{model_folder(args.model).name} -> {folder} ({time.perf_counter() - t0:.1f} s)")
    return 0
