"""Tiny, offline, randomly initialised Stable Diffusion components for demos and tests.

Nothing here touches the network: the tokenizer's vocabulary and merges are generated on
the fly and every model is built from a config with random (seeded) weights.  The images
such a pipeline makes are noise, but every code path of a real Stable Diffusion pipeline
(tokenizer, text encoder, cross-attention UNet, VAE, scheduler) runs, in tens of ms;
:func:`tiny_sdxl_pipeline` does the same for Stable Diffusion XL (two tokenizers and text
encoders, pooled and size conditioning, Euler scheduler); :func:`tiny_sd3_pipeline` and
:func:`tiny_flux_pipeline` for the MMDiT models, Stable Diffusion 3 and FLUX.1-dev (joint
text-image attention transformers, T5 encoders with :func:`tiny_t5_tokenizer`, flow matching).

>>> from p2p_widgets.testing import tiny_pipeline, tiny_sdxl_pipeline
>>> pipe = tiny_pipeline()
>>> image = pipe("a red cat", num_inference_steps=2).images[0]  # 32x32 PIL image
>>> image = tiny_sdxl_pipeline()("a red cat", num_inference_steps=2).images[0]  # 32x32 too
>>> from p2p_widgets.testing import tiny_flux_pipeline, tiny_sd3_pipeline
>>> image = tiny_sd3_pipeline()("a red cat", num_inference_steps=2).images[0]  # 32x32 too
>>> image = tiny_flux_pipeline()("a red cat", num_inference_steps=2).images[0]  # and 32x32
"""

from __future__ import annotations

from functools import lru_cache
from typing import TypeVar

import torch
import transformers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

from .tokenizer import EOS, word_tokenizer

__all__ = [
    "MULTI_TOKEN_WORDS",
    "TINY_WORDS",
    "tiny_flux_pipeline",
    "tiny_pipeline",
    "tiny_sd3_pipeline",
    "tiny_sdxl_pipeline",
    "tiny_t5_tokenizer",
    "tiny_tokenizer",
]

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


# ---------------------------------------------------------------------------- MMDiT: Stable Diffusion 3, FLUX.1

_SPACE = "\u2581"  # "▁": SentencePiece's mark of a piece that starts a word
_T5_SPECIAL = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2, as in T5


@lru_cache(maxsize=1)
def _t5_tokenizer_json() -> str:
    """The ``tokenizers`` Unigram tokenizer of :func:`tiny_t5_tokenizer`, serialised; checked once a process.

    T5's layout: ``<pad>``, ``</s>``, ``<unk>``, then the pieces, best score first (SentencePiece's order).
    A word's piece scores about -3 and a character -10, so one piece beats any two: each word of
    :data:`TINY_WORDS` is the piece ``"▁word"``, each of :data:`MULTI_TOKEN_WORDS` its CLIP pieces (the first
    with ``"▁"``), and any other word falls back to ``"▁"`` and single characters.
    """
    pieces = [_SPACE, *(_SPACE + w for w in TINY_WORDS)]
    for split in _MULTI_TOKEN_PIECES.values():
        pieces += [_SPACE + split[0], *split[1:]]
    vocab = [(t, 0.0) for t in _T5_SPECIAL]
    vocab += [(p, -3.0 - i / 1000) for i, p in enumerate(dict.fromkeys(pieces))]
    vocab += [(chr(c), -10.0 - i / 1000) for i, c in enumerate(range(ord("!"), ord("~") + 1))]
    tokenizer = Tokenizer(Unigram(vocab, unk_id=_T5_SPECIAL.index("<unk>"), byte_fallback=False))
    # As T5's SentencePiece model: normalise (NFKC here, a precompiled map there), drop spaces at either end and
    # keep one of a run, "▁" for each space and before the text (Metaspace), "</s>" after it.
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme="always", split=True)
    tokenizer.decoder = decoders.Metaspace(replacement=_SPACE, prepend_scheme="always", split=True)
    eos = ("</s>", _T5_SPECIAL.index("</s>"))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[eos]
    )
    want = {w: [_SPACE + w] for w in TINY_WORDS}
    want |= {w: [_SPACE + split[0], *split[1:]] for w, split in _MULTI_TOKEN_PIECES.items()}
    for word, tokens in want.items():
        if (got := tokenizer.encode(word, add_special_tokens=False).tokens) != tokens:
            raise AssertionError(f"the tiny T5 vocabulary splits {word!r} as {got}, not {tokens}")
    return tokenizer.to_str()


def tiny_t5_tokenizer(max_length: int = 512) -> PreTrainedTokenizerFast:
    """A fresh, real ``T5TokenizerFast`` over a generated ~170-piece Unigram vocabulary, built in-process.

    A miniature of T5 v1.1's SentencePiece tokenizer (SD3's ``tokenizer_3``, Flux's ``tokenizer_2``): pieces
    that start a word carry ``"▁"``; each word of :data:`TINY_WORDS` is one piece (``"▁cat"``), each word of
    :data:`MULTI_TOKEN_WORDS` the same pieces as in :func:`tiny_tokenizer` (``"▁bicy"``, ``"cle"``). Other words
    split into ``"▁"`` and characters; printable ASCII is covered and any other character is ``<unk>``, as
    T5's are outside its vocabulary. Case is kept (as T5; CLIP lower-cases). No bos; ``</s>`` (id 1) ends the
    text; it pads with ``<pad>`` (id 0), on the right; ``model_max_length = max_length`` (T5's 512 by default:
    the pipelines pad and truncate to their own ``max_sequence_length``, 256 in SD3 and 512 in Flux). No
    ``<extra_id_*>`` sentinels (``extra_ids=0``): the pipelines never use them. Offsets and ``word_ids()``
    work (it is a fast tokenizer); a piece's offsets include the space before it.
    """
    # The tokenizers-backed class: transformers 5 calls it T5Tokenizer and keeps this name as a run-time alias
    # that its type declarations leave out; in transformers 4, T5Tokenizer is the SentencePiece one.
    t5_tokenizer_fast = transformers.T5TokenizerFast  # type: ignore[attr-defined]
    tokenizer: PreTrainedTokenizerFast = t5_tokenizer_fast(
        tokenizer_object=Tokenizer.from_str(_t5_tokenizer_json()),
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=0,
        model_max_length=max_length,
    )
    return tokenizer


def _clip_config(tokenizer: CLIPTokenizer, hidden: int, intermediate: int, act: str, projection: int) -> CLIPTextConfig:
    """A 2-layer, 4-head CLIP text config over ``tokenizer``'s vocabulary, 77 positions."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=projection,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


#: d_model of the tiny T5 encoder: the MMDiTs' ``joint_attention_dim``.
_T5_WIDTH = 96


def _t5_encoder(tokenizer: PreTrainedTokenizerFast) -> T5EncoderModel:
    """A miniature of T5 v1.1 XXL's encoder, which SD3 and FLUX.1 share.

    d_model 96 (XXL: 4096), 4 heads of 16 (64 of 64), gated-GELU feed-forward 112 wide (10240), 2 layers (24);
    32 relative-position buckets up to distance 128, as XXL. Call it under a seeded RNG.
    """
    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=_T5_WIDTH,
            d_kv=16,
            d_ff=112,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
            feed_forward_proj="gated-gelu",
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )


def _vae16(sample_size: int, scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    """A factor-2 VAE with SD3's and FLUX.1's 16 latent channels, no quant convs; under a seeded RNG.

    Decoding takes ``latents / scaling_factor + shift_factor``, as both pipelines do.
    """
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=16,
        norm_num_groups=32,
        sample_size=sample_size * 2,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _check_even(sample_size: int) -> None:
    if isinstance(sample_size, bool) or not isinstance(sample_size, int) or sample_size < 2 or sample_size % 2:
        raise ValueError(f"sample_size (the latent side) must be an even int >= 2, not {sample_size!r}")


def tiny_sd3_pipeline(
    *,
    seed: int = 0,
    sample_size: int = 16,
    dtype: torch.dtype = torch.float32,
) -> StableDiffusion3Pipeline:
    """A ``StableDiffusion3Pipeline`` with tiny random weights, seeded by ``seed``.

    A miniature of Stable Diffusion 3 medium, part for part (SD 3.5 medium adds ``dual_attention_layers``
    and ``qk_norm``, which diffusers 0.30 lacks, so they are left out):

    - ``tokenizer`` pads with ``<|endoftext|>`` (CLIP ViT-L), ``tokenizer_2`` with ``"!"`` (OpenCLIP bigG),
      as in SDXL; ``tokenizer_3`` is :func:`tiny_t5_tokenizer`.
    - ``text_encoder``: ``CLIPTextModelWithProjection``, hidden 32, quick_gelu, projection 24;
      ``text_encoder_2``: the same class, hidden 48, gelu, projection 44; 2 layers each. The pipeline takes
      each one's penultimate hidden states (32 + 48 = 80 wide, zero-padded to T5's 96) and ``text_embeds``
      (pooled, 24 + 44 = 68 = ``pooled_projection_dim``). ``text_encoder_3``: the tiny T5 encoder, d_model 96
      = ``joint_attention_dim``. The text sequence is 77 CLIP tokens then ``max_sequence_length`` T5 tokens
      (256 by default): 333.
    - Transformer: ``SD3Transformer2DModel``, patch 2 over 16 latent channels, 3 joint blocks (SD3 medium: 24;
      the last is ``context_pre_only``, as there), 4 heads of 18 (24 of 64), so the inner and caption
      projection width is 72; ``pos_embed_max_size`` 1.5 ``sample_size`` patches (3x the default grid, as
      SD3's 192 for 64). Joint attention is ``JointAttnProcessor2_0``: one softmax over [image, text] tokens.
    - VAE: 16 latent channels, factor 2 (images are ``2 * sample_size`` pixels a side, which must be a
      multiple of 4 = factor x patch), ``scaling_factor`` 1.5305 and ``shift_factor`` 0.0609 (SD3's), no
      quant convs.
    - ``FlowMatchEulerDiscreteScheduler`` with SD3's config: 1000 train steps, ``shift`` 3.0.

    Every width differs (32, 48, 24, 44, 68, 80, 96, 72), so a mixed-up tensor fails by its shape.
    The global torch RNG state is left untouched.
    """
    _check_even(sample_size)
    tokenizer = tiny_tokenizer()
    tokenizer_2 = tiny_tokenizer(pad_token="!")
    tokenizer_3 = tiny_t5_tokenizer()
    hidden, hidden_2, projection, projection_2, heads, head_dim = 32, 48, 24, 44, 4, 18
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModelWithProjection(_clip_config(tokenizer, hidden, 37, "quick_gelu", projection))
        text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer_2, hidden_2, 53, "gelu", projection_2))
        text_encoder_3 = _t5_encoder(tokenizer_3)
        transformer = SD3Transformer2DModel(
            sample_size=sample_size,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=3,
            attention_head_dim=head_dim,
            num_attention_heads=heads,
            joint_attention_dim=_T5_WIDTH,
            caption_projection_dim=heads * head_dim,
            pooled_projection_dim=projection + projection_2,
            pos_embed_max_size=3 * sample_size // 2,
        )
        vae = _vae16(sample_size, scaling_factor=1.5305, shift_factor=0.0609)
    pipe = StableDiffusion3Pipeline(
        transformer=_prepare(transformer, dtype),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_prepare(vae, dtype),
        text_encoder=_prepare(text_encoder, dtype),
        tokenizer=tokenizer,
        text_encoder_2=_prepare(text_encoder_2, dtype),
        tokenizer_2=tokenizer_2,
        text_encoder_3=_prepare(text_encoder_3, dtype),
        tokenizer_3=tokenizer_3,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipeline(
    *,
    seed: int = 0,
    sample_size: int = 16,
    dtype: torch.dtype = torch.float32,
) -> FluxPipeline:
    """A ``FluxPipeline`` with tiny random weights, seeded by ``seed``.

    A miniature of FLUX.1-dev, part for part:

    - ``tokenizer``: CLIP ViT-L's layout, padding with ``<|endoftext|>``; ``tokenizer_2``: :func:`tiny_t5_tokenizer`.
    - ``text_encoder``: ``CLIPTextModel``, hidden 32, quick_gelu, 2 layers; only its pooled output is used
      (``pooled_projection_dim`` 32). ``text_encoder_2``: the tiny T5 encoder, d_model 96 =
      ``joint_attention_dim``; the text sequence is the ``max_sequence_length`` T5 tokens (512 by default).
    - Transformer: ``FluxTransformer2DModel``, 2 double-stream blocks (``num_layers``; dev: 19) and 4
      single-stream blocks (``num_single_layers``; dev: 38), 4 heads of 20 (24 of 128), so 80 wide, RoPE axes
      (4, 8, 8) summing to the head width (dev: 16, 56, 56); ``guidance_embeds`` as dev (guidance-distilled:
      ``guidance_scale`` is an input, there is no classifier-free batch). Its input is the 16-channel latent
      packed into 2x2 patches: 64 channels, ``(sample_size / 2) ** 2`` tokens. Joint attention runs over
      [text, image] tokens, RoPE applied to queries and keys of both (text positions are all zero).
    - VAE: 16 latent channels, factor 2, so images are ``2 * sample_size`` pixels a side and must be a
      multiple of 4 (factor x packing); ``scaling_factor`` 0.3611 and ``shift_factor`` 0.1159 (FLUX.1's), no
      quant convs.
    - ``FlowMatchEulerDiscreteScheduler`` with FLUX.1-dev's config: dynamic shifting, ``base_shift`` 0.5,
      ``max_shift`` 1.15 over 256 to 4096 image tokens (``shift`` 3.0 is unused). The tiny images have fewer
      tokens than 256, so the pipeline's ``mu`` extrapolates below 0.5 (0.47 at 64 tokens).

    The pipeline's default size is ``2 * sample_size`` pixels (FluxPipeline's is 1024, whatever the model).
    Every width differs (32, 96, 80, 64), so a mixed-up tensor fails by its shape.
    The global torch RNG state is left untouched.
    """
    _check_even(sample_size)
    tokenizer = tiny_tokenizer()
    tokenizer_2 = tiny_t5_tokenizer()
    hidden, heads, head_dim = 32, 4, 20
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(_clip_config(tokenizer, hidden, 37, "quick_gelu", hidden))
        text_encoder_2 = _t5_encoder(tokenizer_2)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=16 * 2 * 2,
            num_layers=2,
            num_single_layers=4,
            attention_head_dim=head_dim,
            num_attention_heads=heads,
            joint_attention_dim=_T5_WIDTH,
            pooled_projection_dim=hidden,
            guidance_embeds=True,
            axes_dims_rope=(4, 8, 8),
        )
        vae = _vae16(sample_size, scaling_factor=0.3611, shift_factor=0.1159)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=_prepare(vae, dtype),
        text_encoder=_prepare(text_encoder, dtype),
        tokenizer=tokenizer,
        text_encoder_2=_prepare(text_encoder_2, dtype),
        tokenizer_2=tokenizer_2,
        transformer=_prepare(transformer, dtype),
    )
    # FluxPipeline's default height is default_sample_size * vae_scale_factor, hard-coded to 1024 pixels; its
    # vae_scale_factor counts the 2x2 packing in diffusers 0.30 (4 here) and not since (2 here).
    pipe.default_sample_size = 2 * sample_size // pipe.vae_scale_factor
    pipe.set_progress_bar_config(disable=True)
    return pipe
