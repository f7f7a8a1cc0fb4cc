"""Cost of a Prompt-to-Prompt edit against the stock diffusers pipeline.

Times one edit (source + 1 target: word swap, cross 0.8 / self 0.4, attention recording
on) against the stock pipeline's ``__call__`` (``StableDiffusionPipeline`` or
``StableDiffusionXLPipeline``) generating the same two prompts in one batch with the same
steps, guidance, scheduler, size and x_T, in the same process, alternating runs.
Prints one JSON line: the median of the per-pair time ratios (edit / stock), both medians
in seconds, and the peak memory of each (GPU: allocator peak; CPU: resident-set growth).

    python benchmarks/edit_overhead.py --arch tiny                       # CPU, tiny UNet
    python benchmarks/edit_overhead.py --arch tiny-sdxl                  # CPU, tiny SDXL
    python benchmarks/edit_overhead.py --arch sd15 --device cuda --dtype float16
    python benchmarks/edit_overhead.py --arch sdxl --device cuda --dtype float16

``sd15`` and ``sdxl`` build the full Stable Diffusion 1.5 / SDXL base 1.0 architectures
(UNet, CLIP text encoders, VAE) with random weights: timing needs the shapes, not the
trained weights. The tokenizers are the tiny offline ones (the prompts are all one-token
words, so they tokenize to as many tokens as with CLIP's vocabulary).
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
from p2p_widgets.testing import tiny_pipeline, tiny_sdxl_pipeline, tiny_tokenizer

SOURCE, TARGET = "a photo of a cat sitting on a table", "a photo of a dog sitting on a table"
# The Recipe's default and StableDiffusionPipeline's; StableDiffusionXLPipeline's is 5.0, so
# both sides are given it.
GUIDANCE = 7.5
#: Image side in pixels when --size is not given.
DEFAULT_SIZE = {"tiny": 32, "tiny-sdxl": 32, "sd15": 512, "sdxl": 1024}


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
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype)


def sdxl_pipeline(dtype: torch.dtype, device: torch.device | str = "cpu"):
    """Stable Diffusion XL base 1.0's architecture with random weights (no download).

    Each part is made on ``device`` itself (the float32 UNet alone is 10 GB: on a GPU it is
    never staged in CPU memory) and cast to ``dtype`` before the next is made, so the peak is
    one float32 part. ``device="meta"`` makes the shapes only, to count parameters.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def cast(module):
        torch.nn.Module.to(module, dtype=dtype)  # diffusers' own .to(dtype) logs a spurious warning
        return module.eval()

    tokenizer, tokenizer_2 = tiny_tokenizer(), tiny_tokenizer(pad_token="!")
    torch.manual_seed(0)
    with torch.device(device):
        unet = cast(
            UNet2DConditionModel(
                sample_size=128,
                cross_attention_dim=2048,
                attention_head_dim=(5, 10, 20),  # read as the number of heads (diffusers#2011): 64 channels each
                block_out_channels=(320, 640, 1280),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 10),
                use_linear_projection=True,
                addition_embed_type="text_time",
                addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816,  # 6 size numbers * 256 + the pooled 1280
            )
        )
        text_encoder = cast(
            CLIPTextModel(
                CLIPTextConfig(  # CLIP ViT-L/14
                    vocab_size=49408,
                    hidden_size=768,
                    intermediate_size=3072,
                    num_hidden_layers=12,
                    num_attention_heads=12,
                    max_position_embeddings=77,
                    hidden_act="quick_gelu",
                    projection_dim=768,
                    bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                )
            )
        )
        text_encoder_2 = cast(
            CLIPTextModelWithProjection(
                CLIPTextConfig(  # OpenCLIP ViT-bigG/14
                    vocab_size=49408,
                    hidden_size=1280,
                    intermediate_size=5120,
                    num_hidden_layers=32,
                    num_attention_heads=20,
                    max_position_embeddings=77,
                    hidden_act="gelu",
                    projection_dim=1280,
                    bos_token_id=tokenizer_2.bos_token_id,
                    eos_token_id=tokenizer_2.eos_token_id,
                    pad_token_id=tokenizer_2.pad_token_id,
                )
            )
        )
        vae = cast(
            AutoencoderKL(
                block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                latent_channels=4,
                layers_per_block=2,
                sample_size=1024,
                scaling_factor=0.13025,
                force_upcast=True,
            )
        )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        interpolation_type="linear",
        use_karras_sigmas=False,
        timestep_spacing="leading",
        steps_offset=1,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build(arch: str, dtype: torch.dtype, device: torch.device, size: int):
    """The pipeline of ``--arch``, on ``device`` in ``dtype``, for ``size``-pixel images."""
    if arch == "tiny":  # the test-suite's SD1-like pipeline
        return tiny_pipeline("sd1", sample_size=size // 2, dtype=dtype).to(device)
    if arch == "tiny-sdxl":  # the test-suite's SDXL miniature
        return tiny_sdxl_pipeline(sample_size=size // 2, dtype=dtype).to(device)
    if arch == "sd15":
        return sd15_pipeline(dtype).to(device)
    if arch == "sdxl":
        return sdxl_pipeline(dtype, device)
    raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(DEFAULT_SIZE)}")


def stock_call(pipe, noise: torch.Tensor, steps: int, size: int):
    """The stock pipeline making SOURCE and TARGET in one batch from the same x_T."""
    device, dtype = pipe.unet.device, pipe.unet.dtype
    return pipe(
        [SOURCE, TARGET],
        latents=noise.expand(2, -1, -1, -1).to(device, dtype),
        num_inference_steps=steps,
        guidance_scale=GUIDANCE,
        height=size,
        width=size,
    ).images


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
    parser.add_argument("--arch", choices=tuple(DEFAULT_SIZE), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument(
        "--size",
        type=int,
        default=None,
        help="image side in pixels; default: 32 (tiny, tiny-sdxl), 512 (sd15), 1024 (sdxl)",
    )
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    size, steps = args.size or DEFAULT_SIZE[args.arch], args.steps
    pipe = build(args.arch, dtype, device, size)
    noise = initial_noise(pipe, 0, size, size)

    def ours():
        return edit(
            pipe,
            SOURCE,
            Target(TARGET, cross=0.8, self_attn=0.4),
            steps=steps,
            guidance=GUIDANCE,
            height=size,
            width=size,
            scheduler="pipeline",
            record=True,
            latents=noise,
        )

    def stock():
        return stock_call(pipe, noise, steps, size)

    # On the CPU the time is this process's CPU time (the work done, whatever else the
    # machine runs; with --threads 1 it is the wall time of a quiet machine); on a GPU the
    # wall time, synchronised.
    clock = time.perf_counter if device.type == "cuda" else time.process_time

    def timed(function):
        start = clock()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return clock() - start

    def peak(function):  # apart from timing: the CPU's sampling thread would count as work
        with PeakMemory(device) as memory:
            function()
        return memory.used

    timed(ours), timed(stock)  # warm-up: kernels, allocator, caches
    edit_peak, stock_peak = peak(ours), peak(stock)
    ratios, edit_times, stock_times = [], [], []
    for repeat in range(args.repeats):
        order = (ours, stock) if repeat % 2 == 0 else (stock, ours)
        results = {f: timed(f) for f in order}
        ratios.append(results[ours] / results[stock])
        edit_times.append(results[ours])
        stock_times.append(results[stock])
    print(
        json.dumps(
            {
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
            }
        )
    )


if __name__ == "__main__":
    main()
