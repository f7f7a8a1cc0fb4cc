"""The panel without a browser: widgets driven with .value and .click(), compared with the API."""

import datetime
import html
import io
import json
import re
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import processors_of
from p2p_widgets import CrossWindow, LocalBlend, Recipe, Target, Window, run
from p2p_widgets.files import read_recipe
from p2p_widgets.panel import EditRow, P2PPanel, PanelView, Session, Settings, WordChoice, compat

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
        upload.value = (
            {
                "name": "r.json",
                "type": "application/json",
                "size": len(data),
                "content": memoryview(data),
                "last_modified": datetime.datetime(2026, 1, 1),
            },
        )
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
        edits=(
            EditRow(EDIT, words=((1, WordChoice(2.0, local=True)),)),
            EditRow("", "refine", ((4, WordChoice(preserve=True)),)),
        ),
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
    assert back == Settings(
        **{**settings.__dict__, "edits": (settings.edits[0], EditRow(SOURCE, "refine", settings.edits[1].words))}
    )
    # what the panel cannot show is reported, not silently dropped
    chained = Recipe(
        SOURCE, (Target(EDIT), Target("a dog riding a horse", parent=1, cross={"default_": 0.5, "dog": 0.2}))
    )
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
    with pytest.raises(ValueError, match=r"edit row is 1\.\.1"):
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
    with pytest.raises(ValueError, match=r"the chain has steps 0\.\.0"):
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


# --------------------------------------------------------------------------- trust
# No silent wrong result, nothing lost: every refusal is one clean error naming the problem,
# shown in place of any error before it; word settings that cannot be kept are said.

MODEL = "tiny-sd1"  # the shared panel's model name, to see recipes made with another one noted


@pytest.fixture(scope="module")
def ran(sd1):
    """One panel with one 2-step run, shared by the cases below (a run costs seconds)."""
    view = PanelView(
        Session(sd1, Settings(source=SOURCE, edits=(EditRow(EDIT),), steps=2), preview_every=0, model=MODEL)
    )
    assert view.session.run(wait=True) and view.session.state.status == "done", view.session.state.message
    return view


@pytest.fixture
def done(ran):
    """The shared panel back at run 1's settings with no error up; afterwards, the runs
    made before the case must be untouched (the same entries, in order)."""
    session = ran.session
    session.wait()
    session.restore(1)
    session.show(branch=1, step=None, factor=None, overlay=True, mode="heatmaps")
    ran.errors.clear()
    before = session.state.history
    yield ran
    session.wait()
    assert len(session.state.history) >= len(before) and all(a is b for a, b in zip(session.state.history, before))
    assert ran.errors == [], ran.errors  # no exception hidden inside a callback (expected ones are cleared)


def _status(view) -> str:
    """The status line as the user reads it (tags dropped, entities unescaped)."""
    return html.unescape(re.sub(r"<[^>]*>", "", view.widgets["status"].value))


def _shows_only(view, message: str) -> None:
    """The status line shows ``message`` as the one error, and nothing else."""
    assert view.session.state.error == message
    assert _status(view).endswith(message) and _status(view).count("\u26a0") == 1, _status(view)


def _refuse_steps(view) -> str:
    assert view.session.update(steps=0) is False
    return "steps must be at least 1, not 0"


def _refuse_swap(view) -> str:  # through the widgets: a swap of prompts of different lengths
    row = view._edit_rows[0]
    row["kind"].value = "swap"
    row["prompt"].value = "a dog riding a red bicycle"
    view.widgets["generate"].click()
    assert not view.session.running
    return (
        "target 1 ('a dog riding a red bicycle'): a word swap needs prompts with the same number of words, "
        "but 'a cat riding a bicycle' has 5 and 'a dog riding a red bicycle' has 6; use refinement "
        "(kind='refine') to add or remove words"
    )


def _upload(view, name: str, data: bytes) -> None:
    upload = view.widgets["upload"]
    if compat.MAJOR >= 8:
        upload.value = (
            {
                "name": name,
                "type": "",
                "size": len(data),
                "content": memoryview(data),
                "last_modified": datetime.datetime(2026, 1, 1),
            },
        )
    else:
        upload.metadata = [{"name": name, "type": "", "size": len(data), "lastModified": 0}]
        upload.data = [data]
        upload._counter = 1


def _png_without_recipe() -> bytes:
    stream = io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(stream, format="PNG")
    return stream.getvalue()


def _a_file(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    return tmp_path / "a_file"


# (case, what the user does after an earlier error is up, the message it must show instead)
NEWER_ERRORS_BY_API = [
    (
        "a refused setting",
        lambda v, tmp: v.session.update(cross=(0.9, 0.2)),
        "a window's start (0.9) is after its end (0.2); give (start, end) with start <= end",
    ),
    ("an unknown preset", lambda v, tmp: v.session.apply_preset("best"), "no preset named 'best'"),
    (
        "an empty source prompt",
        lambda v, tmp: v.session.update(source="") and v.session.run(),
        'the source prompt is empty; describe the image, e.g. "a cat riding a bicycle"',
    ),
    (
        "an export of a run not in the history",
        lambda v, tmp: v.session.export(tmp, number=9),
        "there is no run 9 in the history (runs: 1)",
    ),
    (
        "a recipe file that is not there",
        lambda v, tmp: v.session.load_recipe(tmp / "gone.json"),
        "no such file: {tmp}/gone.json",
    ),
]


@pytest.mark.parametrize("case, act, message", NEWER_ERRORS_BY_API, ids=[c[0] for c in NEWER_ERRORS_BY_API])
def test_a_new_error_replaces_the_old_one_through_the_api(done, tmp_path, case, act, message):
    older = _refuse_steps(done)
    try:
        act(done, tmp_path)
    except (ValueError, FileNotFoundError):
        pass  # raised and shown: both are asked for
    error = done.session.state.error
    assert error is not None and message.format(tmp=tmp_path) in error, error
    _shows_only(done, error)
    assert older not in _status(done)
    assert done.session.settings.steps == 2


# (case, the widget action after a refused Generate, the message it must show instead)
NEWER_ERRORS_BY_WIDGET = [
    (
        "Load with an empty path",
        lambda v, tmp: (v.widgets["recipe_path"].__setattr__("value", "  "), v.widgets["load"].click()),
        "no recipe file given; type the path of a recipe JSON or PNG file (e.g. p2p_run1_0.png)",
    ),
    (
        "Load a file that is not there",
        lambda v, tmp: (
            v.widgets["recipe_path"].__setattr__("value", str(tmp / "gone.png")),
            v.widgets["load"].click(),
        ),
        "no such file: {tmp}/gone.png",
    ),
    (
        "upload a text file",
        lambda v, tmp: _upload(v, "notes.txt", b"hello"),
        "notes.txt is neither a recipe JSON file nor a readable image",
    ),
    (
        "Export with no folder",
        lambda v, tmp: (v.widgets["folder"].__setattr__("value", ""), v.widgets["export"].click()),
        "no export folder given; type the folder to write the run's files to",
    ),
    (
        "Export into a file",
        lambda v, tmp: (v.widgets["folder"].__setattr__("value", str(_a_file(tmp))), v.widgets["export"].click()),
        "{tmp}/a_file",
    ),
    (
        "Generate with an empty source",
        lambda v, tmp: (v.widgets["source"].__setattr__("value", ""), v.widgets["generate"].click()),
        'the source prompt is empty; describe the image, e.g. "a cat riding a bicycle"',
    ),
]


@pytest.mark.parametrize("case, act, message", NEWER_ERRORS_BY_WIDGET, ids=[c[0] for c in NEWER_ERRORS_BY_WIDGET])
def test_a_new_error_replaces_the_old_one_through_the_widgets(done, tmp_path, monkeypatch, case, act, message):
    monkeypatch.chdir(tmp_path)  # a file written to the working folder would show below
    older = _refuse_swap(done)
    _shows_only(done, older)
    act(done, tmp_path)
    error = done.session.state.error
    assert error is not None and message.format(tmp=tmp_path) in error, error
    _shows_only(done, error)
    assert "word swap" not in _status(done)
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["a_file"])  # nothing exported on a refusal
    assert all(message.format(tmp=tmp_path) in e for e in done.errors)  # a raising button's error: the one shown
    done.errors.clear()


def _run_and_refuse_meanwhile(refuse):
    """A Generate click, and ``refuse(view)`` at the run's first step (from inside it)."""

    def act(view):
        refused = threading.Event()

        def at_first_step(state):
            if state.running and state.step == 1 and not refused.is_set():
                refused.set()
                refuse(view)

        view.session.observe(at_first_step)
        try:
            view.widgets["generate"].click()
            view.session.wait(timeout=120)
        finally:
            view.session.unobserve(at_first_step)
        assert refused.is_set()

    return act


def _fix_swap_and_generate(view):
    view._edit_rows[0]["kind"].value = "auto"
    view.widgets["generate"].click()
    view.session.wait(timeout=120)


# (case, the refusal, what follows it, what the status line must say then)
CLEARED = [
    ("a refused Generate, then a run", _refuse_swap, _fix_swap_and_generate, "run {next} done"),
    (
        "a second Generate during a run",
        lambda v: None,
        _run_and_refuse_meanwhile(lambda v: v.session.run()),
        "run {next} done",
    ),
    ("a refused setting during a run", lambda v: None, _run_and_refuse_meanwhile(_refuse_steps), "run {next} done"),
    ("a refused setting, then a valid one", _refuse_steps, lambda v: setattr(v.widgets["steps"], "value", 3), None),
    (
        "a refused preset, then a restore",
        lambda v: v.session.apply_preset("best"),
        lambda v: v.widgets["history"].children[0].children[1].click(),
        "restored run 1",
    ),
]


@pytest.mark.parametrize("case, refuse, then, shown", CLEARED, ids=[c[0] for c in CLEARED])
def test_a_refusal_is_cleared_by_what_succeeds_after_it(done, case, refuse, then, shown):
    runs = len(done.session.state.history)  # the shared panel's runs so far
    refuse(done)
    then(done)
    state = done.session.state
    assert state.error is None, state.error
    assert "\u26a0" not in _status(done), _status(done)
    if shown is None:
        assert _status(done) == ""  # the refusal's text is gone, not left as a plain message
    else:
        shown = shown.format(next=runs + 1)
        assert _status(done).startswith(shown) and state.message.startswith(shown), _status(done)
    if "done" in (shown or ""):
        assert state.status == "done" and len(state.history) == runs + 1 and state.entry.number == runs + 1


def _recipe_bytes(*targets, **fields) -> bytes:
    return Recipe(SOURCE, targets, steps=3, **fields).to_json().encode()


# (case, file name, contents (None: no such file), the message: names the file and the problem)
BAD_RECIPES = [
    ("not JSON", "notes.json", b"hello, world", "{name} is neither a recipe JSON file nor a readable image"),
    ("JSON that is not a recipe", "list.json", b"[1, 2]", "{name}: this is not a recipe: expected a JSON object"),
    (
        "JSON with unknown fields",
        "colour.json",
        b'{"prompt": "a cat", "colour": "red"}',
        "{name}: unknown Recipe field(s): colour",
    ),
    (
        "a PNG without a recipe",
        "photo.png",
        _png_without_recipe(),
        "{name} holds no p2p_widgets recipe (no 'p2p_widgets.recipe' text chunk)",
    ),
    (
        "a re-weighted word not in its prompt",
        "lion.json",
        _recipe_bytes(Target(EDIT, reweight={"lion": 2.0})),
        (
            "{name}: target 1 re-weights 'lion', which is not in 'a dog riding a bicycle'; "
            "its words are: a, dog, riding, a, bicycle; correct the word or the prompt in the recipe"
        ),
    ),
    (
        "a preserved word not in its prompt",
        "horse.json",
        _recipe_bytes(Target(EDIT, preserve=("horse",))),
        (
            "{name}: target 1 preserves 'horse', which is not in 'a dog riding a bicycle'; "
            "its words are: a, dog, riding, a, bicycle; correct the word or the prompt in the recipe"
        ),
    ),
    (
        "a blend word index past its prompt",
        "index.json",
        _recipe_bytes(Target(EDIT, blend=LocalBlend((9,)))),
        (
            "{name}: target 1 blends on word 9, but 'a dog riding a bicycle' has 5 words (a, dog, riding, a, bicycle); "
            "correct the word index or the prompt in the recipe"
        ),
    ),
    ("no such file", "gone.json", None, "no such file: {name}"),
]


LOADS = [  # each bad file through the Load button and as an upload (an upload always has contents)
    pytest.param(*case[1:], route, id=f"{case[0]}-{route}")
    for case in BAD_RECIPES
    for route in ("Load button", "upload")
    if not (case[2] is None and route == "upload")
]


@pytest.mark.parametrize("filename, data, message, route", LOADS)
def test_a_failing_recipe_load_shows_its_own_error(done, tmp_path, filename, data, message, route):
    _refuse_steps(done)  # an earlier error, to be replaced
    settings = done.session.settings
    path = tmp_path / filename
    if data is not None:
        path.write_bytes(data)
    if route == "upload":
        name = filename
        _upload(done, filename, data)
    else:
        name = str(path)
        done.widgets["recipe_path"].value = name
        done.widgets["load"].click()
    error = done.session.state.error
    assert error is not None and message.format(name=name) in error, error
    _shows_only(done, error)
    assert done.session.settings == settings  # nothing loaded
    assert len(done.errors) == 1 and message.format(name=name) in done.errors[0]
    done.errors.clear()


# (case, the settings the panel has no input for, the note the load must show)
UNSHOWN = [
    (
        "a negative prompt",
        dict(negative_prompt="blurry"),
        "the recipe's negative_prompt 'blurry' is not shown; the panel runs with ''",
    ),
    (
        "another scheduler",
        dict(scheduler="EulerDiscreteScheduler"),
        "the recipe's scheduler 'EulerDiscreteScheduler' is not shown; the panel runs with 'DDIMScheduler'",
    ),
    ("a DDIM eta", dict(eta=0.5), "the recipe's eta 0.5 is not shown; the panel runs with 0.0"),
    (
        "a guidance rescale",
        dict(guidance_rescale=0.7),
        "the recipe's guidance_rescale 0.7 is not shown; the panel runs with 0.0",
    ),
    (
        "a self-injection scale",
        dict(self_max_scale=1.0),
        "the recipe's self_max_scale 1.0 is not shown; the panel runs with 0.25",
    ),
    (
        "another model",
        dict(model="someone/other-model"),
        f"it was made with 'someone/other-model'; this panel runs '{MODEL}', so the images will differ",
    ),
    (
        "a per-word window",
        dict(targets=(Target(EDIT, cross={"default_": 0.8, "dog": 0.3}),)),
        "edit 1: per-word cross windows are not shown; one window used",
    ),
]


@pytest.mark.parametrize("case, fields, note", UNSHOWN, ids=[c[0] for c in UNSHOWN])
def test_a_recipe_with_settings_the_panel_cannot_show_says_so(done, case, fields, note):
    fields = {"targets": (Target(EDIT),), **fields}
    notes = done.session.load_recipe(
        Recipe(SOURCE, fields.pop("targets"), steps=3, **fields).to_json().encode(), "r.json"
    )
    assert note in notes
    assert (
        done.session.state.error is None
        and note in _status(done)
        and done.session.state.message.startswith("recipe loaded from r.json (")
    )
    assert done.session.settings.steps == 3


def test_recipe_words_load_as_the_engine_reads_them(done):
    """A word re-weights every occurrence, a phrase each of its words: loaded back, the
    panel's recipe runs exactly as the file's (no silent wrong result)."""
    recipe = Recipe(
        SOURCE, (Target(EDIT, reweight={"a": 0.5}, preserve=("riding a",), blend=LocalBlend(("DOG",))),), steps=3
    )
    notes = done.session.load_recipe(recipe.to_json().encode(), "r.json")
    assert notes == ()
    assert dict(done.session.settings.edits[0].words) == {
        0: WordChoice(0.5),
        1: WordChoice(local=True),
        2: WordChoice(preserve=True),
        3: WordChoice(0.5, preserve=True),
    }
    from p2p_widgets.prompts import tokenize

    prompt = tokenize(done.session.pipe.tokenizer, EDIT)
    tokens = lambda words: sorted({t for w in words for t in prompt.token_indices(w)})  # noqa: E731
    mine, theirs = done.session.recipe().targets[0], recipe.targets[0]
    assert tokens(w for w, _ in mine.reweight) == tokens(w for w, _ in theirs.reweight)  # both a's
    assert tokens(mine.preserve) == tokens(theirs.preserve) and tokens(mine.blend.words) == tokens(theirs.blend.words)


def _choose(word, **choice):
    return lambda view: view.session.choose(1, word, **choice)


def _edit_prompt(text):
    return lambda view: setattr(view._edit_rows[0]["prompt"], "value", text)


def _follow_the_source(view):
    view._edit_rows[0]["prompt"].value = ""  # the row re-weights the source itself
    view.session.choose(1, "cat", weight=3.0)


# (case, the word setting made, the prompt change, the message, the choices left on edit 1)
DROPPED = [
    (
        "a re-weight",
        _choose("dog", weight=2.0),
        _edit_prompt("a lion riding a bicycle"),
        "the re-weight of 'dog' (x2.0) was dropped: 'dog' is no longer in edit 1",
        {},
    ),
    (
        "a preservation",
        _choose("bicycle", preserve=True),
        _edit_prompt("a dog riding a horse"),
        "the preservation of 'bicycle' was dropped: 'bicycle' is no longer in edit 1",
        {},
    ),
    (
        "a local blend",
        _choose("dog", local=True),
        _edit_prompt("a lion riding a bicycle"),
        "the local blend on 'dog' was dropped: 'dog' is no longer in edit 1",
        {},
    ),
    (
        "all three on one word",
        _choose("dog", weight=-1.0, preserve=True, local=True),
        _edit_prompt("a lion riding a bicycle"),
        (
            "the re-weight of 'dog' (x-1.0) was dropped: 'dog' is no longer in edit 1; "
            "the preservation of 'dog' was dropped: 'dog' is no longer in edit 1; "
            "the local blend on 'dog' was dropped: 'dog' is no longer in edit 1"
        ),
        {},
    ),
    (
        "a row that follows the source",
        _follow_the_source,
        lambda v: setattr(v.widgets["source"], "value", "a lion riding a bicycle"),
        "the re-weight of 'cat' (x3.0) was dropped: 'cat' is no longer in edit 1",
        {},
    ),
    (
        "one word gone, one kept",
        lambda v: (_choose("dog", weight=2.0)(v), _choose("riding", preserve=True)(v)),
        _edit_prompt("a lion riding a bicycle"),
        "the re-weight of 'dog' (x2.0) was dropped: 'dog' is no longer in edit 1",
        {2: WordChoice(preserve=True)},
    ),
    (
        "a word that moves keeps its setting",
        _choose("dog", weight=2.0),
        _edit_prompt("a big dog riding a bicycle"),
        None,
        {2: WordChoice(2.0)},
    ),
]


@pytest.mark.parametrize("case, choose, change, message, left", DROPPED, ids=[c[0] for c in DROPPED])
def test_a_word_setting_dropped_with_its_word_is_reported(done, case, choose, change, message, left):
    choose(done)
    change(done)
    state = done.session.state
    assert dict(state.settings.edits[0].words) == left
    assert state.error is None
    if message is None:
        assert "dropped" not in state.message and state.selected == (1, 2)  # the selection followed "dog"
    else:
        assert state.message == message and _status(done) == message
    marked = [b.description for b in done.widgets["chips"].children[1].children[1:] if "[" in b.description]
    assert len(marked) == len(left)  # the chips show what is left, no more


# (who exports second into the folder the shared panel exported run 1 to)
EXPORTERS = ["another panel", "the same panel again"]


@pytest.mark.parametrize("second", EXPORTERS)
def test_exports_into_one_folder_never_overwrite_each_other(done, sd1, tmp_path, second):
    first = done.session.export(tmp_path)
    assert done.session.state.message == f"saved run 1 to {tmp_path}: p2p_run1_0.png, p2p_run1_1.png, p2p_run1.json"
    if second == "another panel":
        other = PanelView(
            Session(sd1, Settings(source=SOURCE, edits=(EditRow(EDIT),), seed=7, steps=2), preview_every=0)
        )
        assert other.session.run(wait=True) and other.session.state.status == "done"
    else:
        other = done
    other.widgets["folder"].value = str(tmp_path)
    other.widgets["export"].click()
    assert other.session.state.message == (
        f"saved run 1 to {tmp_path} (p2p_run1 was taken): p2p_run1-2_0.png, p2p_run1-2_1.png, p2p_run1-2.json"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["p2p_run1.json", "p2p_run1_0.png", "p2p_run1_1.png", "p2p_run1-2.json", "p2p_run1-2_0.png", "p2p_run1-2_1.png"]
    )
    assert read_recipe(first[-1]) == done.session.state.history[0].result.recipe  # the first export is intact
    assert read_recipe(tmp_path / "p2p_run1-2_1.png") == other.session.state.entry.result.recipe
    assert other.errors == []


def _broken(name):
    def fail(*args, **kwargs):
        raise RuntimeError(f"broken {name}")

    return fail


def _set(name, value):
    return lambda view: setattr(view.widgets[name], "value", value(view.widgets[name]) if callable(value) else value)


def _click(name):
    return lambda view: view.widgets[name].click()


def _select_dog(view):
    view.session.select_word(1, "dog")


# (the widget, the session call it makes, what the user does, setup before breaking the call)
CALLBACKS = [
    ("source", "update", _set("source", "a cat riding a horse"), None),
    ("seed", "update", _set("seed", 5), None),
    ("steps", "update", _set("steps", 3), None),
    ("guidance", "update", _set("guidance", 5.0), None),
    ("size", "update", _set("size", 1), None),
    ("cross", "update", _set("cross", (0.0, 0.5)), None),
    ("self_attn", "update", _set("self_attn", (0.0, 0.5)), None),
    ("threshold", "update", _set("threshold", 0.5), None),
    ("values", "update", _set("values", (0.0, 0.5)), None),
    ("value_beta", "update", _set("value_beta", 0.5), None),
    ("preset", "apply_preset", _set("preset", "optimised"), None),
    ("add_edit", "add_edit", _click("add_edit"), None),
    ("new_seed", "new_seed", _click("new_seed"), None),
    ("generate", "run", _click("generate"), None),
    ("cycle", "run", _click("cycle"), None),
    ("continue", "continue_from", _click("continue"), None),
    ("branch", "show", _set("branch", 0), None),
    ("mode", "show", _set("mode", "difference"), None),
    ("overlay", "show", _set("overlay", False), None),
    ("resolution", "show", _set("resolution", 1), None),
    ("all_steps", "set_step", _set("all_steps", False), None),
    ("step", "set_step", _set("step", 2), None),
    ("export", "export", _click("export"), None),
    ("load", "load_recipe", _click("load"), None),
    ("upload", "load_recipe", lambda v: _upload(v, "r.json", b"{}"), None),
    ("a word chip", "select_word", lambda v: v.chip(1, 1).click(), None),
    ("weight", "choose", _set("weight", 2.0), _select_dog),
    ("preserve", "choose", _set("preserve", True), _select_dog),
    ("local", "choose", _set("local", True), _select_dog),
    (
        "an edited prompt",
        "set_edit",
        lambda v: setattr(v._edit_rows[0]["prompt"], "value", "a cow riding a bicycle"),
        None,
    ),
    ("an edit kind", "set_edit", lambda v: setattr(v._edit_rows[0]["kind"], "value", "refine"), None),
    ("remove", "remove_edit", lambda v: v._edit_rows[0]["remove"].click(), None),
    ("a history button", "restore", lambda v: v.widgets["history"].children[0].children[1].click(), None),
    (
        "a breadcrumb",
        "back_to",
        lambda v: v.widgets["crumbs"].children[1].click(),
        lambda v: v.session.continue_from(1, 1),
    ),
]


@pytest.mark.parametrize("widget, call, act, setup", CALLBACKS, ids=[c[0] for c in CALLBACKS])
def test_every_callback_shows_its_errors_in_the_panel(done, monkeypatch, widget, call, act, setup):
    if setup is not None:
        setup(done)
    monkeypatch.setattr(done.session, call, _broken(call))
    act(done)
    _shows_only(done, f"RuntimeError: broken {call}")
    assert done.errors == [f"RuntimeError: broken {call}"]
    done.errors.clear()


def test_a_drawing_error_shows_in_the_panel(done, monkeypatch):
    monkeypatch.setattr(done.session, "heatmap_png", _broken("heatmap_png"))
    done.session.set_step(1)
    assert "the panel could not redraw (RuntimeError: broken heatmap_png)" in _status(done)
    assert done.errors == ["RuntimeError: broken heatmap_png"]
    done.errors.clear()


def test_an_error_after_the_run_is_shown_not_lost(done, monkeypatch):
    import p2p_widgets.panel.session as session_module

    monkeypatch.setattr(session_module, "_thumbnail", _broken("thumbnail"))
    state = _click_and_wait(done)
    assert state.status == "error" and not state.running
    _shows_only(done, "RuntimeError: broken thumbnail")
    assert not done.widgets["generate"].disabled
