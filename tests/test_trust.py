"""Hostile input and faults against the library: every refusal a clean error naming the
problem, no silent wrong result, the pipeline and earlier results untouched.

Classes: concurrency (real threads), the pipeline's scheduler as it is, recipes (one
strict schema; property-based round trips), numbers in range and finite results, memory
before allocation. Files, images to invert, the CLI and the panel have their own files
(test_files.py, test_inversion_input.py, test_cli.py, test_panel.py).
"""

import json
import threading
import warnings

import diffusers
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import processors_of
from p2p_widgets import CrossWindow, LocalBlend, Recipe, Target, Window, edit, invert, run
from p2p_widgets import engine as engine_module
from p2p_widgets.engine import NotFinite, initial_noise, make_scheduler
from p2p_widgets.memory import NotEnoughMemory, available_memory
from p2p_widgets.prompts import tokenize

JOIN = 120  # seconds: a thread that is not done by then is a hang, and fails the test


def pixels(images):
    return [np.asarray(image).copy() for image in images]


def scheduler_state(pipe):
    return type(pipe.scheduler), dict(pipe.scheduler.config)


@pytest.fixture
def earlier(sd1):
    """A result made before the hostile call, and a copy of its pixels and latents."""
    result = edit(sd1, "a red cat", "a blue cat", steps=2, seed=1)
    return result, pixels(result.images), result.latents.clone()


def assert_untouched(pipe, processors, scheduler, earlier):
    assert processors_of(pipe) == processors
    assert scheduler_state(pipe) == scheduler
    result, images, latents = earlier
    assert all(np.array_equal(a, b) for a, b in zip(pixels(result.images), images))
    assert torch.equal(result.latents, latents)


# -- 1. concurrency ----------------------------------------------------------------------
class Paused:
    """A run that stops inside its sampling loop (processors attached) until released."""

    def __init__(self, pipe, *prompts, at=1, **settings):
        self.inside, self.release, self.result, self.error = threading.Event(), threading.Event(), None, None

        def callback(progress):
            if progress.step == at:
                self.inside.set()
                assert self.release.wait(JOIN), "never released"

        def work():
            try:
                self.result = edit(pipe, *prompts, callback=callback, **settings)
            except BaseException as error:  # re-raised in the test thread
                self.error = error

        self.thread = threading.Thread(target=work, daemon=True)
        self.thread.start()
        assert self.inside.wait(JOIN), "the run never reached its sampling loop"

    def finish(self):
        self.release.set()
        self.thread.join(JOIN)
        assert not self.thread.is_alive(), "the run hung"
        if self.error is not None:
            raise self.error
        return self.result


def stock(pipe, prompts, steps=3):
    noise = initial_noise(pipe, 0, 32, 32).expand(len(prompts), -1, -1, -1)
    return pipe(list(prompts), latents=noise.clone(), num_inference_steps=steps, output_type="np").images


def test_a_stock_call_during_a_run_is_untouched_and_does_not_touch_the_run(sd1):
    alone = stock(sd1, ["a cat", "a dog"])
    solo = edit(sd1, "a red cat", "a blue cat", steps=4)
    paused = Paused(sd1, "a red cat", "a blue cat", steps=4)
    during = stock(sd1, ["a cat", "a dog"])  # two prompts: a batch the run's controller would misread
    result = paused.finish()
    assert np.array_equal(alone, during)
    assert all(np.array_equal(a, b) for a, b in zip(pixels(solo.images), pixels(result.images)))
    for factor, maps in solo.attention.maps.items():
        assert torch.equal(maps, result.attention.maps[factor])  # the record is the run's own
    assert all(
        isinstance(p, type(next(iter(sd1.unet.attn_processors.values())))) for p in sd1.unet.attn_processors.values()
    )


def test_an_inversion_during_a_run_is_the_same_as_alone(sd1):
    image = edit(sd1, "a red cat", steps=2).images[0]
    alone = invert(sd1, image, "a red cat", "ddim", steps=3, guidance=1.0)
    paused = Paused(sd1, "a red cat", "a blue cat", steps=4)
    during = invert(sd1, image, "a red cat", "ddim", steps=3, guidance=1.0)
    paused.finish()
    assert torch.equal(alone.trajectory, during.trajectory)


def test_racing_edits_on_one_pipeline_each_get_their_own_images(sd1):
    jobs = [
        ("a red cat", "a blue cat"),
        ("a dog riding a horse", "a cat riding a horse"),
        ("a big tree", "a small tree"),
    ]
    solo = [pixels(edit(sd1, *job, steps=3).images) for job in jobs]
    before = processors_of(sd1)
    barrier = threading.Barrier(len(jobs))
    results, errors = [None] * len(jobs), []

    def work(index):
        try:
            barrier.wait(JOIN)
            results[index] = pixels(edit(sd1, *jobs[index], steps=3).images)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN)
    assert not any(t.is_alive() for t in threads), "a racing edit hung"
    assert not errors, errors
    for got, want in zip(results, solo):
        assert all(np.array_equal(a, b) for a, b in zip(got, want))
    assert processors_of(sd1) == before  # restored once the last run ended


def test_tokenising_from_threads_does_not_depend_on_the_tokenizer_padding_state(sd1):
    tokenizer = sd1.tokenizer
    texts = ["a red cat riding a bicycle", "a dog", "an old wooden house on a snowy mountain at night"]
    expected = {text: tokenize(tokenizer, text) for text in texts}
    stop, wrong, errors = threading.Event(), [], []

    def pad():  # what the stock pipeline does, over and over
        while not stop.is_set():
            tokenizer(texts[2], padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
            tokenizer(texts[1], padding="longest", truncation=True, max_length=4)

    def ours():
        try:
            for _ in range(200):
                for text in texts:
                    if tokenize(tokenizer, text) != expected[text]:
                        wrong.append(text)
        except BaseException as error:
            errors.append(error)

    padders = [threading.Thread(target=pad, daemon=True) for _ in range(2)]
    workers = [threading.Thread(target=ours, daemon=True) for _ in range(2)]
    for thread in padders + workers:
        thread.start()
    for thread in workers:
        thread.join(JOIN)
    stop.set()
    for thread in padders:
        thread.join(JOIN)
    assert not any(t.is_alive() for t in padders + workers)
    assert not errors and not wrong


def test_a_processor_the_user_sets_during_a_run_is_kept(sd1):
    from diffusers.models.attention_processor import AttnProcessor

    original = sd1.unet.attn_processors
    paused = Paused(sd1, "a red cat", "a blue cat", steps=3)
    name = next(iter(original))
    mine = AttnProcessor()
    module = sd1.unet.get_submodule(name.rsplit(".processor", 1)[0])
    module.set_processor(mine)
    paused.finish()
    assert sd1.unet.attn_processors[name] is mine  # not reverted behind the user's back
    module.set_processor(original[name])


# -- 2. the pipeline's scheduler as it is -----------------------------------------------
def users_pipeline(base, scheduler):
    """A pipeline built as users build one: their own scheduler, patched by diffusers."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffusers' steps_offset deprecation notice
        pipe = diffusers.StableDiffusionPipeline(**{**base.components, "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("name", ["pipeline", "DDIMScheduler"])
def test_a_scheduler_built_without_steps_offset_samples_the_pipelines_timesteps(sd1, name):
    ddim = diffusers.DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False
    )
    assert ddim.config.steps_offset == 0
    pipe = users_pipeline(sd1, ddim)
    assert pipe.scheduler.config.steps_offset == 1  # patched by the pipeline ...
    assert "steps_offset" in pipe.scheduler.config._use_default_values  # ... and listed as a default
    copy = make_scheduler(pipe, name)
    copy.set_timesteps(10)
    pipe.scheduler.set_timesteps(10)
    assert torch.equal(copy.timesteps, pipe.scheduler.timesteps)  # 901 ... 1, not 900 ... 0
    expected = stock(pipe, ["a red cat"], steps=10)[0]
    result = edit(pipe, "a red cat", steps=10, scheduler=name)
    assert np.array_equal(np.asarray(result.source), (expected * 255).round().astype(np.uint8))


def test_another_scheduler_class_takes_its_own_defaults_but_the_patched_keys(sd1):
    pipe = users_pipeline(
        sd1, diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    )
    euler = make_scheduler(pipe, "EulerDiscreteScheduler")
    assert euler.config.steps_offset == 1
    assert euler.config.beta_schedule == "scaled_linear"
    assert euler.config.timestep_spacing == diffusers.EulerDiscreteScheduler().config.timestep_spacing


# -- 3. recipes: one strict schema -------------------------------------------------------
GOOD = {"prompt": "a cat riding a bicycle", "targets": [{"prompt": "a dog riding a bicycle"}]}


def with_target(**fields):
    return {**GOOD, "targets": [{"prompt": "a dog riding a bicycle", **fields}]}


BAD_RECIPES = [
    # (recipe JSON object, what the message must say)
    ({**GOOD, "targets": "a dog riding a bicycle"}, '"targets" is a list'),
    ({**GOOD, "targets": {"prompt": "a dog riding a bicycle"}}, '"targets" is a list'),
    ({**GOOD, "targets": 3}, '"targets" is a list'),
    ({**GOOD, "targets": [3]}, "target 1: a target is a prompt string or an object"),
    ({**GOOD, "targets": [{"kind": "swap"}]}, 'target 1: a target needs its "prompt"'),
    (with_target(reweight="dog"), "reweight is a list"),
    (with_target(reweight=[["dog"]]), r"reweight holds \(word, weight\) pairs"),
    (with_target(reweight={"dog": "two"}), "weight of 'dog' must be a finite number"),
    (with_target(reweight={"dog": 1e39}), "within float32"),
    (with_target(reweight=[["dog", 2], ["Dog", 3]]), "twice"),
    (with_target(cross={"start": 0.1}), "missing end"),
    (with_target(cross={"start": 0.1, "end": 0.5, "middle": 0.3}), "unknown key"),
    (with_target(self_attn={"end": 0.5}), "missing start"),
    (with_target(cross={"default": [0, 0.8], "words": {"dog": 0.3}}), '"words" of a cross window is a list'),
    (with_target(cross={"default": [0, 0.8], "words": [["dog", 0.3, 0.4]]}), r"\(word, window\) pair"),
    (with_target(cross={"default": [0, 0.8], "words": [[-1, 0.3]]}), "a word is its text or its index"),
    (with_target(cross=[0.1, 0.2, 0.3]), r"a window is \(start, end\)"),
    (with_target(cross=1.5), "between 0 and 1"),
    (with_target(preserve="dog"), "preserve is a list"),
    (with_target(blend=["dog"]), "a local blend is an object"),
    (with_target(blend={"threshold": 0.5}), 'a local blend needs its "words"'),
    (with_target(blend={"words": ["dog"], "dilation": 10**6}), "dilation is a max-pool radius"),
    (with_target(value_beta=2), "value_beta"),
    (with_target(parent=True), "parent is a branch index"),
    (with_target(colour="red"), "unknown Target field"),
    ({**GOOD, "version": "99.0"}, "newer than this one"),
    ({**GOOD, "version": "not a version"}, "not a p2p_widgets version"),
    ({**GOOD, "version": 3}, '"version" is the p2p_widgets version'),
    ({**GOOD, "seed": 10**30}, "seed must be from 0 to 2\\*\\*63 - 1"),
    ({**GOOD, "seed": -1}, "seed must be from 0"),
    ({**GOOD, "seed": 1.5}, "seed must be an integer"),
    ({**GOOD, "steps": "50"}, "steps must be an integer"),
    ({**GOOD, "steps": 10**8}, "at most 10000"),
    ({**GOOD, "guidance": "high"}, "guidance must be a number"),
    ({**GOOD, "guidance_rescale": 1.5}, "guidance_rescale is"),
    ({**GOOD, "eta": 100}, "eta is DDIM's eta"),
    ({**GOOD, "scheduler": 5}, "scheduler is a diffusers scheduler class name"),
    ({**GOOD, "model": ["x"]}, "model is a hub id"),
    ({**GOOD, "height": 64.0}, "height must be a positive number of pixels"),
    ({"targets": []}, 'no "prompt"'),
    ([GOOD], "expected a JSON object, not a list"),
]


@pytest.mark.parametrize("data, message", BAD_RECIPES, ids=[str(i) for i in range(len(BAD_RECIPES))])
def test_a_bad_recipe_is_refused_by_name(data, message):
    with pytest.raises(ValueError, match=message):
        Recipe.from_json(json.dumps(data))


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "invalid JSON"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"prompt": "a cat", "targets": [' + "[" * 50_000 + "]" * 50_000 + "]}", "nested too deeply|a target is"),
        ('"a cat"', "expected a JSON object"),
        (b"\xff\xfe", "not UTF-8"),
        ('{"prompt": "' + "a" * 5_000_000 + '"}', "more than the"),
    ],
)
def test_text_that_is_not_a_recipe_is_refused(text, message):
    with pytest.raises(ValueError, match=message):
        Recipe.from_json(text)


def test_per_word_windows_keyed_by_word_index_survive_json_and_rerun_the_same(sd1):
    recipe = Recipe(
        "a red cat on a table",
        (Target("a blue cat on a table", cross={"default_": 0.8, 1: 0.2}, reweight={2: 2.0}, preserve=(2,)),),
        steps=3,
    )
    again = Recipe.from_json(recipe.to_json())
    assert again == recipe
    assert again.targets[0].cross.words == ((1, Window(0.0, 0.2)),)  # the index, not the word "1"
    first, second = pixels(run(sd1, recipe).images), pixels(run(sd1, again).images)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))


def test_reweight_as_a_json_object_and_older_per_word_windows_load():
    data = with_target(reweight={"dog": 2}, cross={"default_": [0, 0.8], "dog": [0, 0.3]})
    target = Recipe.from_json(json.dumps(data)).targets[0]
    assert target.reweight == (("dog", 2.0),)
    assert target.cross == CrossWindow(Window(0, 0.8), (("dog", Window(0, 0.3)),))


WORDS = st.sampled_from(["cat", "dog", "red", "a", "bicycle"]) | st.integers(0, 6)
FRACTION = st.floats(0, 1, allow_nan=False)


@st.composite
def windows(draw):
    a, b = sorted((draw(FRACTION), draw(FRACTION)))
    return Window(a, b)


@st.composite
def targets(draw, count):
    words = draw(st.lists(WORDS, max_size=3, unique_by=lambda w: w.lower() if isinstance(w, str) else w))
    weight = st.floats(allow_nan=False, allow_infinity=False, width=32)  # every finite float32
    blend = None
    if draw(st.booleans()):
        blend = LocalBlend(
            tuple(draw(st.lists(WORDS, min_size=1, max_size=2))),
            parent_words=draw(st.none() | st.lists(WORDS, max_size=2).map(tuple)),
            threshold=draw(st.floats(0.01, 0.99)),
            dilation=draw(st.integers(0, 32)),
            start=draw(FRACTION),
        )
    return Target(
        draw(st.sampled_from(["a dog riding a bicycle", "a red cat", "A cat, riding!"])),
        parent=draw(st.integers(0, count - 1)),
        kind=draw(st.sampled_from(["auto", "swap", "refine"])),
        cross=CrossWindow(draw(windows()), tuple((w, draw(windows())) for w in words)),
        self_attn=draw(windows()),
        reweight=tuple((w, draw(weight)) for w in words),
        reweight_window=draw(st.none() | windows()),
        preserve=tuple(draw(st.lists(WORDS, max_size=2))),
        blend=blend,
        values=draw(windows()),
        value_beta=draw(FRACTION),
    )


@st.composite
def recipes(draw):
    count = draw(st.integers(0, 3))
    return Recipe(
        draw(st.text(min_size=1, max_size=30).filter(str.strip)),
        tuple(draw(targets(i + 1)) for i in range(count)),
        seed=draw(st.integers(0, 2**63 - 1)),
        steps=draw(st.integers(1, 10_000)),
        guidance=draw(st.none() | st.floats(-1e4, 1e4, allow_nan=False)),
        negative_prompt=draw(st.text(max_size=10)),
        height=draw(st.none() | st.integers(1, 4096)),
        width=draw(st.none() | st.integers(1, 4096)),
        scheduler=draw(st.sampled_from([None, "DDIMScheduler", "pipeline", "EulerDiscreteScheduler"])),
        original_size=draw(st.none() | st.tuples(st.integers(1, 65536), st.integers(1, 65536))),
        crop=draw(st.tuples(st.integers(0, 65536), st.integers(0, 65536))),
        target_size=draw(st.none() | st.tuples(st.integers(1, 65536), st.integers(1, 65536))),
        eta=draw(FRACTION),
        guidance_rescale=draw(FRACTION),
        self_max_scale=draw(FRACTION),
        model=draw(st.none() | st.text(min_size=1, max_size=20)),
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(recipes())
def test_every_recipe_the_api_accepts_round_trips_through_json(recipe):
    assert Recipe.from_json(recipe.to_json()) == recipe
    assert Recipe.from_json(recipe.to_json(indent=None)) == recipe


# -- 4. numbers in range, results finite -------------------------------------------------
BAD_NUMBERS = [
    # (settings or a callable, error type, message)
    (dict(seed=-1), ValueError, "seed must be from 0"),
    (dict(seed=2**64 - 1), ValueError, "seed must be from 0"),
    (dict(seed=2**63), ValueError, "seed must be from 0"),
    (dict(guidance_rescale=-0.1), ValueError, "guidance_rescale is"),
    (dict(guidance_rescale=2.0), ValueError, "guidance_rescale is"),
    (dict(guidance=1e308), ValueError, "guidance 1e\\+308 is out of range"),
    (dict(guidance=float("nan")), ValueError, "guidance must be a finite number"),
    (dict(eta=100.0), ValueError, "eta is DDIM's eta"),
    (dict(eta=-1.0), ValueError, "eta is DDIM's eta"),
    (dict(steps=2000), ValueError, "more than the 1000 timesteps"),
    (lambda: Target("a dog", reweight={"dog": float("inf")}), ValueError, "finite number"),
    (lambda: Target("a dog", reweight={"dog": 4e38}), ValueError, "within float32"),
    (lambda: LocalBlend(("dog",), dilation=33), ValueError, "from 0 to 32"),
    (lambda: LocalBlend(("dog",), dilation=-1), ValueError, "from 0 to 32"),
]


@pytest.mark.parametrize("case, error, message", BAD_NUMBERS, ids=[str(i) for i in range(len(BAD_NUMBERS))])
def test_numbers_out_of_range_are_refused(sd1, earlier, case, error, message):
    processors, scheduler = processors_of(sd1), scheduler_state(sd1)
    with pytest.raises(error, match=message):
        case() if callable(case) else edit(sd1, "a cat", "a dog", **{"steps": 2, **case})
    assert_untouched(sd1, processors, scheduler, earlier)


BAD_CALLS = [
    # (edit() arguments beyond the prompts, error type, message)
    (dict(callback="print"), TypeError, "callback is a function of a Progress"),
    (dict(cancel="yes"), TypeError, "cancel is a threading.Event"),
    (dict(record="no"), TypeError, "record is True or False"),
    (dict(preview_every=-1), ValueError, "preview_every is a number of steps"),
    (dict(latents=[1, 2]), TypeError, "latents is a torch.Tensor"),
    (dict(record_self=(99, 1)), ValueError, "record_self is \\(step, factor\\)"),
    (dict(scheduler="FlowMatchEulerDiscreteScheduler"), ValueError, "does not sample this pipeline's model"),
    (dict(scheduler="UNet2DConditionModel"), ValueError, "is not a diffusers scheduler"),
    (dict(height=31), ValueError, "not a multiple of"),
    (dict(negative_prompt=5), TypeError, "negative_prompt is a string"),
    (dict(stepz=3), TypeError, "unknown setting"),
]


@pytest.mark.parametrize("options, error, message", BAD_CALLS, ids=[str(i) for i in range(len(BAD_CALLS))])
def test_bad_run_options_are_refused_before_the_pipeline_is_touched(sd1, earlier, options, error, message):
    processors, scheduler = processors_of(sd1), scheduler_state(sd1)
    with pytest.raises(error, match=message):
        edit(sd1, "a cat", "a dog", **{"steps": 2, **options})
    assert_untouched(sd1, processors, scheduler, earlier)


def test_a_scheduler_that_needs_a_missing_package_says_which(sd1, monkeypatch):
    class Dummy:  # what diffusers exports for a scheduler whose optional package is missing
        _backends = ("torch", "torchsde")

    monkeypatch.setattr(diffusers, "DPMSolverSDEScheduler", Dummy)
    with pytest.raises(ValueError, match="needs the optional package\\(s\\) torchsde: pip install torchsde"):
        edit(sd1, "a cat", steps=2, scheduler="DPMSolverSDEScheduler")


def test_the_largest_seed_runs(sd1):
    assert edit(sd1, "a cat", steps=1, seed=2**63 - 1, eta=1.0).images  # seed + 1 seeds the scheduler's noise


@pytest.mark.parametrize(
    "target, settings, named",
    [
        (Target("a dog", reweight={"dog": -1e30}), {}, "re-weight -1e\\+30 of 'dog'"),
        (Target("a dog"), dict(guidance=9000.0), "guidance 9000"),
    ],
)
def test_latents_that_become_non_finite_raise_naming_the_setting(sd1, earlier, target, settings, named):
    processors, scheduler = processors_of(sd1), scheduler_state(sd1)
    with torch.no_grad():  # weights scaled up so that the run overflows; the message names the guidance
        scale = sd1.unet.conv_out.weight.clone()
        if "guidance" in settings:
            sd1.unet.conv_out.weight.mul_(1e35)
        try:
            with pytest.raises(NotFinite, match=named):
                edit(sd1, "a cat", target, steps=3, **settings)
        finally:
            sd1.unet.conv_out.weight.copy_(scale)
    assert_untouched(sd1, processors, scheduler, earlier)


def test_non_finite_latents_given_are_refused(sd1, earlier):
    processors, scheduler = processors_of(sd1), scheduler_state(sd1)
    noise = initial_noise(sd1, 0, 32, 32)
    noise[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        edit(sd1, "a cat", "a dog", steps=2, latents=noise)
    with pytest.raises(TypeError, match=r"latents is a torch\.Tensor"):
        edit(sd1, "a cat", "a dog", steps=2, latents=noise.numpy())
    assert_untouched(sd1, processors, scheduler, earlier)


# -- 5. memory before allocation ---------------------------------------------------------
def test_a_huge_size_is_refused_with_the_estimate_before_allocating(sd1, earlier, monkeypatch):
    processors, scheduler = processors_of(sd1), scheduler_state(sd1)

    def no_noise(*args, **kwargs):
        raise AssertionError("the initial noise was allocated before the memory check")

    monkeypatch.setattr(engine_module, "initial_noise", no_noise)
    with pytest.raises(NotEnoughMemory, match=r"needs about [\d.]+ PB on cpu, but only .* is free"):
        edit(sd1, "a cat", "a dog", steps=2, height=2**20, width=2**20)
    assert_untouched(sd1, processors, scheduler, earlier)


def test_the_estimate_counts_steps_branches_and_the_record(sd1):
    branches = 3
    small = engine_module.estimate_run(sd1, branches, 10, (32, 32), True)
    more_steps = engine_module.estimate_run(sd1, branches, 100, (32, 32), True)
    unrecorded = engine_module.estimate_run(sd1, branches, 100, (32, 32), True, record=False)
    assert more_steps.device_bytes > small.device_bytes > 0
    assert unrecorded.device_bytes < more_steps.device_bytes
    record = dict(more_steps.on_device)["attention record"]
    # 100 steps x 3 branches x 77 tokens x (16x16 + 8x8 cells) x fp16
    assert record == 100 * 3 * 77 * (16 * 16 + 8 * 8) * 2


def test_a_run_over_the_free_memory_is_refused(sd1, earlier, monkeypatch):
    processors, scheduler = processors_of(sd1), scheduler_state(sd1)
    estimate = engine_module.estimate_run(sd1, 2, 2, (32, 32), True)
    monkeypatch.setattr("p2p_widgets.memory.available_memory", lambda device: estimate.device_bytes // 2)
    with pytest.raises(NotEnoughMemory, match="fewer targets"):
        edit(sd1, "a cat", "a dog", steps=2)
    assert_untouched(sd1, processors, scheduler, earlier)


def test_a_sweep_splits_its_passes_when_the_estimate_refuses_them(sd1, monkeypatch):
    from p2p_widgets.study import sweep

    grid = dict(cross=(0.2, 0.5, 0.8), self_attn=(0.0, 0.4), steps=2)
    whole = sweep(sd1, "a red cat", "a blue cat", **grid)
    limit = engine_module.estimate_run(sd1, 5, 2, (32, 32), True)  # room for two points (4 targets) a pass
    done = []
    real_run = engine_module.run

    def counting(pipe, recipe, **options):
        result = real_run(pipe, recipe, **options)
        done.append(len(recipe.targets))
        return result

    monkeypatch.setattr("p2p_widgets.memory.available_memory", lambda device: limit.device_bytes + limit.host_bytes)
    monkeypatch.setattr(engine_module, "run", counting)
    split = sweep(sd1, "a red cat", "a blue cat", **grid)
    assert max(done) <= 4 and sum(done) == 12  # 6 points x 2 branches, in passes that fit
    settings = ("cross", "self_attn", "k", "values")
    assert [[r[k] for k in settings] for r in split.rows] == [[r[k] for k in settings] for r in whole.rows]
    for a, b in zip(split.edited + split.returned, whole.edited + whole.returned):  # batch sizes differ: rounding
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 2


def test_a_long_prompt_is_refused_before_its_tokens_are_mapped_to_words(sd1, monkeypatch):
    import p2p_widgets.prompts as prompts

    def quadratic(*args, **kwargs):
        raise AssertionError("mapped tokens to words before checking the length")

    monkeypatch.setattr(prompts, "_owners", quadratic)
    with pytest.raises(ValueError, match="60000 tokens long but the text encoder takes at most 75"):
        edit(sd1, "a cat " * 30_000, "a dog", steps=2)


def test_available_memory_is_known_on_this_machine():
    free = available_memory("cpu")
    assert free is None or free > 0


@pytest.mark.parametrize("method", ["ddim", "null-text"])
def test_an_inversion_over_the_free_memory_is_refused_before_encoding(sd1, earlier, monkeypatch, method):
    import p2p_widgets.inversion as inversion

    processors, scheduler = processors_of(sd1), scheduler_state(sd1)
    image = earlier[0].images[0]
    needed = inversion._estimate(
        sd1, inversion.plan_branches(Recipe("a red cat", steps=3), sd1.tokenizer), method, 3, (32, 32)
    )
    monkeypatch.setattr("p2p_widgets.memory.available_memory", lambda device: needed.device_bytes - 1)

    def no_encoding(*args, **kwargs):
        raise AssertionError("the image was encoded before the memory check")

    monkeypatch.setattr(inversion, "encode_image", no_encoding)
    with pytest.raises(NotEnoughMemory, match=f"this inversion \\({method}, 3 steps, 32x32 pixels\\) needs about"):
        invert(sd1, image, "a red cat", method, steps=3)
    assert_untouched(sd1, processors, scheduler, earlier)


def test_null_text_needs_more_memory_than_ddim_inversion(sd1):
    import p2p_widgets.inversion as inversion

    branches = inversion.plan_branches(Recipe("a red cat", steps=10), sd1.tokenizer)
    ddim = inversion._estimate(sd1, branches, "ddim", 10, (32, 32))
    null = inversion._estimate(sd1, branches, "null-text", 10, (32, 32))
    assert null.device_bytes > ddim.device_bytes > 0


def test_two_null_text_inversions_at_once_restore_the_unets_gradient_flags(sd1):
    image = edit(sd1, "a red cat", steps=2).images[0]
    flags = [p.requires_grad for p in sd1.unet.parameters()]
    alone = invert(sd1, image, "a red cat", "null-text", steps=2, inner_steps=2)
    results, errors = [None, None], []
    barrier = threading.Barrier(2)

    def work(index):
        try:
            barrier.wait(JOIN)
            results[index] = invert(sd1, image, "a red cat", "null-text", steps=2, inner_steps=2)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN)
    assert not any(t.is_alive() for t in threads) and not errors, errors
    assert [p.requires_grad for p in sd1.unet.parameters()] == flags
    for result in results:
        torch.testing.assert_close(result.unconditional, alone.unconditional)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda r: __import__("p2p_widgets").plot.difference(r, 1, gain=float("nan")), "positive finite number"),
        (lambda r: __import__("p2p_widgets").plot.difference(r, 1, gain=float("inf")), "positive finite number"),
        (lambda r: __import__("p2p_widgets").plot.gallery(r, columns=0), "pictures per row"),
        (lambda r: __import__("p2p_widgets").plot.gallery(r, columns=-2), "pictures per row"),
        (lambda r: r.attention.word_map(5, "cat"), "branch 5 does not exist"),
        (lambda r: r.attention.word_map(0, "cat", steps=(2, 1)), "selects no step"),
        (lambda r: r.attention.word_map(0, "cat", factor=3), "no cross-attention was recorded at factor 3"),
    ],
)
def test_bad_picture_and_record_arguments_are_refused(earlier, call, message):
    result, images, _latents = earlier
    with pytest.raises(ValueError, match=message):
        call(result)
    assert all(np.array_equal(a, b) for a, b in zip(pixels(result.images), images))
