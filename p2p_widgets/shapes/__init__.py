"""A synthetic "shapes" world for training and evaluating a tiny text-to-image model.

Scenes of one or two coloured shapes on an achromatic background, captions from a fixed
grammar (``"a big red striped circle and a small blue square on a black background"``),
rendering with exact per-object masks, and pixel measurements (colour, shape, size,
texture, segmentation) to check generated or edited images against ground truth.

>>> from p2p_widgets.shapes import batch, parse_caption
>>> images, captions = batch(4, seed=0)  # (4, 64, 64, 3) uint8 and 4 captions

Only numpy and PIL are needed here.
"""

from __future__ import annotations

from . import data
from .data import *  # noqa: F403 -- the grammar's public names, listed once in data.__all__

__all__ = list(data.__all__)
