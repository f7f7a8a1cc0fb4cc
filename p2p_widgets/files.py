"""Saving results as PNGs that carry their recipe, and reading recipes back.

Every file is written to a temporary name in the same folder and renamed into place,
so a reader never sees a half-written file and an existing file is only replaced
whole.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, PngImagePlugin

from .edits import Recipe

if TYPE_CHECKING:
    from .engine import Result

__all__ = ["save_result", "read_recipe", "recipe_from_bytes", "RECIPE_KEY"]

RECIPE_KEY = "p2p_widgets.recipe"  # the PNG text chunk holding the recipe JSON


def _atomic_write(path: Path, write) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_result(result: Result, folder: str | os.PathLike, stem: str = "p2p") -> list[Path]:
    """Write ``{stem}_0.png`` (source), ``{stem}_1.png``, ... and ``{stem}.json``.

    Each PNG carries the run's recipe in a text chunk (``RECIPE_KEY``), and its branch
    index. Returns the paths written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    recipe_json = result.recipe.to_json()
    paths = []
    for index, image in enumerate(result.images):
        info = PngImagePlugin.PngInfo()
        info.add_text(RECIPE_KEY, recipe_json)
        info.add_text("p2p_widgets.branch", str(index))
        info.add_text("prompt", result.recipe.prompts[index])
        path = folder / f"{stem}_{index}.png"
        _atomic_write(path, lambda stream, image=image, info=info: image.save(stream, format="PNG", pnginfo=info))
        paths.append(path)
    path = folder / f"{stem}.json"
    _atomic_write(path, lambda stream: stream.write(recipe_json.encode("utf-8")))
    paths.append(path)
    return paths


def read_recipe(path: str | os.PathLike) -> Recipe:
    """The recipe stored in a recipe JSON file or in a PNG written by :func:`save_result`.

    Raises:
        ValueError: the file holds no recipe (with what was found instead).
        FileNotFoundError: no such file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    return recipe_from_bytes(path.read_bytes(), str(path))


def recipe_from_bytes(data: bytes, name: str = "the file") -> Recipe:
    """The recipe in the contents of a recipe JSON file or a PNG written by
    :func:`save_result` (e.g. an upload); ``name`` is used in error messages."""
    if bytes(data[:8]) != b"\x89PNG\r\n\x1a\n":
        try:
            text = bytes(data).decode("utf-8")
            json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{name} is neither a recipe JSON file nor a readable image") from None
        return Recipe.from_json(text)
    try:
        with Image.open(io.BytesIO(data)) as image:
            text = dict(getattr(image, "text", {}) or image.info).get(RECIPE_KEY)
    except OSError as error:
        raise ValueError(f"{name} is neither a recipe JSON file nor a readable image ({error})") from None
    if text is None:
        raise ValueError(f"{name} holds no p2p_widgets recipe (no {RECIPE_KEY!r} text chunk)")
    return Recipe.from_json(text)
