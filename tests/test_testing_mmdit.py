"""Tests for the tiny MMDiT pipelines (Stable Diffusion 3, FLUX.1-dev) and the offline T5 tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from p2p_widgets.testing import (
    MULTI_TOKEN_WORDS,
    TINY_WORDS,
    tiny_flux_pipeline,
    tiny_sd3_pipeline,
    tiny_t5_tokenizer,
    tiny_tokenizer,
)

SPACE = "\u2581"  # SentencePiece's word-start mark


@pytest.fixture(scope="module")
def sd3():
    return tiny_sd3_pipeline()


@pytest.fixture(scope="module")
def flux():
    return tiny_flux_pipeline()


@pytest.fixture(scope="module")
def t5():
    return tiny_t5_tokenizer()


def _images(pipe, **kwargs) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(0)
    return pipe("a red cat", num_inference_steps=2, generator=generator, output_type="np", **kwargs).images


def _processors(model: torch.nn.Module) -> list[str]:
    """The class names of a model's attention processors (diffusers 0.30's Flux has no ``attn_processors``)."""
    return [type(m.processor).__name__ for m in model.modules() if hasattr(m, "set_processor")]


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": value
        for name, module in pipe.components.items()
        if isinstance(module, torch.nn.Module)
        for key, value in module.state_dict().items()
    }


# ---------------------------------------------------------------------------- T5 tokenizer


def test_t5_tokenizer_is_a_real_fast_t5_tokenizer(t5):
    assert isinstance(t5, T5TokenizerFast) and t5.is_fast
    assert t5.model_max_length == 512
    assert tiny_t5_tokenizer(max_length=32).model_max_length == 32
    # T5's special ids: pad 0, eos 1, unk 2; no bos, no sentinels
    assert (t5.pad_token, t5.eos_token, t5.unk_token) == ("<pad>", "</s>", "<unk>")
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)
    assert t5.bos_token is None
    assert not any("extra_id" in t for t in t5.get_vocab())


def test_t5_tiny_words_are_one_piece(t5):
    assert [t5.tokenize(w) for w in TINY_WORDS] == [[SPACE + w] for w in TINY_WORDS]
    ids = t5(" ".join(TINY_WORDS)).input_ids
    assert t5.convert_ids_to_tokens(ids) == [SPACE + w for w in TINY_WORDS] + ["</s>"]


def test_t5_multi_token_words_split_as_clip(t5):
    clip = tiny_tokenizer()
    for word, count in MULTI_TOKEN_WORDS.items():
        pieces = t5.tokenize(word)
        assert len(pieces) == count > 1
        assert pieces[0].startswith(SPACE) and not any(SPACE in p for p in pieces[1:])
        assert [p.lstrip(SPACE) for p in pieces] == [p.removesuffix("</w>") for p in clip.tokenize(word)]


def test_t5_other_text_case_and_unknown_characters(t5):
    assert t5.tokenize("Cat") == [SPACE, "C", "a", "t"]  # case is kept, as in T5 (CLIP lower-cases)
    assert t5.tokenize("zebra 42!") == [SPACE, *"zebra", SPACE, "4", "2", "!"]
    assert t5.tokenize("  a  cat ") == [SPACE + "a", SPACE + "cat"]  # spaces at the ends dropped, runs as one
    assert [(s, e) for s, e in t5("  a  cat ", return_offsets_mapping=True).offset_mapping] == [(2, 3), (4, 8), (0, 0)]
    ids = t5("naïve ☃").input_ids
    assert t5.unk_token_id in ids  # characters outside the vocabulary are <unk>, as in T5
    assert t5.decode(t5("a red cat, a dog").input_ids, skip_special_tokens=True) == "a red cat, a dog"


def test_t5_eos_and_padding_to_model_max_length(t5):
    enc = t5("a cat", padding="max_length")
    cat = t5.convert_tokens_to_ids([SPACE + "a", SPACE + "cat"])
    assert len(enc.input_ids) == t5.model_max_length == 512
    assert enc.input_ids[:3] == [*cat, t5.eos_token_id]
    assert enc.input_ids[3:] == [t5.pad_token_id] * 509
    assert enc.attention_mask == [1] * 3 + [0] * 509
    # As the pipelines call it: padded and truncated to max_sequence_length, eos kept last
    long = t5(["cat " * 300], padding="max_length", max_length=256, truncation=True, return_tensors="pt")
    assert long.input_ids.shape == (1, 256) and long.input_ids[0, -1] == t5.eos_token_id


def test_clip_and_t5_tokens_map_back_to_words(t5):
    text = "a cat riding a bicycle"
    words = text.split()
    # CLIP: bos, then pieces; a word ends at a piece with "</w>" (no offsets from transformers 4's CLIPTokenizer)
    clip = tiny_tokenizer()
    ids = clip(text).input_ids
    tokens = clip.convert_ids_to_tokens(ids)
    assert (ids[0], ids[-1]) == (clip.bos_token_id, clip.eos_token_id)
    assert tokens[1:-1] == ["a</w>", "cat</w>", "riding</w>", "a</w>", "bicy", "cle</w>"]
    assert "".join(tokens[1:-1]).split("</w>")[:-1] == words
    # T5: no bos, pieces, eos; a word starts at a piece with "▁"; it is a fast tokenizer: word ids and offsets
    enc = t5(text, return_offsets_mapping=True)
    tokens = t5.convert_ids_to_tokens(enc.input_ids)
    assert tokens == [SPACE + "a", SPACE + "cat", SPACE + "riding", SPACE + "a", SPACE + "bicy", "cle", "</s>"]
    assert "".join(tokens[:-1]).split(SPACE)[1:] == words
    assert enc.word_ids() == [0, 1, 2, 3, 4, 4, None]
    # A piece's span includes the space before it; eos has none
    assert [text[s:e] for s, e in enc.offset_mapping] == ["a", " cat", " riding", " a", " bicy", "cle", ""]


# ---------------------------------------------------------------------------- Stable Diffusion 3


def test_sd3_parts(sd3):
    assert type(sd3) is StableDiffusion3Pipeline
    assert type(sd3.transformer) is SD3Transformer2DModel and type(sd3.vae) is AutoencoderKL
    assert type(sd3.text_encoder) is type(sd3.text_encoder_2) is CLIPTextModelWithProjection
    assert type(sd3.text_encoder_3) is T5EncoderModel and isinstance(sd3.tokenizer_3, T5TokenizerFast)
    assert type(sd3.tokenizer) is type(sd3.tokenizer_2) is CLIPTokenizer
    assert (sd3.tokenizer.pad_token, sd3.tokenizer_2.pad_token) == ("<|endoftext|>", "!")
    assert type(sd3.scheduler) is FlowMatchEulerDiscreteScheduler
    assert (sd3.scheduler.config.shift, sd3.scheduler.config.use_dynamic_shifting) == (3.0, False)
    t = sd3.transformer.config
    te, te_2, te_3 = sd3.text_encoder.config, sd3.text_encoder_2.config, sd3.text_encoder_3.config
    assert (t.patch_size, t.in_channels, t.out_channels, t.num_layers) == (2, 16, 16, 3)
    assert t.pooled_projection_dim == te.projection_dim + te_2.projection_dim
    assert t.joint_attention_dim == te_3.d_model >= te.hidden_size + te_2.hidden_size
    assert t.caption_projection_dim == t.num_attention_heads * t.attention_head_dim
    widths = [te.hidden_size, te_2.hidden_size, te.projection_dim, te_2.projection_dim, te_3.d_model]
    widths += [t.pooled_projection_dim, te.hidden_size + te_2.hidden_size, t.caption_projection_dim]
    assert len(set(widths)) == len(widths)
    v = sd3.vae.config
    assert (v.latent_channels, v.scaling_factor, v.shift_factor, sd3.vae_scale_factor) == (16, 1.5305, 0.0609, 2)
    assert _processors(sd3.transformer) == ["JointAttnProcessor2_0"] * 3


def test_sd3_makes_finite_images_of_the_requested_size(sd3):
    images = _images(sd3, height=32, width=48)
    assert images.shape == (1, 32, 48, 3) and np.isfinite(images).all()
    assert images.std() > 0
    np.testing.assert_array_equal(images, _images(sd3, height=32, width=48))
    assert _images(sd3).shape == (1, 32, 32, 3)  # the default: 2 * sample_size


def test_sd3_prompt_embeddings_are_clip_then_t5(sd3):
    embeds, negative, pooled, negative_pooled = sd3.encode_prompt("a red cat", None, None, max_sequence_length=16)
    assert embeds.shape == negative.shape == (1, 77 + 16, 96)
    assert pooled.shape == negative_pooled.shape == (1, 24 + 44)
    assert torch.all(embeds[:, :77, 32 + 48 :] == 0)  # the CLIP part is zero-padded to T5's width
    assert sd3.encode_prompt("a red cat", None, None)[0].shape == (1, 77 + 256, 96)  # max_sequence_length 256


def test_sd3_seed_weights_and_global_rng():
    state = torch.get_rng_state()
    a, b, c = _weights(tiny_sd3_pipeline()), _weights(tiny_sd3_pipeline(seed=0)), _weights(tiny_sd3_pipeline(seed=1))
    assert torch.equal(torch.get_rng_state(), state)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        random = [k for k in a if k.startswith(name + ".") and a[k].dtype.is_floating_point and a[k].std() > 0]
        assert random and any(not torch.equal(a[k], c[k]) for k in random), name


def test_sd3_sample_size_and_dtype():
    pipe = tiny_sd3_pipeline(sample_size=8, dtype=torch.bfloat16)
    assert pipe.transformer.config.sample_size == 8 and pipe.default_sample_size == 8
    assert pipe.transformer.config.pos_embed_max_size == 12
    assert all(p.dtype == torch.bfloat16 for p in pipe.transformer.parameters())
    assert pipe.text_encoder_3.dtype == pipe.vae.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="even int"):
        tiny_sd3_pipeline(sample_size=7)


# ---------------------------------------------------------------------------- FLUX.1-dev


def test_flux_parts(flux):
    assert type(flux) is FluxPipeline
    assert type(flux.transformer) is FluxTransformer2DModel and type(flux.vae) is AutoencoderKL
    assert type(flux.text_encoder) is CLIPTextModel and type(flux.tokenizer) is CLIPTokenizer
    assert type(flux.text_encoder_2) is T5EncoderModel and isinstance(flux.tokenizer_2, T5TokenizerFast)
    assert flux.tokenizer.pad_token == "<|endoftext|>"
    t = flux.transformer.config
    assert (t.patch_size, t.in_channels, t.num_layers, t.num_single_layers, t.guidance_embeds) == (1, 64, 2, 4, True)
    assert sum(t.axes_dims_rope) == t.attention_head_dim and all(d % 2 == 0 for d in t.axes_dims_rope)
    assert t.joint_attention_dim == flux.text_encoder_2.config.d_model
    assert t.pooled_projection_dim == flux.text_encoder.config.hidden_size
    widths = [flux.text_encoder.config.hidden_size, t.joint_attention_dim, t.num_attention_heads * t.attention_head_dim]
    assert len({*widths, t.in_channels}) == 4
    v = flux.vae.config
    assert (v.latent_channels, v.scaling_factor, v.shift_factor, len(v.block_out_channels)) == (16, 0.3611, 0.1159, 2)
    s = flux.scheduler.config
    assert type(flux.scheduler) is FlowMatchEulerDiscreteScheduler and s.use_dynamic_shifting
    assert (s.base_shift, s.max_shift, s.base_image_seq_len, s.max_image_seq_len) == (0.5, 1.15, 256, 4096)
    # diffusers 0.30: FluxAttnProcessor2_0 (double-stream) and FluxSingleAttnProcessor2_0; later one class for both
    double, single = _processors(flux.transformer)[:2], _processors(flux.transformer)[2:]
    assert (len(double), len(single)) == (2, 4)
    assert (set(double), set(single)) in (
        ({"FluxAttnProcessor"}, {"FluxAttnProcessor"}),
        ({"FluxAttnProcessor2_0"}, {"FluxAttnProcessor2_0"}),
        ({"FluxAttnProcessor2_0"}, {"FluxSingleAttnProcessor2_0"}),
    )


def test_flux_makes_finite_images_of_the_requested_size(flux):
    images = _images(flux, height=32, width=48)
    assert images.shape == (1, 32, 48, 3) and np.isfinite(images).all()
    assert images.std() > 0
    np.testing.assert_array_equal(images, _images(flux, height=32, width=48))
    assert _images(flux).shape == (1, 32, 32, 3)  # the default: 2 * sample_size, not FluxPipeline's 1024
    # packed latents: (32 / 2 / 2) * (48 / 2 / 2) tokens of 16 * 2 * 2 channels
    latents = flux("a cat", num_inference_steps=1, height=32, width=48, output_type="latent").images
    assert latents.shape == (1, 8 * 12, 64)


def test_flux_prompt_embeddings(flux):
    embeds, pooled, text_ids = flux.encode_prompt("a red cat", None, max_sequence_length=16)
    assert embeds.shape == (1, 16, 96) and pooled.shape == (1, 32)
    assert text_ids.shape[-2:] == (16, 3) and not text_ids.any()  # text tokens sit at RoPE position 0
    assert flux.encode_prompt("a red cat", None)[0].shape == (1, 512, 96)  # max_sequence_length 512


def test_flux_seed_weights_and_global_rng():
    state = torch.get_rng_state()
    a, b, c = _weights(tiny_flux_pipeline()), _weights(tiny_flux_pipeline(seed=0)), _weights(tiny_flux_pipeline(seed=1))
    assert torch.equal(torch.get_rng_state(), state)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        random = [k for k in a if k.startswith(name + ".") and a[k].dtype.is_floating_point and a[k].std() > 0]
        assert random and any(not torch.equal(a[k], c[k]) for k in random), name


def test_flux_sample_size_and_dtype():
    pipe = tiny_flux_pipeline(sample_size=8, dtype=torch.bfloat16)
    assert pipe.default_sample_size * pipe.vae_scale_factor == 16  # default images 16 px a side
    assert all(p.dtype == torch.bfloat16 for p in pipe.transformer.parameters())
    assert pipe.text_encoder_2.dtype == pipe.vae.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="even int"):
        tiny_flux_pipeline(sample_size=0)
