"""Command line: ``python -m p2p_widgets edit SOURCE TARGET... --out DIR`` and ``demo``.

``edit`` generates the source and its edits in one batch and saves PNGs that carry their
recipe, plus the recipe as JSON. ``--recipe FILE`` re-runs a saved recipe (JSON or PNG).
``--heatmaps`` also saves every branch's word heatmaps (all steps) and a captioned gallery.

The model is ``--model`` when given; else "tiny" for prompts, and for a recipe the model
it names, if that is on this machine (a built-in name, a local folder, or a hub id in the
local Hugging Face cache): a recipe file never chooses what gets downloaded.

``demo`` opens the notebooks (``notebooks/`` of a source checkout) in JupyterLab, the
quick start first; ``--model NAME`` sets ``P2P_WIDGETS_MODEL`` for them, and any other
option goes to JupyterLab (e.g. ``--no-browser --port 8888``).

Every failure is one line ``error: ...`` on stderr and exit status 2 (130 for Ctrl-C).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["main"]

DEFAULT_MODEL = "tiny"
BUILT_IN_MODELS = ("tiny", "tiny-sd2", "tiny-sdxl", "shapes")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # "name" or "owner/name"
# the settings a recipe holds: with --recipe they would be ignored, so they are refused
_RECIPE_OPTIONS = {
    "steps": "--steps",
    "seed": "--seed",
    "guidance": "--guidance",
    "cross": "--cross",
    "self_attn": "--self",
    "size": "--size",
}
# guidance None: the model family's (7.5 for Stable Diffusion, 5 for SDXL)
_DEFAULTS = {"steps": 50, "seed": 0, "guidance": None, "cross": 0.8, "self_attn": 0.4, "size": None}


class CliError(Exception):
    """A refusal: its message is printed as one ``error:`` line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One ``error:`` line instead of argparse's usage block (still SystemExit(2))."""
        self.exit(2, f"error: {_one_line(message)}; see {self.prog} --help\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m p2p_widgets", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    edit = commands.add_parser("edit", help="generate a prompt and its edits, save the images")
    edit.add_argument("prompts", nargs="*", help="the source prompt, then one or more edited prompts")
    edit.add_argument("--recipe", help="re-run a recipe (.json or a PNG written by p2p_widgets), as it is")
    edit.add_argument(
        "--model",
        default=None,
        help="tiny, tiny-sd2, tiny-sdxl, shapes, a local folder or a hub id (default: tiny; with --recipe, the "
        "recipe's model if it is on this machine)",
    )
    edit.add_argument("--steps", type=int, help="diffusion steps (default: 50)")
    edit.add_argument("--seed", type=int, help="seed of the initial noise (default: 0)")
    edit.add_argument(
        "--guidance", type=float, help="classifier-free guidance scale (default: the model's, 7.5; 5 for SDXL)"
    )
    edit.add_argument("--cross", type=float, help="cross-attention injection, fraction of steps (default: 0.8)")
    edit.add_argument(
        "--self", dest="self_attn", type=float, help="self-attention injection, fraction of steps (default: 0.4)"
    )
    edit.add_argument("--size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"))
    edit.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cpu)")
    edit.add_argument("--out", default="out", help="folder for the images (default: out)")
    edit.add_argument("--heatmaps", action="store_true", help="also save word heatmaps and a gallery")
    demo = commands.add_parser(
        "demo", help="open the notebooks in JupyterLab (other options go to JupyterLab, e.g. --no-browser --port 8888)"
    )
    demo.add_argument("--model", help="the notebooks' model (sets P2P_WIDGETS_MODEL; default: their own choice)")
    parser.set_defaults(_commands=commands.choices)
    return parser


NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
FIRST_NOTEBOOK = "01_quickstart.ipynb"


def _demo(model: str | None, jupyter_options: list[str]) -> int:
    """Run JupyterLab on the quick start notebook; returns its exit code."""
    import importlib.util

    first = NOTEBOOKS / FIRST_NOTEBOOK
    if not first.exists():
        raise CliError(
            f"the notebooks are not here ({NOTEBOOKS}): they come with the source repository, "
            "so run this from a clone (pip install -e .), or open them on Binder or Colab (see the README)"
        )
    if importlib.util.find_spec("jupyterlab") is None:
        raise CliError('JupyterLab is not installed: pip install jupyterlab (or pip install -e ".[test]")')
    environment = dict(os.environ)
    if model:
        from .models import MODEL_VARIABLE

        environment[MODEL_VARIABLE] = model
    if hasattr(os, "geteuid") and os.geteuid() == 0 and "--allow-root" not in jupyter_options:
        # containers and CI run as root; JupyterLab refuses without
        jupyter_options = [*jupyter_options, "--allow-root"]
    command = [sys.executable, "-m", "jupyterlab", *jupyter_options, str(first)]
    print("running:", " ".join(command), flush=True)
    try:
        return subprocess.call(command, env=environment)
    except KeyboardInterrupt:
        return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, 2 for an error, 130 for Ctrl-C).
    A bad option exits through argparse (SystemExit(2)) with one ``error:`` line."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    saved: list[Path] = []
    try:
        if args.command == "demo":
            return _demo(args.model, extra)
        if extra:
            args._commands["edit"].error(f"unrecognized arguments: {' '.join(extra)}")
        _edit(args, saved)
        return 0
    except KeyboardInterrupt:
        done = "the images were saved, the heatmaps were not" if saved else "nothing was saved"
        print(f"error: interrupted (Ctrl-C); {done}", file=sys.stderr)
        return 130
    except CliError as error:
        _error(str(error))
    except (ValueError, TypeError) as error:  # the library's refusals of bad input: they teach
        _error(str(error) or type(error).__name__)
    except OSError as error:  # files: the library's messages name the path and what to do
        _error(str(error) or f"{type(error).__name__} (errno {error.errno})")
    except Exception as error:  # the boundary: never a traceback
        _error(f"unexpected {type(error).__name__}: {_brief(error)} (please report this, with the command line)")
    return 2


def _edit(args: argparse.Namespace, saved: list[Path]) -> None:
    """``edit``: check everything that can be checked, then load, run and save."""
    from . import Recipe, Target, read_recipe, run, save_result
    from .files import _numbered, _remove_stale, _save_pictures

    # 1. Input that needs no model: the device, the output folder, the recipe.
    device = _check_device(args.device)
    out = _check_out(args.out)
    if args.recipe:
        given = [option for name, option in _RECIPE_OPTIONS.items() if getattr(args, name) is not None]
        if args.prompts or given:
            what = ", ".join((["prompts"] if args.prompts else []) + given)
            raise CliError(
                f"--recipe re-runs a saved recipe as it is, so {what} would be ignored: drop them "
                "(to change a setting, edit the recipe's JSON, or give the prompts instead of --recipe)"
            )
        recipe = read_recipe(args.recipe)
    else:
        if len(args.prompts) < 1:
            raise CliError("give a source prompt and at least one edited prompt, or --recipe FILE")
        settings: dict[str, Any] = {
            name: _DEFAULTS[name] if getattr(args, name) is None else getattr(args, name) for name in _DEFAULTS
        }
        height, width = settings["size"] or (None, None)
        targets = tuple(Target(p, cross=settings["cross"], self_attn=settings["self_attn"]) for p in args.prompts[1:])
        recipe = Recipe(
            args.prompts[0],
            targets,
            seed=settings["seed"],
            steps=settings["steps"],
            guidance=settings["guidance"],
            height=height,
            width=width,
        )
    _check_seed(recipe.seed)
    model, reason = _choose_model(args.model, recipe.model, from_recipe=bool(args.recipe))
    recipe = recipe.replace(model=model)  # the saved recipe names the model that made the images
    # 2. Load, run, save.
    print(f"model: {model} ({reason})", file=sys.stderr, flush=True)
    pipe = _load(model, device)
    result = _run(run, pipe, recipe)
    for path in save_result(result, out):
        saved.append(path)
        print(path)
    if args.heatmaps:
        from . import plot

        pictures = {"p2p_gallery.png": plot.gallery(result).image()}
        for branch in range(len(result.images)):
            pictures[f"p2p_{branch}_words.png"] = plot.word_grid(result, branch).image()
        for path in _save_pictures(result, out, pictures):
            print(path)
        _remove_stale(out, _numbered("p2p", "_words"), len(result.images))


def _check_device(name: str | None) -> str | None:
    """The device, if it exists on this machine; a CliError that says what to use if not."""
    from .models import check_device

    try:
        check_device(name, what=f"--device {name}", fix="drop --device or use --device cpu")
    except ValueError as error:
        raise CliError(str(error)) from None
    return name


def _check_out(out: str) -> Path:
    """The output folder, checked now (not after minutes of sampling): not a file, and
    writable (it, or the nearest folder above it that exists, since it will be created)."""
    folder = Path(out).expanduser()
    if folder.exists() and not folder.is_dir():
        raise CliError(f"--out {out} is a file; give a folder for the images (it is created if missing)")
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise CliError(f"--out {out}: {existing} is a file, so the folder cannot be created there; give another folder")
    try:  # permissions, read-only disks, ACLs: only trying tells
        descriptor, probe = tempfile.mkstemp(dir=existing, prefix=".p2p-write-test-")
        os.close(descriptor)
        os.unlink(probe)
    except OSError as error:
        raise CliError(
            f"--out {out}: cannot write in {existing} ({error.strerror or error}); choose a folder you can write to"
        ) from None
    return folder


def _check_seed(seed: int) -> None:
    import torch

    try:
        torch.Generator("cpu").manual_seed(seed)
    except (RuntimeError, OverflowError, TypeError):
        raise CliError(
            f"seed {seed} is out of range for torch's generator; use an integer from 0 to 2**63 - 1"
        ) from None


def _choose_model(explicit: str | None, named: str | None, *, from_recipe: bool) -> tuple[str, str]:
    """The model to load and why. ``explicit``: --model; ``named``: the recipe's model."""
    if explicit is not None:
        if not explicit.strip():
            raise CliError(f"--model is empty; give {', '.join(BUILT_IN_MODELS)}, a local folder or a hub id")
        if not _HUB_ID.fullmatch(explicit) and not Path(explicit).expanduser().exists():
            raise CliError(
                f"--model {explicit}: no such folder (and not a hub id, which is owner/name); "
                "give the model's folder or hub id"
            )
        differs = from_recipe and named and named != explicit
        return explicit, "--model" + (f"; the recipe names {named}" if differs else "")
    if not from_recipe:
        return DEFAULT_MODEL, "the default; choose another with --model"
    if not named:
        return DEFAULT_MODEL, "the recipe names no model, so the default; choose another with --model"
    if named in BUILT_IN_MODELS:
        return named, "from the recipe"
    if Path(named).expanduser().is_dir():
        return named, "from the recipe, a local folder"
    if not _HUB_ID.fullmatch(named):  # a path (a hub id is "owner/name")
        raise CliError(
            f"the recipe names the model folder {named}, which is not on this machine; "
            "pass --model with its folder or hub id"
        )
    from .models import _in_cache

    if _in_cache(named):
        return named, "from the recipe, in the local Hugging Face cache"
    raise CliError(
        f"the recipe names the hub model {named}, which is not on this machine; to download it, pass --model {named}"
    )


def _load(model: str, device: str | None) -> Any:
    """The pipeline; any loading failure becomes one CliError naming the model and what to do."""
    from .models import load_pipeline

    try:
        with _library_warnings_off():
            return load_pipeline(model, device=device)
    except (KeyboardInterrupt, CliError):
        raise
    except (OSError, ValueError, TypeError) as error:
        if str(error).startswith(
            ("could not load the model", "no such model folder", "unknown device", "device ", "dtype ")
        ):
            raise CliError(_brief(error)) from None  # load_pipeline's own message says what to do
        raise CliError(
            f"could not load the model {model} ({type(error).__name__}: {_brief(error)}){_advice(model)}"
        ) from None
    except Exception as error:
        raise CliError(
            f"could not load the model {model} ({type(error).__name__}: {_brief(error)}){_advice(model)}"
        ) from None


def _advice(model: str) -> str:
    if model in BUILT_IN_MODELS:
        return ""
    if Path(model).expanduser().exists():
        return "; it must be a diffusers pipeline folder (written by save_pretrained, with a model_index.json)"
    return (
        "; it is not in the local Hugging Face cache and could not be downloaded: check the hub id and the "
        "network, or pass a local folder with --model"
    )


@contextmanager
def _library_warnings_off() -> Iterator[None]:
    """diffusers' and transformers' warnings off while loading (their notices, e.g. that
    accelerate is missing, would bury the one line that matters); progress bars stay."""
    try:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging
    except ImportError:
        yield
        return
    saved = [(module, module.get_verbosity()) for module in (diffusers_logging, transformers_logging)]
    try:
        for module, _ in saved:
            module.set_verbosity_error()
        yield
    finally:
        for module, verbosity in saved:
            module.set_verbosity(verbosity)


def _run(run: Any, pipe: Any, recipe: Any) -> Any:
    import torch

    try:
        return run(pipe, recipe)
    except torch.cuda.OutOfMemoryError:
        raise CliError("out of GPU memory; try a smaller --size, fewer edited prompts, or --device cpu") from None


def _brief(error: BaseException, limit: int = 400) -> str:
    """An exception's message on one line, at most ``limit`` characters."""
    text = _one_line(str(error)) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_line(message: str) -> str:
    return " ".join(message.split())


def _error(message: str) -> None:
    print(f"error: {_one_line(message)}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
