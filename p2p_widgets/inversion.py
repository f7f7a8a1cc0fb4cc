"""Real-image editing: bring a photo to the model's size, then invert it.

This module starts with the image input (paper section 4 edits real images); the
inversion methods (DDIM, null-text, negative-prompt, direct) build on it.

``prepare_image(image, (height, width))`` accepts a path, a PIL image or an array, and
returns an RGB image of exactly that size with a note for every change it made (mode
conversion, resizing, cropping or padding), so nothing happens to the user's image
silently.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from .engine import check_multiple

__all__ = ["PreparedImage", "prepare_image", "MAX_PIXELS"]

MAX_PIXELS = 64_000_000  # larger inputs are refused before decoding (decompression bombs)
Fit = Literal["crop", "pad"]


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


def _open(source: Any, max_pixels: int) -> tuple[Image.Image, list[str]]:
    """The input as a PIL image (not yet converted), refusing oversized ones early."""
    notes: list[str] = []
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"no such image file: {path}")
        try:
            image = Image.open(path)  # lazy: reads the header only
        except Image.DecompressionBombError as error:
            raise ValueError(f"{path} is too large to decode safely ({error}); resize it first") from None
        except OSError as error:
            raise ValueError(f"cannot read {path} as an image ({error}); use a PNG, JPEG, WebP, BMP or TIFF file") from None
        _check_pixels(image.width, image.height, max_pixels, str(path))
        try:
            image.load()
        except (OSError, Image.DecompressionBombError) as error:
            raise ValueError(f"cannot decode {path} ({error}); the file may be truncated or corrupt") from None
        return image, notes
    if isinstance(source, Image.Image):
        _check_pixels(source.width, source.height, max_pixels, "the image")
        return source, notes
    if isinstance(source, np.ndarray):
        return _from_array(source, max_pixels, notes), notes
    raise TypeError(f"an image is a file path, a PIL image or a numpy array, not {type(source).__name__}")


def _check_pixels(width: int, height: int, max_pixels: int, what: str) -> None:
    if width * height > max_pixels:
        raise ValueError(
            f"{what} has {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} "
            "(a guard against decompression bombs); resize it first or pass a larger max_pixels"
        )
    if width < 1 or height < 1:
        raise ValueError(f"{what} is empty ({width}x{height})")


def _from_array(array: np.ndarray, max_pixels: int, notes: list[str]) -> Image.Image:
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[2] not in (1, 3, 4):
        raise ValueError(f"the array has shape {array.shape} (channels first); give (height, width, channels)")
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise ValueError(f"an image array is (height, width) or (height, width, 1|3|4), not {array.shape}")
    _check_pixels(array.shape[1], array.shape[0], max_pixels, "the array")
    if array.dtype == np.uint8:
        pixels = array
    elif array.dtype == np.uint16:
        pixels = (array.astype(np.float64) / 257.0).round().astype(np.uint8)
        notes.append("16-bit array scaled to 8 bits")
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError("the image array holds NaN or infinite values")
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            raise ValueError(f"a float image array must hold values in [0, 1], not [{low:.3g}, {high:.3g}]")
        pixels = (array * 255.0).round().astype(np.uint8)
    else:
        raise ValueError(f"an image array is uint8, uint16 or float in [0, 1], not {array.dtype}")
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[..., 0]
    return Image.fromarray(pixels)


def _to_rgb(image: Image.Image, notes: list[str]) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode != "I" or pixels.max() > 255 else 255.0
        image = Image.fromarray((np.clip(pixels / top, 0, 1) * 255).round().astype(np.uint8))
        notes.append(f"{mode} (16-bit) scaled to 8 bits")
        mode = "L"
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        notes.append(f"{mode} with transparency composited on white")
        return Image.alpha_composite(white, rgba).convert("RGB")
    notes.append(f"{mode} converted to RGB")
    return image.convert("RGB")


def prepare_image(
    source: Any,
    size: tuple[int, int],
    *,
    multiple: int = 8,
    fit: Fit = "crop",
    max_pixels: int = MAX_PIXELS,
) -> PreparedImage:
    """Bring an image to ``size`` = (height, width) in pixels, RGB.

    Args:
        source: a file path, a PIL image, or an array (h, w) / (h, w, 1|3|4) of uint8,
            uint16, or floats in [0, 1].
        size: the size the model needs; each side a multiple of ``multiple`` (the VAE's
            downsampling factor).
        fit: "crop" scales the image to cover the size and crops the centre; "pad" scales
            it to fit inside and pads the rest with the image's mean colour.
        max_pixels: inputs with more pixels are refused before decoding.

    Raises:
        FileNotFoundError / ValueError / TypeError: a missing or unreadable file, an
        oversized image, a bad array, a size the model cannot take, an unknown fit.
    """
    height, width = _size(size, multiple)
    if fit not in ("crop", "pad"):
        raise ValueError(f"fit is 'crop' (cover, then cut the centre) or 'pad' (fit inside, then pad), not {fit!r}")
    image, notes = _open(source, max_pixels)
    original = (image.height, image.width)
    image = _to_rgb(image, notes)
    if (image.height, image.width) != (height, width):
        cover = fit == "crop"
        scale = (max if cover else min)(height / image.height, width / image.width)
        scaled = (max(1, round(image.height * scale)), max(1, round(image.width * scale)))
        if cover:
            scaled = (max(scaled[0], height), max(scaled[1], width))
        else:
            scaled = (min(scaled[0], height), min(scaled[1], width))
        resized = image.resize((scaled[1], scaled[0]), Image.LANCZOS) if scaled != (image.height, image.width) else image
        step = f"resized {image.width}x{image.height} to {scaled[1]}x{scaled[0]}" if resized is not image else ""
        if cover:
            left, top = (scaled[1] - width) // 2, (scaled[0] - height) // 2
            image = resized.crop((left, top, left + width, top + height))
            change = f"centre-cropped to {width}x{height}" if scaled != (height, width) else ""
        else:
            mean = tuple(int(v) for v in np.asarray(resized).reshape(-1, 3).mean(0).round())
            canvas = Image.new("RGB", (width, height), mean)
            canvas.paste(resized, ((width - scaled[1]) // 2, (height - scaled[0]) // 2))
            image = canvas
            change = f"padded to {width}x{height} with its mean colour" if scaled != (height, width) else ""
        notes.append(" and ".join(part for part in (step, change) if part) + " (width x height)")
    return PreparedImage(image=image, original_size=original, notes=tuple(notes))


def _size(size: Any, multiple: int) -> tuple[int, int]:
    if not isinstance(size, (tuple, list)) or len(size) != 2 or not all(
        isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in size
    ):
        raise ValueError(f"size is (height, width) in pixels, not {size!r}")
    height, width = int(size[0]), int(size[1])
    check_multiple("height", height, multiple)
    check_multiple("width", width, multiple)
    return height, width
