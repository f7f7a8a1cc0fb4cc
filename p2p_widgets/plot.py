"""Pictures of a run: heatmaps, overlays, word grids, filmstrips, masks, galleries.

Everything takes plain values (a :class:`~p2p_widgets.engine.Result`, numpy arrays, PIL
images). Single pictures come back as PIL images (``as_array=True``: uint8 numpy arrays
of shape (height, width, 3)); views of several pictures (word grids, filmstrips,
galleries) as :class:`Tiles`, which draw themselves as one PIL image or as a matplotlib
figure built without pyplot, so no global matplotlib state is touched. Sizes given as
pairs are (height, width); PIL's ``.size`` is (width, height) and is converted here.

The fast path is :class:`Scrubber`: it quantises every step's word maps once, so that
rendering one overlay per word at a step is a resize, a palette lookup and an add per
word, all in PIL's C code (about 1.5 ms per 512x512 overlay on one CPU core).
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import Colormap
from matplotlib.figure import Figure
from PIL import Image, ImageChops, ImageDraw, ImageFont

from .record import AttentionRecord, Heatmaps, Normalize, StepsLike, select_steps
from .record import normalize as normalize_maps  # the functions' `normalize` arguments shadow the name

__all__ = [
    "Scrubber",
    "Tiles",
    "blend_mask",
    "colorize",
    "difference",
    "filmstrip",
    "gallery",
    "overlay",
    "palette",
    "self_attention",
    "tile_images",
    "word_grid",
]

ImageLike = Image.Image | np.ndarray
Output = Image.Image | np.ndarray


# -- colours ---------------------------------------------------------------------------
def palette(cmap: str | Colormap = "jet", alpha: float = 1.0) -> np.ndarray:
    """A colour map as a lookup table: (256, 3) uint8, each colour times ``alpha``."""
    if isinstance(cmap, str):
        if cmap not in colormaps:
            raise ValueError(
                f"{cmap!r} is not a matplotlib colour map; try 'jet', 'viridis', 'inferno', 'magma' or 'gray'"
            )
        cmap = colormaps[cmap]
    elif not isinstance(cmap, Colormap):
        raise TypeError(f"cmap is a colour map name or a matplotlib Colormap, not {type(cmap).__name__}")
    _check_alpha(alpha)
    colours = cmap(np.linspace(0.0, 1.0, 256))[:, :3]  # (256, rgb) in [0, 1]
    return np.round(colours * 255.0 * alpha).astype(np.uint8)


def _check_alpha(alpha: float) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha is the heatmap's opacity, from 0 (invisible) to 1 (opaque), not {alpha!r}")


def _quantise(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (clipped) to uint8 levels 0..255."""
    return np.round(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)


def _heat(levels: np.ndarray, size: tuple[int, int], colours: list[int]) -> Image.Image:
    """uint8 levels (h, w) -> an RGB image of ``size`` (height, width): upsample, then colour."""
    image = Image.fromarray(levels, "L")
    if levels.shape != size:
        image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    image.putpalette(colours)  # the grey levels become palette indices
    return image.convert("RGB")


def _heatmap_2d(heatmap: Any) -> np.ndarray:
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if heatmap.ndim != 2:
        raise ValueError(f"a heatmap is a 2-D array (height, width), not an array of shape {heatmap.shape}")
    if not np.isfinite(heatmap).all():
        raise ValueError("the heatmap has NaN or infinite values")
    return heatmap


def _rgb(image: ImageLike) -> Image.Image:
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"an image array is uint8 of shape (height, width, 3), not {image.dtype} {image.shape}")
        return Image.fromarray(image, "RGB")
    if not isinstance(image, Image.Image):
        raise TypeError(f"image is a PIL image or a uint8 array, not {type(image).__name__}")
    return image.convert("RGB")


def _out(image: Image.Image, as_array: bool) -> Output:
    return np.asarray(image).copy() if as_array else image


@overload
def colorize(
    heatmap: Any,
    size: tuple[int, int] | None = ...,
    cmap: str | Colormap = ...,
    normalize: Normalize = ...,
    as_array: Literal[False] = ...,
) -> Image.Image: ...
@overload
def colorize(
    heatmap: Any,
    size: tuple[int, int] | None = ...,
    cmap: str | Colormap = ...,
    normalize: Normalize = ...,
    *,
    as_array: Literal[True],
) -> np.ndarray: ...
@overload
def colorize(
    heatmap: Any,
    size: tuple[int, int] | None = ...,
    cmap: str | Colormap = ...,
    normalize: Normalize = ...,
    as_array: bool = ...,
) -> Output: ...
def colorize(
    heatmap: Any,
    size: tuple[int, int] | None = None,
    cmap: str | Colormap = "jet",
    normalize: Normalize = "map",
    as_array: bool = False,
) -> Output:
    """A heatmap (h, w) as a colour image, upsampled (bilinear) to ``size`` (height, width).

    ``normalize="map"`` stretches it to [0, 1] first; with None the values are taken as
    they are and clipped to [0, 1].
    """
    heatmap = _heatmap_2d(heatmap)
    levels = _quantise(_normalise_one(heatmap, normalize))
    size = heatmap.shape if size is None else _size(size)
    return _out(_heat(levels, size, palette(cmap).reshape(-1).tolist()), as_array)


@overload
def overlay(
    image: ImageLike,
    heatmap: Any,
    alpha: float = ...,
    cmap: str | Colormap = ...,
    normalize: Normalize = ...,
    as_array: Literal[False] = ...,
) -> Image.Image: ...
@overload
def overlay(
    image: ImageLike,
    heatmap: Any,
    alpha: float = ...,
    cmap: str | Colormap = ...,
    normalize: Normalize = ...,
    *,
    as_array: Literal[True],
) -> np.ndarray: ...
@overload
def overlay(
    image: ImageLike,
    heatmap: Any,
    alpha: float = ...,
    cmap: str | Colormap = ...,
    normalize: Normalize = ...,
    as_array: bool = ...,
) -> Output: ...
def overlay(
    image: ImageLike,
    heatmap: Any,
    alpha: float = 0.5,
    cmap: str | Colormap = "jet",
    normalize: Normalize = "map",
    as_array: bool = False,
) -> Output:
    """A heatmap laid over an image: ``(1 - alpha) * image + alpha * colour(heatmap)``.

    The heatmap is upsampled (bilinear) to the image's size, whatever its own size.
    """
    image = _rgb(image)
    heatmap = _heatmap_2d(heatmap)
    _check_alpha(alpha)
    base = Image.fromarray(_scaled(np.asarray(image), 1.0 - alpha))
    heat = _heat(
        _quantise(_normalise_one(heatmap, normalize)),
        (image.height, image.width),
        palette(cmap, alpha).reshape(-1).tolist(),
    )
    return _out(ImageChops.add(base, heat), as_array)


def _scaled(pixels: np.ndarray, factor: float) -> np.ndarray:
    return np.round(pixels.astype(np.float32) * factor).astype(np.uint8)


def _normalise_one(heatmap: np.ndarray, how: Normalize) -> np.ndarray:
    if how == "words":
        how = "map"  # one map alone: the same thing
    return normalize_maps(heatmap[None], how)[0]


def _size(size: Any) -> tuple[int, int]:
    if not isinstance(size, (tuple, list)) or len(size) != 2 or not all(_is_int(v) and v > 0 for v in size):
        raise ValueError(f"size is (height, width) in pixels, not {size!r}")
    return int(size[0]), int(size[1])


# -- the slider's fast path ---------------------------------------------------------------
class Scrubber:
    """Overlays of chosen words on one branch's image, at any step, fast.

    On creation every step's word maps are averaged from the run's
    :class:`~p2p_widgets.record.Heatmaps`, normalised and quantised once; then
    :meth:`frame` renders one overlay per word for a step (or a step range) with no
    recomputation of attention, for a timestep slider.

    Args:
        result: a run's result (its attention record and images are used).
        branch: which image and prompt (0 is the source).
        words: words (texts or indices) to show; None: every word of the prompt.
        alpha, cmap, normalize: as in :func:`overlay`; ``normalize="words"`` shares one
            scale across the shown words at each step.
        factor: one resolution, or None to aggregate all.
        size: (height, width) to render at; default the image's.
    """

    def __init__(
        self,
        result: Any,
        branch: int = 0,
        words: Sequence[str | int] | None = None,
        alpha: float = 0.5,
        cmap: str | Colormap = "jet",
        normalize: Normalize = "map",
        factor: int | None = None,
        size: tuple[int, int] | None = None,
    ) -> None:
        record, image = _record_and_image(result, branch)
        self.heatmaps: Heatmaps = record.heatmaps(branch, factor)
        _check_alpha(alpha)
        self.normalize = normalize
        chosen: list[str | int] = list(range(len(self.heatmaps.prompt.words))) if words is None else list(words)
        self.labels: tuple[str, ...] = self.heatmaps.words(chosen, steps=0, normalize=None).labels  # validates
        if size is not None:
            height, width = _size(size)
            image = image.resize((width, height), Image.Resampling.BICUBIC)
        self.image = image
        self.size = (image.height, image.width)
        self._base = Image.fromarray(_scaled(np.asarray(image), 1.0 - alpha))
        self._colours = palette(cmap, alpha).reshape(-1).tolist()
        per_step = self.heatmaps.per_step  # (steps, tokens, h, w)
        tokens = [list(self.heatmaps.prompt.token_indices(word)) for word in chosen]
        self._words_per_step = np.stack([per_step[:, t].mean(1) for t in tokens], axis=1)  # (steps, words, h, w)
        self._levels = _quantise(normalize_maps(self._words_per_step, normalize))  # (steps, words, h, w) uint8

    @property
    def steps(self) -> int:
        return self.heatmaps.steps

    def levels(self, steps: StepsLike) -> np.ndarray:
        """The quantised maps (words, h, w) uint8 for a step or a step range."""
        chosen = select_steps(steps, self.steps)
        if len(chosen) == 1:
            return self._levels[chosen[0]]
        return _quantise(normalize_maps(self._words_per_step[chosen].mean(0), self.normalize))

    def frame(self, steps: StepsLike) -> list[Image.Image]:
        """One overlay per word (in ``labels`` order) at a step index or a step range."""
        return [ImageChops.add(self._base, _heat(levels, self.size, self._colours)) for levels in self.levels(steps)]


# -- run helpers ----------------------------------------------------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _images_of(result: Any) -> tuple[Image.Image, ...]:
    images = getattr(result, "images", None)
    if images is None:
        raise TypeError(f"expected a run's Result (from p2p_widgets.run or edit), not {type(result).__name__}")
    return tuple(images)


def _record_and_image(result: Any, branch: int) -> tuple[AttentionRecord, Image.Image]:
    images = _images_of(result)
    record = getattr(result, "attention", None)
    if record is None:
        raise ValueError("this run kept no attention record; run it again with record=True (the default)")
    if not _is_int(branch) or not 0 <= branch < len(images):
        raise ValueError(f"branch {branch!r} does not exist; this run has branches 0..{len(images) - 1}")
    return record, images[int(branch)].convert("RGB")


def _step_title(heatmaps: Heatmaps, steps: StepsLike) -> str:
    chosen = select_steps(steps, heatmaps.steps)
    if len(chosen) == 1:
        return f"step {chosen[0] + 1}/{heatmaps.steps} (t={heatmaps.timesteps[chosen[0]]})"
    if chosen == list(range(chosen[0], chosen[-1] + 1)):
        if len(chosen) == heatmaps.steps:
            return f"all {heatmaps.steps} steps"
        return f"steps {chosen[0] + 1}-{chosen[-1] + 1} of {heatmaps.steps}"
    return f"{len(chosen)} of {heatmaps.steps} steps"


def word_grid(
    result: Any,
    branch: int = 0,
    words: Sequence[str | int] | None = None,
    steps: StepsLike = None,
    factor: int | None = None,
    normalize: Normalize = "map",
    tokens: bool = False,
    special: bool = False,
    on_image: bool = True,
    alpha: float = 0.5,
    cmap: str | Colormap = "jet",
    columns: int | None = None,
) -> Tiles:
    """Every word's heatmap (``tokens=True``: every token; ``special=True`` adds begin- and
    end-of-text), labelled, overlaid on the image unless ``on_image=False``: the paper's fig. 4 and the
    official ``show_cross_attention``. ``.figure()`` / ``.image()`` draw it."""
    record, image = _record_and_image(result, branch)
    heatmaps = record.heatmaps(branch, factor)
    if tokens:
        if words is not None:
            raise ValueError("with tokens=True the grid shows every token; leave words=None")
        maps = heatmaps.tokens(steps=steps, normalize=normalize, special=special)
    else:
        maps = heatmaps.words(None if words is None else list(words), steps=steps, normalize=normalize)
    title = f'"{heatmaps.prompt.text}", {_step_title(heatmaps, steps)}'
    return Tiles(_pictures(image, maps.maps, on_image, alpha, cmap), maps.labels, title, columns)


def filmstrip(
    result: Any,
    word: str | int,
    branch: int = 0,
    steps: Sequence[int] | None = None,
    count: int = 8,
    factor: int | None = None,
    normalize: Normalize = "map",
    on_image: bool = True,
    alpha: float = 0.5,
    cmap: str | Colormap = "jet",
) -> Tiles:
    """One word's heatmap at several steps in a row: ``count`` evenly spaced steps, or the
    step indices ``steps``. ``normalize="words"`` puts all steps on one scale, to see the
    map sharpen over the diffusion."""
    record, image = _record_and_image(result, branch)
    heatmaps = record.heatmaps(branch, factor)
    per_step = heatmaps.word_steps(word)  # (steps, h, w)
    total = heatmaps.steps
    if steps is None:
        if not _is_int(count) or count < 1:
            raise ValueError(f"count is how many steps to show (at least 1), not {count!r}")
        chosen = sorted(set(np.linspace(0, total - 1, min(count, total)).round().astype(int).tolist()))
    else:
        chosen = list(steps)
        for step in chosen:
            if not _is_int(step) or not 0 <= step < total:
                raise ValueError(f"step {step!r} does not exist; this run has steps 0..{total - 1}")
        if not chosen:
            raise ValueError("no step chosen; pass step indices, or None for evenly spaced steps")
    maps = normalize_maps(per_step[chosen], normalize)  # "words" here: one scale across the steps
    labels = tuple(f"step {s + 1} (t={heatmaps.timesteps[s]})" for s in chosen)
    name = word if isinstance(word, str) else heatmaps.prompt.words[word].text
    title = f'"{name}" in "{heatmaps.prompt.text}" across the diffusion'
    return Tiles(_pictures(image, maps, on_image, alpha, cmap), labels, title, len(chosen))


def _pictures(
    image: Image.Image, maps: np.ndarray, on_image: bool, alpha: float, cmap: str | Colormap
) -> tuple[Image.Image, ...]:
    """Maps (n, h, w) in [0, 1] as overlays on ``image`` or as colour images of its size."""
    if on_image:
        return tuple(overlay(image, m, alpha=alpha, cmap=cmap, normalize=None) for m in maps)
    return tuple(colorize(m, size=(image.height, image.width), cmap=cmap, normalize=None) for m in maps)


@overload
def blend_mask(
    result: Any, branch: int = ..., step: int = ..., on_image: bool = ..., as_array: Literal[False] = ...
) -> Image.Image: ...
@overload
def blend_mask(
    result: Any, branch: int = ..., step: int = ..., on_image: bool = ..., *, as_array: Literal[True]
) -> np.ndarray: ...
@overload
def blend_mask(
    result: Any, branch: int = ..., step: int = ..., on_image: bool = ..., as_array: bool = ...
) -> Output: ...
def blend_mask(result: Any, branch: int = 1, step: int = -1, on_image: bool = True, as_array: bool = False) -> Output:
    """Where local blending let a target change, at a step (default: the last).

    ``on_image``: the target image, dimmed outside the mask; otherwise the mask itself
    in black (kept from the parent) and white (free to change). Upsampled (nearest) from
    the latent to the image size.
    """
    images = _images_of(result)
    masks = getattr(result, "blend_masks", None)
    if masks is None:
        raise ValueError("this run used no local blending; give a Target blend=LocalBlend([...words]) to get a mask")
    if not _is_int(branch) or not 1 <= branch < len(images):
        raise ValueError(f"branch {branch!r} is not a target; this run's targets are 1..{len(images) - 1}")
    total = masks.shape[0]
    if not _is_int(step) or not -total <= step < total:
        raise ValueError(f"step {step!r} does not exist; local blending ran at steps 0..{total - 1}")
    mask = np.asarray(masks[int(step), int(branch)], dtype=np.uint8) * 255  # (h, w)
    image = images[int(branch)].convert("RGB")
    mask_image = Image.fromarray(mask, "L").resize((image.width, image.height), Image.Resampling.NEAREST)
    if not on_image:
        return _out(mask_image.convert("RGB"), as_array)
    dimmed = Image.fromarray(_scaled(np.asarray(image), 0.25))
    return _out(Image.composite(image, dimmed, mask_image), as_array)


@overload
def difference(
    result: Any, branch: int = ..., against: int | None = ..., gain: float = ..., as_array: Literal[False] = ...
) -> Image.Image: ...
@overload
def difference(
    result: Any, branch: int = ..., against: int | None = ..., gain: float = ..., *, as_array: Literal[True]
) -> np.ndarray: ...
@overload
def difference(
    result: Any, branch: int = ..., against: int | None = ..., gain: float = ..., as_array: bool = ...
) -> Output: ...
def difference(
    result: Any, branch: int = 1, against: int | None = None, gain: float = 1.0, as_array: bool = False
) -> Output:
    """``|image[branch] - image[against]|`` per channel (default ``against``: the branch's
    parent), times ``gain`` and clipped: black where nothing changed."""
    images = _images_of(result)
    count = len(images)
    if not _is_int(branch) or not 0 <= branch < count:
        raise ValueError(f"branch {branch!r} does not exist; this run has branches 0..{count - 1}")
    if against is None:
        branches = getattr(result, "branches", None)
        against = branches[branch].parent if branches is not None and branch > 0 else 0
    if not _is_int(against) or not 0 <= against < count:
        raise ValueError(f"against={against!r} does not exist; this run has branches 0..{count - 1}")
    if isinstance(gain, bool) or not isinstance(gain, (int, float)) or not 0 < gain < float("inf"):
        raise ValueError(f"gain multiplies the difference and is a positive finite number, not {gain!r}")
    first = np.asarray(images[int(branch)].convert("RGB"), dtype=np.float32)
    second = np.asarray(images[int(against)].convert("RGB"), dtype=np.float32)
    change = np.clip(np.abs(first - second) * gain, 0, 255).round().astype(np.uint8)
    return _out(Image.fromarray(change, "RGB"), as_array)


def self_attention(result: Any, branch: int = 0, count: int = 6, cmap: str | Colormap = "viridis") -> Tiles:
    """The top principal components of the recorded self-attention (the official
    ``show_self_attention_comp``); needs ``run(..., record_self=(step, factor))``."""
    record, image = _record_and_image(result, branch)
    components = record.self_components(branch, count)  # (count, h, w); refuses a run that recorded none
    assert record.self_maps is not None  # for the type checker: self_components checked it
    (step, _), _ = record.self_maps
    pictures = tuple(colorize(c, size=(image.height, image.width), cmap=cmap, normalize="map") for c in components)
    labels = tuple(f"component {i + 1}" for i in range(len(pictures)))
    height, width = components.shape[1:]
    title = f"self-attention at step {step + 1}, {height}x{width} maps: top principal components"
    return Tiles(pictures, labels, title, len(pictures))


def gallery(result: Any, columns: int | None = None) -> Tiles:
    """The source and every target side by side, captioned with their prompts and edit
    kinds (the paper's figures)."""
    images = _images_of(result)
    branches = getattr(result, "branches", None)
    if branches is None:
        raise TypeError(f"expected a run's Result (from p2p_widgets.run or edit), not {type(result).__name__}")
    if columns is not None and (not _is_int(columns) or columns < 1):
        raise ValueError(f"columns is the number of pictures per row (1 or more), or None for one row; not {columns!r}")
    labels = tuple(
        f'{"source" if index == 0 else branch.kind}: "{branch.prompt.text}"' for index, branch in enumerate(branches)
    )
    return Tiles(
        tuple(image.convert("RGB") for image in images), labels, None, columns or len(images), tile=256, wrap=28
    )


# -- layout -------------------------------------------------------------------------
@dataclass(frozen=True)
class Tiles:
    """Labelled pictures to lay out in a grid: what the views above return.

    ``.image()`` composes one PIL image (labels underneath), ``.figure()`` a matplotlib
    figure (labels as subplot titles); in a notebook a ``Tiles`` shows itself as the
    image. ``images`` are the individual pictures, at the run's image size.
    """

    images: tuple[Image.Image, ...]
    labels: tuple[str, ...]
    title: str | None = None
    columns: int | None = None
    tile: int | None = 160  # height of each picture in .image() (None: as it is)
    wrap: int = 18  # characters per line of a subplot title in .figure()

    def image(self, tile: int | None = None, columns: int | None = None) -> Image.Image:
        """One RGB image; ``tile``: each picture's height in pixels (default ``self.tile``)."""
        return tile_images(self.images, self.labels, columns or self.columns, tile or self.tile, self.title)

    def figure(self, columns: int | None = None, fig: Figure | None = None) -> Figure:
        """A matplotlib figure (made without pyplot), or drawn into ``fig``."""
        return _figure(self.images, self.labels, self.title, columns or self.columns, fig, self.wrap)

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.image().save(buffer, format="PNG")
        return buffer.getvalue()


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # scalable, Pillow >= 10.1 with FreeType
    except (TypeError, OSError, AttributeError):
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def tile_images(
    images: Sequence[ImageLike],
    labels: Sequence[str] | None = None,
    columns: int | None = None,
    tile: int | None = None,
    title: str | None = None,
    gap: int = 6,
) -> Image.Image:
    """Lay images out in a grid on white, each with its label underneath (wrapped), and an
    optional title on top. ``tile``: every image is scaled to this height (keeping its
    aspect ratio); None keeps the first image's height. Returns one RGB image."""
    pictures = [_rgb(image) for image in images]
    if not pictures:
        raise ValueError("no images to lay out")
    if labels is not None and len(labels) != len(pictures):
        raise ValueError(f"{len(labels)} labels for {len(pictures)} images; give one label per image")
    columns = len(pictures) if columns is None else columns
    if not _is_int(columns) or columns < 1:
        raise ValueError(f"columns is a positive number, not {columns!r}")
    height = pictures[0].height if tile is None else tile
    if not _is_int(height) or height < 1:
        raise ValueError(f"tile is a height in pixels, not {tile!r}")
    pictures = [
        p
        if p.height == height
        else p.resize((max(1, round(p.width * height / p.height)), height), Image.Resampling.BICUBIC)
        for p in pictures
    ]
    width = max(p.width for p in pictures)
    font = _font(max(10, min(18, height // 10)))
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = int(scratch.textbbox((0, 0), "Ag", font=font)[3]) + 2
    wrapped = [_wrap(scratch, text, font, width) for text in labels] if labels is not None else None
    label_height = max(len(w) for w in wrapped) * line if wrapped else 0
    title_lines = textwrap.wrap(title, width=max(20, columns * width // max(1, line // 2))) if title else []
    top = len(title_lines) * line + (gap if title_lines else 0)
    rows = -(-len(pictures) // columns)
    cell_w, cell_h = width + gap, height + label_height + gap
    canvas = Image.new("RGB", (gap + columns * cell_w, top + gap + rows * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(title_lines):
        draw.text((gap, gap // 2 + i * line), text, fill="black", font=font)
    for index, picture in enumerate(pictures):
        row, column = divmod(index, columns)
        x, y = gap + column * cell_w, top + gap + row * cell_h
        canvas.paste(picture, (x + (width - picture.width) // 2, y))
        for i, text in enumerate(wrapped[index] if wrapped else []):
            text_width = draw.textlength(text, font=font)
            draw.text((x + (width - text_width) / 2, y + height + i * line), text, fill="black", font=font)
    return canvas


def _figure(
    tiles: Sequence[Image.Image],
    labels: Sequence[str],
    title: str | None,
    columns: int | None,
    fig: Figure | None,
    wrap: int = 18,
) -> Figure:
    """Tiles as subplots of a matplotlib figure (no pyplot), each titled by its label."""
    count = len(tiles)
    columns = min(count, columns or min(count, 6))
    if not _is_int(columns) or columns < 1:
        raise ValueError(f"columns is a positive number, not {columns!r}")
    rows = -(-count // columns)
    aspect = tiles[0].width / tiles[0].height
    if fig is None:
        fig = Figure(figsize=(2.2 * columns * aspect, 2.4 * rows + (0.4 if title else 0)), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False)
    for index, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if index < count:
            ax.imshow(np.asarray(tiles[index]))
            ax.set_title("\n".join(textwrap.wrap(labels[index], wrap)) or " ", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
