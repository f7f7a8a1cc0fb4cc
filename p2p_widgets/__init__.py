"""Prompt-to-Prompt image editing on diffusers Stable Diffusion pipelines.

>>> from p2p_widgets import edit, Target, LocalBlend
>>> result = edit(pipe, "a cat riding a bicycle", Target("a dog riding a bicycle"))
>>> result.images  # source first, then every target
>>> inverted = invert(pipe, "photo.jpg", "a cat riding a bicycle")  # a real image
>>> inverted.edit(pipe, Target("a dog riding a bicycle")).images

Pictures of a run (heatmaps, overlays, grids, galleries) are in ``p2p_widgets.plot``,
imported on first use (it loads matplotlib). The widget panel is imported lazily
(``p2p_widgets.panel``), so the library works without a notebook.
"""

from __future__ import annotations

__version__ = "0.1.0.dev0"

from typing import Any

from .control import Branch, Controller, plan_branches
from .edits import CrossWindow, LocalBlend, Recipe, Target, Window
from .engine import Cancelled, NotFinite, Progress, Result, edit, run
from .files import read_recipe, save_result
from .inversion import Inversion, invert, restore_outside
from .memory import NotEnoughMemory
from .prompts import Alignment, Prompt, Word, align, infer_kind, tokenize
from .record import AttentionRecord, Heatmaps, Maps, normalize

__all__ = [
    "__version__",
    "edit",
    "run",
    "Recipe",
    "Target",
    "LocalBlend",
    "Window",
    "CrossWindow",
    "Result",
    "Progress",
    "Cancelled",
    "NotFinite",
    "NotEnoughMemory",
    "AttentionRecord",
    "Heatmaps",
    "Maps",
    "normalize",
    "Branch",
    "Controller",
    "plan_branches",
    "Prompt",
    "Word",
    "Alignment",
    "tokenize",
    "align",
    "infer_kind",
    "save_result",
    "read_recipe",
    "invert",
    "Inversion",
    "restore_outside",
]


def __getattr__(name: str) -> Any:  # a submodule, or the panel class
    import importlib

    if name in ("plot", "panel"):  # matplotlib and ipywidgets are loaded only when asked for
        return importlib.import_module(f".{name}", __name__)
    if name == "P2PPanel":
        return importlib.import_module(".panel", __name__).P2PPanel
    raise AttributeError(f"module 'p2p_widgets' has no attribute {name!r}")
