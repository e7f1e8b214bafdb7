"""`slimlm compress RECIPE.yaml`: run a compression chain and print its ledger (see compress/chain.py)."""

from __future__ import annotations

import argparse

from slimlm.checkpoint.atomic import check_output


def add_compress_commands(sub) -> None:
    """Register `compress` on the CLI's subparsers `sub`."""
    c = sub.add_parser(
        "compress",
        help="run prune -> distill -> quantize stages from a YAML recipe; writes a "
        "ledger (JSON, Markdown, PNG) measuring every stage",
    )
    c.add_argument("recipe", help="YAML recipe: model, adapter, out, measure, stages (see README 'Compression')")
    c.add_argument("--out", default=None, help="override the recipe's output folder")
    c.add_argument(
        "--overwrite",
        action="store_true",
        help="write into an output folder that is not empty (files of the same names are replaced)",
    )
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.set_defaults(func=cmd_compress)


def cmd_compress(args: argparse.Namespace) -> int:
    from slimlm.compress.chain import load_compress_recipe
    from slimlm.compress.ledger import ledger_markdown
    from slimlm.compress.run import compress

    recipe = load_compress_recipe(args.recipe)
    if args.out:
        recipe.out = args.out
    check_output(recipe.out, overwrite=args.overwrite, inputs=[recipe.model, recipe.adapter, args.recipe])
    rows = compress(recipe, progress=not args.quiet)
    print("\n" + ledger_markdown(rows))
    print(f"ledger: {recipe.out}/ledger.json, ledger.md, ledger.png")
    return 0
