"""Command line: ``python -m p2p_widgets edit SOURCE TARGET... --out DIR`` and ``demo``.

``edit`` generates the source and its edits in one batch and saves PNGs that carry their
recipe, plus the recipe as JSON. ``--recipe FILE`` re-runs a saved recipe (JSON or PNG).
``--heatmaps`` also saves every branch's word heatmaps (all steps) and a captioned gallery.

``demo`` opens the notebooks (``notebooks/`` of a source checkout) in JupyterLab, the
quick start first; ``--model NAME`` sets ``P2P_WIDGETS_MODEL`` for them, and any other
option goes to JupyterLab (e.g. ``--no-browser --port 8888``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

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
    demo = commands.add_parser(
        "demo", help="open the notebooks in JupyterLab (other options go to JupyterLab, e.g. --no-browser --port 8888)"
    )
    demo.add_argument("--model", help="the notebooks' model (sets P2P_WIDGETS_MODEL; default: their own choice)")
    return parser


NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
FIRST_NOTEBOOK = "01_quickstart.ipynb"


def _demo(model: str | None, jupyter_options: list[str]) -> int:
    """Run JupyterLab on the quick start notebook; returns its exit code."""
    import importlib.util

    first = NOTEBOOKS / FIRST_NOTEBOOK
    if not first.exists():
        print(
            f"error: the notebooks are not here ({NOTEBOOKS}): they come with the source repository, "
            "so run this from a clone (pip install -e .), or open them on Binder or Colab (see the README)",
            file=sys.stderr,
        )
        return 2
    if importlib.util.find_spec("jupyterlab") is None:
        print('error: JupyterLab is not installed: pip install jupyterlab (or pip install -e ".[test]")', file=sys.stderr)
        return 2
    environment = dict(os.environ)
    if model:
        from .models import MODEL_VARIABLE

        environment[MODEL_VARIABLE] = model
    if hasattr(os, "geteuid") and os.geteuid() == 0 and "--allow-root" not in jupyter_options:
        jupyter_options = [*jupyter_options, "--allow-root"]  # containers and CI run as root; JupyterLab refuses without
    command = [sys.executable, "-m", "jupyterlab", *jupyter_options, str(first)]
    print("running:", " ".join(command), flush=True)
    try:
        return subprocess.call(command, env=environment)
    except KeyboardInterrupt:
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "demo":
        return _demo(args.model, extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
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
