"""Cost of one timestep-slider move in the panel: every word's overlay at one step.

Builds the attention record that Stable Diffusion 1.5 leaves at 512x512 (64x64 latent,
cross-attention at 64, 32, 16 and 8 pixels with 5, 5, 5 and 1 layers, 50 steps) for a
10-word prompt, filled with random attention probabilities (the cost does not depend on
the values), and a 512x512 image. Then, in one process:

* ``precompute_ms``: :class:`p2p_widgets.plot.Scrubber` creation (per-step word maps at
  the latent size, normalised and quantised once per run);
* ``scrub_ms``: the median time of ``Scrubber.frame(step)`` for random steps: one
  512x512 RGB overlay per word, as PIL images;
* ``range_ms``: the same for a random step range (the maps are averaged first);
* ``slow_ms``: the same overlays through the general ``overlay()`` function per word,
  without the precomputation, for comparison; ``speedup`` = slow / scrub;
* ``panel_ms``: what the panel does for a slider move to a step not seen before: the
  session renders every word's overlay at its tile size (192 px), lays them out with
  labels and encodes the PNG the Image widget shows; ``panel_cached_ms``: a move back to
  a step already seen (the encoded frame is kept).

Prints one JSON line. ``python benchmarks/heatmap_scrub.py [--size 512] [--words 10]``
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from p2p_widgets.plot import Scrubber, overlay
from p2p_widgets.prompts import tokenize
from p2p_widgets.record import AttentionRecord
from p2p_widgets.testing import tiny_pipeline, tiny_tokenizer

PROMPT_WORDS = "a cat riding a red bicycle near a small blue house".split()


def sd_like_record(size: int, words: int, steps: int, seed: int = 0) -> AttentionRecord:
    """A record shaped like SD 1.5's at ``size`` pixels, random probabilities."""
    prompt = tokenize(tiny_tokenizer(), " ".join((PROMPT_WORDS * 8)[:words]))
    latent = size // 8
    generator = torch.Generator().manual_seed(seed)
    maps, layers = {}, {1: 5, 2: 5, 4: 5, 8: 1}
    for factor in layers:
        side = latent // factor
        logits = torch.randn(steps, 1, side, side, prompt.length, generator=generator)
        maps[factor] = logits.softmax(-1).to(torch.float16)  # (steps, branches, h, w, tokens)
    timesteps = tuple(range(999, 0, -1000 // steps))[:steps]
    return AttentionRecord(
        prompts=(prompt,), latent_size=(latent, latent), maps=maps, layers=layers, timesteps=timesteps
    )


def median_ms(function: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--words", type=int, default=10, help="words in the prompt")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the panel's renderer uses one core)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    record = sd_like_record(args.size, args.words, args.steps)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    from PIL import Image

    result: Any = SimpleNamespace(attention=record, images=(Image.fromarray(image),))  # what plot and the panel read
    chooser = random.Random(0)

    started = time.perf_counter()
    scrubber = Scrubber(result)
    precompute_ms = 1000 * (time.perf_counter() - started)
    assert len(scrubber.labels) == args.words and scrubber.frame(0)[0].size == (args.size, args.size)

    scrub = median_ms(lambda: scrubber.frame(chooser.randrange(args.steps)), args.repeats)

    def a_range() -> None:
        start = chooser.randrange(args.steps - 1)
        scrubber.frame((start, chooser.randrange(start + 1, args.steps + 1)))

    ranged = median_ms(a_range, args.repeats)
    heatmaps = record.heatmaps(0)

    def slow() -> list[Any]:
        maps = heatmaps.words(steps=chooser.randrange(args.steps))
        return [overlay(result.images[0], m) for m in maps.maps]

    slow_ms = median_ms(slow, max(5, args.repeats // 5))

    from p2p_widgets.panel.session import Entry, Session, Settings, View

    session = Session(tiny_pipeline())  # a real (tiny) pipeline: the session takes its family's defaults; never run
    session._replace(history=(Entry(1, Settings(), result, 0.0, result.images[0]),), view=View(entry=1, branch=0))

    def panel_new_step() -> bytes | None:
        session._frames.clear()
        session.set_step(chooser.randrange(args.steps))
        return session.heatmap_png()

    def panel_seen_step() -> bytes | None:
        session.set_step(chooser.randrange(args.steps))
        return session.heatmap_png()

    panel_new_step()  # the Scrubber is built on the first frame
    panel_ms = median_ms(panel_new_step, args.repeats)
    for step in range(args.steps):
        session.set_step(step)
        session.heatmap_png()
    panel_cached_ms = median_ms(panel_seen_step, args.repeats)
    print(
        json.dumps(
            {
                "benchmark": "heatmap_scrub",
                "size": args.size,
                "words": args.words,
                "steps": args.steps,
                "scrub_ms": round(scrub, 2),
                "range_ms": round(ranged, 2),
                "precompute_ms": round(precompute_ms, 1),
                "slow_ms": round(slow_ms, 2),
                "speedup": round(slow_ms / scrub, 2),
                "panel_ms": round(panel_ms, 2),
                "panel_cached_ms": round(panel_cached_ms, 3),
                "threads": args.threads,
                "cpus": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
