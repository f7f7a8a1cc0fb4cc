"""SDXL: two CLIP text encoders side by side, pooled and size conditions, a VAE run in float32.

As ``StableDiffusionXLPipeline`` computes it:

* each prompt is tokenised by both tokenizers (the first pads with end-of-text, the second
  with its own pad token, "!" in SDXL); both encoders' second-to-last hidden states are
  joined feature-wise, so the 77 key positions cross-attention reads are shared: one map
  per word, whichever encoder a feature came from;
* the second encoder's projected end-of-text embedding is the pooled embedding;
* the size conditions ("micro-conditioning": original size, crop's top-left corner,
  target size) are added to the timestep embedding; by default the image's own size, no crop;
* an empty negative prompt is all zeros where the model asks for it
  (``force_zeros_for_empty_prompt``, SDXL base's setting);
* a float16 VAE that asks for it (``force_upcast``) decodes in float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..prompts import encode_text
from .base import Conditioning, Family, _guidance

if TYPE_CHECKING:
    from ..control import Branch
    from ..edits import Recipe

__all__ = ["StableDiffusionXL"]


class StableDiffusionXL(Family):
    """SDXL (``StableDiffusionXLPipeline``, fine-tunes, Turbo and Lightning models alike)."""

    name = "SDXL"
    pipeline = "StableDiffusionXLPipeline"
    parts = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
    default_guidance = 5.0  # the stock pipeline's
    default_scheduler = "pipeline"  # the model's own (Euler for the base model; trailing for Turbo/Lightning)
    upcast_vae = True

    @classmethod
    def recognises(cls, pipe: Any) -> bool:
        config = getattr(getattr(pipe, "unet", None), "config", None)
        return config is not None and getattr(config, "addition_embed_type", None) == "text_time"

    @property
    def text_width(self) -> int:
        return int(self.pipe.text_encoder.config.hidden_size + self.pipe.text_encoder_2.config.hidden_size)

    def check_recipe(self, recipe: Recipe) -> None:
        expected = self.pipe.unet.add_embedding.linear_1.in_features
        given = self.pipe.unet.config.addition_time_embed_dim * 6 + self.pipe.text_encoder_2.config.projection_dim
        if expected != given:
            raise ValueError(
                f"this SDXL UNet expects {expected} added-condition features, but two text encoders and six "
                f"size conditions give {given}; an SDXL refiner (aesthetic score conditioning) is not supported"
            )

    def _time_ids(self, recipe: Recipe, size: tuple[int, int], rows: int) -> torch.Tensor:
        original = tuple(recipe.original_size or size)
        target = tuple(recipe.target_size or size)
        ids = torch.tensor([[*original, *recipe.crop, *target]], dtype=self.pipe.text_encoder_2.dtype)
        return ids.to(self.device).repeat(rows, 1)

    def _encode_both(
        self, texts: Sequence[str], first_ids: Sequence[Sequence[int]], max_length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states joined feature-wise, pooled) for token ids of the first tokenizer
        and the texts (tokenised here by the second)."""
        second_ids = [self.token_ids(self.pipe.tokenizer_2, text, max_length)[0] for text in texts]
        hidden, pooled = [], None
        for encoder, ids in ((self.pipe.text_encoder, first_ids), (self.pipe.text_encoder_2, second_ids)):
            output = encoder(torch.tensor(ids, device=self.device), output_hidden_states=True)
            if output[0].ndim == 2:  # the projected end-of-text embedding (the second encoder's)
                pooled = output[0]
            hidden.append(output.hidden_states[-2])
        text = torch.cat(hidden, dim=-1).to(dtype=self.pipe.text_encoder_2.dtype, device=self.device)
        assert pooled is not None
        return text, pooled

    def encode(self, branches: Sequence[Branch], recipe: Recipe, size: tuple[int, int]) -> Conditioning:
        tokenizer_2 = self.pipe.tokenizer_2
        for branch in branches:
            second = len(encode_text(tokenizer_2, branch.prompt.text)[0])
            if second + 2 != branch.prompt.length:
                raise ValueError(
                    f"SDXL's two tokenizers split {branch.prompt.text!r} differently ({branch.prompt.length - 2} "
                    f"and {second} tokens), so its words would sit at different key positions for the two "
                    "encoders; rephrase it (this happens with tokenizers of fine-tunes that differ)"
                )
        text, pooled = self._encode_both(
            [b.prompt.text for b in branches], [b.prompt.ids for b in branches], branches[0].prompt.max_length
        )
        extra = {"time_ids": self._time_ids(recipe, size, len(branches))}
        extra.update(self.guidance_embedding(len(branches), _guidance(recipe)))
        return Conditioning(text, pooled, extra)

    def encode_negative(self, recipe: Recipe, size: tuple[int, int], max_length: int) -> Conditioning:
        extra = {"time_ids": self._time_ids(recipe, size, 1)}
        if not recipe.negative_prompt and getattr(self.pipe.config, "force_zeros_for_empty_prompt", False):
            dtype = self.pipe.text_encoder_2.dtype
            text = torch.zeros(1, max_length, self.text_width, device=self.device, dtype=dtype)
            pooled = torch.zeros(1, self.pipe.text_encoder_2.config.projection_dim, device=self.device, dtype=dtype)
            return Conditioning(text, pooled, extra)
        ids, _ = self.token_ids(self.tokenizer, recipe.negative_prompt, max_length)
        text, pooled = self._encode_both([recipe.negative_prompt], [ids], max_length)
        return Conditioning(text, pooled, extra)

    def denoise(self, x: torch.Tensor, t: torch.Tensor | int, conditioning: Conditioning) -> torch.Tensor:
        added = {"text_embeds": conditioning.pooled, "time_ids": conditioning.extra["time_ids"]}
        return self.pipe.unet(
            x,
            t,
            encoder_hidden_states=conditioning.text,
            timestep_cond=conditioning.extra.get("timestep_cond"),
            added_cond_kwargs=added,
            return_dict=False,
        )[0]
