"""Loading a pipeline by name: a bundled model, a local folder, or a hub id.

Nothing is downloaded unless a hub id is given. ``"shapes"`` is the model this project
trains and ships inside the package (``p2p_widgets/shapes/weights``), loaded with
``from_pretrained`` exactly like a hub model. ``"tiny"`` and ``"tiny-sd2"`` are in-process
pipelines with random weights (for trying the API and for tests: their images are noise).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["load_pipeline", "BUILT_IN", "SHAPES_WEIGHTS"]

BUILT_IN = {"tiny": "sd1", "tiny-sd2": "sd2"}
SHAPES_WEIGHTS = Path(__file__).parent / "shapes" / "weights"


def load_pipeline(name: str, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None, **kwargs: Any):
    """A Stable Diffusion pipeline from a built-in name, a local folder or a hub id.

    Args:
        name: "shapes", "tiny", "tiny-sd2", a folder saved with ``save_pretrained``, or a hub id
            such as "stable-diffusion-v1-5/stable-diffusion-v1-5" (downloaded by diffusers).
        device: where to put it (default: CPU).
        dtype: weights' dtype (default float32; use torch.float16 on a GPU).
        kwargs: passed to ``StableDiffusionPipeline.from_pretrained``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"give a model name: shapes, {', '.join(BUILT_IN)}, a folder, or a hub id; not {name!r}")
    if name == "shapes":
        if not (SHAPES_WEIGHTS / "model_index.json").exists():
            raise FileNotFoundError(
                f"the shapes model's weights are not in {SHAPES_WEIGHTS}; train them with "
                f"python -m p2p_widgets.shapes.train --out {SHAPES_WEIGHTS}"
            )
        name = str(SHAPES_WEIGHTS)
    if name in BUILT_IN:
        from .testing import tiny_pipeline

        pipe = tiny_pipeline(BUILT_IN[name], dtype=dtype or torch.float32)
    else:
        from diffusers import StableDiffusionPipeline

        options = {"safety_checker": None, "requires_safety_checker": False}
        if Path(name).expanduser().exists():  # a folder: never ask the hub
            name = str(Path(name).expanduser())
            options["local_files_only"] = True
        options.update(kwargs)
        if dtype is not None:
            options["torch_dtype"] = dtype
        pipe = StableDiffusionPipeline.from_pretrained(name, **options)
        pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if device is not None else pipe
