"""Measure the shapes model and Prompt-to-Prompt on it, from pixels against ground truth.

``python -m p2p_widgets.shapes.evaluate [--quick] [--json] [--model shapes]`` prints one
JSON object:

* ``prompt_accuracy``: fraction of generated images in which exactly the prompted objects
  are found, each with its prompted colour and shape;
* ``attention_iou``: mean IoU between a shape word's heatmap (all steps, all resolutions,
  min-max normalised, thresholded at 0.5) and the object's mask found in pixels;
  ``attention_iou_max_normalised``: the same with the map divided by its maximum only (this
  small model's word maps keep a floor of 0.2-0.5 of their peak, which that keeps in);
* ``swap_layout_kept``: fraction of word swaps (colour or shape) with injection (cross 0.8,
  self 0.4 at every resolution) where the object's centroid moves <= 3 px (at 64 px) and
  the new attribute is right; ``swap_layout_kept_without_injection``: the same seeds with
  cross 0 / self 0;
* ``local_blend_background_psnr``: PSNR between source and target outside the edited
  object (both images' masks, dilated by 2 px) when one of two objects changes colour with
  local blending (threshold k = 0.7: this small model's word maps keep a floor of 0.2-0.5
  of their peak everywhere, so the paper's k = 0.3 selects the whole image);
  ``local_blend_background_psnr_without_blend``: the same edit without;
* ``reweight_monotonic``: fraction of re-weighting sweeps of a colour word (weights -1 .. 3,
  the source's maps injected as the paper does) in which the object's colour saturation
  (median chroma inside the source's object mask) never falls and ends higher: the
  paper's re-weighting is a fader for *how much* of what a word says;
  ``reweight_saturation_change``: the mean change of that saturation from the lowest to the
  highest weight, relative to the source's; ``reweight_size_monotonic``: the same sweeps on the
  size word, the object's area against the weight in the word's direction (bigger for
  "big", smaller for "small"): a change of geometry, which injecting the source's maps
  holds in place, so expect it low.

No learned evaluator: objects are found by colour (every object colour is chromatic, every
background achromatic) and classified with the grammar's own pixel measurements. Only
cases whose *source* image is right count for the edit figures (an edit of a wrong
image says nothing about the edit).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import LocalBlend, Target, edit
from ..study import psnr
from .data import (
    COLORS,
    SHAPES,
    ObjectWords,
    SceneWords,
    caption,
    centroid,
    classify_color,
    classify_shape,
    object_masks_from_pixels,
    parse_caption,
    sample_words,
)

__all__ = ["EvalSettings", "evaluate", "prompt_matches", "find_object", "saturation", "dilate", "main"]


@dataclass(frozen=True)
class EvalSettings:
    """How many cases of each kind, and the sampling settings."""

    prompts: int = 100
    swaps: int = 60
    blends: int = 30
    sweeps: int = 20
    weights: tuple[float, ...] = (-1.0, 0.0, 1.0, 2.0, 3.0)
    blend_threshold: float = 0.7
    steps: int = 50
    guidance: float = 7.5
    seed: int = 0

    @classmethod
    def quick(cls) -> EvalSettings:
        return cls(prompts=40, swaps=24, blends=16, sweeps=8, steps=20)


def _pixels(image: Any) -> np.ndarray:
    return np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)


def _objects(image: np.ndarray) -> tuple[dict[str, np.ndarray], int]:
    """The objects found in an image, by colour (the largest of each colour), and their count."""
    masks = object_masks_from_pixels(image)
    by_color: dict[str, np.ndarray] = {}
    for mask in masks:  # largest first
        by_color.setdefault(classify_color(image, mask), mask)
    return by_color, len(masks)


def find_object(image: Any, color: str) -> np.ndarray | None:
    """The (height, width) mask of the largest object of ``color`` (a shapes colour word)
    in an image (PIL or RGB array), or None if there is none."""
    if color not in COLORS:
        raise ValueError(f"{color!r} is not a shapes colour; use one of {', '.join(COLORS)}")
    return _objects(_pixels(image))[0].get(color)


def prompt_matches(image: Any, text: str) -> bool:
    """Whether an image shows exactly the objects a shapes caption names, each with its
    colour and shape (found from pixels): e.g. an edit's success in a sweep."""
    return _correct(_pixels(image), parse_caption(text)) is not None


def _word_indices(words: SceneWords) -> list[dict[str, int]]:
    """For each object, the caption word index of its colour and shape words."""
    indices, start = [], 0
    for obj in words.objects:
        phrase = obj.phrase.split()
        indices.append({"color": start + phrase.index(obj.color), "shape": start + len(phrase) - 1, "size": start + 1})
        start += len(phrase) + 1  # "and"
    return indices


def _correct(image: np.ndarray, words: SceneWords) -> list[np.ndarray] | None:
    """The objects' masks if exactly the prompted objects are there, else None."""
    by_color, count = _objects(image)
    if count != len(words.objects):
        return None
    masks = []
    for obj in words.objects:
        mask = by_color.get(obj.color)
        if mask is None or classify_shape(mask) != obj.shape:
            return None
        masks.append(mask)
    return masks


def _upsample(heatmap: np.ndarray, size: int) -> np.ndarray:
    factor = size // heatmap.shape[0]
    return np.kron(heatmap, np.ones((factor, factor), dtype=heatmap.dtype))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def _threshold(heat: np.ndarray, floor: bool, level: float = 0.5) -> np.ndarray:
    """Where a heatmap reaches ``level`` of its range: from its minimum to its maximum with
    ``floor``, else from 0 to its maximum."""
    low = float(heat.min()) if floor else 0.0
    return (heat - low) >= level * max(float(heat.max()) - low, 1e-12)


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """A boolean mask grown by ``radius`` pixels (4-connected steps)."""
    out = mask.copy()
    for _ in range(radius):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def saturation(image: Any, mask: np.ndarray) -> float:
    """Median chroma (largest minus smallest channel, 0..255) of the pixels of an image
    (PIL or RGB array) under ``mask``."""
    pixels = _pixels(image)[mask].astype(np.int16)
    return float(np.median(pixels.max(axis=-1) - pixels.min(axis=-1)))


def _rises(values: Sequence[float]) -> bool:
    """Never falls from one weight to the next, and ends higher than it starts."""
    return bool(np.all(np.diff(values) >= 0) and values[-1] > values[0])


def _image_scale(image: np.ndarray) -> float:
    """Pixel distances are specified at 64 px; scale them to the image's size."""
    return image.shape[0] / 64


def _other(rng: np.random.Generator, choices: tuple[str, ...], *avoid: str) -> str:
    options = [c for c in choices if c not in avoid]
    return options[int(rng.integers(len(options)))]


def evaluate(pipe: Any, settings: EvalSettings = EvalSettings()) -> dict[str, Any]:
    """Run every measurement on ``pipe``; returns the figures (see the module docstring)."""
    rng = np.random.default_rng(settings.seed)
    run = dict(steps=settings.steps, guidance=settings.guidance, self_max_scale=1.0)
    started = time.perf_counter()

    # 1. Prompt accuracy and attention IoU, on plain generations.
    correct, ious, ious_max = 0, [], []
    for i in range(settings.prompts):
        words = sample_words(rng)
        result = edit(pipe, caption(words), seed=settings.seed + i, **run)
        image = _pixels(result.source)
        masks = _correct(image, words)
        if masks is None:
            continue
        correct += 1
        record = result.attention
        assert record is not None  # for the type checker: edit records attention by default
        for mask, index in zip(masks, _word_indices(words)):
            heat = _upsample(record.word_map(0, index["shape"]), image.shape[0])
            ious.append(_iou(_threshold(heat, floor=True), mask))
            ious_max.append(_iou(_threshold(heat, floor=False), mask))

    # 2. Word swaps with and without injection (single objects).
    kept = {True: 0, False: 0}
    swaps = 0
    for i in range(settings.swaps):
        words = sample_words(rng, two_objects_p=0.0)
        obj = words.objects[0]
        if i % 2:
            new = ObjectWords(obj.shape, _other(rng, COLORS, obj.color), obj.size, obj.texture)
        else:
            new = ObjectWords(_other(rng, SHAPES, obj.shape), obj.color, obj.size, obj.texture)
        edited = SceneWords((new,), words.background)
        outcomes: dict[bool, bool] = {}
        for injected in (True, False):
            cross, self_attn = (0.8, 0.4) if injected else (0.0, 0.0)
            swap = Target(caption(edited), cross=cross, self_attn=self_attn)
            result = edit(pipe, caption(words), swap, seed=10_000 + i, **run)
            source, swapped = _pixels(result.images[0]), _pixels(result.images[1])
            before = _correct(source, words)
            after = find_object(swapped, new.color)
            if before is None:
                break  # the source missed its prompt: no swap to judge
            outcomes[injected] = (  # the new shape, where the old one was
                after is not None
                and classify_shape(after) == new.shape
                and math.dist(centroid(before[0]), centroid(after)) <= 3.0 * _image_scale(source)
            )
        else:
            swaps += 1
            for injected, ok in outcomes.items():
                kept[injected] += ok

    # 3. Local blending: recolour the second of two objects; compare outside it.
    background: dict[bool, list[float]] = {True: [], False: []}
    for i in range(settings.blends):
        words = sample_words(rng, two_objects_p=1.0)
        first, second = words.objects
        color = _other(rng, COLORS, first.color, second.color)
        edited = SceneWords((first, ObjectWords(second.shape, color, second.size, second.texture)), words.background)
        index = _word_indices(edited)[1]
        for blended in (True, False):
            blend = (
                LocalBlend((index["color"], index["shape"]), threshold=settings.blend_threshold) if blended else None
            )
            result = edit(pipe, caption(words), Target(caption(edited), blend=blend), seed=20_000 + i, **run)
            source, target = _pixels(result.images[0]), _pixels(result.images[1])
            masks = _correct(source, words)
            if masks is None:
                break
            changed = masks[1].copy()
            recoloured = find_object(target, color)
            if recoloured is not None:
                changed |= recoloured
            outside = ~dilate(changed, 2)
            if outside.any():
                background[blended].append(psnr(source, target, outside))

    # 4. Re-weighting sweeps. The paper's re-weighting turns up or down an *amount* of
    # what a word says (how fluffy, how snowy) inside a layout that injection keeps; here
    # the colour word of one plain object, measured as colour saturation inside the
    # source's object mask, which must rise with the weight. The size word (a change of
    # geometry, which the injected maps hold in place) is reported beside it.
    rising = {"color": 0, "size": 0}
    saturation_change: list[float] = []
    sweeps = 0
    for i in range(settings.sweeps):
        words = sample_words(rng, two_objects_p=0.0, texture_p=0.0)
        obj = words.objects[0]
        text = caption(words)
        index = _word_indices(words)[0]
        targets = [Target(text, reweight={index[kind]: w}) for kind in ("color", "size") for w in settings.weights]
        result = edit(pipe, text, *targets, seed=30_000 + i, **run)
        pixels = _pixels(result.images[0])
        inside = find_object(pixels, obj.color)  # the source's object
        if inside is None:
            continue
        sweeps += 1
        n = len(settings.weights)
        saturations = [saturation(_pixels(picture), inside) for picture in result.images[1 : 1 + n]]
        areas = []
        for picture in result.images[1 + n :]:
            found = find_object(_pixels(picture), obj.color)
            areas.append(0 if found is None else int(found.sum()))
        rising["color"] += _rises(saturations)
        rising["size"] += _rises(areas if obj.size == "big" else [-a for a in areas])
        saturation_change.append((saturations[-1] - saturations[0]) / max(saturation(pixels, inside), 1.0))

    def fraction(count: int, total: int) -> float | None:
        return round(count / total, 4) if total else None

    def mean(values: list[float]) -> float | None:
        finite = [min(v, 100.0) for v in values]  # identical images: cap infinite PSNR at 100 dB
        return round(float(np.mean(finite)), 2) if finite else None

    return {
        "prompt_accuracy": fraction(correct, settings.prompts),
        "attention_iou": mean(ious),
        "attention_iou_max_normalised": mean(ious_max),
        "swap_layout_kept": fraction(kept[True], swaps),
        "swap_layout_kept_without_injection": fraction(kept[False], swaps),
        "local_blend_background_psnr": mean(background[True]),
        "local_blend_background_psnr_without_blend": mean(background[False]),
        "reweight_monotonic": fraction(rising["color"], sweeps),
        "reweight_saturation_change": None if not saturation_change else round(float(np.mean(saturation_change)), 4),
        "reweight_size_monotonic": fraction(rising["size"], sweeps),
        "counts": {"prompts": settings.prompts, "swaps": swaps, "blends": len(background[True]), "sweeps": sweeps},
        "settings": {
            "steps": settings.steps,
            "guidance": settings.guidance,
            "seed": settings.seed,
            "blend_threshold": settings.blend_threshold,
        },
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Evaluate the shapes model and Prompt-to-Prompt on it.")
    parser.add_argument("--quick", action="store_true", help="a small run (about a minute on a CPU)")
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    parser.add_argument("--model", default="shapes", help="a model name or folder (default: the bundled shapes model)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from ..models import load_pipeline

    settings = EvalSettings.quick() if args.quick else EvalSettings()
    settings = EvalSettings(**{**settings.__dict__, "seed": args.seed})
    figures = evaluate(load_pipeline(args.model), settings)
    if not args.json:
        print(f"shapes evaluation of {args.model} ({'quick' if args.quick else 'full'}):")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
