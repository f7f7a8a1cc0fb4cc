"""Tiny, offline, randomly initialised Stable Diffusion components for demos and tests.

Nothing here touches the network: the tokenizer's vocabulary and merges are generated on
the fly and every model is built from a config with random (seeded) weights.  The images
such a pipeline makes are noise, but every code path of a real Stable Diffusion pipeline
(tokenizer, text encoder, cross-attention UNet, VAE, scheduler) runs, in tens of ms;
:func:`tiny_sdxl_pipeline` does the same for Stable Diffusion XL (two tokenizers and text
encoders, pooled and size conditioning, Euler scheduler).

>>> from p2p_widgets.testing import tiny_pipeline, tiny_sdxl_pipeline
>>> pipe = tiny_pipeline()
>>> image = pipe("a red cat", num_inference_steps=2).images[0]  # 32x32 PIL image
>>> image = tiny_sdxl_pipeline()("a red cat", num_inference_steps=2).images[0]  # 32x32 too
"""

from __future__ import annotations

from typing import TypeVar

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .tokenizer import EOS, word_tokenizer

__all__ = ["MULTI_TOKEN_WORDS", "TINY_WORDS", "tiny_pipeline", "tiny_sdxl_pipeline", "tiny_tokenizer"]

_M = TypeVar("_M", bound=torch.nn.Module)

#: Everyday prompt words that the tiny tokenizer encodes as exactly one token (``word</w>``).
TINY_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "on", "in", "at", "and", "with", "photo",
    "painting", "drawing", "cat", "dog", "tiger", "lion", "bird", "horse", "car", "tree",
    "house", "riding", "red", "blue", "green", "yellow", "black", "white", "big", "small",
    "circle", "square", "triangle", "star", "heart", "striped", "dotted", "background", "sitting", "table",
    "fluffy", "sunny", "snowy", "street", "forest", "beach", "cake", "apple", "pizza", "man",
    "woman", "boy", "girl", "hat", "flowers", "castle", "mountain", "river", "night", "day",
    "old", "new", "wooden", "glass", "basket", "bowl",
)  # fmt: skip

# Words deliberately split into several tokens; the last piece carries the ``</w>`` suffix.
_MULTI_TOKEN_PIECES: dict[str, tuple[str, ...]] = {
    "bicycle": ("bicy", "cle"),
    "motorcycle": ("motor", "cy", "cle"),
    "butterfly": ("butter", "fly"),
    "elephant": ("ele", "phant"),
}

#: Words that the tiny tokenizer splits into several tokens: word -> number of tokens.
MULTI_TOKEN_WORDS: dict[str, int] = {w: len(p) for w, p in _MULTI_TOKEN_PIECES.items()}


def tiny_tokenizer(max_length: int = 77, *, pad_token: str = EOS) -> CLIPTokenizer:
    """A fresh, real ``CLIPTokenizer`` over a generated ~750-token byte-level BPE vocabulary.

    Any text tokenizes without unknown tokens; each word of :data:`TINY_WORDS` is one token,
    each word of :data:`MULTI_TOKEN_WORDS` the stated number.  bos = ``<|startoftext|>``,
    eos = ``<|endoftext|>`` (the last two ids), ``model_max_length = max_length``.  It pads
    with ``pad_token``: eos by default, as CLIP ViT-L; ``"!"`` (id 0) as SDXL's second tokenizer.
    """
    return word_tokenizer(TINY_WORDS, _MULTI_TOKEN_PIECES, max_length, pad_token=pad_token)


def _prepare(module: _M, dtype: torch.dtype) -> _M:
    """Put ``module`` in eval mode (as ``from_pretrained`` does) and cast it to ``dtype``.

    The cast uses ``torch.nn.Module.to`` directly: diffusers' ``ModelMixin.to(dtype)`` logs a spurious
    "modules ... should be kept in float32: []" warning even when there are none.
    """
    if next(module.parameters()).dtype != dtype:
        torch.nn.Module.to(module, dtype=dtype)
    return module.eval()


def tiny_pipeline(
    kind: str = "sd1",
    *,
    seed: int = 0,
    sample_size: int = 16,
    dtype: torch.dtype = torch.float32,
) -> StableDiffusionPipeline:
    """A ``StableDiffusionPipeline`` with tiny random weights, seeded by ``seed``.

    ``kind="sd1"``: SD 1.x layout (epsilon prediction, conv proj_in/out, 8 heads per block).
    ``kind="sd2"``: SD 2.x layout (v-prediction, linear proj_in/out, 2/4 heads per block).
    Both have cross-attention at two resolutions plus the mid block, ``sample_size`` is the
    latent side and the VAE factor is 2, so images are ``2 * sample_size`` pixels a side.
    The global torch RNG state is left untouched; there is no safety checker.
    """
    if kind not in ("sd1", "sd2"):
        raise ValueError(f"kind must be 'sd1' or 'sd2', not {kind!r}")
    sd2 = kind == "sd2"
    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                hidden_act="gelu" if sd2 else "quick_gelu",
                projection_dim=32,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        unet = UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            mid_block_type="UNetMidBlock2DCrossAttn",
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            # diffusers reads `attention_head_dim` as the number of heads (diffusers#2011).
            attention_head_dim=(2, 4) if sd2 else 8,
            use_linear_projection=sd2,
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            norm_num_groups=32,
            sample_size=sample_size * 2,
        )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction" if sd2 else "epsilon",
    )
    pipe = StableDiffusionPipeline(
        vae=_prepare(vae, dtype),
        text_encoder=_prepare(text_encoder, dtype),
        tokenizer=tokenizer,
        unet=_prepare(unet, dtype),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(
    *,
    seed: int = 0,
    sample_size: int = 16,
    dtype: torch.dtype = torch.float32,
) -> StableDiffusionXLPipeline:
    """A ``StableDiffusionXLPipeline`` with tiny random weights, seeded by ``seed``.

    A miniature of SDXL base 1.0, part for part:

    - ``tokenizer`` pads with ``<|endoftext|>`` (CLIP ViT-L), ``tokenizer_2`` with ``"!"``, id 0
      (OpenCLIP bigG); one vocabulary, so real tokens get the same ids at the same positions.
    - ``text_encoder``: ``CLIPTextModel``, hidden 32, quick_gelu; ``text_encoder_2``:
      ``CLIPTextModelWithProjection``, hidden 48, gelu, pooled projection 24; 2 layers each
      (SDXL reads the penultimate hidden states), so ``cross_attention_dim`` is 32 + 48 = 80.
    - UNet: ``DownBlock2D`` then two ``CrossAttnDownBlock2D`` (channels 32, 32, 64; 2 resnets
      each), the mid block, mirrored up blocks ending in ``UpBlock2D``; transformer depth
      (1, 2, 3) as SDXL's (1, 2, 10), so cross-attention sits at latent/2 (2 layers per
      transformer) and latent/4 (3 layers, as the mid block), 16 channels per head, linear
      proj_in/out; ``text_time`` conditioning with time embeddings of 8 channels, so the
      added embedding takes 6 * 8 + 24 = 72.
    - VAE: factor 2 (images are ``2 * sample_size`` pixels a side), ``scaling_factor`` 0.13025,
      ``force_upcast`` (float16 decodes in float32); no ``latents_mean``/``latents_std``.
    - ``EulerDiscreteScheduler`` with SDXL base's config (scaled_linear 0.00085-0.012,
      "leading" spacing, steps_offset 1, epsilon prediction).

    Empty negative prompts are zeros (``force_zeros_for_empty_prompt``), as in SDXL base;
    there is no watermarker.  The global torch RNG state is left untouched.
    """
    tokenizer = tiny_tokenizer()
    tokenizer_2 = tiny_tokenizer(pad_token="!")
    # Widths all different, so a mixed-up embedding fails by its shape.
    hidden, hidden_2, pooled, time_embed_dim = 32, 48, 24, 8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=hidden,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                hidden_act="quick_gelu",
                projection_dim=32,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        text_encoder_2 = CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=len(tokenizer_2),
                hidden_size=hidden_2,
                intermediate_size=53,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                hidden_act="gelu",
                projection_dim=pooled,
                bos_token_id=tokenizer_2.bos_token_id,
                eos_token_id=tokenizer_2.eos_token_id,
                pad_token_id=tokenizer_2.pad_token_id,
            )
        )
        unet = UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 32, 64),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            mid_block_type="UNetMidBlock2DCrossAttn",
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 3),
            # diffusers reads `attention_head_dim` as the number of heads (diffusers#2011).
            attention_head_dim=(2, 2, 4),
            cross_attention_dim=hidden + hidden_2,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_embed_dim,
            # SDXL's six size numbers: original (h, w), crop top-left (y, x), target (h, w).
            projection_class_embeddings_input_dim=6 * time_embed_dim + pooled,
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            norm_num_groups=32,
            sample_size=sample_size * 2,
            scaling_factor=0.13025,
            force_upcast=True,
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
        vae=_prepare(vae, dtype),
        text_encoder=_prepare(text_encoder, dtype),
        text_encoder_2=_prepare(text_encoder_2, dtype),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=_prepare(unet, dtype),
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
