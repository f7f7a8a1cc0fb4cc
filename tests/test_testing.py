"""Tests for the offline tiny tokenizer and tiny Stable Diffusion (1.x, 2.x, XL) pipelines."""

from __future__ import annotations

import math
import os
import string

import numpy as np
import pytest
import torch

import p2p_widgets.testing as tiny
import p2p_widgets.tokenizer as word_tokenizers
from p2p_widgets.testing import MULTI_TOKEN_WORDS, TINY_WORDS, tiny_pipeline, tiny_sdxl_pipeline, tiny_tokenizer

# ---------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_public_api():
    assert set(tiny.__all__) == {
        "MULTI_TOKEN_WORDS",
        "TINY_WORDS",
        "tiny_flux_pipeline",
        "tiny_pipeline",
        "tiny_sd3_pipeline",
        "tiny_sdxl_pipeline",
        "tiny_t5_tokenizer",
        "tiny_tokenizer",
    }
    assert 50 <= len(TINY_WORDS) <= 80
    assert len(set(TINY_WORDS)) == len(TINY_WORDS)
    assert all(w.isascii() and w.isalpha() and w.islower() for w in TINY_WORDS)
    assert not set(TINY_WORDS) & set(MULTI_TOKEN_WORDS)


def test_is_a_real_clip_tokenizer(tok):
    from transformers import CLIPTokenizer

    assert type(tok) is CLIPTokenizer
    assert tok.model_max_length == 77
    assert tiny_tokenizer(max_length=20).model_max_length == 20


@pytest.mark.parametrize("word", TINY_WORDS)
def test_tiny_word_is_one_token(tok, word):
    assert tok.tokenize(word) == [word + "</w>"]


def test_tiny_words_in_one_prompt(tok):
    ids = tok(" ".join(TINY_WORDS)).input_ids
    assert len(ids) == len(TINY_WORDS) + 2
    assert tok.convert_ids_to_tokens(ids[1:-1]) == [w + "</w>" for w in TINY_WORDS]


@pytest.mark.parametrize("word", sorted(MULTI_TOKEN_WORDS))
def test_multi_token_word_count(tok, word):
    pieces = tok.tokenize(word)
    assert len(pieces) == MULTI_TOKEN_WORDS[word] > 1
    assert "".join(pieces) == word + "</w>"
    assert not any(p.endswith("</w>") for p in pieces[:-1])
    # Same split in context, next to every kind of neighbour.
    ids = tok(f"a {word} and the {word} riding").input_ids
    assert len(ids) == 2 + 4 + 2 * MULTI_TOKEN_WORDS[word]


def test_documented_splits(tok):
    assert MULTI_TOKEN_WORDS == {"bicycle": 2, "motorcycle": 3, "butterfly": 2, "elephant": 2}
    assert tok.tokenize("a cat riding a bicycle") == ["a</w>", "cat</w>", "riding</w>", "a</w>", "bicy", "cle</w>"]


def test_byte_level_base_vocabulary(tok):
    table = word_tokenizers._bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert all(table[ord(c)] == c for c in string.ascii_letters + string.digits + string.punctuation)
    assert table[ord(" ")] == "\u0120" and table[ord("\n")] == "\u010a" and table[0] == "\u0100"
    vocab = tok.get_vocab()
    assert all(c in vocab and c + "</w>" in vocab for c in table.values())
    # Like CLIP: the 256 bytes, the same with "</w>" (so "a</w>" is 320 as in CLIP), merges, bos, eos.
    assert [vocab[c] for c in table.values()] == list(range(256))
    assert vocab["a</w>"] == 320
    assert (vocab["<|startoftext|>"], vocab["<|endoftext|>"]) == (len(tok) - 2, len(tok) - 1)


def test_every_merge_result_is_in_the_vocabulary():
    vocab, merges = word_tokenizers._vocab_and_merges(TINY_WORDS, tuple(sorted(tiny._MULTI_TOKEN_PIECES.items())))
    assert len(set(merges)) == len(merges)
    assert all(a in vocab and b in vocab and a + b in vocab for a, b in merges)
    assert sorted(vocab.values()) == list(range(len(vocab)))


@pytest.mark.parametrize("text", ["zebra!? 42", string.printable.strip(), "héllo wörld ☃ 😀 naïve"])
def test_any_text_round_trips_without_unknown_tokens(text):
    tok = tiny_tokenizer(max_length=512)  # string.printable needs > 77 tokens
    ids = tok(text).input_ids
    # unk is <|endoftext|> in CLIP; no special token may appear inside.
    assert all(i < tok.bos_token_id for i in ids[1:-1])
    decoded = tok.decode(ids, skip_special_tokens=True)
    assert "".join(decoded.split()) == "".join(text.lower().split())


def test_bos_eos_and_padding(tok):
    ids = tok("a cat riding a bicycle").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"
    assert tok.bos_token == "<|startoftext|>"
    assert tok.pad_token_id == tok.eos_token_id != tok.bos_token_id

    enc = tok("a cat", padding="max_length", max_length=77)
    assert len(enc.input_ids) == 77
    assert enc.input_ids[:4] == [tok.bos_token_id, *tok.convert_tokens_to_ids(["a</w>", "cat</w>"]), tok.eos_token_id]
    assert enc.input_ids[4:] == [tok.eos_token_id] * 73
    assert enc.attention_mask == [1] * 4 + [0] * 73

    long = tok(" ".join(["cat"] * 100), padding="max_length", truncation=True, max_length=tok.model_max_length)
    assert len(long.input_ids) == 77 and long.input_ids[-1] == tok.eos_token_id


def test_offsets_mapping(tok):
    text = "A cat riding a bicycle"
    if not tok.is_fast:  # transformers 4's CLIPTokenizer is the Python one: no offsets
        with pytest.raises(NotImplementedError):
            tok(text, return_offsets_mapping=True)
        return
    enc = tok(text, return_offsets_mapping=True)
    spans = [text[s:e] for s, e in enc.offset_mapping[1:-1]]
    assert spans == ["A", "cat", "riding", "a", "bicy", "cle"]
    assert enc.offset_mapping[0] == enc.offset_mapping[-1] == (0, 0)


def test_lower_cases_and_normalises_whitespace(tok):
    assert tok("A  Cat\n").input_ids == tok("a cat").input_ids
    assert tok("RED\tCircle").input_ids == tok("red circle").input_ids


def test_fresh_independent_instances():
    a, b = tiny_tokenizer(), tiny_tokenizer()
    assert a is not b
    a.add_tokens(["<extra>"])
    assert len(a) == len(b) + 1
    assert len(tiny_tokenizer()) == len(b)
    # Files came from a temporary directory that is gone; the tokenizer still works.
    assert not os.path.exists(b.name_or_path)
    assert b("a cat").input_ids == tiny_tokenizer()("a cat").input_ids


def test_generated_files(monkeypatch):
    from transformers import CLIPTokenizer

    seen: dict[str, str] = {}

    class Spy(CLIPTokenizer):
        @classmethod
        def from_pretrained(cls, path, *args, **kwargs):
            for name in os.listdir(path):
                with open(os.path.join(path, name), encoding="utf-8") as f:
                    seen[name] = f.read()
            return CLIPTokenizer.from_pretrained(path, *args, **kwargs)

    monkeypatch.setattr(word_tokenizers, "CLIPTokenizer", Spy)
    tiny_tokenizer()
    assert set(seen) == {"vocab.json", "merges.txt"}
    lines = seen["merges.txt"].splitlines()
    assert lines[0] == "#version: 0.2"
    assert all(len(line.split(" ")) == 2 for line in lines[1:])


# ---------------------------------------------------------------------------- pipelines


@pytest.fixture(scope="module")
def pipes():
    return {kind: tiny_pipeline(kind) for kind in ("sd1", "sd2")}


def _state(pipe) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": value
        for name in ("unet", "vae", "text_encoder")
        for key, value in getattr(pipe, name).state_dict().items()
    }


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
@pytest.mark.parametrize(("height", "width"), [(32, 32), (32, 48)])
def test_pipeline_runs_end_to_end(pipes, kind, height, width):
    out = pipes[kind](
        "a red cat",
        num_inference_steps=2,
        height=height,
        width=width,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    assert out.images.shape == (1, height, width, 3)
    assert np.isfinite(out.images).all()


def test_default_size_follows_sample_size():
    pipe = tiny_pipeline(sample_size=8)
    assert pipe.unet.config.sample_size == 8 and pipe.vae.config.sample_size == 16
    images = pipe("a cat", num_inference_steps=1, output_type="np").images
    assert images.shape == (1, 16, 16, 3)


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_pipeline_components(pipes, kind):
    pipe = pipes[kind]
    assert pipe.vae_scale_factor == 2
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert not any(getattr(pipe, name).training for name in ("unet", "vae", "text_encoder"))
    assert pipe.unet.config.sample_size == 16 and pipe.vae.config.sample_size == 32
    cfg = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert (cfg.beta_start, cfg.beta_end, cfg.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert (cfg.clip_sample, cfg.set_alpha_to_one, cfg.steps_offset) == (False, False, 1)
    assert cfg.prediction_type == ("v_prediction" if kind == "sd2" else "epsilon")
    assert pipe.unet.config.use_linear_projection == (kind == "sd2")

    # Cross-attention at two resolutions plus the mid block.
    cross = {n: m for n, m in pipe.unet.named_modules() if n.endswith("attn2")}
    assert {n.split(".")[0] for n in cross} == {"down_blocks", "mid_block", "up_blocks"}
    assert {n.split(".")[1] for n in cross if n.startswith("down_blocks")} == {"0", "1"}
    heads = {(m.heads, m.inner_dim // m.heads) for m in cross.values()}
    assert heads == ({(2, 16), (4, 16)} if kind == "sd2" else {(8, 4), (8, 8)})


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_text_encoder_matches_tokenizer(pipes, kind):
    pipe = pipes[kind]
    tok, cfg = pipe.tokenizer, pipe.text_encoder.config
    assert cfg.vocab_size == len(tok)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    assert cfg.max_position_embeddings == tok.model_max_length == 77
    assert cfg.hidden_size == pipe.unet.config.cross_attention_dim == 32
    # Pooled output is taken at the (first) eos token.
    ids = tok("a cat riding", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        out = pipe.text_encoder(ids)
    assert torch.equal(out.pooler_output[0], out.last_hidden_state[0, 4])


def test_same_seed_same_weights_other_seed_differs():
    torch.manual_seed(123)
    a = _state(tiny_pipeline(seed=7))
    torch.manual_seed(456)
    b = _state(tiny_pipeline(seed=7))
    c = _state(tiny_pipeline(seed=8))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert not torch.equal(a["unet.conv_in.weight"], c["unet.conv_in.weight"])


def test_global_rng_state_untouched():
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    tiny_pipeline("sd1", seed=3)
    tiny_pipeline("sd2", seed=4)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype(dtype):
    pipe = tiny_pipeline(dtype=dtype)
    for name in ("unet", "vae", "text_encoder"):
        assert all(p.dtype == dtype for p in getattr(pipe, name).parameters())


def test_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        tiny_pipeline("sdxl")


def test_word_tokenizer_makes_any_word_list_single_tokens():
    from p2p_widgets.shapes import vocabulary
    from p2p_widgets.tokenizer import word_tokenizer

    tok = word_tokenizer(vocabulary(), max_length=16)
    for word in vocabulary():
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    assert len(tok("zebra", add_special_tokens=False).input_ids) > 1  # unknown words still tokenize
    assert tok.model_max_length == 16
    with pytest.raises(ValueError, match="does not split as"):
        word_tokenizer(("cat",), {"bicycle": ("bi", "cycles")})


# ---------------------------------------------------------------------------- SDXL

SDXL_TEXTS = ["a cat riding a bicycle", "A photo of a RED motorcycle", "zebra?? 42, naïve ☃", " ".join(["cat"] * 90)]


@pytest.fixture(scope="module")
def xl():
    return tiny_sdxl_pipeline()


def _xl_state(pipe) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": value
        for name in ("unet", "vae", "text_encoder", "text_encoder_2")
        for key, value in getattr(pipe, name).state_dict().items()
    }


def test_pad_token_option():
    tok = tiny_tokenizer(pad_token="!")
    assert (tok.pad_token, tok.pad_token_id) == ("!", 0)  # as SDXL's tokenizer_2
    assert (tok.bos_token_id, tok.eos_token_id) == (tiny_tokenizer().bos_token_id, tiny_tokenizer().eos_token_id)
    enc = tok("a cat", padding="max_length", max_length=8)
    words = tok.convert_tokens_to_ids(["a</w>", "cat</w>"])
    assert enc.input_ids == [tok.bos_token_id, *words, tok.eos_token_id, 0, 0, 0, 0]
    assert enc.attention_mask == [1] * 4 + [0] * 4
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tiny_tokenizer(pad_token="<pad>")


@pytest.mark.parametrize("text", SDXL_TEXTS)
def test_sdxl_tokenizers_share_positions_and_pad_differently(xl, text):
    tok, tok_2 = xl.tokenizer, xl.tokenizer_2
    assert len(tok) == len(tok_2) and tok.get_vocab() == tok_2.get_vocab()
    assert tok(text).input_ids == tok_2(text).input_ids
    # As the pipeline calls them: same real tokens, eos-padding vs "!"-padding after the first eos.
    first = tok(text, padding="max_length", max_length=77, truncation=True).input_ids
    second = tok_2(text, padding="max_length", max_length=77, truncation=True).input_ids
    end = first.index(tok.eos_token_id) + 1
    assert first[:end] == second[:end] and len(first) == len(second) == 77
    assert first[end:] == [tok.eos_token_id] * (77 - end) and second[end:] == [0] * (77 - end)


def test_sdxl_tokenizer_2_reads_exclamation_marks_as_pad(xl):
    # As real SDXL (diffusers#4153): "!" is tokenizer_2's pad token, so the text's "!" becomes id 0.
    text = "a cat! riding !! a bicycle"
    first, second = xl.tokenizer(text).input_ids, xl.tokenizer_2(text).input_ids
    assert len(first) == len(second)
    differ = [i for i, (a, b) in enumerate(zip(first, second)) if a != b]
    assert second.count(0) == 3 and [second[i] for i in differ] == [0, 0]
    # tokenizer's "!!" is "!" (id 0 too) + "!</w>"; only the word-final ones differ.
    assert xl.tokenizer.convert_ids_to_tokens([first[i] for i in differ]) == ["!</w>", "!</w>"]


def test_sdxl_text_encoders(xl):
    one, two = xl.text_encoder.config, xl.text_encoder_2.config
    assert (type(xl.text_encoder).__name__, type(xl.text_encoder_2).__name__) == (
        "CLIPTextModel",
        "CLIPTextModelWithProjection",
    )
    assert (one.hidden_act, two.hidden_act) == ("quick_gelu", "gelu")
    assert one.num_hidden_layers >= 2 and two.num_hidden_layers >= 2  # SDXL reads hidden_states[-2]
    assert len({one.hidden_size, two.hidden_size, two.projection_dim}) == 3  # a mix-up cannot pass by shape
    assert xl.unet.config.cross_attention_dim == one.hidden_size + two.hidden_size
    for tok, cfg in ((xl.tokenizer, one), (xl.tokenizer_2, two)):
        assert cfg.vocab_size == len(tok) and cfg.max_position_embeddings == tok.model_max_length == 77
        special = (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
        assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == special
    # The pooled embedding is the projection of the (first) eos token's state.
    ids = xl.tokenizer_2("a cat riding", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        out = xl.text_encoder_2(ids)
        assert torch.allclose(out.text_embeds[0], xl.text_encoder_2.text_projection(out.last_hidden_state[0, 4]))
        embeds, negative, pooled, negative_pooled = xl.encode_prompt("a cat", device="cpu")
    assert embeds.shape == (1, 77, one.hidden_size + two.hidden_size) and pooled.shape == (1, two.projection_dim)
    # force_zeros_for_empty_prompt: no negative prompt is zeros; an explicit "" is encoded.
    assert xl.config.force_zeros_for_empty_prompt
    assert not negative.any() and not negative_pooled.any()
    with torch.no_grad():
        _, negative, _, negative_pooled = xl.encode_prompt("a cat", device="cpu", negative_prompt="")
    assert negative.abs().sum() > 0 and negative_pooled.abs().sum() > 0


def test_sdxl_unet_layout(xl):
    unet, cfg = xl.unet, xl.unet.config
    assert cfg.down_block_types[0] == "DownBlock2D" and set(cfg.down_block_types[1:]) == {"CrossAttnDownBlock2D"}
    assert cfg.up_block_types[-1] == "UpBlock2D" and set(cfg.up_block_types[:-1]) == {"CrossAttnUpBlock2D"}
    assert cfg.mid_block_type == "UNetMidBlock2DCrossAttn" and cfg.use_linear_projection
    assert (cfg.addition_embed_type, cfg.addition_time_embed_dim) == ("text_time", 8)
    assert unet.add_embedding.linear_1.in_features == 6 * 8 + xl.text_encoder_2.config.projection_dim
    assert cfg.time_cond_proj_dim is None  # no guidance embedding (timestep_cond), as SDXL base

    # Where the cross-attention layers are, measured on a 16x16 latent: name -> side attended over.
    sides: dict[str, int] = {}

    def recorder(name):
        def record(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]  # (batch, h*w, channels)
            sides[name] = math.isqrt(hidden.shape[1])

        return record

    hooks = [
        module.register_forward_pre_hook(recorder(name), with_kwargs=True)
        for name, module in unet.named_modules()
        if name.endswith("attn2")
    ]
    try:
        xl("a cat", num_inference_steps=1, guidance_scale=1.0, output_type="latent")
    finally:
        for hook in hooks:
            hook.remove()
    at = {side: sorted(n for n, s in sides.items() if s == side) for side in set(sides.values())}
    assert sorted(at) == [4, 8]  # latent/4 and latent/2, none at full resolution (as SDXL: 32, 64 of 128)
    assert {n.split(".")[0] for n in at[8]} == {"down_blocks", "up_blocks"}
    assert {n.split(".")[0] for n in at[4]} == {"down_blocks", "mid_block", "up_blocks"}
    # Several layers per transformer, as SDXL's 2 at 64x64 and 10 at 32x32: 2 at latent/2, 3 at latent/4.
    for side, depth in ((8, 2), (4, 3)):
        per_transformer: dict[str, int] = {}
        for name in at[side]:
            transformer = name.split(".transformer_blocks.")[0]
            per_transformer[transformer] = per_transformer.get(transformer, 0) + 1
        assert set(per_transformer.values()) == {depth}, per_transformer
    # 2 transformers in each down block, 3 in each up block, 1 in the mid block.
    assert (len(at[8]), len(at[4])) == (2 * 2 + 3 * 2, 2 * 3 + 3 + 3 * 3)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"height": 32, "width": 48}, {"guidance_scale": 1.0}, {"negative_prompt": "a dog"}],
    ids=["default", "non-square", "no-guidance", "negative"],
)
def test_sdxl_stock_pipeline_runs(xl, kwargs):
    out = xl("a red cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np", **kwargs)
    assert out.images.shape == (1, kwargs.get("height", 32), kwargs.get("width", 32), 3)
    assert np.isfinite(out.images).all()


def test_sdxl_components(xl):
    assert xl.vae_scale_factor == 2 and xl.watermark is None
    assert xl.unet.config.sample_size == 16 and xl.vae.config.sample_size == 32
    assert (xl.vae.config.scaling_factor, xl.vae.config.force_upcast) == (0.13025, True)
    assert getattr(xl.vae.config, "latents_mean", None) is None  # decoded as latents / scaling_factor
    assert not any(getattr(xl, name).training for name in ("unet", "vae", "text_encoder", "text_encoder_2"))
    cfg = xl.scheduler.config
    assert type(xl.scheduler).__name__ == "EulerDiscreteScheduler"
    assert (cfg.beta_start, cfg.beta_end, cfg.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert (cfg.timestep_spacing, cfg.steps_offset, cfg.prediction_type) == ("leading", 1, "epsilon")
    assert (cfg.interpolation_type, cfg.use_karras_sigmas) == ("linear", False)
    xl.scheduler.set_timesteps(4)
    assert xl.scheduler.timesteps.tolist() == [751, 501, 251, 1]  # SDXL base's 4-step schedule
    latents = xl("a cat", num_inference_steps=1, height=16, width=48, output_type="latent").images
    assert latents.shape == (1, 4, 8, 24)


def test_sdxl_default_size_follows_sample_size():
    pipe = tiny_sdxl_pipeline(sample_size=8)
    assert pipe.unet.config.sample_size == 8 and pipe.vae.config.sample_size == 16
    assert pipe("a cat", num_inference_steps=1, output_type="np").images.shape == (1, 16, 16, 3)


def test_sdxl_same_seed_same_weights_other_seed_differs(xl):
    torch.manual_seed(123)
    a = _xl_state(tiny_sdxl_pipeline(seed=0))
    b, c = _xl_state(xl), _xl_state(tiny_sdxl_pipeline(seed=1))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Every component is reseeded (key names only by suffix: transformers 5 drops "text_model.").
    for prefix, suffix in (
        ("unet.", "conv_in.weight"),
        ("text_encoder.", "token_embedding.weight"),
        ("text_encoder_2.", "text_projection.weight"),
        ("vae.", "decoder.conv_out.weight"),
    ):
        (name,) = (k for k in a if k.startswith(prefix) and k.endswith(suffix))
        assert not torch.equal(a[name], c[name]), name


def test_sdxl_global_rng_state_untouched():
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    tiny_sdxl_pipeline(seed=3)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sdxl_dtype(dtype):
    pipe = tiny_sdxl_pipeline(dtype=dtype)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert all(p.dtype == dtype for p in getattr(pipe, name).parameters()), name
