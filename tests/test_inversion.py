"""Real-image inversion: every method, the engine's use of it, restoring the original, bad input.

Reconstruction is measured on the bundled shapes model, whose images have an exact
description; the mechanics on tiny random pipelines whose UNet output is scaled down
(a random UNet's large outputs make any DDIM inversion diverge).
"""

import threading
import warnings

import numpy as np
import pytest
import torch

from conftest import processors_of
from p2p_widgets import Cancelled, LocalBlend, Target, edit
from p2p_widgets.inversion import METHODS, Inversion, _epsilon, invert, restore_outside
from p2p_widgets.shapes import ObjectWords, SceneWords, caption, centroid, classify_shape, place, render
from p2p_widgets.shapes.evaluate import dilate, find_object
from p2p_widgets.testing import tiny_pipeline

RED_SQUARE = "a red square"


def calm(kind: str):
    """A tiny pipeline whose UNet predicts small outputs (a smooth, invertible model)."""
    pipe = tiny_pipeline(kind)
    with torch.no_grad():
        pipe.unet.conv_out.weight.mul_(0.05)
        pipe.unet.conv_out.bias.mul_(0.05)
    return pipe


@pytest.fixture(scope="module")
def calm_sd1():
    return calm("sd1")


@pytest.fixture(scope="module")
def calm_sd2():
    return calm("sd2")


def picture(size: int = 32) -> np.ndarray:
    image = np.full((size, size, 3), 90, np.uint8)
    image[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = (200, 30, 30)
    return image


def relative_error(result, inverted: Inversion, branch: int = 0) -> float:
    """How far a branch's final latent is from the image's latent, relative to its power."""
    z0 = inverted.trajectory[0]
    return float((result.latents[branch] - z0).pow(2).mean() / z0.pow(2).mean())


def quiet_invert(*args, **kwargs) -> Inversion:
    with warnings.catch_warnings():  # random weights: whether a prompt "fits" is chance
        warnings.simplefilter("ignore", UserWarning)
        return invert(*args, **kwargs)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_model_outputs_convert_to_the_noise(prediction):
    generator = torch.Generator().manual_seed(0)
    clean, noise = torch.randn(2, 4, 4, 4, generator=generator)
    alpha = torch.tensor(0.3)
    x = alpha.sqrt() * clean + (1 - alpha).sqrt() * noise
    output = {
        "epsilon": noise,
        "v_prediction": alpha.sqrt() * noise - (1 - alpha).sqrt() * clean,
        "sample": clean,
    }[prediction]
    assert torch.allclose(_epsilon(output, x, alpha, prediction), noise, atol=1e-5)
    with pytest.raises(ValueError, match="cannot invert a model predicting 'flow'"):
        _epsilon(output, x, alpha, "flow")


def test_v_prediction_ddim_inversion_round_trips_at_guidance_one(calm_sd2):
    inverted = quiet_invert(calm_sd2, picture(), RED_SQUARE, "ddim", steps=10, guidance=1.0)
    assert inverted.trajectory.shape == (11, 4, 16, 16)
    z0, moved = inverted.trajectory[0], inverted.latents[0] - inverted.trajectory[0]
    assert moved.pow(2).mean() > 0.1 * z0.pow(2).mean()  # x_T is not the image's latent
    # reading v as if it were the noise lands at a relative error near 1
    assert relative_error(inverted.edit(calm_sd2), inverted) < 0.05


def test_direct_inversion_keeps_the_source_on_the_trajectory(calm_sd2):
    inverted = quiet_invert(calm_sd2, picture(), RED_SQUARE, "direct", steps=8, guidance=7.5)
    ddim = quiet_invert(calm_sd2, picture(), RED_SQUARE, "ddim", steps=8, guidance=7.5)
    assert relative_error(inverted.edit(calm_sd2), inverted) < 1e-10
    assert relative_error(ddim.edit(calm_sd2), ddim) > 1e-3  # guidance 7.5 drifts without it


def test_negative_prompt_inversion_guides_the_source_by_itself(calm_sd1):
    """With the source prompt as the unconditional input, the source branch is sampled as at guidance 1."""
    negative = quiet_invert(calm_sd1, picture(), RED_SQUARE, "negative-prompt", steps=8, guidance=7.5)
    plain = quiet_invert(calm_sd1, picture(), RED_SQUARE, "ddim", steps=8, guidance=1.0)
    torch.testing.assert_close(negative.trajectory, plain.trajectory)
    edited = negative.edit(calm_sd1, "a blue square")
    torch.testing.assert_close(edited.latents[0], plain.edit(calm_sd1).latents[0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(edited.latents[1], edited.latents[0])  # the target is guided by its prompt


def test_local_blend_restores_the_original_outside_the_mask(calm_sd1):
    inverted = quiet_invert(calm_sd1, picture(), RED_SQUARE, "ddim", steps=6, guidance=7.5)
    result = inverted.edit(calm_sd1, Target("a blue square", blend=LocalBlend(("blue",), threshold=0.9, dilation=0)))
    mask = result.blend_masks[-1, 1]
    assert 0 < mask.sum() < mask.numel()
    outside = ~mask
    # outside: the image's own latent, not the drifting source branch's
    torch.testing.assert_close(result.latents[1][:, outside], inverted.trajectory[0][:, outside])
    assert not torch.allclose(result.latents[0][:, outside], inverted.trajectory[0][:, outside], atol=1e-3)
    # in pixels: the original exactly outside the (feathered) mask, the edit inside
    images = restore_outside(result, inverted, feather=0)
    original, edited, restored = (
        np.asarray(i).astype(int) for i in (inverted.image.image, result.images[1], images[1])
    )
    pixels = torch.nn.functional.interpolate(mask[None, None].float(), size=original.shape[:2], mode="bilinear")[
        0, 0
    ].numpy()
    assert np.array_equal(restored[pixels == 0], original[pixels == 0])
    assert np.array_equal(restored[pixels == 1], edited[pixels == 1])
    assert images[0] is inverted.image.image


def test_null_text_never_computes_unet_weight_gradients(calm_sd1):
    unet = calm_sd1.unet
    flags = [p.requires_grad for p in unet.parameters()]
    unet.requires_grad_(True)  # as from_pretrained leaves it
    seen = []

    def look(progress):
        seen.append((progress.stage, all(p.grad is None and not p.requires_grad for p in unet.parameters())))

    try:
        null = quiet_invert(
            calm_sd1, picture(), RED_SQUARE, "null-text", steps=3, guidance=7.5, inner_steps=2, callback=look
        )
        assert null.unconditional.shape == (3, 77, 32) and len(null.inner_steps) == 3
        assert all(p.requires_grad for p in unet.parameters())  # restored
        assert all(p.grad is None for p in unet.parameters())
    finally:
        for p, flag in zip(unet.parameters(), flags):
            p.requires_grad_(flag)
    assert [stage for stage, _ in seen] == ["invert"] * 3 + ["null-text"] * 3
    assert all(frozen for stage, frozen in seen if stage == "null-text")


def test_progress_counts_every_step(calm_sd1):
    seen = []
    quiet_invert(calm_sd1, picture(), RED_SQUARE, "ddim", steps=5, guidance=7.5, callback=seen.append)
    assert [(p.step, p.steps, p.stage) for p in seen] == [(i, 5, "invert") for i in range(5)]
    assert [p.timestep for p in seen] == sorted(p.timestep for p in seen)  # x_0 -> x_T


def test_cancel_stops_and_restores_the_pipeline(calm_sd1):
    unet = calm_sd1.unet
    before = (processors_of(calm_sd1), [p.requires_grad for p in unet.parameters()], dict(calm_sd1.scheduler.config))
    cancel = threading.Event()

    def stop_in_the_optimisation(progress):
        if progress.stage == "null-text":
            cancel.set()

    with pytest.raises(Cancelled, match="inversion cancelled at step 5 of 8"):
        quiet_invert(
            calm_sd1,
            picture(),
            RED_SQUARE,
            "null-text",
            steps=4,
            guidance=7.5,
            inner_steps=2,
            callback=stop_in_the_optimisation,
            cancel=cancel,
        )
    after = (processors_of(calm_sd1), [p.requires_grad for p in unet.parameters()], dict(calm_sd1.scheduler.config))
    assert after == before
    assert all(p.grad is None for p in unet.parameters())


def test_runs_that_do_not_match_the_inversion_are_refused(calm_sd1):
    inverted = quiet_invert(calm_sd1, picture(), RED_SQUARE, "null-text", steps=3, guidance=7.5, inner_steps=1)
    with pytest.raises(ValueError, match="inverted with steps=3"):
        inverted.edit(calm_sd1, "a blue square", steps=10)
    with pytest.raises(ValueError, match="source prompt must be the inverted one"):
        edit(calm_sd1, "a green square", "a blue square", steps=3, guidance=7.5, guide=inverted)
    with pytest.raises(ValueError, match=r"guidance must be 7\.5: the null-text embeddings were optimised for it"):
        edit(calm_sd1, RED_SQUARE, steps=3, guidance=5.0, guide=inverted)
    with pytest.raises(ValueError, match="eta must be 0"):
        inverted.edit(calm_sd1, eta=0.5)
    with pytest.raises(ValueError, match="an inversion brings its own x_T"):
        inverted.edit(calm_sd1, latents=inverted.latents)
    with pytest.raises(ValueError, match="latents or a guide, not both"):
        edit(calm_sd1, RED_SQUARE, steps=3, guidance=7.5, guide=inverted, latents=inverted.latents)
    with pytest.raises(TypeError, match=r"guide is a Guide or what p2p_widgets\.invert"):
        edit(calm_sd1, RED_SQUARE, steps=3, guide="cat.png")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="ddpm"), "method is one of ddim, null-text, negative-prompt, direct"),
        (dict(steps=0), "steps is a positive whole number"),
        (dict(guidance=0.5), "guidance is a number >= 1"),
        (dict(inner_steps=0), "inner_steps is a positive whole number"),
        (dict(scheduler="EulerDiscreteScheduler"), "use scheduler='DDIMScheduler'"),
        (dict(size=(31, 32)), "height 31 is not a multiple of 2"),
    ],
)
def test_bad_settings_are_refused_before_any_work(calm_sd1, kwargs, message):
    calls = []
    with pytest.raises(ValueError, match=message):
        invert(calm_sd1, picture(), RED_SQUARE, **{"method": "ddim", **kwargs}, callback=calls.append)
    assert calls == []


def test_bad_images_are_refused_with_the_fix(calm_sd1, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"cannot read .*broken\.png as an image"):
        invert(calm_sd1, broken, RED_SQUARE, "ddim")
    with pytest.raises(FileNotFoundError, match="no such image file"):
        invert(calm_sd1, tmp_path / "missing.png", RED_SQUARE, "ddim")
    with pytest.raises(TypeError, match="prompt is a string describing the image"):
        invert(calm_sd1, picture(), None, "ddim")


def test_the_image_preparation_is_reported(calm_sd1):
    wide = np.zeros((20, 60, 4), np.uint8)
    wide[..., 3] = 128
    inverted = quiet_invert(calm_sd1, wide, RED_SQUARE, "ddim", steps=2, guidance=1.0, fit="pad")
    assert inverted.image.original_size == (20, 60)
    assert any("transparency" in note for note in inverted.notes)
    assert any("padded to 32x32" in note for note in inverted.notes)
    assert (inverted.height, inverted.width) == (32, 32)


# --- on the shapes model: real reconstruction and editing ------------------------------------

TWO = SceneWords((ObjectWords("circle", "red", "big"), ObjectWords("square", "blue", "small")), "gray")


@pytest.fixture(scope="module")
def two_objects():
    return render(place(TWO, np.random.default_rng(1)))


def psnr(a, b, where=None) -> float:
    error = (np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2
    error = error[where].mean() if where is not None else error.mean()
    return float("inf") if error == 0 else 10 * np.log10(255.0**2 / error)


def test_reconstruction_on_a_rendered_scene(shapes, two_objects):
    image = two_objects.image
    found = {}
    for method in METHODS:
        inverted = invert(shapes, image, caption(TWO), method, steps=25, guidance=7.5)
        assert inverted.notes == ()  # the prompt describes it; the size is the model's
        found[method] = psnr(inverted.edit(shapes, record=False).source, image)
    ceiling = psnr(inverted.vae_round_trip(shapes), image)
    for method in ("null-text", "direct"):
        assert found[method] >= found["ddim"] + 5, found
        assert found[method] >= ceiling - 3, (found, ceiling)
    assert found["negative-prompt"] > found["ddim"], found


@pytest.mark.parametrize("method", ["null-text", "direct"])
def test_an_inverted_image_is_edited_in_one_object_only(shapes, two_objects, method):
    image = two_objects.image
    edited = SceneWords((TWO.objects[0], ObjectWords("square", "green", "small")), "gray")
    inverted = invert(shapes, image, caption(TWO), method, steps=25, guidance=7.5)
    result = inverted.edit(shapes, Target(caption(edited), blend=LocalBlend(("green", "square"), threshold=0.7)))
    target = np.asarray(result.images[1])
    square = find_object(target, "green")
    assert square is not None and classify_shape(square) == "square"
    assert np.hypot(*np.subtract(centroid(square), centroid(two_objects.masks[1]))) <= 3
    assert find_object(target, "blue") is None
    keep = ~dilate(two_objects.masks[1] | square, 2)
    assert psnr(target, image, keep) >= 25


def test_a_prompt_that_does_not_describe_the_image_is_warned_about(shapes, two_objects):
    with pytest.warns(UserWarning, match="does not seem to describe the image"):
        inverted = invert(shapes, two_objects.image, "a small green star on a white background", "ddim", steps=5)
    assert any("does not seem to describe" in note for note in inverted.notes)
    with pytest.raises(ValueError, match="the source prompt is empty; describe the image"):
        invert(shapes, two_objects.image, "", "ddim", steps=5)
