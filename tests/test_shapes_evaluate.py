"""The evaluation's measurements, checked on rendered scenes whose truth is known."""

import numpy as np
import pytest

from p2p_widgets.shapes import ObjectWords, SceneWords, caption, place, render
from p2p_widgets.shapes.data import COLOR_RGB
from p2p_widgets.shapes.evaluate import (
    _correct,
    _iou,
    _rises,
    _threshold,
    _upsample,
    _word_indices,
    dilate,
    find_object,
    saturation,
)
from p2p_widgets.study import psnr

SCENE = SceneWords((ObjectWords("circle", "red", "big", "striped"), ObjectWords("square", "blue", "small")), "black")


def rendered(words=SCENE, seed=0):
    return render(place(words, np.random.default_rng(seed)))


def test_word_indices_point_at_the_caption_words():
    words = caption(SCENE).split()
    for obj, index in zip(SCENE.objects, _word_indices(SCENE)):
        assert words[index["color"]] == obj.color
        assert words[index["shape"]] == obj.shape
        assert words[index["size"]] == obj.size


def test_the_prompted_objects_are_found_with_their_true_masks():
    scene = rendered()
    masks = _correct(scene.image, SCENE)
    assert masks is not None
    for found, truth in zip(masks, scene.masks):
        assert _iou(found, truth) > 0.9


def test_wrong_colour_shape_or_count_is_not_correct():
    scene = rendered()
    wrong_shape = SceneWords((ObjectWords("star", "red", "big", "striped"), SCENE.objects[1]), "black")
    wrong_color = SceneWords((ObjectWords("circle", "green", "big", "striped"), SCENE.objects[1]), "black")
    one_object = SceneWords(SCENE.objects[:1], "black")
    for words in (wrong_shape, wrong_color, one_object):
        assert _correct(scene.image, words) is None
    assert find_object(scene.image, "green") is None


def test_find_object_takes_a_picture_or_pixels_and_refuses_an_unknown_colour():
    from PIL import Image

    scene = rendered()
    found = find_object(Image.fromarray(scene.image), "blue")
    assert found is not None and _iou(found, scene.masks[1]) > 0.9
    assert np.array_equal(found, find_object(scene.image, "blue"))
    with pytest.raises(ValueError, match="'mauve' is not a shapes colour; use one of red"):
        find_object(scene.image, "mauve")


def test_psnr_outside_a_mask_ignores_what_changed_inside():
    scene = rendered()
    changed = scene.image.copy()
    changed[scene.masks[1]] = (0, 255, 0)
    outside = ~dilate(scene.masks[1], 2)
    assert psnr(scene.image, changed, outside) == float("inf")
    assert psnr(scene.image, changed, np.ones_like(outside)) < 20


def test_heatmaps_upsample_to_the_image():
    heat = np.arange(16, dtype=np.float32).reshape(4, 4)
    big = _upsample(heat, 16)
    assert big.shape == (16, 16) and big[15, 15] == 15 and big[0, 3] == 0


def test_heatmap_threshold_with_and_without_the_floor():
    mask = np.zeros((8, 8), bool)
    mask[2:5, 3:6] = True
    heat = np.where(mask, 1.0, 0.6)  # a word map that keeps 0.6 of its peak everywhere
    assert _iou(_threshold(heat, floor=True), mask) == 1.0
    assert _threshold(heat, floor=False).all()  # divided by the peak only, everything passes
    assert _iou(_threshold(heat, floor=False), mask) == mask.mean()
    assert not _threshold(np.zeros((4, 4)), floor=True).any()  # a flat map selects nothing


def test_saturation_is_measured_inside_the_mask_and_follows_a_paler_colour():
    scene = rendered()
    red = scene.masks[0]
    full = saturation(scene.image, red)
    r, g, b = COLOR_RGB["red"]
    assert abs(full - (max(r, g, b) - min(r, g, b))) <= 40  # stripes darken part of the object
    paler = scene.image.astype(np.float64)
    paler[red] = 0.5 * paler[red] + 0.5 * 128  # halfway to gray
    assert saturation(paler.astype(np.uint8), red) < 0.6 * full
    assert saturation(scene.image, scene.masks[1]) > 150  # the blue square, not the red circle's


def test_a_sweep_rises_only_if_it_never_falls_and_ends_higher():
    assert _rises([170.0, 172.0, 172.0, 180.0])
    assert not _rises([170.0, 175.0, 173.0, 180.0])  # one fall
    assert not _rises([170.0, 170.0, 170.0])  # flat
    assert not _rises([180.0, 175.0, 170.0])  # the wrong direction
