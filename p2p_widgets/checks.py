"""Small predicates for validating arguments, shared by every module (imports nothing of
the package). ``True`` and ``False`` are never numbers here, although Python's bool is an int."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["is_int", "is_index", "is_real"]


def is_int(value: Any) -> bool:
    """A Python int (a whole number that JSON keeps as it is), not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_index(value: Any) -> bool:
    """A Python or numpy integer, not a bool (a position into something)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """A Python int or float (numpy float64 included), not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
