"""Real-image editing (paper section 4): bring a photo to the model, invert it, edit it.

``invert(pipe, image, prompt, method=...)`` returns an :class:`Inversion`; its ``edit``
runs Prompt-to-Prompt on the image with any edit (swap, refine, re-weight, local blend):

>>> inverted = invert(pipe, "cat.jpg", "a cat sitting on a bench", method="null-text")
>>> result = inverted.edit(pipe, Target("a dog sitting on a bench", blend=LocalBlend(("cat", "dog"))))

Methods (all start with DDIM inversion of the image's latent at guidance 1, x_0 -> x_T):

* ``"ddim"``: edit from that x_T. At guidance 7.5 the source drifts from the image.
* ``"null-text"`` (Mokady et al. 2023): per sampling step, Adam steps on the unconditional
  embedding until the guided step lands on the inversion's latent (the official defaults:
  10 inner steps, lr 1e-2 * (1 - i/100), early stop at loss < 1e-5 + 2e-5 * i, with i
  rescaled to 50 steps). The UNet's weights never get gradients.
* ``"negative-prompt"`` (Miyake et al. 2023): the source prompt's embedding in place of the
  unconditional one; free, no optimisation.
* ``"direct"`` (Ju et al. 2024, "PnP Inversion"): the source branch is kept on the
  inversion's trajectory (adding back, every step, the difference between where it went
  and where the inversion was; done in the run, so no second pass), the targets edit
  freely with the source's attention.

With local blending, the targets are restored outside their masks to the inversion's
trajectory, i.e. to the original image, whatever the method (paper fig. 12);
:func:`restore_outside` also pastes the original pixels there.

``prepare_image(image, (height, width))`` accepts a path, a PIL image or an array, and
returns an RGB image of exactly that size with a note for every change it made (first
frame of many, EXIF orientation, mode or bit-depth conversion, resizing, cropping or
padding), so nothing happens to the user's image silently; input it cannot take is
refused with a ValueError or TypeError that says what to do.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from .checks import is_index, is_int, is_real
from .control import plan_branches
from .edits import Recipe
from .engine import Cancelled, Guide, Progress, Result, check_steps, edit, estimate_run, make_scheduler, resolve
from .families import Conditioning, Family, check_multiple, family_of
from .memory import MemoryEstimate

__all__ = [
    "Inversion",
    "invert",
    "restore_outside",
    "encode_image",
    "METHODS",
    "PreparedImage",
    "prepare_image",
    "MAX_PIXELS",
]

MAX_PIXELS = 64_000_000  # larger inputs are refused before decoding (decompression bombs)
Fit = Literal["crop", "pad"]
METHODS = ("ddim", "null-text", "negative-prompt", "direct")


@dataclass(frozen=True)
class PreparedImage:
    """An image ready for the model.

    Attributes:
        image: RGB, exactly the requested size.
        original_size: (height, width) of the input.
        notes: what was done to the input, in order (empty when nothing was).
    """

    image: Image.Image
    original_size: tuple[int, int]
    notes: tuple[str, ...]


# --- image input ---------------------------------------------------------------------------

# What reading or decoding a file can raise in PIL (plugins raise SyntaxError, struct.error,
# EOFError or IndexError on broken data; a closed image raises ValueError).
_DECODE_ERRORS = (OSError, SyntaxError, EOFError, ValueError, IndexError, struct.error)

# EXIF orientation -> the transposition that shows the image upright (as in
# PIL.ImageOps.exif_transpose) and what it does, in words.
_ORIENTATIONS: dict[int, tuple[Image.Transpose, str]] = {
    2: (Image.Transpose.FLIP_LEFT_RIGHT, "mirrored left-right"),
    3: (Image.Transpose.ROTATE_180, "rotated 180°"),
    4: (Image.Transpose.FLIP_TOP_BOTTOM, "mirrored top-bottom"),
    5: (Image.Transpose.TRANSPOSE, "mirrored left-right and rotated 90° counter-clockwise"),
    6: (Image.Transpose.ROTATE_270, "rotated 90° clockwise"),
    7: (Image.Transpose.TRANSVERSE, "mirrored left-right and rotated 90° clockwise"),
    8: (Image.Transpose.ROTATE_90, "rotated 90° counter-clockwise"),
}
_EXIF_ORIENTATION = 0x0112


def _shown(path: str | os.PathLike) -> str:
    """A path for a message, as given, shortened when absurdly long."""
    text = str(os.fspath(path))
    return text if len(text) <= 200 else f"{text[:100]}...{text[-40:]} ({len(text)} characters)"


def _open(source: Any, max_pixels: int) -> tuple[Image.Image, list[str]]:
    """The input's first frame as a loaded PIL image (not yet oriented or converted),
    refusing oversized ones before decoding."""
    notes: list[str] = []
    if isinstance(source, (str, os.PathLike)):
        return _read(source, max_pixels, notes), notes
    if isinstance(source, Image.Image):
        _check_pixels(source.width, source.height, max_pixels, "the image")
        return _first_frame(source, notes, "the image"), notes
    if isinstance(source, np.ndarray):
        return _from_array(np.asarray(source), max_pixels, notes), notes
    hint = ""
    if isinstance(source, (bytes, bytearray)):
        hint = "; for a file's contents, pass Image.open(io.BytesIO(data))"
    elif type(source).__name__ == "Tensor":
        hint = "; for a tensor, pass tensor.permute(1, 2, 0).cpu().numpy() (height, width, channels)"
    raise TypeError(f"an image is a file path, a PIL image or a numpy array, not {type(source).__name__}{hint}")


def _read(source: str | os.PathLike, max_pixels: int, notes: list[str]) -> Image.Image:
    if isinstance(source, str) and not source.strip():
        raise ValueError("the image path is empty; give the path of an image file")
    path = Path(source)
    shown = _shown(source)
    try:
        exists, is_dir, is_file = path.exists(), path.is_dir(), path.is_file()
    except OSError as error:  # e.g. a name too long for the file system
        raise ValueError(f"cannot use {shown} as a file path ({error.strerror or error}); check the path") from None
    if not exists:
        hint = "; a URL must be downloaded first" if str(source).startswith(("http://", "https://")) else ""
        raise FileNotFoundError(f"no such image file: {shown} (relative paths start at {Path.cwd()}){hint}")
    if is_dir:
        raise ValueError(f"{shown} is a folder, not an image file; give the path of one image in it")
    if not is_file:
        raise ValueError(f"{shown} is not a regular file (a device, pipe or socket?); save the image to a file first")
    try:
        image = Image.open(path)  # lazy: reads the header only
    except Image.DecompressionBombError as error:
        raise ValueError(f"{shown} is too large to decode safely ({error}); resize it first") from None
    except _DECODE_ERRORS as error:
        raise ValueError(
            f"cannot read {shown} as an image ({error}); use a PNG, JPEG, WebP, BMP or TIFF file"
        ) from None
    try:
        _check_pixels(image.width, image.height, max_pixels, shown)
        first = _first_frame(image, notes, shown)
    except ValueError:
        image.close()
        raise
    if first is not image:
        image.close()  # a multi-frame file stays open until closed; the first frame is a copy
    return first


def _first_frame(image: Image.Image, notes: list[str], what: str) -> Image.Image:
    """The first frame, decoded; a caller's image is left on the frame it was on."""
    try:
        frames = int(getattr(image, "n_frames", 1))  # counting may read the whole file
        if frames <= 1:
            image.load()
            return image
        current = image.tell()
        if current:
            image.seek(0)
        first = image.copy()  # decodes frame 0
        if current:
            image.seek(current)
    except Image.DecompressionBombError as error:
        raise ValueError(f"{what} is too large to decode safely ({error}); resize it first") from None
    except _DECODE_ERRORS as error:
        raise ValueError(
            f"cannot decode {what} ({error}); the file may be truncated or corrupt (or the image closed): "
            "save it again or use another copy"
        ) from None
    notes.append(f"first of {frames} frames used")
    return first


def _check_pixels(width: int, height: int, max_pixels: int, what: str) -> None:
    if width * height > max_pixels:
        raise ValueError(
            f"{what} has {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} "
            "(a guard against decompression bombs); resize it first or pass a larger max_pixels"
        )
    if width < 1 or height < 1:
        raise ValueError(f"{what} is empty ({width}x{height} pixels); give an image at least 1 pixel on each side")


def _float_levels(pixels: np.ndarray, what: str, notes: list[str]) -> np.ndarray:
    """8-bit levels of float pixels: [0, 1] is scaled to 0..255, [0, 255] taken as levels;
    anything else is refused (one rule for float arrays and mode "F" images)."""
    if not np.isfinite(pixels).all():
        raise ValueError(
            f"{what} holds NaN or infinite values; replace them (e.g. np.nan_to_num) "
            "and give values in [0, 1] or [0, 255]"
        )
    low, high = float(pixels.min()), float(pixels.max())
    if low >= 0.0 and high <= 1.0:
        notes.append(f"{what} in [0, 1] scaled to 0..255")
        pixels = pixels * 255.0
    elif low >= 0.0 and high <= 255.0:
        notes.append(f"{what} in [0, 255] taken as 8-bit levels")
    else:
        fix = (
            "it looks like [-1, 1]: give (x + 1) / 2"
            if low >= -1.0 and high <= 1.0
            else "rescale it, e.g. (x - x.min()) / (x.max() - x.min()), or clip it"
        )
        raise ValueError(
            f"{what} holds values in [{low:.4g}, {high:.4g}]; a float image is in [0, 1] or [0, 255]: {fix}"
        )
    return np.round(pixels).clip(0, 255).astype(np.uint8)


def _integer_levels(pixels: np.ndarray, what: str, notes: list[str]) -> np.ndarray:
    """8-bit levels of integers whose type does not say their depth (mode "I", int arrays):
    [0, 255] is taken as 8-bit levels, [0, 65535] as 16 bits; anything else is refused."""
    low, high = int(pixels.min()), int(pixels.max())
    if low >= 0 and high <= 255:
        notes.append(f"{what} with values in [0, 255] taken as 8-bit levels")
        return pixels.astype(np.uint8)
    if low >= 0 and high <= 65535:
        notes.append(f"{what} with values up to {high} taken as 16 bits, scaled to 8 bits")
        return np.round(pixels / 257.0).astype(np.uint8)
    raise ValueError(
        f"{what} holds values in [{low}, {high}], beyond 0..65535; "
        "scale it to 0..255 (uint8) or 0..65535 (uint16) first"
    )


def _from_array(array: np.ndarray, max_pixels: int, notes: list[str]) -> Image.Image:
    shape = tuple(array.shape)
    if array.ndim == 4 and shape[0] == 1:
        raise ValueError(f"the array has shape {shape}, a batch of one; give the image itself: array[0]")
    if array.ndim == 3 and shape[0] in (1, 3, 4) and shape[2] not in (1, 3, 4):
        raise ValueError(
            f"the array has shape {shape} (channels first); give (height, width, channels): array.transpose(1, 2, 0)"
        )
    if array.ndim not in (2, 3) or (array.ndim == 3 and shape[2] not in (1, 3, 4)):
        raise ValueError(
            f"an image array is (height, width) or (height, width, 1|3|4) for gray, RGB or RGBA, not {shape}; "
            "select or add channels to make it one of those"
        )
    _check_pixels(shape[1], shape[0], max_pixels, "the array")
    kind, bits = array.dtype.kind, array.dtype.itemsize * 8
    if kind in "uif" and not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if kind == "u" and bits == 8:
        pixels = array
    elif kind == "u" and bits == 16:
        pixels = np.round(array / 257.0).astype(np.uint8)
        notes.append("16-bit array scaled to 8 bits")
    elif kind in "ui":
        pixels = _integer_levels(array, f"{array.dtype} array", notes)
    elif kind == "f":
        pixels = _float_levels(array, f"{array.dtype} array", notes)
    elif kind == "b":
        raise ValueError("the array is boolean (a mask?); give an image: array.astype(np.uint8) * 255")
    else:
        raise ValueError(
            f"an image array holds numbers (uint8, uint16, other integers, or floats in [0, 1] or [0, 255]), "
            f"not {array.dtype}; convert it, e.g. array.astype(np.uint8)"
        )
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[..., 0]
    return Image.fromarray(np.ascontiguousarray(pixels))


def _orient(image: Image.Image, notes: list[str]) -> Image.Image:
    """The image upright per its EXIF orientation (PIL.ImageOps.exif_transpose's rule)."""
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION)
    except (*_DECODE_ERRORS, KeyError, TypeError) as error:
        notes.append(f"its EXIF data cannot be read ({error}); its orientation, if any, is not applied")
        return image
    if orientation is None or orientation == 1:
        return image
    if not isinstance(orientation, int) or orientation not in _ORIENTATIONS:
        notes.append(f"its EXIF orientation {orientation!r} is not one of 1-8; ignored")
        return image
    method, how = _ORIENTATIONS[orientation]
    notes.append(f"{how} per its EXIF orientation ({orientation})")
    return image.transpose(method)


def _to_rgb(image: Image.Image, notes: list[str]) -> Image.Image:
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode.startswith("I;16"):
        pixels = np.asarray(image).astype(np.float64)
        image = Image.fromarray(np.round(pixels / 257.0).astype(np.uint8))
        notes.append(f"{mode} (16-bit) scaled to 8 bits")
        mode = "L"
    elif mode == "I":
        image = Image.fromarray(_integer_levels(np.asarray(image), "I (32-bit integer) image", notes))
        mode = "L"
    elif mode == "F":
        image = Image.fromarray(_float_levels(np.asarray(image), "F (32-bit float) image", notes))
        mode = "L"
    try:
        if mode in ("RGBA", "LA", "PA", "RGBa") or (mode in ("P", "L", "RGB") and "transparency" in image.info):
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            notes.append(f"{mode} with transparency composited on white")
            return Image.alpha_composite(white, rgba).convert("RGB")
        converted = image.convert("RGB")
    except ValueError as error:  # a mode PIL cannot convert, e.g. "La"
        raise ValueError(f"cannot convert a {mode} image to RGB ({error}); convert it to RGB first") from None
    notes.append(f"{mode} converted to RGB")
    return converted


def prepare_image(
    source: Any,
    size: tuple[int, int],
    *,
    multiple: int = 8,
    fit: Fit = "crop",
    max_pixels: int = MAX_PIXELS,
) -> PreparedImage:
    """Bring an image to ``size`` = (height, width) in pixels, RGB.

    In order, each step noted: a multi-frame image (GIF, APNG, TIFF pages) gives its first
    frame (seek to another and pass ``image.copy()`` for that one); the EXIF orientation
    is applied; the mode is converted to RGB (transparency on white; 16-bit scaled; floats
    in [0, 1] scaled, in [0, 255] taken as levels); the image is resized, then cropped or
    padded.

    Args:
        source: a file path, a PIL image, or an array (h, w) / (h, w, 1|3|4) of uint8,
            uint16, other integers in 0..65535 (as mode "I"), or floats in [0, 1] or [0, 255].
        size: the size the model needs; each side a multiple of ``multiple`` (the VAE's
            downsampling factor), at least ``multiple``, at most ``max_pixels`` in all.
        fit: "crop" scales the image to cover the size and crops the centre; "pad" scales
            it to fit inside and pads the rest with the image's mean colour.
        max_pixels: inputs (and sizes) with more pixels are refused before decoding.

    Raises:
        FileNotFoundError / ValueError / TypeError: a missing or unreadable file, an
        oversized image, a bad array, a size the model cannot take, an unknown fit.
    """
    for name, value in (("multiple", multiple), ("max_pixels", max_pixels)):
        if not is_index(value) or value < 1:
            raise ValueError(f"{name} is a positive whole number, not {value!r}")
    height, width = _size(size, int(multiple), int(max_pixels))
    if not isinstance(fit, str) or fit not in ("crop", "pad"):
        raise ValueError(f"fit is 'crop' (cover, then cut the centre) or 'pad' (fit inside, then pad), not {fit!r}")
    image, notes = _open(source, max_pixels)
    original = (image.height, image.width)
    image = _orient(image, notes)
    image = _to_rgb(image, notes)
    if (image.height, image.width) != (height, width):
        cover = fit == "crop"
        scale = (max if cover else min)(height / image.height, width / image.width)
        scaled = (max(1, round(image.height * scale)), max(1, round(image.width * scale)))
        if cover:
            scaled = (max(scaled[0], height), max(scaled[1], width))
        else:
            scaled = (min(scaled[0], height), min(scaled[1], width))
        resizing = scaled != (image.height, image.width)
        step = f"resized {image.width}x{image.height} to {scaled[1]}x{scaled[0]}" if resizing else ""
        if cover:
            left, top = (scaled[1] - width) // 2, (scaled[0] - height) // 2
            if resizing:
                # Resize and crop in one: only the kept part is computed, so a long thin
                # image never makes a huge intermediate (the sampling positions are those
                # of resizing the whole image, then cropping).
                across, down = scaled[1] / image.width, scaled[0] / image.height
                box = (left / across, top / down, (left + width) / across, (top + height) / down)
                image = image.resize((width, height), Image.Resampling.LANCZOS, box=box)
            else:
                image = image.crop((left, top, left + width, top + height))
            change = f"centre-cropped to {width}x{height}" if scaled != (height, width) else ""
        else:
            resized = image.resize((scaled[1], scaled[0]), Image.Resampling.LANCZOS) if resizing else image
            mean = tuple(int(v) for v in np.asarray(resized).reshape(-1, 3).mean(0).round())
            canvas = Image.new("RGB", (width, height), mean)
            canvas.paste(resized, ((width - scaled[1]) // 2, (height - scaled[0]) // 2))
            image = canvas
            change = f"padded to {width}x{height} with its mean colour" if scaled != (height, width) else ""
        notes.append(" and ".join(part for part in (step, change) if part) + " (width x height)")
    return PreparedImage(image=image, original_size=original, notes=tuple(notes))


def _size(size: Any, multiple: int, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(height, width) checked before anything is read or allocated."""
    if not isinstance(size, (tuple, list)) or len(size) != 2:
        raise ValueError(f"size is (height, width) in pixels, not {size!r}")
    for name, side in zip(("height", "width"), size):
        if not is_index(side):
            raise ValueError(
                f"size is (height, width) in whole pixels, not {size!r}: the {name} is a {type(side).__name__}"
            )
        if side < multiple:
            raise ValueError(
                f"{name} {side} is too small: each side is at least {multiple} pixels (the VAE's downsampling "
                f"factor), so the smallest size is ({multiple}, {multiple})"
            )
    height, width = int(size[0]), int(size[1])
    check_multiple("height", height, multiple)
    check_multiple("width", width, multiple)
    if height * width > max_pixels:
        raise ValueError(
            f"size {height}x{width} (height x width) is {height * width:,} pixels, over the limit of "
            f"{max_pixels:,}; use a smaller size"
        )
    return height, width


# --- inversion ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Inversion:
    """A real image inverted for editing: what :func:`~p2p_widgets.run` needs.

    Attributes:
        method: one of :data:`METHODS`.
        prompt: the source prompt (edits keep it as their source).
        image: the image as the model saw it (RGB, the model's size) and what was done to it.
        steps, guidance, height, width, scheduler: the run settings it was inverted for.
        trajectory: (steps + 1, channels, h, w) float32, CPU: the DDIM-inverted latents, from
            the image's latent (index 0) to x_T (index ``steps``). Sampling step ``i`` goes
            from ``trajectory[steps - i]`` to ``trajectory[steps - i - 1]``.
        unconditional: null-text only: (steps, tokens, dim) float32, the optimised
            unconditional embedding of every sampling step.
        unconditional_pooled: null-text on a model with pooled text embeddings (SDXL):
            (steps, dim) float32, optimised with the hidden states; else None.
        inner_steps: null-text only: the Adam steps each sampling step took.
        notes: what happened, for the user (image preparation, warnings).
        seconds: how long the inversion took.
    """

    method: str
    prompt: str
    image: PreparedImage
    steps: int
    guidance: float
    height: int
    width: int
    scheduler: str
    trajectory: torch.Tensor
    unconditional: torch.Tensor | None = None
    unconditional_pooled: torch.Tensor | None = None
    inner_steps: tuple[int, ...] = ()
    notes: tuple[str, ...] = ()
    seconds: float = 0.0

    @property
    def latents(self) -> torch.Tensor:
        """x_T, (1, channels, h, w)."""
        return self.trajectory[-1:]

    def vae_round_trip(self, pipe: Any) -> Image.Image:
        """The image encoded and decoded by the VAE: the best reconstruction any inversion
        method can reach."""
        return family_of(pipe).decode(self.trajectory[:1])[0]

    @property
    def settings(self) -> dict[str, Any]:
        """The recipe settings every edit of this inversion must use."""
        return dict(
            steps=self.steps, guidance=self.guidance, height=self.height, width=self.width, scheduler=self.scheduler
        )

    def check(self, recipe: Recipe) -> None:
        """Refuse a recipe (its defaults resolved) that would not edit the image as it was inverted.

        Raises:
            ValueError: listing every setting that differs, and how to fix it.
        """
        problems = []
        if recipe.prompt != self.prompt:
            problems.append(f"the source prompt must be the inverted one, {self.prompt!r}, not {recipe.prompt!r}")
        if recipe.steps != self.steps:
            problems.append(f"steps must be {self.steps}, not {recipe.steps}")
        if (recipe.height, recipe.width) != (self.height, self.width):
            problems.append(
                f"the size must be {self.height}x{self.width} (height x width), not {recipe.height}x{recipe.width}"
            )
        if recipe.scheduler != self.scheduler:
            problems.append(f"the scheduler must be {self.scheduler}, not {recipe.scheduler}")
        if recipe.eta != 0:
            problems.append(f"eta must be 0 (inversion follows deterministic DDIM), not {recipe.eta}")
        if self.unconditional is not None and recipe.guidance != self.guidance:
            problems.append(
                f"guidance must be {self.guidance}: the null-text embeddings were optimised for it, "
                f"not for {recipe.guidance} (invert again for another guidance)"
            )
        if problems:
            raise ValueError(
                "this run does not match the inversion: "
                + "; ".join(problems)
                + " (inversion.edit(pipe, ...) sets them)"
            )

    def guide(self, recipe: Recipe) -> Guide:
        """What the engine follows to edit this image with ``recipe`` (checked by :meth:`check`).

        Null-text replaces the unconditional embedding step by step, negative-prompt uses
        the source prompt's conditioning in its place, direct keeps the source branch on the
        inversion's trajectory. With local blending the targets are restored outside their
        masks to the trajectory, that is to the original image, whatever the method
        (paper fig. 12).
        """
        self.check(recipe)
        unconditional = None
        if self.unconditional is not None:
            unconditional = Conditioning(self.unconditional, self.unconditional_pooled)
        return Guide(
            latents=self.latents,
            unconditional=unconditional,
            trajectory=self.trajectory,
            pin_source=self.method == "direct",
            source_as_negative=self.method == "negative-prompt",
        )

    def edit(self, pipe: Any, *targets: Any, **settings: Any) -> Result:
        """Edit the image: ``edit(pipe, prompt, *targets)`` with this inversion's settings.

        ``settings``: other recipe fields and run options (callback, cancel, record, ...).
        With no target, the result's source is the reconstruction.
        """
        fixed = self.settings
        clash = sorted(name for name in fixed if name in settings and settings[name] != fixed[name])
        if clash:
            raise ValueError(
                f"this image was inverted with {', '.join(f'{n}={fixed[n]!r}' for n in clash)}; "
                "edit with those (invert again to change them)"
            )
        if "guide" in settings or "latents" in settings:
            raise ValueError("an inversion brings its own x_T: edit it without guide= or latents=")
        return edit(pipe, self.prompt, *targets, **{**settings, **fixed, "guide": self})


def encode_image(pipe: Any, image: Image.Image) -> torch.Tensor:
    """The VAE latent of an RGB image (its posterior mean, scaled as the denoiser expects),
    (1, channels, h, w) on the pipeline's device and dtype."""
    return family_of(pipe).encode_image(image)


def _epsilon(output: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The noise a model output stands for, given the model was told cumulative alpha ``alpha``."""
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return alpha.sqrt() * output + (1 - alpha).sqrt() * x
    if prediction_type == "sample":
        return (x - alpha.sqrt() * output) / (1 - alpha).sqrt()
    raise ValueError(f"cannot invert a model predicting {prediction_type!r} (epsilon, v_prediction or sample)")


_FROZEN: weakref.WeakKeyDictionary[torch.nn.Module, tuple[int, list[tuple[torch.nn.Parameter, bool]]]] = (
    weakref.WeakKeyDictionary()
)
_FROZEN_LOCK = threading.Lock()


@contextlib.contextmanager
def _frozen(module: torch.nn.Module) -> Iterator[None]:
    """No parameter of ``module`` requires gradients inside; the flags are restored after.

    Reference-counted per module: two inversions at once (two threads) freeze it once and
    the last to finish restores the flags as they were before the first."""
    with _FROZEN_LOCK:
        count, flags = _FROZEN.get(module, (0, []))
        if count == 0:
            flags = [(p, p.requires_grad) for p in module.parameters()]
            for p, _ in flags:
                p.requires_grad_(False)
        _FROZEN[module] = (count + 1, flags)
    try:
        yield
    finally:
        with _FROZEN_LOCK:
            count, flags = _FROZEN[module]
            if count == 1:
                del _FROZEN[module]
                for p, flag in flags:
                    p.requires_grad_(flag)
            else:
                _FROZEN[module] = (count - 1, flags)


def _check(method: str, steps: Any, guidance: Any, inner_steps: Any) -> None:
    if method not in METHODS:
        raise ValueError(f"method is one of {', '.join(METHODS)}, not {method!r}")
    if not is_int(steps) or steps < 1:
        raise ValueError(f"steps is a positive whole number, not {steps!r}")
    if not is_real(guidance) or guidance < 1:
        raise ValueError(f"guidance is a number >= 1, not {guidance!r}")
    if not is_int(inner_steps) or inner_steps < 1:
        raise ValueError(f"inner_steps is a positive whole number, not {inner_steps!r}")


class _Steps:
    """Progress reporting and cancelling across an inversion's stages."""

    def __init__(self, total: int, callback: Callable[[Progress], None] | None, cancel: threading.Event | None):
        self.total, self.done, self.callback, self.cancel = total, 0, callback, cancel

    def check(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled(f"inversion cancelled at step {self.done} of {self.total}")

    def report(self, timestep: int, stage: str) -> None:
        if self.callback is not None:
            self.callback(Progress(self.done, self.total, int(timestep), stage=stage))
        self.done += 1


def invert(
    pipe: Any,
    image: Any,
    prompt: str,
    method: str = "null-text",
    *,
    steps: int = 50,
    guidance: float | None = None,
    size: tuple[int, int] | None = None,
    fit: Fit = "crop",
    scheduler: str = "DDIMScheduler",
    inner_steps: int = 10,
    negative_prompt: str = "",
    callback: Callable[[Progress], None] | None = None,
    cancel: threading.Event | None = None,
) -> Inversion:
    """Invert a real image so that it can be edited; see the module docstring.

    Args:
        pipe: a pipeline of a supported family (Stable Diffusion 1.x/2.x, epsilon or
            v-prediction; SDXL).
        image: a path, PIL image or array (see :func:`prepare_image`).
        prompt: a description of the image; edits change its words. Quality depends on
            it: a warning is given when it explains the image no better than no prompt.
        method: "ddim", "null-text", "negative-prompt" or "direct".
        steps, guidance: the settings the edits will run with (guidance None: the model
            family's default, 7.5 for Stable Diffusion, 5 for SDXL).
        size: (height, width) for the model; default its native size.
        fit: "crop" or "pad" when the image's aspect ratio differs.
        scheduler: a deterministic DDIM scheduler (the inversion reverses its steps).
        inner_steps: null-text's most Adam steps per sampling step.
        negative_prompt: the unconditional prompt null-text starts from.
        callback: called with a :class:`~p2p_widgets.Progress` after every step.
        cancel: an event; when set, the inversion stops and raises ``Cancelled``.

    Raises:
        ValueError / TypeError / FileNotFoundError: bad input, before any work.
        Cancelled: ``cancel`` was set; the pipeline is as it was.
    """
    started = time.perf_counter()
    family = family_of(pipe)
    if guidance is None:
        guidance = family.default_guidance
    _check(method, steps, guidance, inner_steps)
    if not isinstance(prompt, str):
        raise TypeError(f"prompt is a string describing the image, not {type(prompt).__name__}")
    sampler = make_scheduler(pipe, scheduler)
    if type(sampler).__name__ != "DDIMScheduler":
        raise ValueError(
            f"inversion reverses deterministic DDIM steps; use scheduler='DDIMScheduler', not {scheduler!r}"
        )
    factor = family.vae_factor
    prepared = prepare_image(image, size or family.default_size(), multiple=factor, fit=fit)
    height, width = prepared.image.height, prepared.image.width
    recipe = Recipe(
        prompt,
        steps=steps,
        guidance=guidance,
        height=height,
        width=width,
        scheduler=scheduler,
        negative_prompt=negative_prompt,
    )
    recipe = resolve(family, recipe)
    branches = plan_branches(recipe, family.tokenizer)  # the prompt, tokenised as the edits will be
    check_steps(sampler, steps)
    _estimate(family, branches, method, steps, (height, width)).check("use fewer steps or a smaller size")
    notes = list(prepared.notes)
    sampler.set_timesteps(steps, device=family.device)
    timesteps = sampler.timesteps
    prediction_type = sampler.config.prediction_type
    progress = _Steps(len(timesteps) * (2 if method == "null-text" else 1), callback, cancel)

    with torch.no_grad():
        conditional = family.encode(branches, recipe, (height, width))
        negative = family.encode_negative(recipe, (height, width), branches[0].prompt.max_length)
        progress.check()
        latent = family.encode_image(prepared.image)
        fit_note = _prompt_fit(family, latent, (negative, conditional), sampler, prompt)
        if fit_note:
            notes.append(fit_note)
            warnings.warn(fit_note, UserWarning, stacklevel=2)
        trajectory = _ddim_invert(family, latent, conditional, sampler, timesteps, prediction_type, progress)
    found: tuple[torch.Tensor, torch.Tensor | None] | None = None
    inner: tuple[int, ...] = ()
    if method == "null-text" and family.is_guided(guidance):
        found, inner = _null_text(
            family, trajectory, negative, conditional, sampler, timesteps, guidance, inner_steps, progress
        )
    elif method == "null-text":
        notes.append("guidance 1: nothing to optimise, null-text is DDIM inversion here")
    return Inversion(
        method=method,
        prompt=prompt,
        image=prepared,
        steps=len(timesteps),
        guidance=float(guidance),
        height=height,
        width=width,
        scheduler=type(sampler).__name__,
        trajectory=trajectory.float().cpu(),
        unconditional=None if found is None else found[0].float().cpu(),
        unconditional_pooled=None if found is None or found[1] is None else found[1].float().cpu(),
        inner_steps=inner,
        notes=tuple(notes),
        seconds=round(time.perf_counter() - started, 3),
    )


def _estimate(pipe: Any, branches: Any, method: str, steps: int, size: tuple[int, int]) -> MemoryEstimate:
    """An inversion's memory: a guided one-branch run's, plus the trajectory (x_0 .. x_T),
    the per-step unconditional embeddings and, for null-text, the denoiser's activations
    kept for the gradient (about three times the forward pass's). ``pipe``: the pipeline
    or its family adapter."""
    family = family_of(pipe)
    run = estimate_run(family, branches, steps, size, True, record=False)
    height, width = family.latent_size(*size)
    latent = family.latent_channels * height * width * 4
    parts = dict(run.on_device)
    parts["trajectory"] = (steps + 1) * latent * 2
    if method == "null-text":
        prompt = branches[0].prompt
        parts["unconditional embeddings"] = (
            steps * prompt.max_length * family.text_width * 4 * 3
        )  # value, Adam's two moments
        parts["activations for the gradient"] = 3 * parts["denoiser activations"]
    what = f"this inversion ({method}, {steps} steps, {size[0]}x{size[1]} pixels)"
    return MemoryEstimate(
        what, family.device, tuple(parts.items()), (("trajectory (host copy)", (steps + 1) * latent),)
    )


def _alpha(sampler: Any, timestep: int) -> torch.Tensor:
    return sampler.alphas_cumprod[timestep] if timestep >= 0 else sampler.final_alpha_cumprod


def _ddim_invert(
    family: Family,
    latent: torch.Tensor,
    conditional: Conditioning,
    sampler: Any,
    timesteps: torch.Tensor,
    prediction_type: str,
    progress: _Steps,
) -> torch.Tensor:
    """x_0 -> x_T by DDIM steps in reverse at guidance 1: the model's noise estimate at the
    next timestep, taken on the current latent (the usual approximation)."""
    ratio = sampler.config.num_train_timesteps // sampler.num_inference_steps
    x, out = latent, [latent]
    for t in reversed(timesteps):
        progress.check()
        t = int(t)
        a_from, a_to = (_alpha(sampler, t - ratio).to(x), _alpha(sampler, t).to(x))
        output = family.denoise(sampler.scale_model_input(x, t), t, conditional)
        eps = _epsilon(output, x, a_to, prediction_type)
        clean = (x - (1 - a_from).sqrt() * eps) / a_from.sqrt()
        x = a_to.sqrt() * clean + (1 - a_to).sqrt() * eps
        out.append(x)
        progress.report(t, "invert")
    return torch.cat(out)


def _null_text(
    family: Family,
    trajectory: torch.Tensor,
    negative: Conditioning,
    conditional: Conditioning,
    sampler: Any,
    timesteps: torch.Tensor,
    guidance: float,
    inner_steps: int,
    progress: _Steps,
) -> tuple[tuple[torch.Tensor, torch.Tensor | None], tuple[int, ...]]:
    """Per sampling step, optimise the unconditional embedding (the hidden states of every
    text encoder, and the pooled embedding where the model has one) so that the guided DDIM
    step from the current latent lands on the inversion's next latent. Only the embeddings
    get gradients: the denoiser's weights are frozen for the duration."""
    steps = len(timesteps)
    dtype = conditional.text.dtype
    text = negative.text.float()
    pooled = None if negative.pooled is None else negative.pooled.float()
    x = trajectory[-1:]
    found_text, found_pooled, counts = [], [], []
    with _frozen(family.denoiser):
        for i, t in enumerate(timesteps):
            progress.check()
            goal = trajectory[steps - i - 1][None]
            scaled = sampler.scale_model_input(x, t)
            with torch.no_grad():
                conditional_pred = family.denoise(scaled, t, conditional)
            progress_at_50 = i * 50 / steps  # the official schedule is for 50 steps
            text = text.detach().clone().requires_grad_(True)
            learned = [text]
            if pooled is not None:
                pooled = pooled.detach().clone().requires_grad_(True)
                learned.append(pooled)
            optimizer = torch.optim.Adam(learned, lr=1e-2 * (1 - progress_at_50 / 100))
            limit = 1e-5 + 2e-5 * progress_at_50
            taken = 0
            for _ in range(inner_steps):
                with torch.enable_grad():
                    unconditional = negative.learned(text.to(dtype), None if pooled is None else pooled.to(dtype))
                    free = family.denoise(scaled, t, unconditional)
                    guided = free + guidance * (conditional_pred - free)
                    landed = sampler.step(guided, t, x, return_dict=False)[0]
                    loss = torch.nn.functional.mse_loss(landed.float(), goal.float())
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                optimizer.step()
                taken += 1
                if loss.item() < limit:
                    break
            text = text.detach()
            pooled = None if pooled is None else pooled.detach()
            found_text.append(text[0])
            if pooled is not None:
                found_pooled.append(pooled[0])
            counts.append(taken)
            with torch.no_grad():
                unconditional = negative.learned(text.to(dtype), None if pooled is None else pooled.to(dtype))
                both = Conditioning.cat([unconditional, conditional])
                free, conditional_pred = family.denoise(torch.cat([scaled, scaled]), t, both).chunk(2)
                x = sampler.step(free + guidance * (conditional_pred - free), t, x, return_dict=False)[0]
            progress.report(int(t), "null-text")
    stacked_pooled = torch.stack(found_pooled) if found_pooled else None
    return (torch.stack(found_text), stacked_pooled), tuple(counts)


def _prompt_fit(
    family: Family, latent: torch.Tensor, conditionings: tuple[Conditioning, Conditioning], sampler: Any, prompt: str
) -> str | None:
    """A warning when the prompt predicts the image's noise no better than no prompt does
    (a diffusion-classifier test at four noise levels, two noises each), else None."""
    generator = torch.Generator("cpu").manual_seed(0)
    levels = [int(f * sampler.config.num_train_timesteps) for f in (0.2, 0.4, 0.6, 0.8)] * 2
    noise = torch.randn((len(levels), *latent.shape[1:]), generator=generator).to(latent)
    t = torch.tensor(levels, device=latent.device)
    noisy = sampler.add_noise(latent.expand(len(levels), -1, -1, -1), noise, t)
    target = noise
    if sampler.config.prediction_type == "v_prediction":
        target = sampler.get_velocity(latent.expand(len(levels), -1, -1, -1), noise, t)
    errors = []
    for conditioning in conditionings:  # the unconditional one, then the prompt's
        output = family.denoise(noisy, t, conditioning.repeat(len(levels)))
        errors.append(float((output.float() - target.float()).pow(2).mean()))
    if errors[1] < errors[0]:
        return None
    return (
        f"the prompt {prompt!r} does not seem to describe the image: the model predicts the image's noise "
        f"no better with it than without ({errors[1]:.4f} vs {errors[0]:.4f}); inversion and edits work, "
        "but their quality depends on a prompt that describes the image"
    )


def restore_outside(result: Result, inversion: Inversion, feather: int = 1) -> tuple[Image.Image, ...]:
    """The result's images with the original image's pixels pasted back outside each
    target's local-blend mask (its last step, upsampled, dilated by ``feather`` pixels of
    the latent grid and softened): the unedited regions become the original exactly.

    The source (index 0) is the original image. Targets without blending are returned as
    they are.
    """
    if result.blend_masks is None:
        raise ValueError("this result has no local-blend masks; give the targets a LocalBlend to restore outside it")
    if result.images[0].size != inversion.image.image.size:
        raise ValueError("this result is not an edit of that inversion (the sizes differ)")
    if not isinstance(feather, int) or isinstance(feather, bool) or feather < 0:
        raise ValueError(f"feather is a whole number of latent pixels >= 0, not {feather!r}")
    original = np.asarray(inversion.image.image, dtype=np.float32)
    height, width = original.shape[:2]
    masks = result.blend_masks[-1].float()[:, None]  # (branches, 1, h, w)
    if feather:
        masks = torch.nn.functional.max_pool2d(masks, 2 * feather + 1, stride=1, padding=feather)
        masks = torch.nn.functional.avg_pool2d(masks, 3, stride=1, padding=1, count_include_pad=False)
    upsampled = torch.nn.functional.interpolate(masks, size=(height, width), mode="bilinear", align_corners=False)
    weights = upsampled[:, 0].clamp(0, 1).numpy()[..., None]  # (branches, height, width, 1)
    images = [inversion.image.image]
    for branch, image in enumerate(result.images[1:], start=1):
        if result.blend_masks[-1][branch].all():  # not blended
            images.append(image)
            continue
        edited = np.asarray(image, dtype=np.float32)
        mixed = original + weights[branch] * (edited - original)
        images.append(Image.fromarray(mixed.round().clip(0, 255).astype(np.uint8)))
    return tuple(images)
