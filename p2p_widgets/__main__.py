"""Command line: ``python -m p2p_widgets edit SOURCE TARGET... --out DIR``.

Generates the source and its edits in one batch and saves PNGs that carry their
recipe, plus the recipe as JSON. ``--recipe FILE`` re-runs a saved recipe (JSON or PNG).
``--heatmaps`` also saves every branch's word heatmaps (all steps) and a captioned gallery.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m p2p_widgets", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    edit = commands.add_parser("edit", help="generate a prompt and its edits, save the images")
    edit.add_argument("prompts", nargs="*", help="the source prompt, then one or more edited prompts")
    edit.add_argument("--recipe", help="re-run a recipe (.json or a PNG written by p2p_widgets)")
    edit.add_argument("--model", default="tiny", help="tiny, tiny-sd2, a local folder or a hub id (default: tiny)")
    edit.add_argument("--steps", type=int, default=50)
    edit.add_argument("--seed", type=int, default=0)
    edit.add_argument("--guidance", type=float, default=7.5)
    edit.add_argument("--cross", type=float, default=0.8, help="cross-attention injection, fraction of steps")
    edit.add_argument("--self", dest="self_attn", type=float, default=0.4, help="self-attention injection, fraction of steps")
    edit.add_argument("--size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"))
    edit.add_argument("--device", default=None, help="e.g. cuda (default: cpu)")
    edit.add_argument("--out", default="out", help="folder for the images (default: out)")
    edit.add_argument("--heatmaps", action="store_true", help="also save word heatmaps and a gallery")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from . import Recipe, Target, read_recipe, run, save_result
    from .models import load_pipeline

    try:
        if args.recipe:
            recipe = read_recipe(args.recipe)
        else:
            if len(args.prompts) < 1:
                raise ValueError("give a source prompt and at least one edited prompt, or --recipe FILE")
            height, width = args.size or (None, None)
            targets = tuple(Target(p, cross=args.cross, self_attn=args.self_attn) for p in args.prompts[1:])
            recipe = Recipe(args.prompts[0], targets, seed=args.seed, steps=args.steps, guidance=args.guidance,
                            height=height, width=width, model=args.model)
        pipe = load_pipeline(args.model if not args.recipe else (recipe.model or args.model), device=args.device)
        result = run(pipe, recipe)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in save_result(result, args.out):
        print(path)
    if args.heatmaps:
        from pathlib import Path

        from . import plot

        out = Path(args.out)
        pictures = {"p2p_gallery.png": plot.gallery(result).image()}
        for branch in range(len(result.images)):
            pictures[f"p2p_{branch}_words.png"] = plot.word_grid(result, branch).image()
        for name, picture in pictures.items():
            picture.save(out / name)
            print(out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
