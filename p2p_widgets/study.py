"""The CL P2P report's tools: hyperparameter presets, cycle consistency, image metrics.

The report (``seeds/001``) studies Prompt-to-Prompt's hyperparameters and finds edits
cycle-inconsistent: A -> B -> A does not return to A. Here:

* :data:`PRESETS`: its two settings by name, ``"literature"`` (k = 0.3, cross 0.8,
  self 0.2: the official code's) and ``"optimised"`` (k = 0, cross 0.2, self 0.8: the
  report's, tuned on faces and hair). ``k = 0`` keeps every pixel that has any attention,
  that is no local blending, so that preset's targets have no blend.
  ``preset("optimised").target("a dog riding a bicycle", blend=("dog",))``.
* :func:`cycle`: A -> B -> A as one chain in one batch, the way back with the same
  windows (``cycle(pipe, "a cat", Target("a dog", values=0.5))``), and :func:`cycle_score`: PSNR and SSIM between A and the returned A', over the
  whole image and outside the edited words' attention mask.
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

from .control import _same_tokens, plan_branches
from .edits import LocalBlend, Recipe, Target
from .engine import Result, edit

__all__ = ["Preset", "PRESETS", "preset", "psnr", "ssim", "CycleScore", "cycle", "cycle_score", "edited_mask"]


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
    "literature": Preset("literature", 0.3, 0.8, 0.2, "the official code's values (k 0.3, cross 0.8, self 0.2)"),
    "optimised": Preset("optimised", 0.0, 0.2, 0.8, "the CL P2P report's values for faces and hair (k 0, cross 0.2, self 0.8)"),
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
        return {"psnr": self.psnr, "ssim": self.ssim, "psnr_outside": self.psnr_outside, "ssim_outside": self.ssim_outside}


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
    changed = np.flatnonzero(_same_tokens(result.branches[child.parent].prompt, child)[: child.prompt.length] == 0)
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
    """Score a run whose branch ``back`` returns to the source's prompt through one edit
    (A -> B -> A): A' against A, whole and outside the edit's mask (the forward edit's
    changed words, see :func:`edited_mask`)."""
    chain = result.branches[back]
    forward = chain.parent
    if chain.prompt.text != result.branches[0].prompt.text or result.branches[forward].parent != 0:
        raise ValueError(f"branch {back} is not a return to the source through one edit (A -> B -> A)")
    mask = edited_mask(result, forward, threshold)
    outside = ~mask if (~mask).any() else None
    source, returned = result.images[0], result.images[back]
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
    blend = forward.blend
    if blend is not None:  # back from B: the region is where A's counterparts of B's blend words are
        source, ahead = plan_branches(Recipe(prompt, (forward,)), pipe.tokenizer)
        tokens = [t for word in blend.words for t in ahead.prompt.token_indices(word)]
        owner = source.prompt.word_of_token()
        words = sorted({owner[t] for t in np.flatnonzero(ahead.alignment.matrix[:, tokens].sum(1)) if owner[t] >= 0})
        if not words:
            raise ValueError(f"the blend words {blend.words} of {forward.prompt!r} have no counterpart in {prompt!r}")
        blend = replace(blend, words=tuple(words), parent_words=blend.words)
    back = replace(forward, prompt=prompt, parent=1, blend=blend, reweight=(), preserve=())
    result = edit(pipe, prompt, forward, back, **settings)
    return result, cycle_score(result)
