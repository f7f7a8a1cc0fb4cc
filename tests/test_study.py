"""The CL P2P tools: presets, image metrics, cycles A -> B -> A."""

import math
import threading

import numpy as np
import pytest

from p2p_widgets import Cancelled, LocalBlend, Target, edit
from p2p_widgets.shapes.evaluate import prompt_matches
from p2p_widgets.study import PRESETS, cycle, cycle_score, edited_mask, preset, psnr, ssim, sweep

SOURCE = "a cat riding a bicycle"
SWAP = "a dog riding a bicycle"


def test_the_reports_two_presets():
    literature, optimised = preset("literature"), preset("optimised")
    assert (literature.k, literature.cross, literature.self_attn) == (0.3, 0.8, 0.2)
    assert (optimised.k, optimised.cross, optimised.self_attn) == (0.0, 0.2, 0.8)
    target = literature.target(SWAP, blend=("dog",), values=0.5)
    assert target.cross.default.end == 0.8 and target.self_attn.end == 0.2 and target.values.end == 0.5
    assert target.blend == LocalBlend(("dog",), threshold=0.3)
    assert optimised.target(SWAP, blend="dog").blend is None  # k = 0: no blending
    assert set(PRESETS) == {"literature", "optimised"}
    with pytest.raises(ValueError, match="no preset named 'best'; the presets are: literature, optimised"):
        preset("best")
    with pytest.raises(ValueError, match="the optimised preset sets cross"):
        optimised.target(SWAP, cross=0.5)


def test_psnr_and_ssim_of_identical_noisy_and_masked_images():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)
    assert psnr(image, image) == math.inf and ssim(image, image) == pytest.approx(1.0)
    noisy = [np.clip(image + rng.normal(0, s, image.shape), 0, 255).astype(np.uint8) for s in (5, 20, 60)]
    assert psnr(image, noisy[0]) > psnr(image, noisy[1]) > psnr(image, noisy[2])
    assert 1.0 > ssim(image, noisy[0]) > ssim(image, noisy[1]) > ssim(image, noisy[2])
    assert ssim(image, noisy[1]) == pytest.approx(ssim(noisy[1], image))  # symmetric
    changed = image.copy()
    changed[:8] = 0
    outside = np.ones((32, 32), bool)
    outside[:13] = False  # the SSIM window (radius 5) reaches 5 pixels beyond the change
    assert psnr(image, changed, outside) == math.inf and ssim(image, changed, outside) == pytest.approx(1.0)
    assert psnr(image, changed) < 20
    with pytest.raises(ValueError, match="the mask is"):
        psnr(image, changed, outside[:10])
    with pytest.raises(ValueError, match="the images differ in size"):
        ssim(image, image[:16])


def test_the_edited_mask_covers_the_swapped_word(sd1):
    result = edit(sd1, SOURCE, Target(SWAP), steps=3, seed=0, height=64, width=64)
    mask = edited_mask(result, 1)
    assert mask.shape == (64, 64) and 0 < mask.mean() <= 1
    unchanged = edit(sd1, SOURCE, Target(SOURCE), steps=3, seed=0, height=64, width=64)
    assert not edited_mask(unchanged, 1).any()  # nothing changed, nothing masked
    with pytest.raises(ValueError, match="branch 0 is the source"):
        edited_mask(result, 0)


def test_a_cycle_in_one_batch_returns_exactly_to_the_source(sd1):
    """A' is edited from B with B's maps, which inside the windows are A's own: so A -> B -> A
    in one batch comes back to A's pixels, with or without value injection or blending."""
    for forward in (Target(SWAP), Target(SWAP, values=0.5), Target(SWAP, blend=LocalBlend(("dog",)))):
        result, score = cycle(sd1, SOURCE, forward, steps=3, seed=0)
        assert [b.prompt.text for b in result.branches] == [SOURCE, SWAP, SOURCE]
        assert result.recipe.targets[1].parent == 1
        assert score.psnr == math.inf and score.ssim == pytest.approx(1.0), forward
    back = result.recipe.targets[1].blend
    assert back.words == (1,) and back.parent_words == ("dog",)  # "cat" is word 1 of the source


def test_a_way_back_longer_than_the_way_there_drifts_and_scores_lower(sd1):
    """With the back edit injecting B's maps where B drew its own (cross 0.2 there, 1.0 back),
    A' is no longer A: the score says so, over the whole image."""
    there, back = Target(SWAP, cross=0.2, self_attn=0.0), Target(SOURCE, parent=1, cross=1.0, self_attn=0.0)
    drifted = edit(sd1, SOURCE, there, back, steps=4, seed=0)
    score = cycle_score(drifted)
    assert score.psnr < 60 and score.ssim < 1.0
    with pytest.raises(ValueError, match="not a return to the prompt its parent edited"):
        cycle_score(edit(sd1, SOURCE, Target(SWAP), Target("a cow riding a bicycle", parent=1), steps=2, seed=0))
    with pytest.raises(ValueError, match="edits the source"):
        cycle(sd1, SOURCE, Target(SWAP, parent=1))


def test_a_sweep_has_one_row_per_grid_point_with_finite_metrics(sd1, tmp_path):
    result = sweep(
        sd1,
        SOURCE,
        SWAP,
        cross=(0.2, 0.8),
        self_attn=0.4,
        k=(0.0, 0.5),
        values=(0.0, 0.5),
        blend="dog",
        steps=3,
        seed=0,
    )
    assert len(result.rows) == 8 and len(result.edited) == len(result.returned) == 8
    settings = {(r["cross"], r["self_attn"], r["k"], r["values"]) for r in result.rows}
    assert settings == {(c, 0.4, k, v) for c in (0.2, 0.8) for k in (0.0, 0.5) for v in (0.0, 0.5)}
    for row in result.rows:
        for name in ("cycle_psnr", "cycle_ssim", "background_psnr", "edge_correlation"):
            assert math.isfinite(row[name]), (name, row)
    text = result.to_csv(tmp_path / "sweep.csv")
    assert text.splitlines()[0] == "cross,self_attn,k,values,cycle_psnr,cycle_ssim,background_psnr,edge_correlation"
    assert (tmp_path / "sweep.csv").read_text() == text and len(text.splitlines()) == 9
    sheet = result.contact_sheet(columns=3)
    assert sheet.width > 2 * sheet.height / 3  # 9 tiles in 3 columns


def test_a_sweep_in_small_passes_reports_progress_across_them_and_cancels(sd1):
    seen = []
    whole = sweep(sd1, SOURCE, SWAP, cross=(0.2, 0.5, 0.8), steps=2, seed=0)
    split = sweep(sd1, SOURCE, SWAP, cross=(0.2, 0.5, 0.8), steps=2, seed=0, max_targets=2, callback=seen.append)
    assert [p.step for p in seen] == list(range(6)) and {p.steps for p in seen} == {6}  # 3 passes of 2 steps
    for a, b in zip(whole.rows, split.rows):
        assert a["cross"] == b["cross"] and a["edge_correlation"] == pytest.approx(b["edge_correlation"], abs=1e-3)
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        sweep(sd1, SOURCE, SWAP, steps=2, cancel=stop)


@pytest.mark.parametrize(
    "grid, message",
    [
        (dict(cross=()), "the sweep's cross grid is empty"),
        (dict(self_attn=(0.2, 1.5)), "the sweep's self_attn grid holds 1.5; its values are numbers in \\[0, 1\\]"),
        (dict(k=(1.0,), blend="dog"), "the sweep's k grid holds 1.0; its values are numbers in \\[0, 1\\)"),
        (dict(k=(0.3,)), "no blend words"),
        (dict(values=("all",)), "the sweep's values grid holds 'all'"),
        (dict(max_targets=1), "max_targets is the most branches per pass"),
    ],
)
def test_bad_grids_are_refused_before_anything_runs(sd1, grid, message):
    with pytest.raises(ValueError, match=message):
        sweep(sd1, SOURCE, SWAP, steps=2, **grid)


def test_a_sweep_on_the_shapes_model_measures_edit_success(shapes):
    source = "a big red circle and a small blue square on a black background"
    edited = source.replace("blue", "green")
    result = sweep(
        shapes,
        source,
        edited,
        cross=0.8,
        self_attn=0.4,
        k=(0.0, 0.7),
        blend="green",
        mask_threshold=0.7,
        success=lambda image: prompt_matches(image, edited),
        steps=20,
        seed=0,
        self_max_scale=1.0,
    )
    assert all(row["edit_success"] for row in result.rows), result.rows
    assert prompt_matches(result.source, source) and not prompt_matches(result.source, edited)
    blended = [r["background_psnr"] for r in result.rows if r["k"] == 0.7]
    plain = [r["background_psnr"] for r in result.rows if r["k"] == 0.0]
    assert min(blended) > max(plain)  # local blending keeps the rest of the scene
