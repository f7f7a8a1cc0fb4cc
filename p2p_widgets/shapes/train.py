"""Train the shapes model: ``python -m p2p_widgets.shapes.train --out DIR``.

Two stages, both on freshly rendered scenes (no data set on disk; every batch is drawn
from a seed, so a run is reproducible on the same machine):

1. the VAE: reconstruct images, a mean squared error weighted up at edges (see
   :func:`edge_weights`) plus a small KL term; then the latent scaling factor is set to
   1 / std of the latents, as Stable Diffusion's 0.18215 does; then the decoder alone
   (encoder frozen, so the latent space does not move) learns to decode latents with
   added noise back to the clean image (:func:`refine_decoder`): the denoiser's latents
   are never exact, and a decoder that only saw exact ones turns their errors into
   coloured blotches on the background;
2. the UNet and the text encoder, jointly, with the denoising objective of Stable
   Diffusion: ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps``, predict ``eps``; 10% of
   captions are dropped to "" so classifier-free guidance works. Two standard speed-ups
   for short runs: Min-SNR-gamma loss weights (Hang et al., 2023: each step's loss is
   weighted by ``min(SNR, gamma) / SNR`` so the easy low-noise steps stop dominating) and
   an exponential moving average of the weights, which is what gets saved.

The result is saved with ``save_pretrained`` (safetensors) and loads with
``StableDiffusionPipeline.from_pretrained``. Users can train their own toy world the same
way by swapping the data and the vocabulary.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline

from ..tokenizer import write_vocabulary_files
from .data import batch, vocabulary
from .model import ModelConfig, build_pipeline, scheduler_config

__all__ = [
    "TrainConfig",
    "edge_weights",
    "loss_weights",
    "train",
    "train_vae",
    "refine_decoder",
    "train_denoiser",
    "main",
]


@dataclass(frozen=True)
class TrainConfig:
    """Training settings (defaults: the bundled model)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    seed: int = 0
    batch_size: int = 32
    vae_steps: int = 2000
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    vae_edge_weight: float = 4.0
    decoder_steps: int = 600
    decoder_lr: float = 5e-4
    decoder_noise: float = 0.5
    denoiser_steps: int = 16000
    denoiser_lr: float = 1.5e-3
    text_lr_scale: float = 1.0
    warmup_steps: int = 200
    caption_dropout: float = 0.1
    min_snr: float | None = 5.0
    ema_decay: float | None = 0.999
    threads: int | None = None


def _images(seed: int, count: int, size: int) -> tuple[torch.Tensor, list[str]]:
    """A batch of rendered scenes as (count, 3, size, size) floats in [-1, 1], and captions."""
    pixels, captions = batch(count, seed=seed, size=size)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return images, captions


_VAE, _DECODER, _DENOISER, _HELD_OUT = 0, 1_000_000, 2_000_000, 4_000_000  # disjoint ranges of data seeds per stage


def _data_seed(config: TrainConfig, stage: int, step: int) -> int:
    """The scene seed of one batch: distinct across stages, steps and training seeds."""
    return config.seed * 10_000_019 + stage + step


def _schedule(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


Report = Callable[[str, int, int, float], None]  # (stage, step, steps, loss)


def edge_weights(images: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-pixel weights of the VAE's squared error: ``1 + weight * edge``, where ``edge``
    (in [0, 1]) is the largest channel step to a 4-neighbour, summed over the neighbours.

    Flat shapes are mostly flat colour: a plain mean squared error is dominated by the
    interiors and background, and a short training blurs small stars and triangles into
    circles (the shape is in the edges). Weighting the edges makes the decoder draw them.
    Returns (batch, 1, height, width), normalised to mean 1 over the batch.
    """
    # (batch, 1, h, w-1) and (batch, 1, h-1, w): the step to the right / downward neighbour
    across = (images[..., :, 1:] - images[..., :, :-1]).abs().amax(1, keepdim=True)
    down = (images[..., 1:, :] - images[..., :-1, :]).abs().amax(1, keepdim=True)
    edge = torch.zeros_like(images[:, :1])
    edge[..., :, 1:] += across
    edge[..., :, :-1] += across
    edge[..., 1:, :] += down
    edge[..., :-1, :] += down
    weights = 1 + weight * edge.clamp(max=1)
    return weights / weights.mean()


def portable_text_encoder(folder: str | Path) -> None:
    """Give the saved CLIP text encoder's weights the ``text_model.`` prefix if they lack it.

    transformers 5 saves them without it and loads either form; transformers 4 silently
    leaves unprefixed weights unloaded (random), so a saved model must carry the prefix.
    """
    from safetensors.torch import load_file, save_file

    path = Path(folder) / "model.safetensors"
    weights = load_file(path)
    if all(key.startswith("text_model.") for key in weights):
        return
    renamed = {key if key.startswith("text_model.") else f"text_model.{key}": value for key, value in weights.items()}
    save_file(renamed, path, metadata={"format": "pt"})


def _reconstruction_loss(reconstruction: torch.Tensor, images: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """The VAE stages' squared error, weighted up at edges (:func:`edge_weights`)."""
    return ((reconstruction - images).pow(2) * edge_weights(images, config.vae_edge_weight)).mean()


def train_vae(pipe: StableDiffusionPipeline, config: TrainConfig, report: Report | None = None) -> float:
    """Stage 1. Returns the latent scaling factor it set on the VAE."""
    vae, size = pipe.vae, config.model.image_size
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _schedule(s, config.vae_steps, min(config.warmup_steps, config.vae_steps))
    )
    for step in range(config.vae_steps):
        images, _ = _images(_data_seed(config, _VAE, step), config.batch_size, size)
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = _reconstruction_loss(reconstruction, images, config) + config.vae_kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)  # lr 2e-3 spikes without it
        optimizer.step()
        schedule.step()
        if report is not None:
            report("vae", step, config.vae_steps, loss.item())
    vae.eval()
    with torch.no_grad():  # 1 / std of the latents, from a held-out batch
        images, _ = _images(_data_seed(config, _HELD_OUT, 0), 256, size)
        std = float(vae.encode(images).latent_dist.mean.std())
    scaling = 1.0 / max(std, 1e-6)
    vae.register_to_config(scaling_factor=scaling)
    refine_decoder(vae, config, report)
    return scaling


def refine_decoder(vae: AutoencoderKL, config: TrainConfig, report: Report | None = None) -> None:
    """Stage 1b: teach the decoder to decode slightly wrong latents to clean images.

    The encoder stays frozen, so the latent space (and the scaling factor) is unchanged.
    Each image's scaled latent gets Gaussian noise of a level drawn uniformly from
    ``[0, decoder_noise]`` (in units of the latents' standard deviation); the decoder is
    trained to give back the clean image with the same edge-weighted error as stage 1
    (its measured effect is in the model card).
    """
    if config.decoder_steps <= 0:
        return
    size, scaling = config.model.image_size, vae.config.scaling_factor
    decoder = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    vae.requires_grad_(False)
    for parameter in decoder:
        parameter.requires_grad_(True)
    vae.decoder.train()
    optimizer = torch.optim.AdamW(decoder, lr=config.decoder_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _schedule(s, config.decoder_steps, min(config.warmup_steps, config.decoder_steps))
    )
    generator = torch.Generator().manual_seed(config.seed + 1)
    for step in range(config.decoder_steps):
        images, _ = _images(_data_seed(config, _DECODER, step), config.batch_size, size)
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.sample(generator) * scaling
            level = torch.rand(len(latents), 1, 1, 1, generator=generator) * config.decoder_noise
            latents = latents + level * torch.randn(latents.shape, generator=generator)
        reconstruction = vae.decode(latents / scaling).sample
        loss = _reconstruction_loss(reconstruction, images, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder, 1.0)
        optimizer.step()
        schedule.step()
        if report is not None:
            report("decoder", step, config.decoder_steps, loss.item())
    vae.requires_grad_(True)
    vae.eval()


def loss_weights(alphas_cumprod: torch.Tensor, min_snr: float | None) -> torch.Tensor:
    """Min-SNR-gamma weights of the epsilon loss per timestep: ``min(SNR, gamma) / SNR``
    with ``SNR = a_t / (1 - a_t)``; all ones when ``min_snr`` is None."""
    if not min_snr:
        return torch.ones_like(alphas_cumprod)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    return snr.clamp(max=min_snr) / snr


def train_denoiser(
    pipe: StableDiffusionPipeline,
    config: TrainConfig,
    report: Report | None = None,
    checkpoint: Callable[[int], None] | None = None,
    checkpoint_every: int = 0,
) -> None:
    """Stage 2: the UNet and the text encoder, with the VAE frozen.

    Every ``checkpoint_every`` steps, ``checkpoint(step)`` is called with the averaged
    weights in place (as they would be saved), then training goes on.
    """
    unet, text_encoder, vae, tokenizer = pipe.unet, pipe.text_encoder, pipe.vae, pipe.tokenizer
    noise_schedule = DDPMScheduler(
        **{k: v for k, v in scheduler_config().items() if k not in ("set_alpha_to_one", "steps_offset")}
    )
    alphas = noise_schedule.alphas_cumprod  # (1000,)
    unet.train()
    text_encoder.train()
    parameters = [*unet.parameters(), *text_encoder.parameters()]
    groups: list[dict[str, Any]] = [
        {"params": list(unet.parameters())},
        {"params": list(text_encoder.parameters()), "lr": config.denoiser_lr * config.text_lr_scale},
    ]
    optimizer = torch.optim.AdamW(
        groups,
        lr=config.denoiser_lr,
        weight_decay=1e-2,
    )
    average = [p.detach().clone() for p in parameters] if config.ema_decay else None
    weights = loss_weights(alphas, config.min_snr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _schedule(s, config.denoiser_steps, min(config.warmup_steps, config.denoiser_steps))
    )
    generator = torch.Generator().manual_seed(config.seed)
    scaling = vae.config.scaling_factor
    for step in range(config.denoiser_steps):
        images, captions = _images(_data_seed(config, _DENOISER, step), config.batch_size, config.model.image_size)
        drop = torch.rand(len(captions), generator=generator) < config.caption_dropout
        captions = ["" if dropped else text for text, dropped in zip(captions, drop.tolist())]
        ids = tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        with torch.no_grad():
            x0 = vae.encode(images).latent_dist.sample(generator) * scaling
        # 1. x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps, t uniform over the 1000 training steps
        t = torch.randint(0, len(alphas), (len(captions),), generator=generator)
        eps = torch.randn(x0.shape, generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        # 2. predict eps from x_t, t and the caption
        prediction = unet(xt, t, encoder_hidden_states=text_encoder(ids)[0]).sample
        loss = (weights[t] * (prediction - eps).pow(2).mean(dim=(1, 2, 3))).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        if average is not None and config.ema_decay:  # decay warms up: the average forgets the random start
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(average, [p.detach() for p in parameters], 1 - decay)
        if report is not None:
            report("denoiser", step, config.denoiser_steps, loss.item())
        if (
            checkpoint is not None
            and checkpoint_every
            and (step + 1) % checkpoint_every == 0
            and step + 1 < config.denoiser_steps
        ):
            current = [p.detach().clone() for p in parameters]
            _assign(parameters, average or current)
            unet.eval()
            text_encoder.eval()
            checkpoint(step + 1)
            _assign(parameters, current)
            unet.train()
            text_encoder.train()
    if average is not None:
        _assign(parameters, average)
    unet.eval()
    text_encoder.eval()


def _assign(parameters: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for parameter, value in zip(parameters, values):
            parameter.copy_(value)


def train(
    config: TrainConfig,
    out: str | Path | None = None,
    report: Report | None = None,
    vae_from: str | Path | None = None,
    checkpoint_every: int = 0,
) -> StableDiffusionPipeline:
    """Build, train and (if ``out`` is given) save the shapes pipeline.

    ``vae_from``: a saved shapes pipeline whose VAE (and latent scaling) to reuse instead
    of training stage 1, for experiments with the denoiser. ``checkpoint_every``: also
    save the pipeline every this many denoiser steps, to ``out/checkpoint-STEP``.
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)  # noqa: NPY002 -- for any library code that draws from numpy's global state
    pipe = build_pipeline(config.model, seed=config.seed)
    started = time.perf_counter()
    if vae_from is None:
        train_vae(pipe, config, report)
    else:
        pipe.vae.load_state_dict(AutoencoderKL.from_pretrained(Path(vae_from) / "vae").state_dict())
        pipe.vae.register_to_config(scaling_factor=AutoencoderKL.load_config(Path(vae_from) / "vae")["scaling_factor"])
        pipe.vae.eval()
    vae_seconds = time.perf_counter() - started
    pipe.vae.requires_grad_(False)
    out = None if out is None else Path(out)

    def save(folder: Path) -> None:
        pipe.save_pretrained(folder, safe_serialization=True)
        portable_text_encoder(folder / "text_encoder")
        write_vocabulary_files(folder / "tokenizer", vocabulary())  # for transformers < 5

    def checkpoint(step: int) -> None:
        assert out is not None  # for the type checker: passed on only with a folder
        save(out / f"checkpoint-{step}")

    train_denoiser(pipe, config, report, checkpoint if out is not None else None, checkpoint_every)
    if out is not None:
        save(out)
        info = {
            "train_config": {**asdict(config), "model": config.model.to_dict()},
            "vae_from": None if vae_from is None else str(vae_from),
            "vae_seconds": round(vae_seconds, 1),
            "total_seconds": round(time.perf_counter() - started, 1),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }
        (out / "training.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    return pipe


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the shapes model.")
    parser.add_argument("--out", required=True, help="folder to save the pipeline in")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=TrainConfig.vae_steps)
    parser.add_argument(
        "--decoder-steps", type=int, default=TrainConfig.decoder_steps, help="decoder refinement steps (0: none)"
    )
    parser.add_argument("--denoiser-steps", type=int, default=TrainConfig.denoiser_steps)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--lr", type=float, default=TrainConfig.denoiser_lr, help="denoiser learning rate")
    parser.add_argument("--text-lr-scale", type=float, default=TrainConfig.text_lr_scale)
    parser.add_argument("--vae-from", default=None, help="reuse the VAE of a saved shapes pipeline (skips stage 1)")
    parser.add_argument("--checkpoint-every", type=int, default=0, help="also save every this many denoiser steps")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--every", type=int, default=100, help="print the loss every this many steps")
    args = parser.parse_args(argv)
    config = TrainConfig(
        seed=args.seed,
        vae_steps=args.vae_steps,
        decoder_steps=args.decoder_steps,
        denoiser_steps=args.denoiser_steps,
        batch_size=args.batch_size,
        denoiser_lr=args.lr,
        text_lr_scale=args.text_lr_scale,
        threads=args.threads,
    )
    started = time.perf_counter()

    def report(stage: str, step: int, steps: int, loss: float) -> None:
        if step % args.every == 0 or step == steps - 1:
            print(f"{stage} {step + 1}/{steps} loss {loss:.4f} ({time.perf_counter() - started:.0f} s)", flush=True)

    train(config, args.out, report, vae_from=args.vae_from, checkpoint_every=args.checkpoint_every)


if __name__ == "__main__":
    main()
