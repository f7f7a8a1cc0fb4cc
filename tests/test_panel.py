"""The panel without a browser: widgets driven with .value and .click(), compared with the API."""

import datetime
import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from p2p_widgets import CrossWindow, LocalBlend, Recipe, Target, Window, run
from p2p_widgets.panel import EditRow, P2PPanel, Session, Settings, WordChoice
from p2p_widgets.panel import compat

from conftest import processors_of

SOURCE = "a cat riding a bicycle"
EDIT = "a dog riding a bicycle"


@pytest.fixture
def panel(sd1):
    panel = P2PPanel(sd1, SOURCE, [EDIT], steps=6, preview_every=2)
    yield panel
    panel.session.cancel()
    panel.session.wait()
    assert panel.view.errors == [], panel.view.errors  # no exception hidden inside a callback


def _click_and_wait(panel, name="generate"):
    panel.widgets[name].click()
    return panel.session.wait(timeout=120)


def _pixels(image):
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_generate_shows_the_same_images_as_the_api(panel, sd1):
    panel.view.chip(1, 1).click()  # "dog"
    panel.widgets["weight"].value = 2.0
    panel.widgets["local"].value = True
    state = _click_and_wait(panel)
    assert state.status == "done", state.message
    assert state.error is None
    expected = run(
        sd1,
        Recipe(
            SOURCE,
            (Target(EDIT, cross=CrossWindow(Window(0.0, 0.8)), reweight=((1, 2.0),), blend=LocalBlend((1,))),),
            steps=6,
        ),
    )
    entry = state.entry
    assert entry.number == 1 and len(state.history) == 1
    assert torch.equal(entry.result.latents, expected.latents)
    assert entry.result.recipe.targets[0].reweight == ((1, 2.0),)
    # the output area shows the images and a heatmap grid
    shown = Image.open(__import__("io").BytesIO(panel.widgets["images"].value))
    assert shown.width >= 2 * expected.images[0].width
    assert panel.widgets["heatmaps"].value
    assert panel.widgets["progress"].value == panel.widgets["progress"].max
    assert "run 1 done" in panel.widgets["status"].value


def test_chips_show_the_tokenised_words_and_the_choices(panel):
    session = panel.session
    words = [b.description for b in panel.widgets["chips"].children[1].children[1:]]
    assert words == ["a", "dog", "riding", "a", "bicycle"]
    session.choose(1, "bicycle", weight=-1.0, preserve=True)
    assert panel.view.chip(1, 4).description == "bicycle [x-1 keep]"
    assert panel.view.chip(1, 4).button_style == "info"  # selected
    # the editor follows the selected word
    assert panel.widgets["weight"].value == -1.0 and panel.widgets["preserve"].value
    panel.view.chip(0, 1).click()  # a source word: the editor is disabled, with a hint
    assert panel.widgets["weight"].disabled
    assert "edited prompt" in panel.widgets["word"].value
    # a prompt change keeps choices on words that stay in place, drops the others
    panel.view._edit_rows[0]["prompt"].value = "a dog riding a tricycle"
    assert session.settings.edits[0].words == ()
    session.choose(1, "dog", weight=3)
    panel.view._edit_rows[0]["prompt"].value = "a dog riding a big tricycle"
    assert dict(session.settings.edits[0].words) == {1: WordChoice(weight=3.0)}
    assert session.settings.edits[0].kind == "auto"
    assert "refine" in panel.view._edit_rows[0]["inferred"].value


def test_scrubbing_changes_the_heatmaps_without_recomputing(panel, monkeypatch):
    assert _click_and_wait(panel).status == "done"
    import p2p_widgets.panel.session as session_module

    def no_runs(*args, **kwargs):
        raise AssertionError("scrubbing must not run the pipeline")

    monkeypatch.setattr(session_module, "run", no_runs)
    widgets = panel.widgets
    averaged = widgets["heatmaps"].value
    widgets["step"].value = 2
    assert not widgets["all_steps"].value
    widgets["step"].value = 1
    first = widgets["heatmaps"].value
    widgets["step"].value = 6
    last = widgets["heatmaps"].value
    assert len({averaged, first, last}) == 3
    assert panel.session.state.view.step == 5
    widgets["step"].value = 1
    assert widgets["heatmaps"].value == first  # the cached frame
    widgets["all_steps"].value = True
    assert widgets["heatmaps"].value == averaged
    # other views: raw maps, one resolution, the difference image, another branch
    widgets["overlay"].value = False
    assert widgets["heatmaps"].value != averaged
    assert [label for label, _ in widgets["resolution"].options] == ["all", "16x16", "8x8"]
    widgets["resolution"].value = 2
    assert panel.session.state.view.factor == 2
    widgets["mode"].value = "difference"
    difference = widgets["heatmaps"].value
    widgets["branch"].value = 0
    assert widgets["heatmaps"].value != difference


def test_scrub_frames_match_the_plot_functions(panel):
    from p2p_widgets import plot

    assert _click_and_wait(panel).status == "done"
    session = panel.session
    session.show(branch=0, step=2)
    result = session.state.entry.result
    scrubber = plot.Scrubber(result, 0, size=(128, 128))  # 32 px images are shown at least 128 px high
    expected = plot.tile_images(scrubber.frame(2), list(scrubber.labels))
    assert np.array_equal(_pixels(session.heatmap_image()), _pixels(expected))


def test_cancel_mid_run_leaves_the_pipeline_clean_and_the_panel_usable(panel, sd1):
    before = processors_of(sd1)
    session = panel.session
    stop = threading.Event()

    def cancel_at_step_two(state):
        if state.running and state.step == 2 and not stop.is_set():
            stop.set()
            panel.widgets["cancel"].click()

    session.update(steps=30)
    session.observe(cancel_at_step_two)
    state = _click_and_wait(panel)
    session.unobserve(cancel_at_step_two)
    assert state.status == "cancelled"
    assert "cancelled at step" in panel.widgets["status"].value
    assert state.history == ()
    assert processors_of(sd1) == before
    assert not panel.widgets["generate"].disabled and panel.widgets["cancel"].disabled
    session.update(steps=4)
    assert _click_and_wait(panel).status == "done"


def test_a_second_click_while_running_does_not_start_a_second_run(panel):
    session = panel.session
    release = threading.Event()
    clicked = []

    def hold(state):  # at the run's first step, click again (from inside the run)
        if state.running and state.step == 1 and not release.is_set():
            release.set()
            clicked.append(session.run())

    session.observe(hold)
    panel.widgets["generate"].click()
    release.wait(60)
    state = session.wait(timeout=120)
    session.unobserve(hold)
    assert clicked == [False]
    assert state.status == "done" and len(state.history) == 1
    assert "already" in (state.error or "") or state.error is None  # the note may be replaced by the run's end


def test_errors_are_shown_and_history_kept(panel, sd1, monkeypatch):
    session = panel.session
    assert _click_and_wait(panel).status == "done"
    kept = session.state.history
    # bad input: shown, nothing started
    panel.view._edit_rows[0]["kind"].value = "swap"
    panel.view._edit_rows[0]["prompt"].value = "a dog riding a red bicycle"
    panel.widgets["generate"].click()
    assert not session.running
    assert "refine" in session.state.error and "&#9888;" in panel.widgets["status"].value
    assert session.state.history == kept
    # a failure inside the run (here: out of memory), shown readably
    import p2p_widgets.panel.session as session_module

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(session_module, "run", out_of_memory)
    session.set_edit(1, kind="auto")
    state = _click_and_wait(panel)
    assert state.status == "error" and "out of memory" in state.error and "fewer" in state.error
    assert state.history == kept and state.entry is kept[0]
    monkeypatch.undo()
    assert _click_and_wait(panel).status == "done"
    assert len(session.state.history) == 2 and session.state.error is None


def test_history_restores_settings_and_images(panel):
    session = panel.session
    assert _click_and_wait(panel).status == "done"
    first = session.state.history[0]
    panel.widgets["seed"].value = 7
    session.choose(1, "dog", weight=3.0)
    assert _click_and_wait(panel).status == "done"
    assert len(panel.widgets["history"].children) == 2
    second_images = panel.widgets["images"].value
    restore = panel.widgets["history"].children[0].children[1]
    restore.click()
    assert session.settings == first.settings
    assert panel.widgets["seed"].value == 0
    assert panel.view.chip(1, 1).description == "dog"
    assert panel.widgets["images"].value != second_images
    assert session.state.view.entry == 1


def test_export_and_load_recipe(panel, sd1, tmp_path):
    session = panel.session
    session.choose(1, "dog", weight=2.5)
    session.update(seed=3)
    assert _click_and_wait(panel).status == "done"
    panel.widgets["folder"].value = str(tmp_path)
    panel.widgets["export"].click()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["p2p_run1.json", "p2p_run1_0.png", "p2p_run1_1.png"]
    recipe = json.loads((tmp_path / "p2p_run1.json").read_text())
    assert recipe["seed"] == 3 and recipe["targets"][0]["reweight"] == [[1, 2.5]]
    # change everything, then load the PNG back: the settings return
    saved = session.settings
    session.update(seed=11, steps=3, source="a cat riding a horse")
    panel.widgets["recipe_path"].value = str(tmp_path / "p2p_run1_1.png")
    panel.widgets["load"].click()
    assert session.settings == saved
    assert panel.widgets["seed"].value == 3 and panel.widgets["source"].value == SOURCE
    # bad files: a readable message, settings untouched
    (tmp_path / "notes.json").write_text("[1, 2]")
    panel.widgets["recipe_path"].value = str(tmp_path / "notes.json")
    panel.widgets["load"].click()
    assert "not a recipe" in session.state.error
    assert session.settings == saved
    panel.view.errors.clear()  # the load button's error is expected here


def test_upload_recipe_in_both_widget_versions(panel, tmp_path):
    session = panel.session
    recipe = Recipe("a cat riding a horse", (Target("a cat riding a zebra", reweight={"zebra": 2.0}),), seed=5, steps=4)
    data = recipe.to_json().encode()
    upload = panel.widgets["upload"]
    if compat.MAJOR >= 8:
        upload.value = ({"name": "r.json", "type": "application/json", "size": len(data), "content": memoryview(data), "last_modified": datetime.datetime(2026, 1, 1)},)
    else:
        upload.metadata = [{"name": "r.json", "type": "application/json", "size": len(data), "lastModified": 0}]
        upload.data = [data]
        upload._counter = 1  # what the browser sends last
    assert session.settings.source == "a cat riding a horse"
    assert session.settings.seed == 5
    assert session.settings.edits[0].choice(4).weight == 2.0
    assert compat.uploaded_files(upload) == []  # emptied, so the same file can be chosen again


def test_settings_round_trip_through_recipes():
    settings = Settings(
        source=SOURCE,
        edits=(EditRow(EDIT, words=((1, WordChoice(2.0, local=True)),)), EditRow("", "refine", ((4, WordChoice(preserve=True)),))),
        seed=9,
        steps=12,
        guidance=5.0,
        size=(48, 64),
        cross=(0.1, 0.7),
        self_attn=(0.0, 0.3),
        threshold=0.4,
        values=(0.0, 1.0),
        value_beta=0.25,
    )
    recipe = settings.recipe()
    assert recipe.targets[0].values == Window(0.0, 1.0) and recipe.targets[0].value_beta == 0.25
    assert recipe.targets[1].prompt == SOURCE  # an empty edited prompt re-weights the source
    back, notes = Settings.from_recipe(recipe)
    assert notes == ()
    assert back == Settings(**{**settings.__dict__, "edits": (settings.edits[0], EditRow(SOURCE, "refine", settings.edits[1].words))})
    # what the panel cannot show is reported, not silently dropped
    chained = Recipe(SOURCE, (Target(EDIT), Target("a dog riding a horse", parent=1, cross={"default_": 0.5, "dog": 0.2})))
    loaded, notes = Settings.from_recipe(chained)
    assert loaded.chain == chained.targets[:1] and any("per-word" in n for n in notes)  # a chain loads as one
    mixed = Recipe(SOURCE, (Target(EDIT, values=1.0, value_beta=0.25), Target("a cow riding a bicycle", values=1.0)))
    loaded, notes = Settings.from_recipe(mixed)
    assert loaded.value_beta == 0.25 and any("value beta differ" in n for n in notes)
    tree = Recipe(SOURCE, (Target(EDIT), Target("a dog riding a horse", parent=1), Target("a cow riding a bicycle")))
    _, notes = Settings.from_recipe(tree)
    assert any("its parent 1 is not shown" in n for n in notes)  # not a chain: said so


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda s: s.update(steps=0), "steps must be at least 1"),
        (lambda s: s.update(cross=(0.9, 0.2)), "start"),
        (lambda s: s.update(threshold=1.5), "threshold"),
        (lambda s: s.update(value_beta=1.5), "value_beta is the parent's share"),
        (lambda s: s.update(guidance=float("nan")), "guidance must be a finite number"),
        (lambda s: s.update(size=(0, 32)), "size is (height, width)"),
        (lambda s: s.update(colour="red"), "unknown setting"),
        (lambda s: s.set_edit(1, kind="replace"), "auto, swap, refine"),
    ],
)
def test_bad_settings_are_refused_whole(sd1, call, message):
    session = Session(sd1, Settings(source=SOURCE, edits=(EditRow(EDIT),)))
    before = session.settings
    assert call(session) is False
    assert message in session.state.error
    assert session.settings == before


def test_word_errors_name_the_words(sd1):
    session = Session(sd1, Settings(source=SOURCE, edits=(EditRow(EDIT),)))
    with pytest.raises(ValueError, match="'lion' is not in row 1; its words are: a, dog, riding, a, bicycle"):
        session.choose(1, "lion", weight=2)
    with pytest.raises(ValueError, match="apply to an edited prompt"):
        session.choose(0, "cat", weight=2)
    with pytest.raises(ValueError, match="edit row is 1..1"):
        session.set_edit(3, prompt="x")
    with pytest.raises(ValueError, match="no run 4"):
        session.restore(4)


def test_edit_rows_add_and_remove(panel):
    session = panel.session
    panel.widgets["add_edit"].click()
    assert len(panel.view._edit_rows) == 2
    panel.view._edit_rows[1]["prompt"].value = "a cat riding a red bicycle"
    assert session.inferred_kind(2) == "refine"
    assert _click_and_wait(panel).status == "done"
    assert session.state.entry.result.kinds == ("source", "swap", "refine")
    assert [label for label, _ in panel.widgets["branch"].options] == ["source", "edit 1", "edit 2"]
    panel.view._edit_rows[0]["remove"].click()
    assert [e.prompt for e in session.settings.edits] == ["a cat riding a red bicycle"]


def test_size_choices(panel, sd1):
    session = panel.session
    labels = [label for label, _ in panel.widgets["size"].options]
    assert labels[0] == "32x32 (model default)" and "64x64" in labels
    panel.widgets["size"].value = labels.index("64x64")
    assert session.settings.size == (64, 64)
    assert _click_and_wait(panel).status == "done"
    assert session.state.entry.result.images[1].size == (64, 64)
    # a recipe with a size the list lacks adds it; the model's default size maps to the default entry
    session.load_recipe(Recipe(SOURCE, (EDIT,), height=40, width=24).to_json().encode(), "r.json")
    assert session.settings.size == (40, 24)
    assert panel.widgets["size"].options[panel.widgets["size"].value][0] == "40x24"
    session.load_recipe(Recipe(SOURCE, (EDIT,), height=32, width=32).to_json().encode(), "r.json")
    assert session.settings.size is None and panel.widgets["size"].value == 0


def test_panel_starts_with_an_example_and_shows_itself(sd1, monkeypatch):
    panel = P2PPanel(sd1)
    assert panel.session.settings.source == "a cat riding a bicycle"
    assert [e.prompt for e in panel.session.settings.edits] == ["a dog riding a bicycle"]
    assert P2PPanel(sd1, "a red house").session.settings.edits == (EditRow(),)
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda widget: shown.append(widget))
    panel._ipython_display_()
    assert shown == [panel.root]
    assert "runs=0" in repr(panel)


def test_switching_runs_keeps_the_step_where_it_exists(panel):
    session = panel.session
    assert _click_and_wait(panel).status == "done"  # 6 steps
    session.show(step=5, factor=2)
    session.update(steps=3)
    assert _click_and_wait(panel).status == "done"
    assert session.state.view.step is None and panel.widgets["all_steps"].value  # run 2 has no step 5
    assert session.state.view.factor == 2
    session.set_step(2)
    session.restore(1)
    assert session.state.view.step == 2 and panel.widgets["step"].value == 3
    assert panel.widgets["step"].max == 6


def test_chips_are_rebuilt_only_when_words_change_and_old_ones_closed(panel):
    first = panel.view.chip(1, 1)
    panel.widgets["steps"].value = 9
    assert panel.view.chip(1, 1) is first  # a setting that does not touch the words
    panel.view._edit_rows[0]["prompt"].value = "a dog riding a tricycle"
    assert panel.view.chip(1, 1) is not first
    assert first.comm is None  # closed


def test_a_shapes_pipeline_object_gets_the_shapes_example_and_blend_threshold(shapes, sd1):
    panel = P2PPanel(shapes)
    assert panel.session.settings.source.endswith("on a black background")
    assert panel.session.settings.threshold == 0.7 and panel.session.model == "shapes"
    assert P2PPanel(shapes, threshold=0.4).session.settings.threshold == 0.4  # given wins
    other = P2PPanel(sd1)
    assert other.session.settings.source == SOURCE and other.session.settings.threshold == 0.3


def test_the_cl_p2p_presets_and_value_injection_in_the_panel(panel, sd1):
    w, s = panel.widgets, panel.session
    assert w["preset"].value == ""  # the defaults (cross 0.8, self 0.4) are no preset
    w["preset"].value = "optimised"
    assert (s.settings.cross, s.settings.self_attn, s.settings.threshold) == ((0.0, 0.2), (0.0, 0.8), 0.0)
    assert tuple(w["cross"].value) == (0.0, 0.2) and w["threshold"].value == 0.0
    s.choose(1, "dog", local=True)
    assert s.settings.target(1).blend is None  # k 0: no blending, as the report means it
    w["values"].value = (0.0, 0.5)
    w["value_beta"].value = 0.25
    w["preset"].value = "literature"
    target = s.settings.target(1)
    assert target.blend == LocalBlend((1,), threshold=0.3) and target.values == Window(0.0, 0.5)  # word 1: "dog"
    assert target.value_beta == 0.25
    w["cross"].value = (0.0, 0.6)
    assert w["preset"].value == ""  # moved off the preset: custom
    assert not s.apply_preset("best") and "no preset named 'best'" in s.state.error
    state = _click_and_wait(panel)
    assert state.status == "done", state.message
    assert state.entry.result.recipe.targets[0].values == Window(0.0, 0.5)
    assert state.entry.result.recipe.targets[0].value_beta == 0.25
    assert torch.equal(state.entry.result.latents, run(sd1, s.settings.recipe()).latents)


def test_conversational_editing_continues_the_chain_and_goes_back(panel, sd1):
    w, s = panel.widgets, panel.session
    first = _click_and_wait(panel).entry  # run 1: cat -> dog
    s.show(branch=1)
    w["continue"].click()  # edit the dog further
    assert s.settings.chain == (first.result.recipe.targets[0],) and s.breadcrumb() == (SOURCE, EDIT)
    assert s.settings.edits[0].prompt == EDIT and len(w["crumbs"].children) == 4  # label, 0, >, 1
    s.set_edit(1, prompt="a dog riding a car")
    second = _click_and_wait(panel).entry
    assert [t.parent for t in second.result.recipe.targets] == [0, 1]
    # the earlier steps are what they were (up to the batched kernels' float rounding)
    assert (second.result.latents[:2] - first.result.latents).abs().max() < 1e-3
    assert s.state.view.branch == 2  # the new edit is shown
    s.continue_from(second.number, 2)
    assert s.breadcrumb() == (SOURCE, EDIT, "a dog riding a car")
    w["crumbs"].children[3].click()  # step 1: back to the dog
    assert s.breadcrumb() == (SOURCE, EDIT) and s.settings.edits[0].prompt == EDIT
    s.back_to(0)
    assert s.settings.chain == () and not w["crumbs"].children
    with pytest.raises(ValueError, match="the chain has steps 0..0"):
        s.back_to(3)


def test_the_cycle_button_runs_the_edit_back_and_shows_the_score(panel):
    w, s = panel.widgets, panel.session
    w["cycle"].click()
    state = s.wait(timeout=120)
    assert state.status == "done", state.message
    entry = state.entry
    assert [b.prompt.text for b in entry.result.branches] == [SOURCE, EDIT, SOURCE]
    assert entry.cycle is not None and entry.cycle.psnr == float("inf")  # one batch: it returns exactly
    assert "cycle back to step 0: PSNR inf dB" in w["status"].value


def test_a_chain_recipe_loads_back_as_a_chain(panel, tmp_path):
    s = panel.session
    s.update(edits=(EditRow(EDIT),), chain=(Target("a cow riding a bicycle"),))
    recipe = s.recipe()
    settings, notes = Settings.from_recipe(recipe)
    assert settings.chain == recipe.targets[:1] and settings.edits[0].prompt == EDIT and notes == ()
    assert settings.recipe().targets == recipe.targets
