"""Real-image inversion: reconstruction quality, time and memory of every method.

For each method, inverts images and regenerates them with no edit, and prints one JSON
line: the reconstruction PSNR against the input image (mean over the images), seconds
per inversion (median), and the peak memory of an inversion (GPU: allocator peak; CPU:
resident-set growth). A first line gives the VAE round trip, the ceiling of every method.

    python benchmarks/inversion.py                     # the bundled shapes model, CPU
    python benchmarks/inversion.py --arch sd15 --device cuda --dtype float16 --images 1

On the shapes model the images are rendered scenes of its grammar, so the prompt is
their exact description. ``sd15`` is Stable Diffusion 1.5's architecture with random
weights: its PSNRs mean nothing, its seconds and memory do; there ``--baseline`` also
times null-text the straightforward way (gradients for the UNet's weights too, as the
official code computes them) in the same process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from edit_overhead import PeakMemory, sd15_pipeline
from p2p_widgets import inversion
from p2p_widgets.inversion import METHODS, invert
from p2p_widgets.study import psnr


def shapes_cases(count: int) -> tuple[Any, list[tuple[Any, str]]]:
    """The shapes pipeline and ``count`` rendered scenes with their exact captions."""
    from p2p_widgets.models import load_pipeline
    from p2p_widgets.shapes import caption, place, render, sample_words

    pipe = load_pipeline("shapes")
    rng = np.random.default_rng(0)
    cases = []
    for _ in range(count):
        words = sample_words(rng)
        cases.append((render(place(words, rng)).image, caption(words)))
    return pipe, cases


def sd15_cases(count: int, dtype: torch.dtype, device: str) -> tuple[Any, list[tuple[Any, str]]]:
    """SD 1.5's architecture (random weights) and ``count`` noise images with one prompt."""
    pipe = sd15_pipeline(dtype).to(device)
    rng = np.random.default_rng(0)
    images = [(rng.random((512, 512, 3)) * 255).astype(np.uint8) for _ in range(count)]
    return pipe, [(image, "a photo of a cat sitting on a table") for image in images]


@contextlib.contextmanager
def _weights_keep_gradients(module: torch.nn.Module) -> Iterator[None]:
    """The straightforward null-text: the UNet's weights require gradients throughout."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
            p.grad = None


def measure(
    pipe: Any,
    cases: list[tuple[Any, str]],
    method: str,
    args: argparse.Namespace,
    device: torch.device,
    label: str | None = None,
) -> dict[str, Any]:
    """One JSON line for ``method``: reconstruction PSNR, seconds and peak memory per inversion."""
    seconds: list[float] = []
    quality: list[float] = []
    memory: list[int] = []
    inner: list[int] = []
    for image, prompt in cases:
        with PeakMemory(device) as peak:
            started = time.perf_counter()
            inverted = invert(pipe, image, prompt, method, steps=args.steps, guidance=args.guidance)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - started)
        memory.append(peak.used)
        inner.extend(inverted.inner_steps)
        quality.append(psnr(inverted.edit(pipe, record=False).source, inverted.image.image))
    line = {
        "method": label or method,
        "reconstruction_psnr": round(statistics.mean(min(q, 100.0) for q in quality), 2),
        "seconds": round(statistics.median(seconds), 3),
        "peak_memory_mb": round(max(memory) / 2**20, 1),
        "images": len(cases),
        "steps": args.steps,
        "guidance": args.guidance,
    }
    if inner:
        line["mean_inner_steps"] = round(statistics.mean(inner), 2)
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=("shapes", "sd15"), default="shapes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--baseline", action="store_true", help="also null-text with UNet weight gradients")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.arch == "shapes":
        pipe, cases = shapes_cases(args.images)
        pipe.to(device)
    else:
        pipe, cases = sd15_cases(args.images, getattr(torch, args.dtype), args.device)
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")

    ceiling = []
    for image, prompt in cases:
        inverted = invert(pipe, image, prompt, "ddim", steps=1, guidance=1.0)
        ceiling.append(psnr(inverted.vae_round_trip(pipe), inverted.image.image))
    print(
        json.dumps(
            {
                "method": "vae_round_trip",
                "reconstruction_psnr": round(statistics.mean(ceiling), 2),
                "images": len(cases),
            }
        )
    )
    for method in methods:
        print(json.dumps(measure(pipe, cases, method, args, device)), flush=True)
    if args.baseline:
        frozen = inversion._frozen
        inversion._frozen = _weights_keep_gradients
        try:
            print(json.dumps(measure(pipe, cases, "null-text", args, device, "null-text_with_unet_weight_gradients")))
        finally:
            inversion._frozen = frozen


if __name__ == "__main__":
    main()
