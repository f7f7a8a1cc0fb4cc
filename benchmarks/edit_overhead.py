"""Cost of a Prompt-to-Prompt edit against the stock diffusers pipeline.

Times one edit (source + 1 target: word swap, cross 0.8 / self 0.4, attention recording
on) against ``StableDiffusionPipeline.__call__`` generating the same two prompts in one
batch with the same steps, scheduler and x_T, in the same process, alternating runs.
Prints one JSON line: the median of the per-pair time ratios (edit / stock), both medians
in seconds, and the peak memory of each (GPU: allocator peak; CPU: resident-set growth).

    python benchmarks/edit_overhead.py --arch tiny                       # CPU, tiny UNet
    python benchmarks/edit_overhead.py --arch sd15 --device cuda --dtype float16

``sd15`` builds the full Stable Diffusion 1.5 architecture (UNet, CLIP ViT-L text
encoder, VAE) with random weights: timing needs the shapes, not the trained weights.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time

import torch

from p2p_widgets import Target, edit
from p2p_widgets.engine import initial_noise
from p2p_widgets.testing import tiny_pipeline, tiny_tokenizer

SOURCE, TARGET = "a photo of a cat sitting on a table", "a photo of a dog sitting on a table"


def sd15_pipeline(dtype: torch.dtype):
    """Stable Diffusion 1.5's architecture with random weights (no download)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64,
        cross_attention_dim=768,
        attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
    )
    tokenizer = tiny_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype)


class PeakMemory:
    """Peak memory during a block: CUDA allocator peak, or resident-set growth on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self._rss()
            self.peak = self.base
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as stream:
            return int(stream.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.used = torch.cuda.max_memory_allocated() - self.base
        else:
            self.running = False
            self.thread.join()
            self.used = max(self.peak, self._rss()) - self.base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=None, help="image side in pixels; default: 32 (tiny), 512 (sd15)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.arch == "tiny":  # the test-suite's SD1-like pipeline
        size = args.size or 32
        pipe = tiny_pipeline("sd1", sample_size=size // 2, dtype=dtype)
    else:
        size = args.size or 512
        pipe = sd15_pipeline(dtype)
    steps = args.steps
    pipe = pipe.to(device)
    noise = initial_noise(pipe, 0, size, size)

    def ours():
        return edit(pipe, SOURCE, Target(TARGET, cross=0.8, self_attn=0.4), steps=steps, height=size, width=size,
                    scheduler="pipeline", record=True, latents=noise)

    def stock():
        return pipe([SOURCE, TARGET], latents=noise.expand(2, -1, -1, -1).to(device, dtype), num_inference_steps=steps,
                    height=size, width=size).images

    def timed(function):
        with PeakMemory(device) as memory:
            start = time.perf_counter()
            function()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        return seconds, memory.used

    timed(ours), timed(stock)  # warm-up: kernels, allocator, caches
    ratios, edit_times, stock_times, edit_peak, stock_peak = [], [], [], 0, 0
    for repeat in range(args.repeats):
        order = (ours, stock) if repeat % 2 == 0 else (stock, ours)
        results = {f: timed(f) for f in order}
        (edit_s, edit_mem), (stock_s, stock_mem) = results[ours], results[stock]
        ratios.append(edit_s / stock_s)
        edit_times.append(edit_s)
        stock_times.append(stock_s)
        edit_peak, stock_peak = max(edit_peak, edit_mem), max(stock_peak, stock_mem)
    print(json.dumps({
        "benchmark": "edit_overhead",
        "arch": args.arch,
        "device": str(device),
        "dtype": args.dtype,
        "size": size,
        "steps": steps,
        "repeats": args.repeats,
        "ratio": round(statistics.median(ratios), 4),
        "edit_s": round(statistics.median(edit_times), 4),
        "stock_s": round(statistics.median(stock_times), 4),
        "edit_peak_mb": round(edit_peak / 2**20, 1),
        "stock_peak_mb": round(stock_peak / 2**20, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
