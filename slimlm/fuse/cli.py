"""`slimlm fuse`: load a model (+ adapter), run fusion passes, report what changed and the logit drift, save.

The saved folder is an ordinary HF folder (or a slimlm quantized folder for a quantized model): merged adapters and
folded norm gains persist as weights; qkv/gate_up fusion is a run-time layout that saves under the unfused names
(fuse/rows.py) and is re-applied after loading with `slimlm.fuse.fuse_model_`.
"""

from __future__ import annotations

import argparse
import json

from slimlm.checkpoint.atomic import OVERWRITE_HELP, check_output
from slimlm.errors import InputError
from slimlm.fuse.llama import FUSION_PASSES
from slimlm.load_config import SAVE_SKIP, SaveLoadConfig
from slimlm.recipe import add_command_flags


def add_fuse_commands(sub) -> None:
    """Register `fuse` on the CLI's subparsers `sub`."""
    f = sub.add_parser(
        "fuse", help="exact operator fusion: merge adapters, fold RMSNorm gains, fuse q/k/v and gate/up; save the model"
    )
    # --model, --adapter (merged first: needs the merge pass), --dtype (fp32: the passes are exact to fp32 round-off)
    add_command_flags(f, SaveLoadConfig, skip=tuple(n for n in SAVE_SKIP if n != "adapter"))
    f.add_argument(
        "--passes",
        default=",".join(FUSION_PASSES),
        help=f"comma-separated, run in the order {','.join(FUSION_PASSES)} (default: all)",
    )
    f.add_argument(
        "--untie-head",
        action="store_true",
        help="norms: give a tied LM head its own copy (vocab x dim more memory) so the final norm folds",
    )
    f.add_argument("--out", required=True, help="output folder (written atomically)")
    f.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    f.add_argument("--json", action="store_true", help="print the reports and the drift as JSON")
    f.set_defaults(func=cmd_fuse)


def check_args(args: argparse.Namespace) -> list[str]:
    """The pass names in run order; ValueError for flag combinations that cannot work (before the slow load)."""
    from slimlm.fuse.llama import parse_passes

    passes = parse_passes(args.passes)
    if args.adapter and "merge" not in passes:
        raise InputError("--adapter needs the merge pass in --passes: a saved model folder holds no adapter")
    if args.untie_head and "norms" not in passes:
        raise InputError("--untie-head only matters with the norms pass in --passes")
    check_output(args.out, overwrite=args.overwrite, inputs=[args.model, args.adapter])
    return passes


def cmd_fuse(args: argparse.Namespace) -> int:
    import torch

    from slimlm.checkpoint.hf import save_hf_folder
    from slimlm.checkpoint.quantized import save_quantized
    from slimlm.fuse.llama import fuse_model_
    from slimlm.llm import load
    from slimlm.peft import logit_drift
    from slimlm.peft.merge import PROBE

    passes = check_args(args)
    llm = load(args.model, dtype=args.dtype, adapter=args.adapter)
    model, tokenizer = llm.model, llm.tokenizer
    ids = torch.tensor([tokenizer.encode(PROBE)])
    with torch.no_grad():
        before = model(ids)
        reports = fuse_model_(model, passes, args.untie_head)
        after = model(ids)
    if model.peft is not None:
        raise InputError(
            f"the {model.peft.method} adapter cannot be merged ({reports.get('merge')}), so the "
            "model cannot be saved as one folder; keep it as an adapter and load it with --adapter"
        )
    if model.quantization:
        save_quantized(model, args.out, tokenizer.hf)
    else:
        save_hf_folder(model, args.out, tokenizer.hf, sorted(tokenizer.stop_token_ids))
    drift = logit_drift(before, after)
    if args.json:
        print(
            json.dumps(
                {"out": args.out, "passes": {k: r.to_dict() for k, r in reports.items()}, "drift": drift}, indent=2
            )
        )
        return 0
    for name, r in reports.items():
        print(f"{name}: {r.summary()}")
        for note in r.notes:
            print(f"  note: {note}")
    print(f"logit drift vs unfused on a probe prompt: max |Δ| {drift['max_logit_diff']:.2e}, KL {drift['kl']:.2e}")
    print(f"saved {args.out} (unfused HF names; after loading, re-apply qkv/gate_up with slimlm.fuse.fuse_model_)")
    return 0
