"""Loading a pipeline by name: a bundled tiny model, a local folder, or a hub id.

Nothing is downloaded unless a hub id is given. ``"tiny"`` and ``"tiny-sd2"`` are
in-process pipelines with random weights (for trying the API and for tests: their
images are noise).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["load_pipeline", "BUILT_IN"]

BUILT_IN = {"tiny": "sd1", "tiny-sd2": "sd2"}


def load_pipeline(name: str, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None, **kwargs: Any):
    """A Stable Diffusion pipeline from a built-in name, a local folder or a hub id.

    Args:
        name: "tiny", "tiny-sd2", a folder saved with ``save_pretrained``, or a hub id
            such as "stable-diffusion-v1-5/stable-diffusion-v1-5" (downloaded by diffusers).
        device: where to put it (default: CPU).
        dtype: weights' dtype (default float32; use torch.float16 on a GPU).
        kwargs: passed to ``StableDiffusionPipeline.from_pretrained``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"give a model name: one of {', '.join(BUILT_IN)}, a folder, or a hub id; not {name!r}")
    if name in BUILT_IN:
        from .testing import tiny_pipeline

        pipe = tiny_pipeline(BUILT_IN[name], dtype=dtype or torch.float32)
    else:
        from diffusers import StableDiffusionPipeline

        if Path(name).expanduser().exists():
            name = str(Path(name).expanduser())
        options = {"safety_checker": None, "requires_safety_checker": False, **kwargs}
        if dtype is not None:
            options["torch_dtype"] = dtype
        pipe = StableDiffusionPipeline.from_pretrained(name, **options)
        pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if device is not None else pipe
