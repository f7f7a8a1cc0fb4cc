"""The shapes model's architecture: a real, small Stable Diffusion pipeline.

Every component is the diffusers / transformers class that Stable Diffusion uses, so the
trained model loads with ``StableDiffusionPipeline.from_pretrained`` like any hub model and
runs through the same editing code:

* tokenizer: ``CLIPTokenizer`` in which each word of the shapes grammar is one token;
* text encoder: ``CLIPTextModel`` (trained with the UNet);
* VAE: ``AutoencoderKL`` with a downsampling factor of 4 (64 px images, 16x16 latents);
* UNet: ``UNet2DConditionModel`` with cross-attention at the 16x16 and 8x8 levels;
* scheduler: DDIM with Stable Diffusion's betas (0.00085 .. 0.012, scaled linear).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from ..tokenizer import word_tokenizer
from .data import vocabulary

__all__ = ["ModelConfig", "build_pipeline", "scheduler_config"]


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the shapes model (defaults: the bundled model).

    ``vae_channels`` has one entry per VAE level (factor ``2 ** (levels - 1)``);
    ``unet_channels`` one per UNet level; the first ``cross_levels`` levels and the mid
    block have cross-attention, deeper levels none (as Stable Diffusion's deepest level).
    ``heads``: attention heads, one count for every level or one per level (the mid block
    takes the last). Two heads of 16 channels at the 16x16 level train 1.46x faster on a
    CPU than four of 8 (the attention kernel's cost is per head, not per channel).
    """

    image_size: int = 64
    vae_channels: tuple[int, ...] = (16, 32, 64)
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (32, 64, 128)
    cross_levels: int = 2
    heads: int | tuple[int, ...] = (2, 2, 4)
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    max_length: int = 32

    def __post_init__(self) -> None:
        if self.image_size % 2 ** (len(self.vae_channels) - 1):
            raise ValueError(f"image_size {self.image_size} must be a multiple of the VAE factor")
        if not 1 <= self.cross_levels <= len(self.unet_channels):
            raise ValueError(f"cross_levels must be between 1 and {len(self.unet_channels)}")
        heads = self.level_heads
        if len(heads) != len(self.unet_channels):
            raise ValueError(
                f"heads has {len(heads)} entries for {len(self.unet_channels)} UNet levels; "
                "give one per level or one int"
            )
        for channels, count in zip(self.unet_channels, heads):
            if count < 1 or channels % count:
                raise ValueError(f"{count} heads do not divide a level of {channels} channels")

    @property
    def level_heads(self) -> tuple[int, ...]:
        """The number of attention heads at each UNet level."""
        return (self.heads,) * len(self.unet_channels) if isinstance(self.heads, int) else tuple(self.heads)

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_channels) - 1)

    def to_dict(self) -> dict:
        return asdict(self)


def scheduler_config() -> dict:
    """Stable Diffusion's noise schedule (as in the official Prompt-to-Prompt notebooks)."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def _groups(channels: tuple[int, ...]) -> int:
    """The largest group count (<= 32) dividing every channel count, for GroupNorm."""
    return max(g for g in (32, 16, 8, 4, 2, 1) if all(c % g == 0 for c in channels))


def build_pipeline(config: ModelConfig = ModelConfig(), seed: int = 0) -> StableDiffusionPipeline:
    """An untrained shapes pipeline with seeded random weights (global RNG untouched)."""
    tokenizer = word_tokenizer(vocabulary(), max_length=config.max_length)
    levels = len(config.unet_channels)
    cross = config.cross_levels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=config.text_width,
                intermediate_size=4 * config.text_width,
                num_hidden_layers=config.text_layers,
                num_attention_heads=config.text_heads,
                max_position_embeddings=config.max_length,
                hidden_act="quick_gelu",
                projection_dim=config.text_width,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        unet = UNet2DConditionModel(
            sample_size=config.latent_size,
            in_channels=config.latent_channels,
            out_channels=config.latent_channels,
            block_out_channels=config.unet_channels,
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D",) * cross + ("DownBlock2D",) * (levels - cross),
            up_block_types=("UpBlock2D",) * (levels - cross) + ("CrossAttnUpBlock2D",) * cross,
            mid_block_type="UNetMidBlock2DCrossAttn",
            cross_attention_dim=config.text_width,
            attention_head_dim=config.level_heads,  # diffusers reads this as the number of heads
            norm_num_groups=_groups(config.unet_channels),
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=config.vae_channels,
            down_block_types=("DownEncoderBlock2D",) * len(config.vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(config.vae_channels),
            latent_channels=config.latent_channels,
            layers_per_block=1,
            norm_num_groups=_groups(config.vae_channels),
            sample_size=config.image_size,
            mid_block_add_attention=False,  # 10x cheaper to train on a CPU, not needed here
        )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**scheduler_config()),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
