"""SDXL: the engine against the stock StableDiffusionXLPipeline, the paper's invariants, every
edit kind, the record, size conditions, inversion, and what SDXL refuses.

On a tiny in-process SDXL pipeline (two tokenizers padding differently, two encoders, the
text_time UNet, Euler as SDXL base's scheduler), CPU float32.
"""

import threading
import warnings

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline

from conftest import processors_of
from p2p_widgets import Cancelled, LocalBlend, Recipe, Target, edit, invert, run
from p2p_widgets.engine import initial_noise
from p2p_widgets.families import StableDiffusionXL, family_of
from p2p_widgets.testing import tiny_sdxl_pipeline

STEPS = 4
PROMPT, SWAP = "a red cat sitting on a table", "a red dog sitting on a table"
# The engine computes the conditional rows' cross-attention explicitly where the stock
# pipeline uses SDPA: results agree to float32 rounding, not bit for bit.
TOLERANCE = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def sdxl():
    return tiny_sdxl_pipeline()


def stock(pipe, prompt, noise, **kwargs):
    """The stock pipeline's final latents from x_T ``noise``."""
    output = pipe(
        prompt, latents=noise.clone(), num_inference_steps=kwargs.pop("steps", STEPS), output_type="latent", **kwargs
    )
    return output.images[0].float()


def with_scheduler(pipe, cls):
    """The same parts with another scheduler (the fixture's pipeline is left alone)."""
    return StableDiffusionXLPipeline(**{**pipe.components, "scheduler": cls.from_config(pipe.scheduler.config)})


def test_the_pipeline_is_recognised_as_sdxl(sdxl):
    family = family_of(sdxl)
    assert isinstance(family, StableDiffusionXL)
    assert family.default_size() == (32, 32) and family.default_guidance == 5.0
    factors = sorted({p.factor for p in family.places().values() if p.is_cross})
    assert factors == [2, 4]  # SDXL has no attention at the latent's own resolution


@pytest.mark.parametrize(
    "settings",
    [
        dict(),  # the stock defaults: guidance 5, the pipeline's Euler scheduler, no negative prompt (zeros)
        dict(guidance=1.0),  # no unconditional half
        dict(guidance=7.0, negative_prompt="a blue dog"),
        dict(height=32, width=48),
        dict(guidance=6.0, guidance_rescale=0.7),
        dict(original_size=(64, 48), crop=(4, 8), target_size=(48, 40)),
    ],
    ids=["defaults", "unguided", "negative-prompt", "non-square", "rescale", "size-conditions"],
)
def test_the_source_equals_the_stock_pipeline(sdxl, settings):
    height, width = settings.get("height", 32), settings.get("width", 32)
    noise = initial_noise(sdxl, 1, height, width)
    result = edit(sdxl, PROMPT, Target(SWAP), steps=STEPS, latents=noise, **settings)
    stock_settings = {
        "guidance_scale": settings.get("guidance", 5.0),
        "negative_prompt": settings.get("negative_prompt"),
        "height": height,
        "width": width,
        "guidance_rescale": settings.get("guidance_rescale", 0.0),
        "original_size": settings.get("original_size"),
        "crops_coords_top_left": settings.get("crop", (0, 0)),
        "target_size": settings.get("target_size"),
    }
    expected = stock(sdxl, PROMPT, noise, **stock_settings)
    torch.testing.assert_close(result.latents[0], expected, **TOLERANCE)
    assert (
        result.recipe.scheduler == "EulerDiscreteScheduler"
        and result.recipe.guidance == stock_settings["guidance_scale"]
    )


def test_another_scheduler_matches_the_stock_pipeline(sdxl):
    noise = initial_noise(sdxl, 2, 32, 32)
    result = edit(sdxl, PROMPT, steps=STEPS, latents=noise, scheduler="DDIMScheduler")
    expected = stock(with_scheduler(sdxl, DDIMScheduler), PROMPT, noise)
    torch.testing.assert_close(result.latents[0], expected, **TOLERANCE)


def test_edit_with_a_seed_is_the_stock_pipeline_with_that_generator(sdxl):
    """At the stock defaults (size, 50 steps, guidance 5, the pipeline's scheduler)."""
    result = edit(sdxl, PROMPT, seed=7)
    output = sdxl(PROMPT, generator=torch.Generator("cpu").manual_seed(7), output_type="latent")
    torch.testing.assert_close(result.latents[0], output.images[0].float(), **TOLERANCE)
    image = sdxl(PROMPT, generator=torch.Generator("cpu").manual_seed(7)).images[0]
    assert np.abs(np.asarray(result.source, np.int16) - np.asarray(image, np.int16)).max() <= 1
    assert result.recipe.steps == 50 and (result.recipe.height, result.recipe.width) == (32, 32)


def test_equal_prompts_with_full_injection_give_the_source(sdxl):
    result = edit(sdxl, PROMPT, Target(PROMPT, cross=1.0, self_attn=1.0), steps=STEPS, self_max_scale=1.0)
    torch.testing.assert_close(result.latents[1], result.latents[0], **TOLERANCE)


def test_a_re_weight_of_one_is_no_edit(sdxl):
    plain = edit(sdxl, PROMPT, Target(SWAP, cross=0.0, self_attn=0.0), steps=STEPS)
    ones = edit(sdxl, PROMPT, Target(SWAP, cross=0.0, self_attn=0.0, reweight={"dog": 1.0, "table": 1.0}), steps=STEPS)
    torch.testing.assert_close(ones.latents, plain.latents, atol=1e-6, rtol=1e-6)


def test_no_injection_is_an_independent_generation(sdxl):
    noise = initial_noise(sdxl, 3, 32, 32)
    result = edit(sdxl, PROMPT, Target(SWAP, cross=0.0, self_attn=0.0), steps=STEPS, latents=noise)
    torch.testing.assert_close(result.latents[1], stock(sdxl, SWAP, noise), **TOLERANCE)


def test_targets_never_change_the_source(sdxl):
    alone = edit(sdxl, PROMPT, steps=STEPS)
    many = edit(
        sdxl,
        PROMPT,
        Target(SWAP, blend=LocalBlend(("dog",))),
        Target("a red cat sitting on a wooden table", reweight={"wooden": 3.0}),
        steps=STEPS,
    )
    torch.testing.assert_close(many.latents[0], alone.latents[0], **TOLERANCE)


EDITS = {
    "swap": Target(SWAP),
    "refine": Target("a red cat sitting on a wooden table"),
    "re-weight": Target(PROMPT, reweight={"red": 4.0}),
    "negative re-weight": Target(PROMPT, reweight={"red": -1.0}),
    "per-word windows": Target(SWAP, cross={"default_": 0.8, "dog": 0.3}),
    "window pair": Target(SWAP, cross=(0.1, 0.7), self_attn=(0.0, 0.5)),
    "preservation": Target(SWAP, preserve=("table",)),
    "local blend": Target(
        SWAP, blend=LocalBlend(("dog",), threshold=0.97, dilation=0)
    ),  # random, flat maps: a tight mask
    "value injection": Target(SWAP, values=0.5),
}


@pytest.mark.parametrize("kind", list(EDITS))
def test_every_edit_kind_edits_the_target_only(sdxl, kind):
    noise = initial_noise(sdxl, 4, 32, 32)
    target = EDITS[kind]
    result = edit(sdxl, PROMPT, target, steps=STEPS, latents=noise)
    alone = stock(sdxl, target.prompt, noise)
    torch.testing.assert_close(result.latents[0], stock(sdxl, PROMPT, noise), **TOLERANCE)
    assert (result.latents[1] - alone).abs().max() > 1e-3  # the edit acted on the target
    if kind == "local blend":
        masks = result.blend_masks
        assert masks is not None and masks.shape == (STEPS, 2, 16, 16)
        assert not masks[-1, 1].all() and masks[-1, 1].any()  # a region, not everything
        outside = ~masks[-1, 1]
        assert (result.latents[1] - result.latents[0])[:, outside].abs().max() < 1e-5  # reset to the source there


def test_a_chain_and_a_cycle_run(sdxl):
    result = edit(
        sdxl,
        PROMPT,
        Target(SWAP),
        Target("a blue dog sitting on a table", parent=1),
        Target(PROMPT, parent=1),
        steps=STEPS,
    )
    assert len(result.images) == 4 and result.kinds == ("source", "swap", "swap", "swap")
    full = dict(cross=1.0, self_attn=1.0)
    cycle = edit(
        sdxl, PROMPT, Target(PROMPT, **full), Target(PROMPT, parent=1, **full), steps=STEPS, self_max_scale=1.0
    )
    torch.testing.assert_close(cycle.latents[2], cycle.latents[0], **TOLERANCE)


def test_one_map_per_word_at_both_resolutions(sdxl):
    result = edit(sdxl, PROMPT, Target(SWAP), steps=STEPS)
    record = result.attention
    assert record.factors == (2, 4) and record.map_size(2) == (8, 8) and record.map_size(4) == (4, 4)
    assert record.layers == {2: 10, 4: 18}  # every cross-attention layer, counted once
    maps = record.heatmaps(1).words()
    assert maps.labels == ("a", "red", "dog", "sitting", "on", "a", "table") and maps.maps.shape == (7, 16, 16)
    dog = record.word_map(1, "dog", steps=(0, 2), factor=2)
    assert dog.shape == (8, 8) and np.isfinite(dog).all() and dog.max() > 0
    # probabilities over the 77 shared key positions: the real tokens' maps sum to at most 1
    total = record.token_maps(0, list(range(result.branches[0].prompt.length)), steps=0, factor=4).sum(0)
    assert float(total.max()) <= 1.0 + 1e-3


def test_the_second_tokenizer_pads_its_own_way(sdxl):
    """The negative prompt and every prompt reach the second encoder padded with "!" (id 0),
    as the stock pipeline pads them: the no-edit source matching stock output shows it, and
    a prompt padded the first tokenizer's way changes the result."""
    family = family_of(sdxl)
    ids, length = family.token_ids(sdxl.tokenizer_2, "a red cat", 77)
    assert ids[length:] == (sdxl.tokenizer_2.pad_token_id,) * (77 - length) and sdxl.tokenizer_2.pad_token_id == 0
    first, _ = family.token_ids(sdxl.tokenizer, "a red cat", 77)
    assert first[:length] == ids[:length] and first[length:] != ids[length:]


def test_size_conditions_change_the_image_and_round_trip(sdxl):
    noise = initial_noise(sdxl, 5, 32, 32)
    plain = edit(sdxl, PROMPT, steps=STEPS, latents=noise)
    conditioned = edit(sdxl, PROMPT, steps=STEPS, latents=noise, original_size=(512, 512), crop=(0, 128))
    assert (plain.latents - conditioned.latents).abs().max() > 1e-4
    recipe = conditioned.recipe
    assert Recipe.from_json(recipe.to_json()) == recipe and recipe.crop == (0, 128)
    again = run(sdxl, Recipe.from_json(recipe.to_json()), latents=noise)
    assert again.latents.equal(conditioned.latents)


def test_the_processors_are_restored_after_a_run_an_error_and_a_cancel(sdxl):
    before = processors_of(sdxl)
    edit(sdxl, PROMPT, Target(SWAP), steps=2)
    assert processors_of(sdxl) == before

    def fail(progress):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        edit(sdxl, PROMPT, Target(SWAP), steps=2, callback=fail)
    assert processors_of(sdxl) == before
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        edit(sdxl, PROMPT, Target(SWAP), steps=2, cancel=cancel)
    assert processors_of(sdxl) == before


def test_a_float16_vae_decodes_in_float32_and_is_put_back(sdxl):
    pipe = StableDiffusionXLPipeline(**sdxl.components)
    pipe.vae = tiny_sdxl_pipeline().vae.to(torch.float16)  # a copy: the fixture's VAE stays float32
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    image = family_of(pipe).decode(latents)[0]
    assert pipe.vae.dtype == torch.float16
    reference = family_of(sdxl).decode(latents)[0]  # the same weights in float32
    assert np.abs(np.asarray(image, np.int16) - np.asarray(reference, np.int16)).max() <= 2


def test_two_tokenizers_that_split_a_prompt_differently_are_refused(sdxl):
    from p2p_widgets.testing import tiny_tokenizer

    other = StableDiffusionXLPipeline(**{**sdxl.components, "tokenizer_2": tiny_tokenizer(pad_token="!")})
    other.tokenizer_2.add_tokens(["redcat"])  # one token here, two for the first tokenizer
    with pytest.raises(ValueError, match="two tokenizers split 'a redcat' differently"):
        edit(other, "a redcat", steps=2)


def test_size_conditions_are_refused_on_stable_diffusion(sd1):
    with pytest.raises(ValueError, match="condition SDXL models only"):
        edit(sd1, "a red cat", steps=2, original_size=(64, 64))
    with pytest.raises(ValueError, match="crop is \\(top, left\\)"):
        Recipe("a red cat", crop=(-1, 0))


def test_an_unknown_family_is_refused_by_name():
    class Transformer2DPipeline:
        transformer, vae = torch.nn.Linear(1, 1), object()

    with pytest.raises(
        ValueError, match=r"cannot edit with this Transformer2DPipeline .*it has transformer, vae.*SDXL"
    ):
        edit(Transformer2DPipeline(), "a red cat", steps=2)


# --- inversion -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calm_sdxl():
    """The tiny SDXL pipeline with small UNet outputs (a smooth, invertible model)."""
    pipe = tiny_sdxl_pipeline()
    with torch.no_grad():
        pipe.unet.conv_out.weight.mul_(0.05)
        pipe.unet.conv_out.bias.mul_(0.05)
    return pipe


def picture(size: int = 32) -> np.ndarray:
    image = np.full((size, size, 3), 90, np.uint8)
    image[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = (200, 30, 30)
    return image


def error(result, inverted, branch=0) -> float:
    z0 = inverted.trajectory[0]
    return float((result.latents[branch] - z0).pow(2).mean() / z0.pow(2).mean())


@pytest.mark.slow
def test_inversion_reconstruction_ranks_null_text_and_direct_far_above_ddim(calm_sdxl):
    """On a random model the official null-text schedule (lr 1e-2) moves slowly, so it gets
    more inner steps here than the default 10; the ranking is what is tested."""
    errors = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # random weights: whether a prompt fits is chance
        for method in ("ddim", "null-text", "negative-prompt", "direct"):
            inverted = invert(calm_sdxl, picture(), PROMPT, method, steps=4, guidance=7.5, inner_steps=50)
            errors[method] = error(inverted.edit(calm_sdxl), inverted)
    assert errors["direct"] < 1e-6  # the source is pinned to the trajectory
    assert errors["null-text"] < errors["ddim"] / 2, errors
    assert errors["negative-prompt"] < errors["ddim"], errors


def test_null_text_optimises_both_encoders_and_the_pooled_embedding_with_frozen_weights(calm_sdxl):
    before = [p.requires_grad for p in calm_sdxl.unet.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        inverted = invert(calm_sdxl, picture(), PROMPT, "null-text", steps=3, guidance=7.5, inner_steps=2)
    assert inverted.unconditional.shape == (3, 77, 80)  # 32 features of encoder 1, 48 of encoder 2
    assert inverted.unconditional_pooled.shape == (3, 24)
    # it started from zeros (SDXL's empty negative prompt) and moved in every part
    assert inverted.unconditional[:, :, :32].abs().max() > 0 and inverted.unconditional[:, :, 32:].abs().max() > 0
    assert inverted.unconditional_pooled.abs().max() > 0
    assert [p.requires_grad for p in calm_sdxl.unet.parameters()] == before
    assert all(p.grad is None for p in calm_sdxl.unet.parameters())
    edited = inverted.edit(calm_sdxl, Target(SWAP, blend=LocalBlend(("dog",))))
    assert len(edited.images) == 2 and edited.blend_masks is not None


# --- few-step and stochastic samplers (Turbo, Lightning) --------------------------------------


@pytest.mark.parametrize("name", ["EulerAncestralDiscreteScheduler", "EulerDiscreteScheduler"])
def test_a_few_step_trailing_sampler_equals_the_stock_pipeline(sdxl, name):
    """SDXL Turbo's setting (ancestral Euler, trailing timesteps, no guidance) and
    Lightning's (Euler, trailing): the source is the stock image of the same seed, noise
    of the ancestral steps included."""
    import diffusers

    cls = getattr(diffusers, name)
    turbo = StableDiffusionXLPipeline(
        **{**sdxl.components, "scheduler": cls.from_config(sdxl.scheduler.config, timestep_spacing="trailing")}
    )
    result = edit(turbo, PROMPT, Target(SWAP), seed=3, steps=2, guidance=0.0, scheduler="pipeline")
    output = turbo(
        PROMPT,
        num_inference_steps=2,
        guidance_scale=0.0,
        generator=torch.Generator("cpu").manual_seed(3),
        output_type="latent",
    )
    torch.testing.assert_close(result.latents[0], output.images[0].float(), **TOLERANCE)
    assert result.recipe.scheduler == name and result.recipe.guidance == 0.0


def test_a_stochastic_sampler_gives_every_branch_the_same_noise(sdxl):
    """Equal prompts with full injection give the source under ancestral sampling too: every
    branch draws the same noise at every step (else a stochastic sampler alone would make
    the target differ from the source)."""
    result = edit(
        sdxl,
        PROMPT,
        Target(PROMPT, cross=1.0, self_attn=1.0),
        steps=3,
        scheduler="EulerAncestralDiscreteScheduler",
        self_max_scale=1.0,
    )
    torch.testing.assert_close(result.latents[1], result.latents[0], **TOLERANCE)


def test_ddim_with_eta_gives_every_branch_the_same_noise_and_the_stock_source(sd1):
    result = edit(
        sd1, "a red cat", Target("a red cat", cross=1.0, self_attn=1.0), steps=3, eta=0.7, self_max_scale=1.0, seed=5
    )
    torch.testing.assert_close(result.latents[1], result.latents[0], **TOLERANCE)
    output = sd1(
        "a red cat",
        num_inference_steps=3,
        eta=0.7,
        generator=torch.Generator("cpu").manual_seed(5),
        output_type="latent",
    )
    torch.testing.assert_close(result.latents[0], output.images[0].float(), **TOLERANCE)


# --- the panel, the command line, loading ------------------------------------------------------


def test_the_panel_runs_sdxl_and_shows_its_heatmaps(sdxl):
    from p2p_widgets.panel import Session

    session = Session(sdxl)
    assert session.settings.guidance == 5.0  # the family's default
    session.update(source=PROMPT, steps=2)
    session.update(edits=(session.settings.edits[0].__class__(SWAP),))
    assert session.run(wait=True) and session.state.status == "done", session.state.message
    entry = session.state.history[-1]
    assert len(entry.result.images) == 2 and entry.result.recipe.scheduler == "EulerDiscreteScheduler"
    image = session.heatmap_image()
    assert image is not None and image.size[0] > 0


def test_load_pipeline_loads_a_saved_sdxl_folder(sdxl, tmp_path, monkeypatch):
    from p2p_widgets.models import load_pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sdxl.save_pretrained(tmp_path / "sdxl")
    pipe = load_pipeline(str(tmp_path / "sdxl"))
    assert isinstance(pipe, StableDiffusionXLPipeline) and isinstance(family_of(pipe), StableDiffusionXL)
    noise = initial_noise(sdxl, 0, 32, 32)
    torch.testing.assert_close(
        edit(pipe, PROMPT, steps=2, latents=noise).latents, edit(sdxl, PROMPT, steps=2, latents=noise).latents
    )


def test_the_command_line_edits_with_an_sdxl_model(tmp_path):
    from p2p_widgets.__main__ import main

    assert main(["edit", PROMPT, SWAP, "--model", "tiny-sdxl", "--steps", "2", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "p2p_0.png").is_file() and (tmp_path / "p2p_1.png").is_file()
    recipe = Recipe.from_json((tmp_path / "p2p.json").read_text())
    assert recipe.scheduler == "EulerDiscreteScheduler" and recipe.guidance == 5.0 and recipe.model == "tiny-sdxl"
