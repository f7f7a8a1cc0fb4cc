"""The README's pictures: one per edit kind, made with the bundled shapes model.

``python docs/make_pictures.py [--out docs/images] [--steps 50]`` (about a minute on a CPU).
Every picture uses the first seed from 0 whose source image has exactly the prompted
objects, colours and shapes (checked from pixels, as the shapes evaluation does), so the
pictures show the edits, not the small model's misses.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from p2p_widgets import LocalBlend, Target, edit, invert, plot
from p2p_widgets.models import load_pipeline
from p2p_widgets.shapes import place, render
from p2p_widgets.shapes.data import parse_caption
from p2p_widgets.shapes.evaluate import _correct

TILE = 192  # the 64 px images, shown larger


def _first_good(pipe, source: str, *targets, steps: int, **settings):
    """The edit at the first seed whose source image is right."""
    words = parse_caption(source)
    for seed in range(50):
        result = edit(pipe, source, *targets, seed=seed, steps=steps, **settings)
        if _correct(np.asarray(result.images[0].convert("RGB")), words) is not None:
            return result
    raise RuntimeError(f"no seed in 0..49 draws {source!r} right")


def make(out: Path, steps: int) -> list[Path]:
    pipe = load_pipeline("shapes")
    out.mkdir(parents=True, exist_ok=True)
    two = "a big red circle and a small blue square on a black background"
    one = "a big yellow heart on a gray background"
    pictures = {}

    swap = _first_good(
        pipe,
        two,
        Target(two.replace("circle", "star")),
        Target(two.replace("circle", "star"), cross=0.0, self_attn=0.0),
        steps=steps,
    )
    labels = ["source", "word swap: circle -> star", "the same prompt without injection"]
    pictures["swap.png"] = plot.tile_images(swap.images, labels, tile=TILE)

    refine = _first_good(
        pipe,
        one,
        Target("a big yellow striped heart on a gray background"),
        Target(one.replace("gray", "checkered")),
        steps=steps,
    )
    labels = ["source", 'refinement: + "striped"', "refinement: gray -> checkered background"]
    pictures["refine.png"] = plot.tile_images(refine.images, labels, tile=TILE)

    weights = (-1.0, 0.0, 1.0, 2.0, 3.0)
    reweight = _first_good(pipe, one, *[Target(one, reweight={"yellow": w}) for w in weights], steps=steps)
    labels = ["source", *[f'"yellow" x {w:g}' for w in weights]]
    pictures["reweight.png"] = plot.tile_images(reweight.images, labels, tile=TILE)

    recoloured = two.replace("blue", "green")
    blend = _first_good(
        pipe,
        two,
        Target(recoloured, blend=LocalBlend(("green", "square"), threshold=0.7)),
        Target(recoloured),
        steps=steps,
    )
    labels = ["source", "blue -> green, local blend on the square", "blue -> green, no blend"]
    changes = [plot.difference(blend, branch, gain=8) for branch in (1, 2)]
    labels += ["what changed, with the blend (x8)", "what changed, without (x8)"]
    pictures["blend.png"] = plot.tile_images([*blend.images, *changes], labels, tile=TILE)

    pictures["attention.png"] = plot.word_grid(swap, 0).image(tile=TILE // 2)

    scene = render(place(parse_caption(one), np.random.default_rng(3))).image  # a "real" image: rendered, not generated
    inverted = invert(pipe, scene, one, method="null-text", steps=steps)
    edited = inverted.edit(pipe, Target(one.replace("yellow", "pink")), Target(one.replace("heart", "star")))
    labels = ["the image", "null-text inversion", "yellow -> pink", "heart -> star"]
    pictures["inversion.png"] = plot.tile_images([scene, *edited.images], labels, tile=TILE)

    written = []
    for name, picture in pictures.items():
        picture.save(out / name, optimize=True)
        written.append(out / name)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "images"))
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    for path in make(Path(args.out), args.steps):
        print(path)


if __name__ == "__main__":
    main()
