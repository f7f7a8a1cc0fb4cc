"""The engine against the stock diffusers pipeline, and the paper's invariants."""

import gc
import threading

import diffusers
import numpy as np
import pytest
import torch

from conftest import processors_of
from p2p_widgets import Cancelled, LocalBlend, Recipe, Target, edit, run
from p2p_widgets.engine import initial_noise

STEPS = 6
# Same-process CPU float32. The engine computes cross-attention explicitly where the stock
# pipeline uses SDPA, so results agree to rounding, not bit for bit: the stock pipeline's own
# SDPA and explicit processors differ by 3.5e-5 on these latents (values up to ~25).
TIGHT = dict(rtol=1e-5, atol=1e-4)
# Euler steps x by sigma * epsilon (sigma up to ~15 here): float rounding of epsilon in the
# attention (explicit softmax against the stock SDPA) is amplified by that much.
TIGHT_SIGMA = dict(rtol=1e-5, atol=5e-4)


def stock_latents(pipe, prompt, noise, **kwargs):
    """What diffusers' own pipeline makes from the same x_T."""
    output = pipe(prompt, latents=noise.clone(), num_inference_steps=STEPS, output_type="latent", **kwargs)
    return output.images


@pytest.mark.parametrize(
    "kind, settings",
    [
        ("sd1", dict(guidance=7.5)),
        ("sd1", dict(guidance=1.0)),  # no unconditional half
        ("sd1", dict(guidance=5.0, negative_prompt="a blue dog")),
        ("sd1", dict(guidance=7.5, height=32, width=48)),  # non-square
        ("sd2", dict(guidance=7.5)),  # v-prediction
    ],
)
def test_source_equals_the_stock_pipeline(request, kind, settings):
    pipe = request.getfixturevalue(kind)
    height, width = settings.get("height", 32), settings.get("width", 32)
    noise = initial_noise(pipe, 3, height, width)
    result = edit(pipe, "a red cat", steps=STEPS, seed=3, scheduler="pipeline", **settings)
    expected = stock_latents(
        pipe,
        "a red cat",
        noise,
        guidance_scale=settings["guidance"],
        negative_prompt=settings.get("negative_prompt") or None,
        height=height,
        width=width,
    )
    assert result.latents.shape == expected.shape
    torch.testing.assert_close(result.latents[:1], expected, **TIGHT)
    assert result.images[0].size == (width, height)


def test_any_scheduler_matches_the_stock_pipeline(sd1):
    euler = diffusers.EulerDiscreteScheduler.from_config(sd1.scheduler.config)
    pipe = diffusers.StableDiffusionPipeline(**{**sd1.components, "scheduler": euler})
    pipe.set_progress_bar_config(disable=True)
    result = edit(pipe, "a red cat", "a blue cat", steps=STEPS, seed=1, scheduler="pipeline")
    assert result.recipe.scheduler == "EulerDiscreteScheduler"
    expected = stock_latents(pipe, "a red cat", initial_noise(pipe, 1, 32, 32), guidance_scale=7.5)
    torch.testing.assert_close(result.latents[:1], expected, **TIGHT_SIGMA)


def test_default_scheduler_is_ddim(sd1):
    result = edit(sd1, "a cat", steps=2)
    assert result.recipe.scheduler == "DDIMScheduler"


def full_injection(prompt, **kwargs):
    return Target(prompt, cross=1.0, self_attn=1.0, **kwargs)


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_equal_prompts_with_full_injection_reproduce_the_source(request, kind):
    pipe = request.getfixturevalue(kind)
    result = edit(
        pipe, "a cat riding a bicycle", full_injection("a cat riding a bicycle"), steps=STEPS, self_max_scale=1.0
    )
    torch.testing.assert_close(result.latents[1], result.latents[0], **TIGHT)


def test_self_injection_runs_only_in_the_allowed_layers(sd1):
    prompts = ("a cat riding a bicycle", "a dog riding a bicycle")
    free = edit(sd1, prompts[0], Target(prompts[1], cross=0.0, self_attn=0.0), steps=STEPS)
    # The tiny UNet's maps are 16x16 and 8x8 on a 16x16 latent: none is <= 1/4 of the side.
    limited = edit(sd1, prompts[0], Target(prompts[1], cross=0.0, self_attn=1.0), steps=STEPS)
    assert torch.equal(limited.latents, free.latents)
    # Allowing the 8x8 layers (half the side) changes the target, not the source.
    half = edit(sd1, prompts[0], Target(prompts[1], cross=0.0, self_attn=1.0), steps=STEPS, self_max_scale=0.5)
    assert not torch.allclose(half.latents[1], free.latents[1], atol=1e-4)
    torch.testing.assert_close(half.latents[0], free.latents[0], **TIGHT)


def test_reweighting_with_ones_is_no_edit(sd1):
    plain = edit(sd1, "a cat riding a bicycle", Target("a cat riding a bicycle"), steps=STEPS)
    ones = edit(
        sd1,
        "a cat riding a bicycle",
        Target("a cat riding a bicycle", reweight={"cat": 1.0, "riding": 1.0, "bicycle": 1}),
        steps=STEPS,
    )
    assert torch.equal(ones.latents, plain.latents)


def test_reweighting_changes_the_target_and_scales_its_maps(sd1):
    base = edit(sd1, "a cat riding a bicycle", Target("a cat riding a bicycle"), steps=STEPS)
    for weight in (0.0, -1.0, 5.0):
        result = edit(
            sd1,
            "a cat riding a bicycle",
            Target("a cat riding a bicycle", reweight={"cat": weight, "bicycle": 2.0}),
            steps=STEPS,
        )
        assert not torch.allclose(result.latents[1], base.latents[1], atol=1e-4), weight
        torch.testing.assert_close(result.latents[0], base.latents[0], rtol=0, atol=1e-6)


def test_without_injection_a_target_is_an_independent_generation(sd1):
    result = edit(
        sd1, "a cat riding a bicycle", Target("a dog riding a bicycle", cross=0.0, self_attn=0.0), steps=STEPS
    )
    alone = edit(sd1, "a dog riding a bicycle", steps=STEPS)
    torch.testing.assert_close(result.latents[1], alone.latents[0], **TIGHT)


def test_the_source_is_unchanged_by_targets_and_edits(sd1):
    alone = edit(sd1, "a cat riding a bicycle", steps=STEPS, self_max_scale=1.0)
    edited = edit(
        sd1,
        "a cat riding a bicycle",
        Target("a dog riding a bicycle", blend=LocalBlend(("dog",))),
        Target("a fluffy cat riding a bicycle", reweight={"fluffy": 3.0}),
        Target("a cat riding a motorcycle", parent=1, cross={"default_": 0.6, "motorcycle": 0.2}),
        steps=STEPS,
        self_max_scale=1.0,
    )
    # Batch size changes the CPU kernels' blocking, so allow rounding differences.
    torch.testing.assert_close(edited.latents[0], alone.latents[0], **TIGHT)
    assert edited.kinds == ("source", "swap", "refine", "swap")


def test_local_blend_keeps_the_parent_outside_the_mask(sd1):
    result = edit(
        sd1,
        "a cat riding a bicycle",
        # Random weights attend almost uniformly: a high threshold and no dilation keep
        # the mask partial, so both sides of it can be checked.
        Target("a dog riding a bicycle", blend=LocalBlend(("dog",), threshold=0.95, dilation=0)),
        steps=STEPS,
    )
    mask = result.blend_masks[-1, 1]  # (h, w) on the latent grid
    assert mask.shape == result.latents.shape[2:]
    assert 0 < mask.sum() < mask.numel()  # some of the image may change, not all
    outside = ~mask
    assert torch.equal(result.latents[1][:, outside], result.latents[0][:, outside])
    assert not torch.equal(result.latents[1][:, mask], result.latents[0][:, mask])
    assert result.blend_masks[:, 0].all()  # the source is never blended


def test_local_blend_start_step_leaves_early_steps_alone(sd1):
    result = edit(
        sd1,
        "a cat riding a bicycle",
        Target("a dog riding a bicycle", blend=LocalBlend(("dog",), threshold=0.95, dilation=0, start=0.5)),
        steps=STEPS,
    )
    assert result.blend_masks[: STEPS // 2, 1].all()
    assert not result.blend_masks[STEPS // 2 :, 1].all()


def test_chains_follow_their_parent(sd1):
    """A -> B -> A with full injection and equal prompts returns exactly A."""
    result = edit(
        sd1,
        "a cat riding a bicycle",
        full_injection("a cat riding a bicycle"),
        full_injection("a cat riding a bicycle", parent=1),
        steps=STEPS,
        self_max_scale=1.0,
    )
    torch.testing.assert_close(result.latents[2], result.latents[0], **TIGHT)
    cycle = edit(
        sd1,
        "a cat riding a bicycle",
        Target("a dog riding a bicycle"),
        Target("a cat riding a bicycle", parent=1),
        steps=STEPS,
    )
    assert cycle.kinds == ("source", "swap", "swap")
    # A child injects its parent's *edited* maps: a re-weighted parent is followed exactly.
    prompt = "a cat riding a bicycle"
    chain = edit(
        sd1,
        prompt,
        Target(prompt, cross=1.0, reweight={"cat": 5.0, "bicycle": -2.0}),
        Target(prompt, parent=1, cross=1.0),
        steps=STEPS,
    )
    assert not torch.allclose(chain.latents[1], chain.latents[0], atol=1e-2)
    torch.testing.assert_close(chain.latents[2], chain.latents[1], **TIGHT)


def test_a_parent_may_come_after_its_child(sd1):
    forward = edit(sd1, "a cat", Target("a red cat", parent=2), Target("a dog"), steps=2)
    assert forward.kinds == ("source", "refine", "swap")


def test_processors_are_restored_after_success_error_and_cancel(sd1):
    before = processors_of(sd1)
    edit(sd1, "a cat", "a dog", steps=2)
    assert processors_of(sd1) == before

    def fail(progress):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        edit(sd1, "a cat", "a dog", steps=3, callback=fail)
    assert processors_of(sd1) == before

    cancel = threading.Event()

    def cancel_after_first(progress):
        cancel.set()

    with pytest.raises(Cancelled, match="step 1 of 4"):
        edit(sd1, "a cat", "a dog", steps=4, callback=cancel_after_first, cancel=cancel)
    assert processors_of(sd1) == before


def test_cancel_from_another_thread(sd1):
    cancel, started, outcome = threading.Event(), threading.Event(), {}

    def slow(progress):
        started.set()
        cancel.wait(5)  # the main thread sets it while the run is under way

    def work():
        try:
            edit(sd1, "a cat", "a dog", steps=10, callback=slow, cancel=cancel)
        except Cancelled as error:
            outcome["cancelled"] = error

    thread = threading.Thread(target=work)
    thread.start()
    assert started.wait(30)
    cancel.set()
    thread.join(30)
    assert "cancelled" in outcome
    assert edit(sd1, "a cat", steps=1).images  # the pipeline still works


def test_repeated_runs_leak_neither_processors_nor_tensors(sd1):
    before = processors_of(sd1)

    def live_tensors():
        gc.collect()
        return sum(1 for obj in gc.get_objects() if torch.is_tensor(obj))

    for _ in range(5):
        edit(sd1, "a cat", Target("a dog", blend=LocalBlend(("dog",))), steps=2)
    baseline = live_tensors()
    for _ in range(15):
        edit(sd1, "a cat", Target("a dog", blend=LocalBlend(("dog",))), steps=2)
    assert live_tensors() <= baseline
    assert processors_of(sd1) == before


def test_recipe_round_trip_reproduces_the_images(sd1):
    first = edit(
        sd1,
        "a cat riding a bicycle",
        Target("a dog riding a bicycle", cross={"default_": 0.8, "dog": 0.3}, blend=LocalBlend(("dog",))),
        Target("a fluffy cat riding a bicycle", reweight={"fluffy": -1.0}, preserve=("cat",)),
        steps=STEPS,
        seed=11,
    )
    recipe = Recipe.from_json(first.recipe.to_json())
    assert recipe == first.recipe
    again = run(sd1, recipe)
    for a, b in zip(first.images, again.images):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_progress_and_previews(sd1):
    seen = []
    edit(sd1, "a cat", "a dog", steps=4, callback=seen.append, preview_every=2)
    assert [p.step for p in seen] == [0, 1, 2, 3]
    assert seen[-1].fraction == 1.0
    assert [p.preview is not None for p in seen] == [False, True, False, True]
    assert len(seen[1].preview) == 2 and seen[1].preview[0].size == (32, 32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_finite(dtype):
    from p2p_widgets.testing import tiny_pipeline

    pipe = tiny_pipeline("sd1", dtype=dtype)
    result = edit(
        pipe,
        "a cat riding a bicycle",
        Target("a dog riding a bicycle", reweight={"dog": 3.0}, blend=LocalBlend(("dog",))),
        steps=3,
        self_max_scale=1.0,
    )
    assert torch.isfinite(result.latents).all()
    assert result.attention.word_map(1, "dog").dtype == np.float32


def test_attention_record_shapes_and_word_maps(sd1):
    result = edit(sd1, "a cat riding a bicycle", "a dog riding a bicycle", steps=STEPS, height=32, width=48)
    record = result.attention
    assert record.latent_size == (16, 24)
    assert record.factors == (1, 2)
    assert record.maps[1].shape[:4] == (STEPS, 2, 16, 24)
    assert record.maps[2].shape[:4] == (STEPS, 2, 8, 12)
    assert record.maps[1].dtype == torch.float16
    # tokens 0 .. end-of-text of the longest prompt are kept
    assert record.maps[1].shape[-1] == result.branches[0].prompt.length
    # the maps are probabilities: over all 77 tokens they sum to one, so over the kept ones <= 1
    assert float(record.maps[1].float().sum(-1).max()) <= 1.0 + 1e-2
    # a word's map is the mean of its tokens' maps; "bicycle" has several tokens
    tokens = result.branches[0].prompt.token_indices("bicycle")
    assert len(tokens) > 1
    expected = record.maps[2][2, 0][..., list(tokens)].float().mean(-1).numpy()
    np.testing.assert_allclose(record.word_map(0, "bicycle", steps=2, factor=2), expected, rtol=1e-6)
    # step ranges average the chosen steps
    ranged = record.word_map(0, "cat", steps=(1, 4), factor=1)
    manual = np.mean([record.word_map(0, "cat", steps=s, factor=1) for s in (1, 2, 3)], axis=0)
    np.testing.assert_allclose(ranged, manual, rtol=1e-5, atol=1e-7)
    # aggregated maps have the latent's size
    assert record.word_map(1, "dog").shape == (16, 24)
    with pytest.raises(ValueError, match="'lion' is not in"):
        record.word_map(0, "lion")


def test_self_attention_is_recorded_on_request(sd1):
    result = edit(sd1, "a cat", "a dog", steps=3, record_self=(1, 2))
    (where, maps) = result.attention.self_maps
    assert where == (1, 2)
    assert maps.shape == (2, 64, 64)  # branches, pixels, pixels at the 8x8 layer
    torch.testing.assert_close(maps.float().sum(-1), torch.ones(2, 64), atol=1e-2, rtol=0)


def test_recording_off_still_edits_and_blends(sd1):
    target = Target(
        "a dog riding a bicycle", reweight={"dog": 2.0}, blend=LocalBlend(("dog",), threshold=0.95, dilation=0)
    )
    on = edit(sd1, "a cat riding a bicycle", target, steps=STEPS)
    off = edit(sd1, "a cat riding a bicycle", target, steps=STEPS, record=False)
    assert off.attention is None and on.attention is not None
    assert torch.equal(off.blend_masks, on.blend_masks)
    torch.testing.assert_close(off.latents, on.latents, **TIGHT)


@pytest.mark.parametrize(
    "latent, factors, expected",
    [
        ((64, 64), (1, 2, 4, 8), 4),  # SD at 512 px: the paper's 16x16 maps
        ((96, 96), (1, 2, 4, 8), 4),  # SD at 768 px: a quarter of the side, 24x24
        ((128, 128), (1, 2, 4, 8), 4),  # 1024 px: a quarter, 32x32
        ((16, 16), (1, 2, 4), 1),  # the shapes model: 16x16, not 4x4 (that covers everything once dilated)
        ((32, 32), (1, 2, 4, 8), 2),  # 256 px: 16x16
        ((8, 12), (1, 2), 1),  # smaller than 16: the finest maps
        ((64, 48), (2, 4), 4),  # the wanted side follows the shorter side; only some factors recorded
    ],
)
def test_blend_masks_come_from_a_quarter_of_the_latent_but_at_least_16_cells(latent, factors, expected):
    from p2p_widgets.control import blend_factor

    assert blend_factor(latent, factors) == expected
