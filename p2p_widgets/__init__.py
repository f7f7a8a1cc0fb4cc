"""Prompt-to-Prompt image editing on diffusers Stable Diffusion pipelines.

>>> from p2p_widgets import edit, Target, LocalBlend
>>> result = edit(pipe, "a cat riding a bicycle", Target("a dog riding a bicycle"))
>>> result.images  # source first, then every target

The widget panel is imported lazily (``p2p_widgets.panel``), so the library works
without a notebook.
"""

from __future__ import annotations

__version__ = "0.1.0.dev0"

from .control import Branch, Controller, plan_branches
from .edits import CrossWindow, LocalBlend, Recipe, Target, Window
from .engine import Cancelled, Progress, Result, edit, run
from .files import read_recipe, save_result
from .prompts import Alignment, Prompt, Word, align, infer_kind, tokenize
from .record import AttentionRecord

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
    "AttentionRecord",
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
]
