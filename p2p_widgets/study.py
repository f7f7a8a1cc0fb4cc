"""The CL P2P report's tools: hyperparameter presets, cycle consistency, image metrics.

The report (``seeds/001``) studies Prompt-to-Prompt's hyperparameters and finds edits
cycle-inconsistent: A -> B -> A does not return to A. Here:

* :data:`PRESETS`: its two settings by name, ``"literature"`` (k = 0.3, cross 0.8,
  self 0.2: the official code's) and ``"optimised"`` (k = 0, cross 0.2, self 0.8: the
  report's, tuned on faces and hair). ``k = 0`` keeps every pixel that has any attention,
  that is no local blending, so that preset's targets have no blend.
  ``preset("optimised").target("a dog riding a bicycle", blend=("dog",))``.
* :func:`cycle`: A -> B -> A as one chain in one batch, the way back with the same
  windows (``cycle(pipe, "a cat", Target("a dog", values=0.5))``), and
  :func:`cycle_score`: PSNR and SSIM between A and the returned A', over the whole image
  and outside the edited words' attention mask.
* :func:`psnr`, :func:`ssim`: plain image metrics on uint8 RGB arrays, optionally inside
  a mask.

In one batch a cycle is exact by construction whenever the way back injects no longer
than the way there: A' starts from A's noise with A's prompt, and what it takes from B
(B's maps inside the windows) is A's own maps carried over, so A' follows A pixel for pixel
(tested). It drifts only when the way back injects B's maps where B drew its own (a longer
window back than there). The report's inconsistency comes from editing back in a second
run, whose source is B generated afresh from its prompt rather than the edited B.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .control import plan_branches, same_tokens
from .edits import LocalBlend, Recipe, Target
from .engine import Progress, Result, edit
from .memory import NotEnoughMemory

__all__ = [
    "Preset",
    "PRESETS",
    "preset",
    "psnr",
    "ssim",
    "edge_correlation",
    "CycleScore",
    "cycle",
    "cycle_score",
    "edited_mask",
    "Sweep",
    "SweepPoint",
    "sweep",
]


@dataclass(frozen=True)
class Preset:
    """A named choice of the three hyperparameters the CL P2P report studies."""

    name: str
    k: float  # local-blend threshold; 0: no blending
    cross: float  # cross-attention injection, fraction of the steps
    self_attn: float  # self-attention injection, fraction of the steps
    note: str = ""

    def target(self, prompt: str, blend: tuple[str, ...] | list[str] | str | None = None, **fields: Any) -> Target:
        """A :class:`Target` with this preset's windows; ``blend``: the words to blend
        locally on, at the preset's threshold (ignored when ``k`` is 0: no blending).
        ``fields``: any other Target field (parent, reweight, values, ...)."""
        clash = sorted({"cross", "self_attn"} & set(fields))
        if clash:
            raise ValueError(f"the {self.name} preset sets {', '.join(clash)}; build a Target directly to choose them")
        local = None
        if blend and self.k > 0:
            local = LocalBlend((blend,) if isinstance(blend, str) else tuple(blend), threshold=self.k)
        return Target(prompt, cross=self.cross, self_attn=self.self_attn, blend=local, **fields)


PRESETS: dict[str, Preset] = {
    "literature": Preset(
        "literature",
        0.3,
        0.8,
        0.2,
        "the official code's values (k 0.3, cross 0.8, self 0.2); its cross window ends at "
        "int(0.8 * (steps + 1)), here at floor(0.8 * steps): the same at multiples of 5 steps "
        "(its 50), one step shorter at every other count",
    ),
    "optimised": Preset(
        "optimised", 0.0, 0.2, 0.8, "the CL P2P report's values for faces and hair (k 0, cross 0.2, self 0.8)"
    ),
}


def preset(name: str) -> Preset:
    """A preset by name ("literature" or "optimised")."""
    if name not in PRESETS:
        raise ValueError(f"no preset named {name!r}; the presets are: {', '.join(PRESETS)}")
    return PRESETS[name]


# -- metrics ----------------------------------------------------------------------------
def _pixels(image: Any) -> np.ndarray:
    array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an RGB image (height, width, 3), not an array of shape {array.shape}")
    return array.astype(np.float64)


def _where(mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if mask is None:
        return np.ones(shape[:2], dtype=bool)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != shape[:2]:
        raise ValueError(f"the mask is {mask.shape} but the images are {shape[:2]}; give one (height, width) mask")
    if not mask.any():
        raise ValueError("the mask selects no pixel")
    return mask


def psnr(a: Any, b: Any, mask: np.ndarray | None = None) -> float:
    """Peak signal-to-noise ratio in dB of two RGB images (0..255), inside ``mask`` if
    given; ``inf`` for identical pixels."""
    x, y = _pixels(a), _pixels(b)
    if x.shape != y.shape:
        raise ValueError(f"the images differ in size: {x.shape[:2]} and {y.shape[:2]}")
    error = ((x - y) ** 2)[_where(mask, x.shape)].mean()
    return math.inf if error == 0 else 10 * math.log10(255.0**2 / error)


def _gaussian(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    axis = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    kernel = torch.exp(-(axis**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def ssim(a: Any, b: Any, mask: np.ndarray | None = None) -> float:
    """Structural similarity (Wang et al., 2004: 11x11 Gaussian window, sigma 1.5,
    K1 0.01, K2 0.03) of two RGB images, the mean over channels and over the pixels of
    ``mask`` (all by default); borders are reflected. 1 for identical images."""
    x, y = _pixels(a), _pixels(b)
    if x.shape != y.shape:
        raise ValueError(f"the images differ in size: {x.shape[:2]} and {y.shape[:2]}")
    where = _where(mask, x.shape)
    kernel = _gaussian()
    pad = len(kernel) // 2

    def blur(values: torch.Tensor) -> torch.Tensor:  # (3, h, w), separable
        values = F.pad(values[None], (pad, pad, pad, pad), mode="reflect")
        values = F.conv2d(values, kernel.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
        return F.conv2d(values, kernel.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)[0]

    x_t, y_t = (torch.from_numpy(v).permute(2, 0, 1).contiguous() for v in (x, y))
    mx, my = blur(x_t), blur(y_t)
    vx, vy, cov = blur(x_t * x_t) - mx**2, blur(y_t * y_t) - my**2, blur(x_t * y_t) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    index = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(index.mean(0).numpy()[where].mean())


# -- cycle consistency ----------------------------------------------------------------
@dataclass(frozen=True)
class CycleScore:
    """How far A -> B -> A lands from A: over the whole image and outside the edited
    words' attention mask (``mask``: True where the edit may change the image)."""

    psnr: float
    ssim: float
    psnr_outside: float
    ssim_outside: float
    mask: np.ndarray

    def to_dict(self) -> dict[str, float]:
        return {
            "psnr": self.psnr,
            "ssim": self.ssim,
            "psnr_outside": self.psnr_outside,
            "ssim_outside": self.ssim_outside,
        }


def edited_mask(result: Result, branch: int, threshold: float = 0.3, dilation: int = 1) -> np.ndarray:
    """Where ``branch``'s edit of its parent happens, at the image size: the union of its
    changed tokens' maps (in the branch) and of the parent's tokens they replace (in the
    parent), all steps and resolutions, each divided by its peak, above ``threshold``,
    dilated by ``dilation`` latent pixels. All False when nothing changed."""
    if result.attention is None:
        raise ValueError("this result has no attention record; run it with record=True")
    child = result.branches[branch]
    if child.alignment is None:
        raise ValueError("branch 0 is the source: it edits nothing; give a target's branch")
    changed = np.flatnonzero(same_tokens(result.branches[child.parent].prompt, child)[: child.prompt.length] == 0)
    replaced = np.flatnonzero(child.alignment.matrix[:, changed].sum(1)[: result.branches[child.parent].prompt.length])
    maps = []
    for which, tokens in ((branch, changed), (child.parent, replaced)):
        if len(tokens):
            heat = result.attention.heatmaps(which).token_maps([int(t) for t in tokens]).mean(0)
            maps.append(heat / max(float(heat.max()), 1e-12) > threshold)
    height, width = result.images[0].height, result.images[0].width
    if not maps:
        return np.zeros((height, width), dtype=bool)
    mask = torch.from_numpy(np.any(maps, axis=0)).float()[None, None]
    mask = F.max_pool2d(mask, 2 * dilation + 1, stride=1, padding=dilation) if dilation else mask
    return F.interpolate(mask, size=(height, width), mode="nearest")[0, 0].numpy() > 0.5


def cycle_score(result: Result, back: int = 2, threshold: float = 0.3) -> CycleScore:
    """Score a run whose branch ``back`` returns through one edit to the prompt that edit
    started from (A -> B -> A, anywhere in a chain): A' against A, whole and outside the
    edit's mask (the forward edit's changed words, see :func:`edited_mask`)."""
    chain = result.branches[back]
    forward = chain.parent
    origin = result.branches[forward].parent
    if forward <= 0 or chain.prompt.text != result.branches[origin].prompt.text:
        raise ValueError(f"branch {back} is not a return to the prompt its parent edited (A -> B -> A)")
    mask = edited_mask(result, forward, threshold)
    outside = ~mask if (~mask).any() else None
    source, returned = result.images[origin], result.images[back]
    return CycleScore(
        psnr=psnr(source, returned),
        ssim=ssim(source, returned),
        psnr_outside=psnr(source, returned, outside),
        ssim_outside=ssim(source, returned, outside),
        mask=mask,
    )


def cycle(pipe: Any, prompt: str, forward: Target | str, **settings: Any) -> tuple[Result, CycleScore]:
    """Run A -> B -> A in one batch and score it: ``prompt`` is A, ``forward`` the edit to
    B (a Target of the source, or B's prompt); the way back is the same Target with A's
    prompt and parent B, its local blend (if any) on the words of A that B's blend words
    replaced. ``settings``: as for :func:`~p2p_widgets.edit`. Returns the result (branches
    A, B, A') and its :func:`cycle_score`."""
    forward = forward if isinstance(forward, Target) else Target(forward)
    if forward.parent != 0:
        raise ValueError(f"the forward edit of a cycle edits the source (parent 0), not branch {forward.parent}")
    result = edit(pipe, prompt, forward, _way_back(pipe, prompt, forward, 1), **settings)
    return result, cycle_score(result)


def _way_back(pipe: Any, prompt: str, forward: Target, parent: int) -> Target:
    """The edit from ``forward``'s branch (``parent``) back to ``prompt``, with the same
    windows; its blend (if any) on the words of ``prompt`` that the blend words replaced."""
    blend = forward.blend
    if blend is not None:
        source, ahead = plan_branches(Recipe(prompt, (forward,)), pipe.tokenizer)
        assert ahead.alignment is not None  # a target's branch is aligned to its parent
        tokens = [t for word in blend.words for t in ahead.prompt.token_indices(word)]
        owner = source.prompt.word_of_token()
        words = sorted({owner[t] for t in np.flatnonzero(ahead.alignment.matrix[:, tokens].sum(1)) if owner[t] >= 0})
        if not words:
            raise ValueError(f"the blend words {blend.words} of {forward.prompt!r} have no counterpart in {prompt!r}")
        blend = replace(blend, words=tuple(words), parent_words=blend.words)
    return replace(forward, prompt=prompt, parent=parent, blend=blend, reweight=(), preserve=())


# -- sweeps -----------------------------------------------------------------------------
def edge_correlation(a: Any, b: Any) -> float:
    """Pearson correlation of two images' Sobel edge magnitudes (on grey levels): a
    structure proxy, 1 when the edges are the same up to a scale; 0 if either has none."""
    edges = []
    kernel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=torch.float64)
    for image in (a, b):
        grey = torch.from_numpy(_pixels(image).mean(-1))[None, None]
        grey = F.pad(grey, (1, 1, 1, 1), mode="replicate")
        gx, gy = F.conv2d(grey, kernel[None, None]), F.conv2d(grey, kernel.T[None, None])
        edges.append(torch.sqrt(gx**2 + gy**2).flatten())
    x, y = (e - e.mean() for e in edges)
    norm = float(torch.sqrt((x * x).sum() * (y * y).sum()))
    return float((x * y).sum()) / norm if norm > 0 else 0.0


@dataclass(frozen=True)
class SweepPoint:
    """One point of a sweep grid: the forward edit's windows and blend threshold."""

    cross: float
    self_attn: float
    k: float
    values: float


@dataclass(frozen=True)
class Sweep:
    """A sweep's results: ``rows`` (one dict per grid point: its settings and metrics),
    ``source`` (image A), ``edited`` and ``returned`` (B and A' of every point)."""

    rows: tuple[dict[str, Any], ...]
    source: Any
    edited: tuple[Any, ...]
    returned: tuple[Any, ...]

    def to_csv(self, path: Any = None) -> str:
        """The table as CSV text; also written to ``path`` if given."""
        import csv
        import io

        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(self.rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        text = buffer.getvalue()
        if path is not None:
            from pathlib import Path

            Path(path).write_text(text, encoding="utf-8")
        return text

    def contact_sheet(self, columns: int | None = None, tile: int = 160) -> Image.Image:
        """The source, then every point's edited image labelled with its settings (PIL)."""
        from .plot import tile_images

        labels = ["source"] + [
            f"cross {r['cross']:g}, self {r['self_attn']:g}, k {r['k']:g}, values {r['values']:g}" for r in self.rows
        ]
        return tile_images([self.source, *self.edited], labels, columns=columns or min(6, len(labels)), tile=tile)


def _finite(value: float) -> float:
    """PSNR for a table: identical images (infinite PSNR) count as 100 dB."""
    return round(min(value, 100.0), 2)


def _grid(name: str, values: Any, low: float, high: float, high_open: bool = False) -> tuple[float, ...]:
    values = (values,) if isinstance(values, (int, float)) and not isinstance(values, bool) else tuple(values)
    if not values:
        raise ValueError(f"the sweep's {name} grid is empty; give at least one value")
    for value in values:
        bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
        if bad or not low <= value <= high or (high_open and value >= high):
            closing = ")" if high_open else "]"
            raise ValueError(
                f"the sweep's {name} grid holds {value!r}; its values are numbers in [{low:g}, {high:g}{closing}"
            )
    return tuple(float(v) for v in values)


def _out_of_memory(error: BaseException) -> bool:
    """A refusal by the memory estimate (before allocating), or an allocator's failure
    (CUDA's OutOfMemoryError, the CPU allocator's RuntimeError, Python's MemoryError)."""
    if isinstance(error, (NotEnoughMemory, MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


def sweep(
    pipe: Any,
    prompt: str,
    edited: str,
    *,
    cross: Any = (0.8,),
    self_attn: Any = (0.4,),
    k: Any = (0.0,),
    values: Any = (0.0,),
    blend: tuple[str, ...] | list[str] | str | None = None,
    value_beta: float = 1.0,
    success: Any = None,
    mask_threshold: float = 0.3,
    max_targets: int | None = None,
    callback: Any = None,
    cancel: Any = None,
    **settings: Any,
) -> Sweep:
    """One edit (``prompt`` -> ``edited``) over a grid of cross window x self window x
    blend threshold ``k`` x value window (fractions of the steps; ``k`` 0: no blending;
    ``blend``: the words of ``edited`` to blend on when ``k`` > 0).

    Every point is run as a cycle A -> B -> A (two branches), as many points per diffusion
    pass as ``max_targets`` allows (default: all) and memory holds: a pass whose memory
    estimate exceeds what is free (CPU or GPU), or that runs out of memory, is split in half
    and retried. Each row: the settings, ``cycle_psnr`` / ``cycle_ssim``
    (A' against A), ``background_psnr`` (B against A outside the edit's attention mask:
    :func:`edited_mask` at ``mask_threshold``; 0.7 suits the shapes model's maps),
    ``edge_correlation`` (B's edges against A's), and ``edit_success`` when ``success`` (a
    function of B's image returning True or False) is given. ``callback`` gets a
    :class:`~p2p_widgets.Progress` after every step, counted across the passes (``stage``
    names the pass); ``cancel`` (a ``threading.Event``) stops at the next step.
    ``settings``: as for :func:`~p2p_widgets.edit` (seed, steps, ...).
    """
    grid = [
        SweepPoint(c, s, kk, v)
        for c in _grid("cross", cross, 0.0, 1.0)
        for s in _grid("self_attn", self_attn, 0.0, 1.0)
        for kk in _grid("k", k, 0.0, 1.0, high_open=True)
        for v in _grid("values", values, 0.0, 1.0)
    ]
    words: tuple[str, ...] = () if blend is None else ((blend,) if isinstance(blend, str) else tuple(blend))
    if any(p.k > 0 for p in grid) and not words:
        raise ValueError(
            "the k grid has thresholds above 0 but no blend words; give blend=(words of the edited prompt)"
        )
    if max_targets is not None and (
        isinstance(max_targets, bool) or not isinstance(max_targets, int) or max_targets < 2
    ):
        raise ValueError(
            f"max_targets is the most branches per pass besides the source, at least 2, not {max_targets!r}"
        )

    def forward(point: SweepPoint) -> Target:
        local = LocalBlend(words, threshold=point.k) if point.k > 0 else None
        return Target(
            edited,
            cross=point.cross,
            self_attn=point.self_attn,
            blend=local,
            values=point.values,
            value_beta=value_beta,
        )

    targets = [forward(p) for p in grid]
    backs = {}  # the way back of each point, made once (it tokenises)
    size = len(grid) if max_targets is None else max(1, max_targets // 2)
    passes = [list(range(i, min(i + size, len(grid)))) for i in range(0, len(grid), size)]
    results: dict[int, tuple[Result, int]] = {}
    finished = 0
    while passes:
        chunk = passes.pop(0)
        branches = []
        for j, number in enumerate(chunk):
            if number not in backs:
                backs[number] = _way_back(pipe, prompt, targets[number], 0)
            branches += [targets[number], replace(backs[number], parent=1 + 2 * j)]

        def report(progress: Progress, before: int = finished, passes_left: int = len(passes)) -> None:
            if callback is not None:  # steps counted across the passes, the run's own step count per pass
                step, total = before * progress.steps + progress.step, (before + 1 + passes_left) * progress.steps
                callback(Progress(step, total, progress.timestep, progress.preview, "sweep"))

        try:
            result = edit(pipe, prompt, *branches, callback=report, cancel=cancel, **settings)
        except (NotEnoughMemory, MemoryError, RuntimeError) as error:
            if len(chunk) == 1 or not _out_of_memory(error):
                raise
            passes[:0] = [chunk[: len(chunk) // 2], chunk[len(chunk) // 2 :]]
            continue
        for j, number in enumerate(chunk):
            results[number] = (result, 1 + 2 * j)
        finished += 1

    rows, edited_images, returned_images = [], [], []
    source = results[0][0].images[0]
    for index, point in enumerate(grid):
        result, branch = results[index]
        image, back = result.images[branch], result.images[branch + 1]
        outside = ~edited_mask(result, branch, mask_threshold)
        row = {
            "cross": point.cross,
            "self_attn": point.self_attn,
            "k": point.k,
            "values": point.values,
            "cycle_psnr": _finite(psnr(source, back)),
            "cycle_ssim": round(ssim(source, back), 4),
            "background_psnr": _finite(psnr(source, image, outside if outside.any() else None)),
            "edge_correlation": round(edge_correlation(source, image), 4),
        }
        if success is not None:
            row["edit_success"] = bool(success(image))
        rows.append(row)
        edited_images.append(image)
        returned_images.append(back)
    return Sweep(tuple(rows), source, tuple(edited_images), tuple(returned_images))
