"""Tests for the offline tiny tokenizer and tiny Stable Diffusion pipelines."""

from __future__ import annotations

import os
import string

import numpy as np
import pytest
import torch

import p2p_widgets.testing as tiny
import p2p_widgets.tokenizer as word_tokenizers
from p2p_widgets.testing import MULTI_TOKEN_WORDS, TINY_WORDS, tiny_pipeline, tiny_tokenizer

# ---------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_public_api():
    assert set(tiny.__all__) == {"MULTI_TOKEN_WORDS", "TINY_WORDS", "tiny_pipeline", "tiny_tokenizer"}
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
