"""The "shapes" world: a caption grammar, a renderer with exact masks, and pixel measurements.

A scene holds one or two flat-coloured shapes on an achromatic background. Its caption
follows one fixed grammar (every object phrase has the same word order)::

    caption    := object ("and" object)* "on" "a" BACKGROUND "background"
    object     := "a" SIZE COLOR [TEXTURE] SHAPE

    "a big red circle and a small blue striped square on a black background"
    "a small green star on a gray background"

Design rules that make pixel measurement unambiguous:

* every object colour is strongly chromatic and the colours are spread around the hue
  circle (at least 40 degrees apart); every background is achromatic (black, gray,
  white, or a gray checkerboard). So "object or background" is a chroma test, and an
  object's colour is the hue of its pixels, unchanged by anti-aliasing against the
  background and by texture (textures are a darker shade of the same hue);
* textures cover well under half of an object, so the median colour inside a mask is
  the object's own colour;
* shapes are never rotated, so templates tell them apart (also square from diamond).

Geometry: pixel ``(row i, column j)`` covers ``[j, j+1) x [i, i+1)`` in continuous
coordinates, so ``center_x = 32.0`` is the middle of a 64 pixel image. An object's
``scale`` in ``[0, 1]`` maps linearly to its diameter (bounding-box width) between 18
and 36 pixels at 64 pixels (proportionally at other sizes); ``scale < 0.5`` is called
"small", the rest "big". Sampling draws small objects from scale ``[0, 0.15]`` and big
ones from ``[0.7, 1]``.

Rendering draws each object's polygon at 4x supersampling with PIL (inset half a
subpixel, so coverage is unbiased), box-filters it down to a coverage map, shades the
texture analytically at output resolution (diagonal stripes, or dots on a hexagonal grid,
in 0.55 times the object's colour, anchored at the object's centre; below 64 pixels they
shrink less than the shapes, to stay legible), and composites the objects in order (the
second on top). An object's mask is the set of pixels where its *visible* coverage (its
own coverage times what the objects above leave uncovered) is at least one half.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "SHAPES",
    "COLORS",
    "SIZES",
    "TEXTURES",
    "BACKGROUNDS",
    "COLOR_RGB",
    "BACKGROUND_RGB",
    "ObjectWords",
    "SceneWords",
    "ObjectSpec",
    "Scene",
    "RenderedScene",
    "vocabulary",
    "caption",
    "parse_caption",
    "diameter",
    "render",
    "place",
    "sample_words",
    "sample_scene",
    "dataset",
    "iter_dataset",
    "batch",
    "centroid",
    "classify_color",
    "classify_shape",
    "classify_size",
    "classify_texture",
    "estimate_scale",
    "object_masks_from_pixels",
]

# --------------------------------------------------------------------------- vocabulary

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "diamond")
COLORS: tuple[str, ...] = ("red", "yellow", "green", "cyan", "blue", "purple", "pink")
SIZES: tuple[str, ...] = ("small", "big")
TEXTURES: tuple[str, ...] = ("plain", "striped", "dotted")  # "plain" is never written
BACKGROUNDS: tuple[str, ...] = ("black", "gray", "white", "checkered")

#: Object colours: chroma (max - min channel) >= 170, hues 0, 52, 127, 186, 228, 274, 320.
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "yellow": (240, 210, 30),
    "green": (30, 200, 50),
    "cyan": (30, 200, 220),
    "blue": (40, 80, 235),
    "purple": (150, 50, 225),
    "pink": (240, 60, 180),
}
#: Solid backgrounds; "checkered" alternates its two grays in squares of size/8 pixels.
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "white": (255, 255, 255),
}
_CHECKER_RGB = ((64, 64, 64), (160, 160, 160))

_GRAMMAR_WORDS = ("a", "and", "on", "background")
_TEXTURE_WORDS = tuple(t for t in TEXTURES if t != "plain")

# Geometry at 64 pixels; everything scales with size / 64.
_DIAMETER_SMALL = 18.0  # scale 0 (smaller stars and triangles are hard to tell apart at 64 px)
_DIAMETER_BIG = 36.0  # scale 1
_SCALE_RANGES = {"small": (0.0, 0.15), "big": (0.7, 1.0)}
_DEFAULT_SCALE = {"small": 0.075, "big": 0.85}
_SHADE = 0.55  # texture colour = _SHADE * object colour (same hue, darker)
_STRIPE_PERIOD, _STRIPE_WIDTH = 5.5, 2.0  # pixels at 64: dark fraction ~0.36
_DOT_PERIOD, _DOT_RADIUS = 6.0, 1.5  # hexagonal grid: dark fraction ~0.23
_MIN_TEXTURE_SCALE = 0.8  # below 64 pixels textures shrink less than shapes, to stay legible
_SUPERSAMPLE = 4


def vocabulary() -> tuple[str, ...]:
    """Every word a caption can contain (grammar words, sizes, colours, textures, shapes, backgrounds)."""
    return _GRAMMAR_WORDS + SIZES + COLORS + _TEXTURE_WORDS + SHAPES + BACKGROUNDS


# --------------------------------------------------------------------------- descriptions


def _check(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")


@dataclass(frozen=True)
class ObjectWords:
    """What a caption says about one object: its size, colour, texture and shape words."""

    shape: str
    color: str
    size: str
    texture: str = "plain"

    def __post_init__(self) -> None:
        _check(self.shape, SHAPES, "shape")
        _check(self.color, COLORS, "color")
        _check(self.size, SIZES, "size")
        _check(self.texture, TEXTURES, "texture")

    @property
    def phrase(self) -> str:
        """``"a {size} {color} [{texture}] {shape}"``, e.g. ``"a big red striped circle"``."""
        words = ["a", self.size, self.color]
        if self.texture != "plain":
            words.append(self.texture)
        words.append(self.shape)
        return " ".join(words)


@dataclass(frozen=True)
class SceneWords:
    """What a caption says about a scene: its objects (in drawing order) and background."""

    objects: tuple[ObjectWords, ...]
    background: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))
        if not self.objects:
            raise ValueError("a scene needs at least one object")
        _check(self.background, BACKGROUNDS, "background")


def diameter(scale: float, size: int = 64) -> float:
    """An object's diameter (bounding-box width) in pixels for a scale in [0, 1]."""
    return (_DIAMETER_SMALL + scale * (_DIAMETER_BIG - _DIAMETER_SMALL)) * size / 64.0


def _size_word(scale: float) -> str:
    return "small" if scale < 0.5 else "big"


@dataclass(frozen=True)
class ObjectSpec:
    """One object: its words, its centre in pixels and its continuous scale in [0, 1].

    ``scale`` defaults to the middle of the sampling range of ``size``; when given it must
    agree with ``size`` (``"small"`` below 0.5, ``"big"`` from 0.5).
    """

    shape: str
    color: str
    size: str
    texture: str
    center_x: float
    center_y: float
    scale: float | None = None

    def __post_init__(self) -> None:
        ObjectWords(self.shape, self.color, self.size, self.texture)  # validates the words
        scale = float(_DEFAULT_SCALE[self.size] if self.scale is None else self.scale)
        if not 0.0 <= scale <= 1.0:
            raise ValueError(f"scale must lie in [0, 1], got {scale}")
        if _size_word(scale) != self.size:
            raise ValueError(f"scale {scale} is {_size_word(scale)!r}, but size is {self.size!r}")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "center_x", float(self.center_x))
        object.__setattr__(self, "center_y", float(self.center_y))

    @property
    def words(self) -> ObjectWords:
        return ObjectWords(self.shape, self.color, self.size, self.texture)


@dataclass(frozen=True)
class Scene:
    """One or two objects (drawn in order, the second on top) on a background, ``size`` pixels square."""

    objects: tuple[ObjectSpec, ...]
    background: str
    size: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))
        if not 1 <= len(self.objects) <= 2:
            raise ValueError(f"a scene has 1 or 2 objects, got {len(self.objects)}")
        _check(self.background, BACKGROUNDS, "background")
        if self.size < 16:
            raise ValueError(f"image size must be at least 16, got {self.size}")

    @property
    def words(self) -> SceneWords:
        return SceneWords(tuple(o.words for o in self.objects), self.background)

    @property
    def caption(self) -> str:
        return caption(self)

    def with_words(self, words: SceneWords) -> Scene:
        """The same layout described by other words (an edit's ground truth).

        Positions are kept; an object whose size word changes gets that word's default scale.
        """
        if len(words.objects) != len(self.objects):
            raise ValueError(f"{len(words.objects)} object descriptions for {len(self.objects)} objects")
        objects = []
        for o, w in zip(self.objects, words.objects):
            scale = o.scale if w.size == o.size else _DEFAULT_SCALE[w.size]
            objects.append(replace(o, shape=w.shape, color=w.color, size=w.size, texture=w.texture, scale=scale))
        return Scene(tuple(objects), words.background, self.size)


@dataclass(frozen=True, eq=False)
class RenderedScene:
    """A rendered scene: ``image`` (H, W, 3) uint8, ``masks`` (n_objects, H, W) bool, its caption."""

    scene: Scene
    image: np.ndarray
    masks: np.ndarray
    caption: str


# --------------------------------------------------------------------------- captions


def caption(scene: Scene | SceneWords) -> str:
    """The caption of a scene (or of its words), e.g. ``"a small green star on a gray background"``."""
    words = scene.words if isinstance(scene, Scene) else scene
    return " and ".join(o.phrase for o in words.objects) + f" on a {words.background} background"


def parse_caption(text: str) -> SceneWords:
    """Read a caption back into words; the inverse of :func:`caption`.

    Case, surrounding whitespace and a final full stop are ignored. Raises ``ValueError``
    naming the offending word (and listing the vocabulary for unknown words).
    """
    tokens = text.lower().strip().rstrip(".").split()
    vocab = vocabulary()
    for tok in tokens:
        if tok not in vocab:
            raise ValueError(f"unknown word {tok!r} in caption {text!r}; the vocabulary is: {', '.join(vocab)}")
    pos = 0

    def take(allowed: tuple[str, ...], what: str, optional: bool = False) -> str | None:
        nonlocal pos
        if pos < len(tokens) and tokens[pos] in allowed:
            pos += 1
            return tokens[pos - 1]
        if optional:
            return None
        found = repr(tokens[pos]) if pos < len(tokens) else "the end of the caption"
        raise ValueError(
            f"expected {what} ({' | '.join(allowed)}) at word {pos + 1} of {text!r}, found {found}; "
            "captions read 'a SIZE COLOR [TEXTURE] SHAPE [and a ...] on a BACKGROUND background'"
        )

    objects = []
    while True:
        take(("a",), "'a'")
        size = take(SIZES, "a size")
        color = take(COLORS, "a color")
        texture = take(_TEXTURE_WORDS, "a texture", optional=True) or "plain"
        shape = take(SHAPES, "a shape")
        objects.append(ObjectWords(shape, color, size, texture))  # type: ignore[arg-type]
        if take(("and",), "'and'", optional=True) is None:
            break
    take(("on",), "'on'")
    take(("a",), "'a'")
    background = take(BACKGROUNDS, "a background")
    take(("background",), "'background'")
    if pos != len(tokens):
        raise ValueError(f"unexpected {tokens[pos]!r} after the end of caption {text!r}")
    return SceneWords(tuple(objects), background)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- geometry


def _unit_polygon(shape: str) -> np.ndarray:
    """The shape's outline as (N, 2) x, y points, centred, fitting the box [-1, 1]^2 (y down)."""
    if shape == "circle":
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif shape == "square":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float) * 0.84
    elif shape == "diamond":
        pts = np.array([[0, -1], [0.78, 0], [0, 1], [-0.78, 0]], float)
    elif shape == "triangle":
        h = math.sqrt(3) / 2
        pts = np.array([[0, -h], [1, h], [-1, h]], float)
    elif shape == "star":
        k = np.arange(10)
        r = np.where(k % 2 == 0, 1.0, 0.48)
        a = -np.pi / 2 + k * np.pi / 5
        pts = np.stack([r * np.cos(a), r * np.sin(a)], 1)
    elif shape == "heart":
        t = np.linspace(0, 2 * np.pi, 72, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts = np.stack([x, y], 1)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    lo, hi = pts.min(0), pts.max(0)
    pts = pts - (lo + hi) / 2
    return pts / max(1.0, np.abs(pts).max())


def _polygon_area_centroid(pts: np.ndarray) -> tuple[float, np.ndarray]:
    x, y = pts[:, 0], pts[:, 1]
    xn, yn = np.roll(x, -1), np.roll(y, -1)
    cross = x * yn - xn * y
    area = cross.sum() / 2
    c = np.array([((x + xn) * cross).sum(), ((y + yn) * cross).sum()]) / (6 * area)
    return abs(area), c


_POLYGONS = {s: _unit_polygon(s) for s in SHAPES}
_AREA_CENTROID = {s: _polygon_area_centroid(p) for s, p in _POLYGONS.items()}
#: half extents (x, y) of each unit polygon, for placement
_HALF_EXTENT = {s: np.abs(p).max(0) for s, p in _POLYGONS.items()}


def _rasterize(pts: np.ndarray, height: int, width: int) -> tuple[int, int, np.ndarray] | None:
    """Coverage of a polygon (pixel coordinates) as ``(y0, x0, cov)`` over its bounding box, or None."""
    x0 = max(math.floor(pts[:, 0].min()), 0)
    x1 = min(math.ceil(pts[:, 0].max()), width)
    y0 = max(math.floor(pts[:, 1].min()), 0)
    y1 = min(math.ceil(pts[:, 1].max()), height)
    if x1 <= x0 or y1 <= y0:
        return None
    ss = _SUPERSAMPLE
    # PIL fills every pixel the polygon touches; inset by half a pixel so that a supersampled
    # pixel is filled when its centre is inside the polygon
    local = _inset((pts - (x0, y0)) * ss, 0.5)
    canvas = Image.new("L", ((x1 - x0) * ss, (y1 - y0) * ss))
    ImageDraw.Draw(canvas).polygon(local.ravel().tolist(), fill=255)
    cov = np.asarray(canvas.reduce(ss), dtype=np.float32) * (1 / 255)
    return y0, x0, cov


def _inset(pts: np.ndarray, d: float) -> np.ndarray:
    """Move a polygon's edges inwards by ``d`` (mitred corners)."""
    edges = np.roll(pts, -1, axis=0) - pts
    normals = np.stack([edges[:, 1], -edges[:, 0]], 1) / np.hypot(edges[:, 0], edges[:, 1])[:, None]
    x, y = pts[:, 0], pts[:, 1]
    if (x * np.roll(y, -1) - np.roll(x, -1) * y).sum() < 0:  # make the normals point outwards
        normals = -normals
    prev = np.roll(normals, 1, axis=0)
    miter = (prev + normals) / (1.0 + (prev * normals).sum(1))[:, None]
    return pts - d * miter


def _object_polygon(obj: ObjectSpec, size: int) -> np.ndarray:
    assert obj.scale is not None  # for the type checker: ObjectSpec.__post_init__ fills it in
    return _POLYGONS[obj.shape] * (diameter(obj.scale, size) / 2) + (obj.center_x, obj.center_y)


def _texture_weight(texture: str, xs: np.ndarray, ys: np.ndarray, k: float) -> np.ndarray:
    """Fraction of each pixel covered by the darker texture shade; ``xs``, ``ys`` relative to the centre."""
    if texture == "striped":
        period, half = _STRIPE_PERIOD * k, _STRIPE_WIDTH * k / 2
        u = (xs + ys) * (1 / math.sqrt(2))  # diagonal stripes
        d = np.abs(np.mod(u / period + 0.5, 1.0) - 0.5) * period
        return np.clip(half - d + 0.5, 0.0, 1.0)
    # dotted: hexagonal grid, distance to the nearest dot centre (two candidate rows)
    period, radius = _DOT_PERIOD * k, _DOT_RADIUS * k
    row_h = period * math.sqrt(3) / 2
    base = np.floor(ys / row_h)
    distances = []
    for dr in (0.0, 1.0):
        row = base + dr
        dy = ys - row * row_h
        shift = np.mod(row, 2) * (period / 2)
        dx = np.mod(xs - shift + period / 2, period) - period / 2
        distances.append(np.hypot(dx, dy))
    return np.clip(radius - np.minimum(*distances) + 0.5, 0.0, 1.0)


@lru_cache(maxsize=16)
def _background_image(background: str, size: int) -> np.ndarray:
    if background == "checkered":
        cell = max(size // 8, 1)
        idx = (np.arange(size) // cell) % 2
        parity = (idx[:, None] + idx[None, :]) % 2
        img = np.array(_CHECKER_RGB, np.float32)[parity]
    else:
        img = np.empty((size, size, 3), np.float32)
        img[:] = BACKGROUND_RGB[background]
    img.flags.writeable = False
    return img


def _render_arrays(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    size = scene.size
    k = size / 64.0
    img = _background_image(scene.background, size).copy()
    alphas = np.zeros((len(scene.objects), size, size), np.float32)
    for i, obj in enumerate(scene.objects):
        r = _rasterize(_object_polygon(obj, size), size, size)
        if r is None:
            continue
        y0, x0, cov = r
        h, w = cov.shape
        alphas[i, y0 : y0 + h, x0 : x0 + w] = cov
        rgb = np.asarray(COLOR_RGB[obj.color], np.float32)
        color: np.ndarray
        if obj.texture == "plain":
            color = rgb
        else:
            xs = np.arange(x0, x0 + w, dtype=np.float32)[None, :] + (0.5 - obj.center_x)
            ys = np.arange(y0, y0 + h, dtype=np.float32)[:, None] + (0.5 - obj.center_y)
            t = _texture_weight(obj.texture, xs, ys, max(k, _MIN_TEXTURE_SCALE))[..., None]
            color = rgb * (1.0 - (1.0 - _SHADE) * t)
        region = img[y0 : y0 + h, x0 : x0 + w]
        region += (color - region) * cov[..., None]
    # visible coverage: own coverage times what every later object leaves uncovered
    visible = alphas.copy()
    for i in range(len(alphas) - 1):
        visible[i] *= np.prod(1.0 - alphas[i + 1 :], axis=0)
    masks = visible >= 0.5
    for i in range(len(masks) - 1):  # ties at exactly one half go to the upper object
        masks[i] &= ~masks[i + 1 :].any(0)
    return np.rint(img).astype(np.uint8), masks


def render(scene: Scene) -> RenderedScene:
    """Draw a scene: the image, every object's visible mask, and the caption."""
    image, masks = _render_arrays(scene)
    return RenderedScene(scene, image, masks, caption(scene))


# --------------------------------------------------------------------------- sampling


def _uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(lo + (hi - lo) * rng.random())


def sample_words(
    rng: np.random.Generator,
    *,
    two_objects_p: float = 0.5,
    texture_p: float = 0.3,
    shapes: Sequence[str] = SHAPES,
    colors: Sequence[str] = COLORS,
    backgrounds: Sequence[str] = BACKGROUNDS,
    distinct_colors: bool = True,
) -> SceneWords:
    """Random scene words: 1 or 2 objects (of different colours unless ``distinct_colors=False``)."""
    n = 2 if rng.random() < two_objects_p else 1
    if distinct_colors and n > len(colors):
        raise ValueError("not enough colours for distinct object colours")
    picked = (
        [colors[i] for i in rng.choice(len(colors), n, replace=False)]
        if distinct_colors
        else [colors[i] for i in rng.integers(len(colors), size=n)]
    )
    objects = []
    for color in picked:
        shape = shapes[int(rng.integers(len(shapes)))]
        size = SIZES[int(rng.integers(len(SIZES)))]
        texture = _TEXTURE_WORDS[int(rng.integers(len(_TEXTURE_WORDS)))] if rng.random() < texture_p else "plain"
        objects.append(ObjectWords(shape, color, size, texture))
    return SceneWords(tuple(objects), backgrounds[int(rng.integers(len(backgrounds)))])


def place(
    words: SceneWords,
    rng: np.random.Generator,
    size: int = 64,
    *,
    max_overlap: float = 0.15,
    scales: Sequence[float] | None = None,
    tries: int = 200,
) -> Scene:
    """Lay out described objects at random: inside the image, 1 pixel (at 64) from the edge.

    Two objects' centres are at least ``(1 - max_overlap) * (r1 + r2)`` apart, where ``r`` is
    half an object's diameter. Scales are drawn from each size word's range unless given;
    when no layout fits, new scales are drawn.
    """
    n = len(words.objects)
    if not 1 <= n <= 2:
        raise ValueError(f"a scene has 1 or 2 objects, got {n}")
    margin = size / 64.0
    for _ in range(tries):
        if scales is not None:
            sc = [float(s) for s in scales]
        else:
            sc = [_uniform(rng, *_SCALE_RANGES[w.size]) for w in words.objects]
        centers = []  # (lowest, highest) centre of each object, as (x, y) pairs
        radii = []
        for w, s in zip(words.objects, sc):
            half = _HALF_EXTENT[w.shape] * diameter(s, size) / 2
            radii.append(diameter(s, size) / 2)
            lo, hi = half + margin, size - half - margin
            if np.any(hi < lo):
                raise ValueError("object does not fit in the image")
            centers.append((lo, hi))
        for _ in range(50):
            pos = [(_uniform(rng, lo[0], hi[0]), _uniform(rng, lo[1], hi[1])) for lo, hi in centers]
            if n == 1 or math.dist(pos[0], pos[1]) >= (1 - max_overlap) * (radii[0] + radii[1]):
                break
        else:
            continue
        objs = tuple(
            ObjectSpec(w.shape, w.color, w.size, w.texture, x, y, s) for w, s, (x, y) in zip(words.objects, sc, pos)
        )
        return Scene(objs, words.background, size)
    raise ValueError("could not place the objects without overlap")


def sample_scene(
    rng: np.random.Generator,
    size: int = 64,
    two_objects_p: float = 0.5,
    texture_p: float = 0.3,
    **kwargs: Any,
) -> Scene:
    """A random scene; deterministic for a given generator state.

    Extra keywords go to :func:`sample_words` (``shapes``, ``colors``, ``backgrounds``,
    ``distinct_colors``) and :func:`place` (``max_overlap``).
    """
    place_kw = {k: kwargs.pop(k) for k in ("max_overlap",) if k in kwargs}
    words = sample_words(rng, two_objects_p=two_objects_p, texture_p=texture_p, **kwargs)
    return place(words, rng, size, **place_kw)


def iter_dataset(n: int, seed: int, size: int = 64, **kwargs: Any) -> Iterator[RenderedScene]:
    """``n`` rendered random scenes from one seed (keywords as for :func:`sample_scene`)."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield render(sample_scene(rng, size, **kwargs))


def dataset(n: int, seed: int, size: int = 64, **kwargs: Any) -> list[RenderedScene]:
    """A list of ``n`` rendered random scenes; same as ``list(iter_dataset(...))``."""
    return list(iter_dataset(n, seed, size, **kwargs))


def batch(n: int, seed: int, size: int = 64, **kwargs: Any) -> tuple[np.ndarray, list[str]]:
    """Training data: images (n, size, size, 3) uint8 and their captions (same scenes as :func:`dataset`)."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3), np.uint8)
    captions = []
    for i in range(n):
        scene = sample_scene(rng, size, **kwargs)
        images[i], _ = _render_arrays(scene)
        captions.append(caption(scene))
    return images, captions


# --------------------------------------------------------------------------- measurement


def _hue_chroma(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hue in degrees [0, 360) and chroma (max - min) of float RGB values (..., 3)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx = np.maximum(np.maximum(r, g), b)
    mn = np.minimum(np.minimum(r, g), b)
    c = mx - mn
    safe = np.where(c > 0, c, 1.0)
    h = np.where(
        mx == r,
        np.mod((g - b) / safe, 6.0),
        np.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0),
    )
    return np.mod(h * 60.0, 360.0), c


_PALETTE_HUES = _hue_chroma(np.array([COLOR_RGB[c] for c in COLORS], np.float64))[0]


def _nearest_color_index(hue: np.ndarray) -> np.ndarray:
    d = np.abs(hue[..., None] - _PALETTE_HUES)
    return np.argmin(np.minimum(d, 360.0 - d), axis=-1)


def _as_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask, bool)
    if mask.ndim != 2:
        raise ValueError(f"a mask is 2-d (H, W), got shape {mask.shape}")
    if not mask.any():
        raise ValueError("the mask is empty")
    return mask


def centroid(mask: np.ndarray) -> tuple[float, float]:
    """The centre of mass ``(y, x)`` of a mask, in continuous pixel coordinates (pixel centres at +0.5)."""
    ys, xs = np.nonzero(_as_mask(mask))
    return float(ys.mean() + 0.5), float(xs.mean() + 0.5)


def classify_color(image: np.ndarray, mask: np.ndarray) -> str:
    """The palette colour whose hue is nearest the hue of the median colour inside ``mask``."""
    pixels = np.asarray(image)[_as_mask(mask)][:, :3].astype(np.float64)
    median = np.median(pixels, axis=0)
    return COLORS[int(_nearest_color_index(_hue_chroma(median)[0]))]


def _template(shape: str, area: float, cy: float, cx: float, height: int, width: int) -> np.ndarray:
    """A shape's mask with the given area and centroid."""
    a, c = _AREA_CENTROID[shape]
    pts = (_POLYGONS[shape] - c) * math.sqrt(area / a) + (cx, cy)
    out = np.zeros((height, width), bool)
    r = _rasterize(pts, height, width)
    if r is not None:
        y0, x0, cov = r
        out[y0 : y0 + cov.shape[0], x0 : x0 + cov.shape[1]] = cov >= 0.5
    return out


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def _shape_scores(mask: np.ndarray, hidden: np.ndarray | None = None) -> dict[str, float]:
    mask = _as_mask(mask)
    area = float(mask.sum())
    cy, cx = centroid(mask)
    h, w = mask.shape
    variants = [(1.0, 0.0, 0.0)]
    seen = np.ones_like(mask)
    if hidden is not None:
        hidden = np.asarray(hidden, bool) & ~mask
        if (hidden & _dilate(mask)).any():
            # occluded: the whole shape is larger than what shows, its centroid pulled away
            seen = ~hidden
            variants = [
                (f, dy, dx) for f in (1.0, 1.15, 1.3, 1.5) for dy in (-1.0, 0.0, 1.0) for dx in (-1.0, 0.0, 1.0)
            ]
    scores = {}
    for shape in SHAPES:
        best = 0.0
        for f, dy, dx in variants:
            t = _template(shape, area * f, cy + dy, cx + dx, h, w) & seen
            best = max(best, np.count_nonzero(t & mask) / np.count_nonzero(t | mask))
        scores[shape] = best
    return scores


def classify_shape(mask: np.ndarray, hidden: np.ndarray | None = None) -> str:
    """The shape whose template (same area and centroid) best overlaps ``mask`` (IoU).

    ``hidden`` optionally marks pixels where the object may be hidden (the masks of the
    objects drawn over it): when it touches the mask, templates are also tried larger and
    shifted, and hidden pixels are left out of the comparison.
    """
    scores = _shape_scores(mask, hidden)
    return max(scores, key=scores.__getitem__)


def estimate_scale(mask: np.ndarray, shape: str, size: int | None = None) -> float:
    """An object's continuous scale from its mask area (unclipped; ~0 small .. ~1 big).

    ``size`` is the image size, by default the mask's width. Occlusion lowers the estimate.
    """
    mask = _as_mask(mask)
    _check(shape, SHAPES, "shape")
    size = mask.shape[1] if size is None else size
    a, _ = _AREA_CENTROID[shape]
    d = 2.0 * math.sqrt(mask.sum() / a) * 64.0 / size
    return (d - _DIAMETER_SMALL) / (_DIAMETER_BIG - _DIAMETER_SMALL)


def classify_size(mask: np.ndarray, shape: str | None = None, size: int | None = None) -> str:
    """``"small"`` or ``"big"`` from the mask area (shape classified from the mask unless given)."""
    shape = classify_shape(mask) if shape is None else shape
    return _size_word(estimate_scale(mask, shape, size))


def _erode(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] &= mask[:-1]
    out[:-1] &= mask[1:]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    out[0] = out[-1] = False
    out[:, 0] = out[:, -1] = False
    return out


def classify_texture(image: np.ndarray, mask: np.ndarray) -> str:
    """``"plain"``, ``"striped"`` or ``"dotted"`` from the darker pixels inside ``mask``.

    A pixel is dark when its projection on the median colour is below 0.78 of it. Few dark
    pixels: plain. Otherwise stripes (diagonal lines) are told from dots by whether dark
    pixels stay dark two pixels (at 64, scaled with the image width) along the stripe direction.
    """
    mask = _as_mask(mask)
    inner = _erode(mask)
    if inner.sum() < 12:
        inner = mask
    img = np.asarray(image)[..., :3].astype(np.float32)
    median = np.median(img[inner], axis=0)
    proj = (img @ median) / max(float(median @ median), 1.0)
    dark = (proj < 0.78) & inner
    frac = dark.sum() / inner.sum()
    if frac < 0.08:
        return "plain"
    # stripes run along (x + 1, y - 1); compare dark[y, x] with dark[y - s, x + s], s ~ 2 at 64
    s = max(1, round(2 * max(mask.shape[1] / 64.0, _MIN_TEXTURE_SCALE)))
    a = dark[s:, :-s]
    b = dark[:-s, s:]
    both = inner[s:, :-s] & inner[:-s, s:]
    n = (a & both).sum()
    if n == 0:
        return "plain"
    keep = (a & b & both).sum() / n
    return "striped" if keep > 0.5 else "dotted"


def _label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a bool mask: labels (0 = outside) and their count."""
    h, w = mask.shape
    big = h * w
    flat_idx = np.arange(big, dtype=np.int64).reshape(h, w)
    lab = np.where(mask, flat_idx, big)
    while True:
        new = lab.copy()
        np.minimum(new[1:], lab[:-1], out=new[1:])
        np.minimum(new[:-1], lab[1:], out=new[:-1])
        np.minimum(new[:, 1:], lab[:, :-1], out=new[:, 1:])
        np.minimum(new[:, :-1], lab[:, 1:], out=new[:, :-1])
        new = np.where(mask, new, big)
        # pointer jumping: follow each label to its own label
        flat = np.append(new.ravel(), big)
        new = np.where(mask, flat[new], big)
        if np.array_equal(new, lab):
            break
        lab = new
    roots, labels = np.unique(lab, return_inverse=True)
    labels = labels.reshape(h, w) + 1
    labels[~mask] = 0  # outside pixels share the root ``big``, the last label
    return labels, len(roots) - int(not mask.all())


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    labels, _ = _label(~mask)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    outside = np.isin(labels, border[border > 0])
    return ~outside


def object_masks_from_pixels(
    image: np.ndarray,
    background: str | None = None,
    *,
    min_area: float | None = None,
    chroma_threshold: float = 40.0,
) -> list[np.ndarray]:
    """Find the objects in an image: one bool mask per object, largest first.

    Every background is achromatic and every object colour chromatic, so a pixel belongs
    to an object when its chroma (max - min channel) is at least ``chroma_threshold``.
    Object pixels are split by nearest palette hue, so touching objects of different
    colours separate; objects of the same colour that touch merge. Each component is then
    trimmed to pixels with at least 0.42 of its median chroma (about half coverage; the
    darker texture keeps 0.55), its enclosed holes are filled, and components smaller than
    ``min_area`` (default 20 pixels at 64, scaled by area) are dropped. ``background`` is
    only validated: the chroma rule works the same for every background.
    """
    if background is not None:
        _check(background, BACKGROUNDS, "background")
    img = np.asarray(image)[..., :3].astype(np.float32)
    h, w = img.shape[:2]
    if min_area is None:
        min_area = 20.0 * (h * w) / (64 * 64)
    hue, chroma = _hue_chroma(img)
    fg = chroma >= chroma_threshold
    cls = np.where(fg, _nearest_color_index(hue), -1)
    found = []
    for k in np.unique(cls[fg]):
        # seeds: the class's pixels after an erosion (drops one-pixel slivers between colours)
        sel = cls == k
        seeds = _erode(sel)
        labels, n = _label(sel)
        for lab in range(1, n + 1):
            comp = labels == lab
            if comp.sum() < min_area or not (seeds & comp).any():
                continue
            med = float(np.median(chroma[comp]))
            refined = comp & (chroma >= 0.42 * med)
            if refined.sum() < min_area:
                continue
            rl, rn = _label(refined)
            if rn > 1:  # keep the largest piece
                sizes = np.bincount(rl.ravel())[1:]
                refined = rl == 1 + int(np.argmax(sizes))
            found.append(_fill_holes(refined))
    found.sort(key=lambda m: -int(m.sum()))
    return found
