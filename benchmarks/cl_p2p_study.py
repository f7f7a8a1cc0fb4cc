"""Do the CL P2P report's claims hold on the shapes model? One JSON object.

    python benchmarks/cl_p2p_study.py [--quick]

Fixed edits (a colour or shape swap of one object of a two-object scene) and seeds; only
cases whose source image is right count. Figures, from pixels:

* ``cycle_psnr_without_value_injection`` / ``cycle_psnr_with_value_injection``: A -> B -> A
  as one chain in one batch (default windows, cross 0.8 / self 0.4; values over the first
  half of the steps), PSNR of A' against A (identical images count as 100 dB);
* ``two_run_cycle_psnr_*``: the same, editing back in a second run whose source is B
  generated afresh from its prompt (what a user without chains does), A'' against A;
* ``presets``: for "literature" (k 0.3, cross 0.8, self 0.2) and "optimised" (no
  blending, cross 0.2, self 0.8): ``edit_success`` (B shows exactly the edited prompt's
  objects) and ``background_psnr`` (B against A outside the edited object, found by colour
  in both, dilated by 2 px), with local blending on the edited object's words;
* ``value_injection``: for no value injection and for each value setting in
  :data:`VALUE_SETTINGS` (a window ending at 0.5 .. 1.0 with beta 1, and all steps with
  beta 0.25 .. 0.75), ``edit_success`` and ``background_psnr`` of B (default windows, no
  blending): how long and how strongly values can be injected before the swap is undone.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from p2p_widgets import Target, edit
from p2p_widgets.models import load_pipeline
from p2p_widgets.shapes.data import parse_caption
from p2p_widgets.shapes.evaluate import dilate, find_object, prompt_matches
from p2p_widgets.study import preset, psnr

SCENE = "a big {0} {1} and a small {2} {3} on a {4} background"
EDITS = [  # (source words, which word changes, to what)
    (("red", "circle", "blue", "square", "black"), 2, "green"),
    (("red", "circle", "blue", "square", "black"), 1, "star"),
    (("yellow", "heart", "purple", "triangle", "gray"), 0, "cyan"),
    (("yellow", "heart", "purple", "triangle", "gray"), 3, "circle"),
    (("green", "square", "pink", "diamond", "white"), 2, "blue"),
    (("green", "square", "pink", "diamond", "white"), 1, "heart"),
]


VALUE_SETTINGS = {  # name: (window, beta)
    "first_half": (0.5, 1.0),
    "to_0.6": (0.6, 1.0),
    "to_0.7": (0.7, 1.0),
    "to_0.8": (0.8, 1.0),
    "to_0.9": (0.9, 1.0),
    "all_steps": (1.0, 1.0),
    "all_steps_beta_0.75": (1.0, 0.75),
    "all_steps_beta_0.5": (1.0, 0.5),
    "all_steps_beta_0.25": (1.0, 0.25),
}


def _pixels(image: Any) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def _capped(value: float) -> float:
    return min(value, 100.0)


def _outside_edit(source: Any, target: Any, colours: tuple[str, str]) -> np.ndarray:
    """Pixels outside the edited object in both images (found by its colour before and after)."""
    changed = np.zeros(_pixels(source).shape[:2], dtype=bool)
    for image, colour in zip((source, target), colours):
        mask = find_object(image, colour)
        if mask is not None:
            changed |= mask
    return ~dilate(changed, 2)


def _score(table: dict[str, list[Any]], source: Any, edited_image: Any, edited: str, colours: tuple[str, str]) -> None:
    """Append edit success and the background PSNR outside the edited object to ``table``."""
    table["success"].append(prompt_matches(edited_image, edited))
    table["background"].append(_capped(psnr(source, edited_image, _outside_edit(source, edited_image, colours))))


def study(quick: bool = False, steps: int = 50, seeds: tuple[int, ...] = (0, 1)) -> dict[str, Any]:
    pipe = load_pipeline("shapes")
    edits = EDITS[:3] if quick else EDITS
    seeds = seeds[:1] if quick else seeds
    steps = 20 if quick else steps
    run = dict(steps=steps, guidance=7.5, self_max_scale=1.0)
    figures: dict[str, list] = {
        name: []
        for name in (
            "cycle_without",
            "cycle_with",
            "two_run_without",
            "two_run_with",
        )
    }
    values: dict[str, dict[str, list[Any]]] = {
        name: {"success": [], "background": []} for name in ("none", *VALUE_SETTINGS)
    }
    presets: dict[str, dict[str, list[Any]]] = {
        name: {"success": [], "background": []} for name in ("literature", "optimised")
    }
    values_from = 5  # the branch of the first value setting's B
    half = values_from + list(VALUE_SETTINGS).index("first_half")
    cases = 0
    started = time.perf_counter()
    for words, index, new in edits:
        source_words = list(words)
        edited_words = list(words)
        edited_words[index] = new
        prompt, edited = SCENE.format(*source_words), SCENE.format(*edited_words)
        colour_of = {0: 0, 1: 0, 2: 2, 3: 2}[index]  # the edited object's colour word
        colours = (source_words[colour_of], edited_words[colour_of])
        blend_words = (edited_words[index],) if index in (0, 2) else (edited_words[colour_of], new)
        parse_caption(edited)  # the edit is a caption of the grammar
        for seed in seeds:
            targets = [
                Target(edited),
                Target(prompt, parent=1),  # A -> B -> A, no value injection
                preset("literature").target(edited, blend=blend_words),
                preset("optimised").target(edited, blend=blend_words),
                *(Target(edited, values=window, value_beta=beta) for window, beta in VALUE_SETTINGS.values()),
                Target(prompt, parent=half, values=0.5),  # A -> B -> A, values over the first half
            ]
            result = edit(pipe, prompt, *targets, seed=seed, **run)
            a = result.images[0]
            if not prompt_matches(a, prompt):
                continue
            cases += 1
            figures["cycle_without"].append(_capped(psnr(a, result.images[2])))
            figures["cycle_with"].append(_capped(psnr(a, result.images[-1])))
            for name, branch in (("literature", 3), ("optimised", 4)):
                _score(presets[name], a, result.images[branch], edited, colours)
            _score(values["none"], a, result.images[1], edited, colours)
            for offset, name in enumerate(VALUE_SETTINGS):
                _score(values[name], a, result.images[values_from + offset], edited, colours)
            # the second run: B afresh from its prompt, edited back to A
            back = edit(pipe, edited, Target(prompt), Target(prompt, values=0.5), seed=seed, **run)
            figures["two_run_without"].append(_capped(psnr(a, back.images[1])))
            figures["two_run_with"].append(_capped(psnr(a, back.images[2])))

    def mean(values: Sequence[float]) -> float | None:
        return round(float(np.mean(values)), 3) if values else None

    return {
        "cycle_psnr_without_value_injection": mean(figures["cycle_without"]),
        "cycle_psnr_with_value_injection": mean(figures["cycle_with"]),
        "two_run_cycle_psnr_without_value_injection": mean(figures["two_run_without"]),
        "two_run_cycle_psnr_with_value_injection": mean(figures["two_run_with"]),
        "value_injection": {
            name: {"edit_success": mean(v["success"]), "background_psnr": mean(v["background"])}
            for name, v in values.items()
        },
        "presets": {
            name: {"edit_success": mean(p["success"]), "background_psnr": mean(p["background"])}
            for name, p in presets.items()
        },
        "cases": cases,
        "settings": {"steps": steps, "seeds": list(seeds), "edits": len(edits), "guidance": 7.5},
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 edits, 1 seed, 20 steps")
    args = parser.parse_args()
    print(json.dumps(study(quick=args.quick)))


if __name__ == "__main__":
    main()
