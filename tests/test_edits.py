"""Edit specs: JSON round trips, validation, and bad input refused before anything runs."""

import json

import pytest
import torch

from conftest import processors_of
from p2p_widgets import CrossWindow, LocalBlend, Recipe, Target, Window, edit, read_recipe, run, save_result


def test_windows_parse_fractions_pairs_and_per_word_dicts():
    assert Window.parse(0.8) == Window(0.0, 0.8)
    assert Window.parse((0.2, 0.6)) == Window(0.2, 0.6)
    assert list(Window(0.0, 0.8).steps(50)) == list(range(40))
    assert list(Window(0.2, 0.6).steps(10)) == [2, 3, 4, 5]
    assert len(Window(0.0, 0.29).steps(100)) == 29  # no float truncation surprises
    cross = CrossWindow.parse({"default_": 0.8, "car": 0.4})
    assert cross.default == Window(0.0, 0.8)
    assert cross.words == (("car", Window(0.0, 0.4)),)
    assert CrossWindow.parse({"car": (0.1, 0.3)}).default == Window(0.0, 1.0)  # as in the official code


def test_specs_round_trip_through_json():
    recipe = Recipe(
        "a cat riding a bicycle",
        (
            Target(
                "a dog riding a bicycle",
                cross={"default_": 0.8, "dog": (0.1, 0.3)},
                self_attn=(0.0, 0.5),
                blend=LocalBlend(("dog",), parent_words=("cat",), threshold=0.4, dilation=2, start=0.2),
            ),
            Target("a fluffy cat riding a bicycle", kind="refine", reweight={"fluffy": -1.5}, reweight_window=0.5),
            Target("a cat riding a bicycle", parent=1, preserve=("cat",)),
        ),
        seed=5,
        steps=20,
        guidance=1.0,
        negative_prompt="blurry",
        height=64,
        width=96,
        scheduler="EulerDiscreteScheduler",
        eta=0.0,
        guidance_rescale=0.7,
        self_max_scale=1.0,
        model="tiny",
    )
    text = recipe.to_json()
    json.loads(text)  # plain JSON
    assert Recipe.from_json(text) == recipe
    assert hash(recipe.targets[0]) == hash(Recipe.from_json(text).targets[0])  # frozen and hashable


def test_plain_strings_are_targets():
    recipe = Recipe("a cat", ("a dog", "a red cat"))
    assert recipe.targets == (Target("a dog"), Target("a red cat"))
    assert recipe.prompts == ("a cat", "a dog", "a red cat")


def test_specs_are_frozen():
    target = Target("a dog")
    with pytest.raises(AttributeError):
        target.prompt = "a cat"


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: Window(0.5, 0.2), ValueError, r"start \(0.5\) is after its end \(0.2\)"),
        (lambda: Window(-0.1, 0.5), ValueError, "between 0 and 1"),
        (lambda: Window(0.0, 1.5), ValueError, "between 0 and 1"),
        (lambda: Target("a dog", cross=1.2), ValueError, "between 0 and 1"),
        (lambda: Target("a dog", self_attn=(0.6, 0.3)), ValueError, "start <= end"),
        (lambda: Target("a dog", cross={"default_": 0.8, "dog": (0.5, 0.1)}), ValueError, "after its end"),
        (lambda: Target(""), ValueError, "prompt is empty"),
        (lambda: Target("a dog", kind="replace"), ValueError, "'auto', 'swap' or 'refine'"),
        (lambda: Target("a dog", parent=-1), ValueError, "0 = the source"),
        (lambda: Target("a dog", reweight={"dog": float("nan")}), ValueError, "finite number"),
        (lambda: LocalBlend(("dog",), threshold=0.0), ValueError, r"between 0 and 1 \(exclusive\)"),
        (lambda: LocalBlend(("dog",), threshold=1.0), ValueError, r"between 0 and 1 \(exclusive\)"),
        (lambda: LocalBlend(()), ValueError, "at least one word"),
        (lambda: LocalBlend(("dog",), dilation=-1), ValueError, "max-pool radius"),
        (lambda: Recipe(""), ValueError, "source prompt is empty"),
        (lambda: Recipe("a cat", steps=0), ValueError, "at least 1"),
        (lambda: Recipe("a cat", steps=2.5), TypeError, "integer"),
        (lambda: Recipe("a cat", ("a dog",), height=0), ValueError, "positive number of pixels"),
        (lambda: Recipe("a cat", (Target("a dog", parent=3),)), ValueError, "only 1 targets"),
        (lambda: Recipe("a cat", (Target("a dog", parent=1),)), ValueError, "names itself"),
        (
            lambda: Recipe("a cat", (Target("a dog", parent=2), Target("a cow", parent=1))),
            ValueError,
            "form a loop",
        ),
        (lambda: Recipe.from_json("{not json"), ValueError, "invalid JSON"),
        (lambda: Recipe.from_dict({"prompt": "a cat", "stepz": 3}), ValueError, "unknown Recipe field.*stepz"),
    ],
)
def test_bad_specs_raise_clear_errors(make, error, message):
    with pytest.raises(error, match=message):
        make()


@pytest.mark.parametrize(
    "prompt, targets, settings, message",
    [
        (
            "a cat riding a bicycle",
            [Target("a dog riding a red bicycle", kind="swap")],
            {},
            "same number of words.*kind='refine'",
        ),
        (
            "a cat riding a bicycle",
            [Target("a cat riding a bicycle", reweight={"lion": 2.0})],
            {},
            "target 1.*'lion' is not in 'a cat riding a bicycle'; its words are: a, cat, riding, a, bicycle",
        ),
        ("a cat", [Target("a dog", blend=LocalBlend(("cat",)))], {}, "'cat' is not in 'a dog'"),
        (
            "a cat",
            [Target("a dog", blend=LocalBlend(("dog",), parent_words=("bird",)))],
            {},
            "'bird' is not in 'a cat'",
        ),
        ("a cat", [Target("a dog", preserve=("tree",))], {}, "'tree' is not in 'a dog'"),
        ("a cat", [Target("a dog", cross={"default_": 0.5, "fish": 0.2})], {}, "'fish' is not in"),
        (" ".join(["cat"] * 80), [], {}, "source prompt: .*shorten it by 5 tokens"),
        ("a cat", [" ".join(["dog"] * 76)], {}, "at most 75"),
        ("a cat", [], {"height": 33}, "height 33 is not a multiple of 2.*use 32 or 34"),
        ("a cat", [], {"width": 31}, "width 31 is not a multiple of 2"),
        ("a cat", [], {"scheduler": "NoSuchScheduler"}, "not a diffusers scheduler.*DDIMScheduler"),
    ],
)
def test_bad_input_is_refused_before_the_pipeline_is_touched(sd1, prompt, targets, settings, message):
    before = processors_of(sd1)
    scheduler_state = dict(sd1.scheduler.config)
    with pytest.raises(ValueError, match=message):
        edit(sd1, prompt, *targets, steps=2, **settings)
    assert processors_of(sd1) == before
    assert dict(sd1.scheduler.config) == scheduler_state


def test_a_pipeline_missing_components_is_named(sd1):
    class Incomplete:
        unet, vae, scheduler = sd1.unet, sd1.vae, sd1.scheduler
        text_encoder = tokenizer = None

    with pytest.raises(ValueError, match="no text_encoder, tokenizer"):
        edit(Incomplete(), "a cat", steps=1)


def test_run_needs_a_recipe(sd1):
    with pytest.raises(TypeError, match="use edit"):
        run(sd1, "a cat")


def test_saved_pngs_carry_the_recipe(sd1, tmp_path):
    result = edit(sd1, "a cat riding a bicycle", Target("a dog riding a bicycle", reweight={"dog": 2}), steps=2, seed=4)
    paths = save_result(result, tmp_path, stem="run")
    assert [p.name for p in paths] == ["run_0.png", "run_1.png", "run.json"]
    assert read_recipe(paths[1]) == result.recipe
    assert read_recipe(paths[2]) == result.recipe
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary files left behind
    again = run(sd1, read_recipe(paths[0]))
    assert torch.equal(again.latents, result.latents)
    plain = tmp_path / "plain.png"
    result.images[0].save(plain)
    with pytest.raises(ValueError, match="holds no p2p_widgets recipe"):
        read_recipe(plain)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="neither a recipe JSON file nor a readable image"):
        read_recipe(tmp_path / "broken.png")


@pytest.mark.parametrize("record_self", [(9, 1), (0, 3), (0,), "x"])
def test_bad_self_attention_record_request(sd1, record_self):
    with pytest.raises(ValueError, match=r"record_self is \(step, factor\)"):
        edit(sd1, "a cat", steps=2, record_self=record_self)


def test_errors_name_the_prompt_at_fault(sd1):
    with pytest.raises(ValueError, match="target 2: the prompt is 80 tokens long"):
        edit(sd1, "a cat", "a dog", " ".join(["cat"] * 80), steps=2)
    with pytest.raises(ValueError, match="the source prompt: the prompt is 80 tokens"):
        edit(sd1, " ".join(["cat"] * 80), steps=2)


def test_unknown_settings_list_the_known_ones(sd1):
    with pytest.raises(TypeError, match=r"unknown setting.*stepz.*recipe settings:.*steps.*run options:.*callback"):
        edit(sd1, "a cat", stepz=3)
