"""Heatmaps from the attention record: word maps, step ranges, resolutions, normalisation."""

import dataclasses
import warnings

import numpy as np
import pytest
import torch

from p2p_widgets import edit, normalize
from p2p_widgets.processors import map_size
from p2p_widgets.prompts import tokenize
from p2p_widgets.record import AttentionRecord, select_steps

PROMPT = "a cat riding a bicycle"  # "bicycle" is two tokens in the tiny vocabulary


def make_record(tokenizer, latent=(16, 16), layers=None, steps=5, fill=None, prompts=(PROMPT,), seed=0):
    """A record with random probabilities, or ``fill(factor, step, h, w, tokens)`` values."""
    layers = layers or {1: 2, 2: 3}
    parsed = tuple(tokenize(tokenizer, p) for p in prompts)
    tokens = max(p.length for p in parsed)
    generator = torch.Generator().manual_seed(seed)
    maps = {}
    for factor in layers:
        height, width = map_size(latent, factor)
        if fill is None:
            values = torch.rand(steps, len(parsed), height, width, tokens, generator=generator)
            values = values / values.sum(-1, keepdim=True)
        else:
            values = torch.stack([fill(factor, s, height, width, tokens) for s in range(steps)])[:, None]
            values = values.expand(steps, len(parsed), height, width, tokens)
        maps[factor] = values.to(torch.float16)
    timesteps = tuple(range(900, 900 - 100 * steps, -100))
    return AttentionRecord(prompts=parsed, latent_size=latent, maps=maps, layers=layers, timesteps=timesteps)


def test_a_words_map_is_the_mean_of_its_tokens(tokenizer):
    record = make_record(tokenizer, layers={1: 1})
    tokens = record.prompts[0].token_indices("bicycle")
    assert len(tokens) == 2
    raw = record.maps[1][:, 0].float()  # (steps, h, w, tokens)
    expected = raw[..., list(tokens)].mean(-1).mean(0).numpy()
    np.testing.assert_allclose(record.word_map(0, "bicycle", factor=1), expected, rtol=1e-5)
    heatmaps = record.heatmaps(0, factor=1)
    np.testing.assert_allclose(heatmaps.word_map("bicycle"), heatmaps.token_maps(tokens).mean(0), rtol=1e-6)
    # by index and by text: the same word
    np.testing.assert_array_equal(heatmaps.word_map(4), heatmaps.word_map("bicycle"))
    # a repeated word ("a" twice) averages every occurrence; by index just one
    both = heatmaps.token_maps(record.prompts[0].token_indices("a")).mean(0)
    np.testing.assert_allclose(heatmaps.word_map("a"), both, rtol=1e-6)
    assert not np.allclose(heatmaps.word_map(0), heatmaps.word_map(3))


@pytest.mark.parametrize(
    "steps, chosen",
    [
        (2, [2]),
        (-1, [5]),
        ((1, 4), [1, 2, 3]),
        ((4, 99), [4, 5]),
        (slice(None, None, 2), [0, 2, 4]),
        (None, [0, 1, 2, 3, 4, 5]),
    ],
)
def test_step_selections_average_the_right_steps(tokenizer, steps, chosen):
    # every pixel of every token holds the step index at step s
    record = make_record(tokenizer, steps=6, fill=lambda f, s, h, w, t: torch.full((h, w, t), float(s)))
    assert select_steps(steps, 6) == chosen
    values = record.word_map(0, "cat", steps=steps)
    np.testing.assert_allclose(values, np.full((16, 16), np.mean(chosen)), rtol=1e-6)


@pytest.mark.parametrize("steps", [(3, 3), (7, 9), 6, -7, slice(4, 2)])
def test_step_selections_that_select_nothing_are_refused(tokenizer, steps):
    record = make_record(tokenizer, steps=6)
    with pytest.raises(ValueError, match=r"steps 0\.\.5"):
        record.word_map(0, "cat", steps=steps)


def test_bad_step_types_are_refused(tokenizer):
    record = make_record(tokenizer)
    with pytest.raises(TypeError, match="step index"):
        record.word_map(0, "cat", steps="all")


@pytest.mark.parametrize(
    "latent, layers",
    [
        ((64, 64), {1: 5, 2: 5, 4: 5, 8: 1}),  # SD 1.x at 512: sides 64, 32, 16, 8
        ((48, 80), {1: 2, 2: 2, 4: 1, 8: 1}),  # non-square
        ((33, 47), {1: 1, 2: 1, 4: 3}),  # odd sides: 17x24, 9x12 after ceil-halving
    ],
)
def test_aggregation_across_resolutions_weights_every_layer_once(tokenizer, latent, layers):
    # each resolution holds one constant per step: the aggregate is the layer-weighted mean
    value = {1: 0.1, 2: 0.4, 4: 0.7, 8: 1.0}
    record = make_record(
        tokenizer, latent=latent, layers=layers, fill=lambda f, s, h, w, t: torch.full((h, w, t), value[f])
    )
    expected = sum(value[f] * n for f, n in layers.items()) / sum(layers.values())
    aggregated = record.word_map(0, "bicycle")
    assert aggregated.shape == latent
    np.testing.assert_allclose(aggregated, expected, rtol=2e-3)
    for factor in layers:
        single = record.word_map(0, "bicycle", factor=factor)
        assert single.shape == map_size(latent, factor)
        np.testing.assert_allclose(single, value[factor], rtol=2e-3)


def test_coarse_maps_are_upsampled_in_place(tokenizer):
    # a hot top-left quadrant at the coarse resolution stays top-left at the latent size
    def fill(factor, step, height, width, tokens):
        values = torch.zeros(height, width, tokens)
        if factor == 4:
            values[: height // 2, : width // 2] = 1.0
        return values

    record = make_record(tokenizer, latent=(32, 48), layers={1: 1, 4: 1}, fill=fill)
    heat = record.word_map(0, "cat")
    assert heat.shape == (32, 48)
    assert heat[:12, :18].min() > 0.45 and heat[20:, 30:].max() < 0.05


def test_recorded_probabilities_sum_to_one_over_all_tokens(sd1):
    # a prompt that fills the text encoder's 77 positions keeps every token: sums are 1
    words = "a cat " * 37 + "a"
    result = edit(sd1, words, steps=2)
    heatmaps = result.attention.heatmaps(0)
    assert heatmaps.prompt.length == 77
    sums = heatmaps.per_step.sum(axis=1)  # (steps, h, w)
    np.testing.assert_allclose(sums, 1.0, atol=5e-3)
    # a short prompt keeps only its own tokens: sums are at most one
    short = edit(sd1, PROMPT, steps=2).attention.heatmaps(0).per_step.sum(axis=1)
    assert short.max() <= 1.0 + 5e-3 and short.min() > 0


def test_normalize_per_map_and_across_words():
    rng = np.random.default_rng(0)
    maps = rng.random((3, 4, 5)).astype(np.float32) * np.array([1.0, 2.0, 5.0], dtype=np.float32)[:, None, None]
    per_map = normalize(maps, "map")
    np.testing.assert_allclose(per_map.min(axis=(1, 2)), 0.0, atol=1e-7)
    np.testing.assert_allclose(per_map.max(axis=(1, 2)), 1.0, rtol=1e-6)
    joint = normalize(maps, "words")
    assert joint.min() == 0.0 and joint.max() == pytest.approx(1.0)
    # across words, relative strength is kept: the same affine map for all
    low, high = maps.min(), maps.max()
    np.testing.assert_allclose(joint, (maps - low) / (high - low), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(normalize(maps, None), maps)
    with pytest.raises(ValueError, match='"map", "words" or None'):
        normalize(maps, "max")


def test_a_constant_map_does_not_divide_by_zero():
    maps = np.stack([np.full((4, 4), 0.25), np.zeros((4, 4)), np.linspace(0, 1, 16).reshape(4, 4)]).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        per_map = normalize(maps, "map")
        joint = normalize(maps[:2, None] * 0 + 0.5, "words")
    assert np.isfinite(per_map).all() and np.isfinite(joint).all()
    np.testing.assert_array_equal(per_map[0], 0.0)
    np.testing.assert_array_equal(per_map[1], 0.0)
    assert per_map[2].max() == pytest.approx(1.0)
    np.testing.assert_array_equal(joint, 0.0)


def test_words_gives_labelled_maps_of_every_word(tokenizer):
    record = make_record(tokenizer)
    maps = record.heatmaps(0).words(normalize=None)
    assert maps.labels == ("a", "cat", "riding", "a", "bicycle")
    assert maps.maps.shape == (5, 16, 16) and maps.maps.dtype == np.float32
    np.testing.assert_allclose(maps["bicycle"], record.word_map(0, "bicycle"), rtol=1e-6)
    np.testing.assert_allclose(maps.maps[3], record.word_map(0, 3), rtol=1e-6)
    chosen = record.heatmaps(0).words(["cat", "riding a"], steps=1)
    assert chosen.labels == ("cat", "riding a") and chosen.maps.max() == pytest.approx(1.0)
    with pytest.raises(KeyError, match="they are: cat, riding a"):
        chosen["dog"]


def test_tokens_include_start_and_end_on_request(tokenizer):
    heatmaps = make_record(tokenizer).heatmaps(0)
    every = heatmaps.tokens(normalize=None, special=True)
    assert every.labels == ("<start>", "a", "cat", "riding", "a", "bicycle[1/2]", "bicycle[2/2]", "<end>")
    np.testing.assert_allclose(every.maps[0], heatmaps.token_maps([0])[0])
    assert heatmaps.tokens().labels == every.labels[1:-1]
    with pytest.raises(ValueError, match=r"positions are 0 \(begin-of-text\) .. 7"):
        heatmaps.token_maps([8])


def test_words_not_in_the_prompt_are_named_with_the_prompts_words(tokenizer):
    record = make_record(tokenizer)
    with pytest.raises(ValueError, match=r"'lion' is not in .*a, cat, riding, a, bicycle"):
        record.heatmaps(0).words(["cat", "lion"])
    with pytest.raises(ValueError, match=r"branches 0\.\.0"):
        record.heatmaps(1)
    with pytest.raises(ValueError, match="recorded factors: 1, 2"):
        record.heatmaps(0, factor=8)


def test_heatmaps_are_computed_once_per_branch_and_factor(tokenizer):
    record = make_record(tokenizer, prompts=(PROMPT, "a dog riding a bicycle"))
    assert record.heatmaps(1) is record.heatmaps(1)
    assert record.heatmaps(1) is not record.heatmaps(0)
    assert record.heatmaps(1, factor=2).size == (8, 8)
    assert record.heatmaps(1).prompt.text == "a dog riding a bicycle"


def test_self_attention_components_separate_two_regions(tokenizer):
    # pixels of the left half attend to the left half, right to right: component 1 splits them
    record = make_record(tokenizer, latent=(8, 8), layers={1: 1})
    side = np.arange(64) % 8 < 4
    matrix = np.where(side[:, None] == side[None, :], 1.0, 0.0) + 0.01
    matrix /= matrix.sum(1, keepdims=True)
    probabilities = torch.from_numpy(matrix)[None].to(torch.float16)
    record = dataclasses.replace(record, self_maps=((2, 1), probabilities))
    components = record.self_components(0, count=3)
    assert components.shape == (3, 8, 8)
    first = components[0]
    assert ((first[:, :4] > 0).all() and (first[:, 4:] < 0).all()) or (
        (first[:, :4] < 0).all() and (first[:, 4:] > 0).all()
    )
    flat = components.reshape(3, -1)
    np.testing.assert_allclose(np.linalg.norm(flat, axis=1), 1.0, rtol=1e-4)


def test_self_attention_components_need_recording(sd1, tokenizer):
    with pytest.raises(ValueError, match="record_self=\\(step, factor\\)"):
        make_record(tokenizer).self_components(0)
    result = edit(sd1, "a cat", "a dog", steps=3, record_self=(1, 2))
    components = result.attention.self_components(1, count=4)
    assert components.shape == (4, 8, 8) and np.isfinite(components).all()
    with pytest.raises(ValueError, match=r"1\.\.64"):
        result.attention.self_components(0, count=65)
