"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, a cross-attention UNet, a VAE.

Epsilon and v-prediction alike; the UNet reads the encoder's last hidden states.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from .base import Conditioning, Family, _guidance

if TYPE_CHECKING:
    from ..control import Branch
    from ..edits import Recipe

__all__ = ["StableDiffusion"]


class StableDiffusion(Family):
    """Stable Diffusion 1.x / 2.x (``StableDiffusionPipeline`` and pipelines with its parts)."""

    name = "Stable Diffusion 1.x/2.x"
    pipeline = "StableDiffusionPipeline"
    parts = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    default_guidance = 7.5
    default_scheduler = "DDIMScheduler"  # the paper's (the official notebooks' DDIM settings)

    @classmethod
    def recognises(cls, pipe: Any) -> bool:
        unet = getattr(pipe, "unet", None)
        config = getattr(unet, "config", None)
        return (
            config is not None
            and getattr(pipe, "text_encoder_2", None) is None
            and getattr(config, "addition_embed_type", None) is None
        )

    def check_recipe(self, recipe: Recipe) -> None:
        given = [name for name in ("original_size", "target_size") if getattr(recipe, name) is not None]
        if tuple(recipe.crop) != (0, 0):
            given.append("crop")
        if given:
            raise ValueError(
                f"{', '.join(given)} condition SDXL models only; this is a {self.name} pipeline: "
                "leave them unset (None, and crop (0, 0))"
            )

    def _hidden_states(self, ids: Sequence[Sequence[int]], lengths: Sequence[int]) -> torch.Tensor:
        """The text encoder's last hidden states of padded ids, as the stock pipeline computes
        them (with an attention mask when the encoder is configured to use one)."""
        encoder = self.pipe.text_encoder
        device = self.device
        tokens = torch.tensor(ids, device=device)
        mask = None
        if getattr(encoder.config, "use_attention_mask", False):
            positions = torch.arange(tokens.shape[1], device=device)
            mask = (positions[None, :] < torch.tensor(lengths, device=device)[:, None]).long()
        hidden = encoder(tokens, attention_mask=mask)[0]
        return hidden.to(dtype=encoder.dtype, device=device)

    def encode(self, branches: Sequence[Branch], recipe: Recipe, size: tuple[int, int]) -> Conditioning:
        text = self._hidden_states([b.prompt.ids for b in branches], [b.prompt.length for b in branches])
        return Conditioning(text, None, self.guidance_embedding(len(branches), _guidance(recipe)))

    def encode_negative(self, recipe: Recipe, size: tuple[int, int], max_length: int) -> Conditioning:
        ids, length = self.token_ids(self.tokenizer, recipe.negative_prompt, max_length)
        return Conditioning(self._hidden_states([ids], [length]), None, self.guidance_embedding(1, _guidance(recipe)))

    def denoise(self, x: torch.Tensor, t: torch.Tensor | int, conditioning: Conditioning) -> torch.Tensor:
        return self.pipe.unet(
            x,
            t,
            encoder_hidden_states=conditioning.text,
            timestep_cond=conditioning.extra.get("timestep_cond"),
            return_dict=False,
        )[0]
