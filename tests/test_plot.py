"""Pictures: colour maps, overlays, the scrubber's fast path, grids, masks, galleries."""

import numpy as np
import pytest
from matplotlib import colormaps
from matplotlib.figure import Figure
from PIL import Image

from p2p_widgets import LocalBlend, Recipe, Target, edit, plot, run

SOURCE, TARGET = "a cat riding a bicycle", "a dog riding a bicycle"


@pytest.fixture(scope="module")
def result(sd1):
    """A swap with local blending on a non-square image (32 high, 48 wide)."""
    recipe = Recipe(
        SOURCE,
        targets=(Target(TARGET, blend=LocalBlend(("dog",), threshold=0.9, dilation=0)),),
        steps=6,
        seed=1,
        height=32,
        width=48,
    )
    return run(sd1, recipe, record_self=(2, 2))


def test_palette_is_the_colour_map():
    table = plot.palette("viridis")
    assert table.shape == (256, 3) and table.dtype == np.uint8
    expected = np.round(np.array(colormaps["viridis"](1.0)[:3]) * 255)
    np.testing.assert_array_equal(table[-1], expected)
    with pytest.raises(ValueError, match="not a matplotlib colour map"):
        plot.palette("rainbowz")


def test_colorize_sizes_modes_and_colours():
    heat = np.zeros((4, 6), np.float32)
    heat[0, 0] = 2.0  # stretched to 1 by the per-map normalisation
    image = plot.colorize(heat, cmap="gray")
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (6, 4)
    pixels = plot.colorize(heat, cmap="gray", as_array=True)
    assert pixels.shape == (4, 6, 3) and pixels.dtype == np.uint8
    assert tuple(pixels[0, 0]) == (255, 255, 255) and tuple(pixels[3, 5]) == (0, 0, 0)
    large = plot.colorize(heat, size=(40, 60), as_array=True)
    assert large.shape == (40, 60, 3)
    # unnormalised values are clipped to [0, 1]
    raw = plot.colorize(np.full((2, 2), 0.5, np.float32), cmap="gray", normalize=None, as_array=True)
    assert raw[0, 0, 0] in (127, 128)
    with pytest.raises(ValueError, match="2-D array"):
        plot.colorize(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match=r"\(height, width\)"):
        plot.colorize(heat, size=(10,))


def test_overlay_blends_by_alpha_at_the_images_size():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    heat = rng.random((6, 10)).astype(np.float32)
    invisible = plot.overlay(image, heat, alpha=0.0, as_array=True)
    np.testing.assert_array_equal(invisible, image)
    opaque = plot.overlay(image, heat, alpha=1.0, as_array=True)
    np.testing.assert_array_equal(opaque, plot.colorize(heat, size=(30, 50), as_array=True))
    half = plot.overlay(Image.fromarray(image), heat, alpha=0.5, as_array=True).astype(int)
    expected = 0.5 * image + 0.5 * opaque
    assert np.abs(half - expected).max() <= 1.0
    assert plot.overlay(image, heat).size == (50, 30)
    with pytest.raises(ValueError, match="opacity"):
        plot.overlay(image, heat, alpha=1.5)


def test_scrubber_frames_equal_the_general_overlay(result):
    scrubber = plot.Scrubber(result, branch=1)
    assert scrubber.labels == ("a", "dog", "riding", "a", "bicycle")
    heatmaps = result.attention.heatmaps(1)
    for steps in (0, 3, (1, 5)):
        frame = scrubber.frame(steps)
        assert len(frame) == 5 and all(image.size == (48, 32) and image.mode == "RGB" for image in frame)
        maps = heatmaps.words(steps=steps)
        for image, heat in zip(frame, maps.maps):
            expected = plot.overlay(result.images[1], heat, as_array=True).astype(int)
            assert np.abs(np.asarray(image).astype(int) - expected).max() <= 1
    # another step shows another picture
    assert not np.array_equal(np.asarray(scrubber.frame(0)[1]), np.asarray(scrubber.frame(5)[1]))


def test_scrubber_words_sizes_and_shared_scale(result):
    scrubber = plot.Scrubber(result, words=["cat", "bicycle"], size=(64, 96), normalize="words", alpha=1.0, cmap="gray")
    assert scrubber.labels == ("cat", "bicycle")
    frame = scrubber.frame(2)
    assert [image.size for image in frame] == [(96, 64)] * 2
    # one scale for both words: only one of them reaches the top level
    peaks = scrubber.levels(2).max(axis=(1, 2))
    assert max(peaks) == 255 and min(peaks) < 255
    assert plot.Scrubber(result, words=["cat", "bicycle"]).levels(2).max(axis=(1, 2)).tolist() == [255, 255]
    with pytest.raises(ValueError, match="'lion' is not in"):
        plot.Scrubber(result, words=["lion"])
    with pytest.raises(ValueError, match=r"steps 0\.\.5"):
        scrubber.frame(6)


def test_word_grid_figure_and_image(result):
    grid = plot.word_grid(result, branch=1, steps=(0, 3))
    assert grid.labels == ("a", "dog", "riding", "a", "bicycle") and len(grid.images) == 5
    assert all(image.size == (48, 32) for image in grid.images)
    figure = grid.figure()
    assert isinstance(figure, Figure)
    titles = [ax.get_title() for ax in figure.axes if ax.images]
    assert titles == ["a", "dog", "riding", "a", "bicycle"]
    assert "steps 1-3 of 6" in figure._suptitle.get_text()
    tokens = plot.word_grid(result, tokens=True, special=True, on_image=False).figure()
    assert next(ax.get_title() for ax in tokens.axes if ax.images) == "<start>"
    assert plot.word_grid(result, tokens=True).labels[0] == "a"
    picture = plot.word_grid(result, columns=3).image(tile=40)
    assert isinstance(picture, Image.Image) and picture.mode == "RGB"
    # 3 columns of 60-wide tiles (40 high, aspect 3:2), 2 rows
    assert 3 * 60 <= picture.width < 3 * 60 + 40 and picture.height > 2 * 40
    with pytest.raises(ValueError, match=r"'lion' is not in .*a, cat, riding, a, bicycle"):
        plot.word_grid(result, words=["lion"])
    # a notebook shows the grid as its image
    assert grid._repr_png_().startswith(b"\x89PNG")


def test_filmstrip_shows_one_word_at_spread_steps(result):
    timesteps = result.attention.timesteps
    figure = plot.filmstrip(result, "dog", branch=1, count=2).figure()
    titles = [ax.get_title() for ax in figure.axes if ax.images]
    assert titles == [f"step 1 (t={timesteps[0]})", f"step 6 (t={timesteps[5]})"]
    every = plot.filmstrip(result, "dog", branch=1, count=10).figure()  # more than there are: each step once
    assert [ax.get_title() for ax in every.axes if ax.images] == [
        f"step {i + 1} (t={t})" for i, t in enumerate(timesteps)
    ]
    strip = plot.filmstrip(result, "cat", steps=[0, 5], on_image=False).image(tile=32)
    assert strip.width >= 2 * 48 and strip.height > 32
    with pytest.raises(ValueError, match=r"steps 0\.\.5"):
        plot.filmstrip(result, "cat", steps=[9])


def test_blend_mask_matches_the_runs_mask(sd1, result):
    mask = plot.blend_mask(result, on_image=False, as_array=True)
    assert mask.shape == (32, 48, 3)
    latent_mask = result.blend_masks[-1, 1].numpy()  # (16, 24) on the latent
    upsampled = np.kron(latent_mask, np.ones((2, 2), bool))
    np.testing.assert_array_equal(mask[..., 0] == 255, upsampled)
    assert 0 < upsampled.mean() < 1
    shown = plot.blend_mask(result, as_array=True)
    target = np.asarray(result.images[1])
    np.testing.assert_array_equal(shown[upsampled], target[upsampled])
    no_blend = edit(sd1, SOURCE, TARGET, steps=2)
    with pytest.raises(ValueError, match="no local blending"):
        plot.blend_mask(no_blend)


def test_difference_against_the_parent(result):
    change = plot.difference(result, as_array=True)
    expected = np.abs(np.asarray(result.images[1]).astype(int) - np.asarray(result.images[0]).astype(int))
    np.testing.assert_array_equal(change, expected.astype(np.uint8))
    assert plot.difference(result, branch=0, as_array=True).max() == 0
    assert plot.difference(result).size == (48, 32)
    with pytest.raises(ValueError, match=r"branches 0\.\.1"):
        plot.difference(result, branch=2)


def test_self_attention_components_figure(result):
    figure = plot.self_attention(result, count=4).figure()
    assert len([ax for ax in figure.axes if ax.images]) == 4
    assert "step 3" in figure._suptitle.get_text()
    assert plot.self_attention(result, count=2).image(tile=32).mode == "RGB"


def test_gallery_captions_every_branch(result):
    figure = plot.gallery(result).figure()
    titles = [ax.get_title().replace("\n", " ") for ax in figure.axes if ax.images]
    assert titles == [f'source: "{SOURCE}"', f'swap: "{TARGET}"']
    picture = plot.gallery(result).image(tile=64)
    assert picture.width >= 2 * 96 and picture.height > 64


def test_results_without_a_record_say_how_to_get_one(sd1):
    bare = edit(sd1, SOURCE, TARGET, steps=2, record=False)
    with pytest.raises(ValueError, match="record=True"):
        plot.word_grid(bare)
    with pytest.raises(TypeError, match="Result"):
        plot.Scrubber(np.zeros((4, 4)))


def test_tile_images_lays_out_rows_and_checks_labels():
    tiles = [Image.new("RGB", (20, 10), colour) for colour in ("red", "green", "blue")]
    grid = plot.tile_images(tiles, ["r", "g", "b"], columns=2)
    assert grid.width == 6 + 2 * 26  # gap + columns * (width + gap)
    assert np.asarray(grid)[6 + 2, 6 + 2].tolist() == [255, 0, 0]
    with pytest.raises(ValueError, match="one label per image"):
        plot.tile_images(tiles, ["r"])
