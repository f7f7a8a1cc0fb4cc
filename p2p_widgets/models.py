"""Loading a pipeline by name: a bundled model, a local folder, or a hub id.

Nothing is downloaded unless a hub id is given. ``"shapes"`` is the model this project
trains and ships inside the package (``p2p_widgets/shapes/weights``), loaded with
``from_pretrained`` exactly like a hub model. ``"tiny"``, ``"tiny-sd2"`` and ``"tiny-sdxl"``
are in-process pipelines with random weights (for trying the API and for tests: their
images are noise).
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "load_pipeline",
    "check_device",
    "model_name",
    "choose_model",
    "ModelChoice",
    "BUILT_IN",
    "SHAPES_WEIGHTS",
    "REAL_MODEL",
    "MODEL_VARIABLE",
]

BUILT_IN = {"tiny": "sd1", "tiny-sd2": "sd2", "tiny-sdxl": "sdxl"}  # name -> p2p_widgets.testing kind
SHAPES_WEIGHTS = Path(__file__).parent / "shapes" / "weights"
REAL_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
MODEL_VARIABLE = "P2P_WIDGETS_MODEL"


def load_pipeline(
    name: str, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None, **kwargs: Any
) -> Any:  # a diffusers pipeline; its class is the folder's own (diffusers' top-level names are Any here)
    """A pipeline (Stable Diffusion 1.x/2.x or SDXL) from a built-in name, a local folder or a hub id.

    Args:
        name: "shapes", a built-in tiny pipeline (:data:`BUILT_IN`), a folder saved with
            ``save_pretrained``, or a hub id such as "stable-diffusion-v1-5/stable-diffusion-v1-5"
            or "stabilityai/stable-diffusion-xl-base-1.0" (downloaded by diffusers). The
            folder's own pipeline class is used (``model_index.json``).
        device: where to put it (default: CPU).
        dtype: weights' dtype (default float32; use torch.float16 on a GPU).
        kwargs: passed to the pipeline class's ``from_pretrained``.

    Raises:
        ValueError: a pipeline of a model family p2p_widgets cannot edit (named), a bad
            name, device or dtype, a folder that is not a pipeline.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"give a model name: shapes, {', '.join(BUILT_IN)}, a folder, or a hub id; not {name!r}")
    check_device(device)
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype is a torch dtype such as torch.float16 or torch.float32, not {dtype!r}")
    if name == "shapes":
        if not (SHAPES_WEIGHTS / "model_index.json").exists():
            raise FileNotFoundError(
                f"the shapes model's weights are not in {SHAPES_WEIGHTS}; train them with "
                f"python -m p2p_widgets.shapes.train --out {SHAPES_WEIGHTS}"
            )
        name = str(SHAPES_WEIGHTS)
    if name in BUILT_IN:
        from .testing import tiny_pipeline, tiny_sdxl_pipeline

        kind = BUILT_IN[name]
        pipe = (
            tiny_sdxl_pipeline(dtype=dtype or torch.float32)
            if kind == "sdxl"
            else tiny_pipeline(kind, dtype=dtype or torch.float32)
        )
    else:
        options: dict[str, Any] = {"safety_checker": None, "requires_safety_checker": False}
        local = Path(name).expanduser().exists()
        if local:  # a folder: never ask the hub
            name = str(Path(name).expanduser())
            options["local_files_only"] = True
            if not (Path(name) / "model_index.json").is_file():
                raise ValueError(
                    f"{name} is not a diffusers pipeline folder (it has no model_index.json); give a folder "
                    "written by pipe.save_pretrained(...), or a hub id"
                )
        elif _looks_like_a_path(name):
            raise FileNotFoundError(
                f"no such model folder: {name}; give an existing folder, a hub id, or a built-in name"
            )
        options.update(kwargs)
        if dtype is not None:
            options["torch_dtype"] = dtype
        with _quiet(local):
            import diffusers  # its first import is where transformers warns

            try:
                # The folder's (or hub model's) own pipeline class: StableDiffusionPipeline,
                # StableDiffusionXLPipeline, ...; the safety checker is off where there is one.
                with warnings.catch_warnings():  # diffusers passes huggingface_hub a deprecated option
                    warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
                    index = diffusers.DiffusionPipeline.load_config(
                        name, local_files_only=bool(local or options.get("local_files_only"))
                    )
                cls = getattr(diffusers, str(index.get("_class_name", "")), None) or diffusers.DiffusionPipeline
                if "safety_checker" not in inspect.signature(cls.__init__).parameters:
                    options.pop("safety_checker", None)
                    options.pop("requires_safety_checker", None)
                pipe = cls.from_pretrained(name, **options)
            except OSError as error:  # not cached and no network, no such repository, a broken folder
                detail = " ".join(str(error).split())[:200]
                if local:
                    raise OSError(
                        f"could not load the model folder {name}: it is incomplete or broken ({detail})"
                    ) from None
                raise OSError(
                    f"could not load the model {name}: it is not in the local Hugging Face cache and could not be "
                    f"downloaded (no network, or no such hub id); check the id and the network, or give a local "
                    f"folder ({detail})"
                ) from None
        pipe.set_progress_bar_config(disable=True)
        from .families import family_of

        family_of(pipe)  # a pipeline of no supported family is refused here, by name
    return pipe.to(device) if device is not None else pipe


def _looks_like_a_path(name: str) -> bool:
    """A name that can only be a folder (a hub id is ``owner/name``, nothing more)."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def check_device(device: Any, *, what: str | None = None, fix: str = "use cpu") -> torch.device | None:
    """``device`` as a ``torch.device`` if this machine has it (None stays None).

    ``what`` names the device in messages (default ``device 'cuda'``); ``fix`` says what
    to do instead (the CLI: "drop --device or use --device cpu").

    Raises:
        ValueError: an unknown device, or one this machine does not have, saying what to use.
    """
    if device is None:
        return None
    what = what or f"device {device!r}"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cpu":
        return parsed
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{what}: there is no GPU on this machine (torch.cuda.is_available() is False); {fix}")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"{what}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
        return parsed
    backend = getattr(torch.backends, parsed.type, None) if parsed.type == "mps" else getattr(torch, parsed.type, None)
    available = getattr(backend, "is_available", None)
    if not callable(available) or not available():
        raise ValueError(f"{what}: {parsed.type} is not available on this machine; {fix}")
    return parsed


def model_name(pipe: Any) -> str | None:
    """ "shapes" for the bundled model's pipeline, else the folder or hub id it was loaded
    from (None for a pipeline built in memory)."""
    loaded_from = getattr(pipe, "name_or_path", None)
    if not loaded_from:
        return None
    try:
        if Path(loaded_from).expanduser().resolve() == SHAPES_WEIGHTS.resolve():
            return "shapes"
    except (OSError, ValueError):
        pass
    return str(loaded_from)


@contextmanager
def _quiet(local: bool) -> Iterator[None]:
    """Loading from a folder: no progress bars and only errors from diffusers and
    transformers (e.g. transformers' notice that torchvision is missing, which concerns
    image processors this package never uses). Downloads keep their progress bars."""
    if not local:
        yield
        return
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    saved = [
        (module, module.get_verbosity(), module.is_progress_bar_enabled())
        for module in (diffusers_logging, transformers_logging)
    ]
    try:
        for module, _, _ in saved:
            module.set_verbosity_error()
            module.disable_progress_bar()
        yield
    finally:
        for module, verbosity, bars in saved:
            module.set_verbosity(verbosity)
            if bars:
                module.enable_progress_bar()


@dataclass(frozen=True)
class ModelChoice:
    """Which model a notebook uses, where, and why (see :func:`choose_model`)."""

    name: str
    device: str
    dtype: torch.dtype | None
    reason: str

    @property
    def is_shapes(self) -> bool:
        """True for the bundled shapes model (its prompts follow the shapes grammar)."""
        return self.name == "shapes"

    def load(self) -> Any:  # a diffusers pipeline, as load_pipeline returns
        """The pipeline, loaded with :func:`load_pipeline`."""
        return load_pipeline(self.name, device=self.device, dtype=self.dtype)

    def __str__(self) -> str:
        return f"model: {self.name} on {self.device} ({self.reason})"


def _in_cache(name: str) -> bool:
    """Whether a hub model's files are on this machine already (asks no server)."""
    if Path(name).expanduser().exists():
        return True
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "model_index.json"), str)
    except Exception:  # an id the hub library rejects, or no cache folder
        return False


def choose_model(
    real: str = REAL_MODEL,
    *,
    environ: Mapping[str, str] | None = None,
    gpu: bool | None = None,
    cached: Callable[[str], bool] = _in_cache,
) -> ModelChoice:
    """The model a notebook should use, and why: the notebooks' first model cell.

    1. the environment variable ``P2P_WIDGETS_MODEL`` when it is set (any name
       :func:`load_pipeline` takes: "shapes", a folder, a hub id);
    2. else ``real`` (Stable Diffusion 1.5) when there is a GPU *and* its weights are in the
       local Hugging Face cache: nothing is downloaded unless you ask for it by name;
    3. else the bundled shapes model (offline, CPU).

    A GPU gets float16 weights for every model but the built-in ones. ``environ``, ``gpu``
    and ``cached`` default to this machine's (they are arguments for tests).
    """
    environ = os.environ if environ is None else environ
    gpu = torch.cuda.is_available() if gpu is None else gpu
    device = "cuda" if gpu else "cpu"

    def on_device(name: str, reason: str) -> ModelChoice:
        small = name == "shapes" or name in BUILT_IN
        return ModelChoice(name, device, torch.float16 if gpu and not small else None, reason)

    named = environ.get(MODEL_VARIABLE, "").strip()
    if named:
        return on_device(named, f"{MODEL_VARIABLE} is set")
    if not gpu:
        return on_device("shapes", f"no GPU; set {MODEL_VARIABLE} to choose another model")
    if cached(real):
        return on_device(real, "a GPU, and its weights are in the local cache")
    return on_device(
        "shapes",
        f"a GPU, but {real} is not in the local cache; set {MODEL_VARIABLE}={real} to download it (about 5 GB)",
    )
