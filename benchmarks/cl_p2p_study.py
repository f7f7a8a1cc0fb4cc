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
* ``value_injection_edit_success``: edit success (default windows) with no value
  injection, values over the first half of the steps, and over all of them.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from p2p_widgets import Target, edit
from p2p_widgets.models import load_pipeline
from p2p_widgets.shapes.data import parse_caption
from p2p_widgets.shapes.evaluate import _dilate, _find, prompt_matches
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


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def _capped(value: float) -> float:
    return min(value, 100.0)


def _outside_edit(source, target, colours: tuple[str, str]) -> np.ndarray:
    """Pixels outside the edited object in both images (found by its colour before and after)."""
    changed = np.zeros(_pixels(source).shape[:2], dtype=bool)
    for image, colour in zip((source, target), colours):
        mask = _find(_pixels(image), colour)
        if mask is not None:
            changed |= mask
    return ~_dilate(changed, 2)


def study(quick: bool = False, steps: int = 50, seeds: tuple[int, ...] = (0, 1)) -> dict:
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
            "values_all_success",
            "values_half_success",
            "plain_success",
        )
    }
    presets = {name: {"success": [], "background": []} for name in ("literature", "optimised")}
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
            plain = Target(edited)
            half = Target(edited, values=0.5)
            targets = [
                plain,
                Target(prompt, parent=1),  # A -> B -> A, no value injection
                half,
                Target(prompt, parent=3, values=0.5),  # A -> B -> A, values over the first half
                Target(edited, values=1.0),
                preset("literature").target(edited, blend=blend_words),
                preset("optimised").target(edited, blend=blend_words),
            ]
            result = edit(pipe, prompt, *targets, seed=seed, **run)
            a = result.images[0]
            if not prompt_matches(a, prompt):
                continue
            cases += 1
            figures["cycle_without"].append(_capped(psnr(a, result.images[2])))
            figures["cycle_with"].append(_capped(psnr(a, result.images[4])))
            figures["plain_success"].append(prompt_matches(result.images[1], edited))
            figures["values_half_success"].append(prompt_matches(result.images[3], edited))
            figures["values_all_success"].append(prompt_matches(result.images[5], edited))
            for name, branch in (("literature", 6), ("optimised", 7)):
                b = result.images[branch]
                presets[name]["success"].append(prompt_matches(b, edited))
                presets[name]["background"].append(_capped(psnr(a, b, _outside_edit(a, b, colours))))
            # the second run: B afresh from its prompt, edited back to A
            back = edit(pipe, edited, Target(prompt), Target(prompt, values=0.5), seed=seed, **run)
            figures["two_run_without"].append(_capped(psnr(a, back.images[1])))
            figures["two_run_with"].append(_capped(psnr(a, back.images[2])))

    def mean(values) -> float | None:
        return round(float(np.mean(values)), 3) if values else None

    return {
        "cycle_psnr_without_value_injection": mean(figures["cycle_without"]),
        "cycle_psnr_with_value_injection": mean(figures["cycle_with"]),
        "two_run_cycle_psnr_without_value_injection": mean(figures["two_run_without"]),
        "two_run_cycle_psnr_with_value_injection": mean(figures["two_run_with"]),
        "value_injection_edit_success": {
            "first_half": mean(figures["values_half_success"]),
            "all_steps": mean(figures["values_all_success"]),
            "none": mean(figures["plain_success"]),
        },
        "presets": {
            name: {"edit_success": mean(p["success"]), "background_psnr": mean(p["background"])} for name, p in presets.items()
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
