"""The synthetic shapes world: caption grammar, exact masks, sampling, pixel measurements."""

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from p2p_widgets.shapes import (
    BACKGROUND_RGB,
    BACKGROUNDS,
    COLOR_RGB,
    COLORS,
    SHAPES,
    ObjectSpec,
    ObjectWords,
    Scene,
    SceneWords,
    batch,
    caption,
    centroid,
    classify_color,
    classify_shape,
    classify_size,
    classify_texture,
    dataset,
    diameter,
    estimate_scale,
    object_masks_from_pixels,
    parse_caption,
    render,
    sample_scene,
    vocabulary,
)
from p2p_widgets.shapes import data as shapes_data


def _scenes(n, seed, size=64, **kw):
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, size, **kw) for _ in range(n)]


def _hue_chroma(rgb):
    return shapes_data._hue_chroma(np.asarray(rgb, np.float64))


def _dilate(mask, steps):
    for _ in range(steps):
        m = mask.copy()
        m[1:] |= mask[:-1]
        m[:-1] |= mask[1:]
        m[:, 1:] |= mask[:, :-1]
        m[:, :-1] |= mask[:, 1:]
        mask = m
    return mask


# ----------------------------------------------------------------------------- captions


def test_caption_wording():
    two = Scene(
        (
            ObjectSpec("circle", "red", "big", "plain", 20, 20),
            ObjectSpec("square", "blue", "small", "striped", 48, 44),
        ),
        "black",
    )
    assert caption(two) == "a big red circle and a small blue striped square on a black background"
    one = Scene((ObjectSpec("star", "green", "small", "plain", 32, 32),), "gray")
    assert caption(one) == one.caption == "a small green star on a gray background"
    dotted = SceneWords((ObjectWords("heart", "pink", "big", "dotted"),), "checkered")
    assert caption(dotted) == "a big pink dotted heart on a checkered background"


def test_captions_round_trip():
    for scene in _scenes(300, seed=1, texture_p=0.5):
        text = caption(scene)
        words = parse_caption(text)
        assert words == scene.words
        assert caption(words) == text
    assert parse_caption("  A Big Red Circle on a Black Background. ") == SceneWords(
        (ObjectWords("circle", "red", "big"),), "black"
    )


def test_vocabulary_is_exactly_the_caption_words():
    vocab = vocabulary()
    assert len(set(vocab)) == len(vocab)
    assert {"a", "and", "on", "background"} <= set(vocab)
    used = set()
    for scene in _scenes(500, seed=2, texture_p=0.5):
        used |= set(caption(scene).split())
    assert used <= set(vocab)
    assert used == set(vocab)  # no word is listed that captions never use
    assert "plain" not in vocab


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("a big red circle on a black backdrop", "unknown word 'backdrop'"),
        ("a big plain red circle on a black background", "unknown word 'plain'"),
        ("a big crimson circle on a black background", "unknown word 'crimson'"),
        ("a red big circle on a black background", "expected a size"),
        ("a big red circle", "found the end of the caption"),
        ("a big red on a black background", "expected a shape"),
        ("a big red circle and on a black background", "expected 'a'"),
        ("a big red circle on a black background background", "unexpected 'background'"),
        ("", "expected 'a'"),
    ],
)
def test_bad_captions_raise_clear_errors(text, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)) as info:
        parse_caption(text)
    message = str(info.value)
    if fragment.startswith("unknown word"):
        assert "vocabulary" in message and ", ".join(vocabulary()) in message


def test_specs_are_validated():
    with pytest.raises(ValueError, match="'big'"):
        ObjectSpec("circle", "red", "small", "plain", 32, 32, scale=0.8)
    with pytest.raises(ValueError, match="unknown color 'crimson'"):
        ObjectSpec("circle", "crimson", "small", "plain", 32, 32)
    with pytest.raises(ValueError, match="scale"):
        ObjectSpec("circle", "red", "big", "plain", 32, 32, scale=1.5)
    with pytest.raises(ValueError, match="unknown texture"):
        ObjectWords("circle", "red", "big", "spotted")
    obj = ObjectSpec("circle", "red", "big", "plain", 32, 32)
    assert obj.scale == pytest.approx(0.85)
    with pytest.raises(ValueError, match="1 or 2 objects"):
        Scene((obj, obj, obj), "black")
    with pytest.raises(ValueError, match="unknown background"):
        Scene((obj,), "blue")


def test_with_words_keeps_the_layout():
    scene = _scenes(1, seed=3, two_objects_p=1.0)[0]
    words = scene.words
    first = words.objects[0]
    new_size = "big" if first.size == "small" else "small"
    edited = SceneWords((ObjectWords("heart", first.color, new_size, "dotted"), *words.objects[1:]), "white")
    moved = scene.with_words(edited)
    assert moved.words == edited
    assert (moved.objects[0].center_x, moved.objects[0].center_y) == (
        scene.objects[0].center_x,
        scene.objects[0].center_y,
    )
    assert moved.objects[0].size == new_size and moved.objects[1] == scene.objects[1]


# ----------------------------------------------------------------------------- rendering


def test_render_shapes_and_dtypes():
    for size in (32, 64, 128):
        scene = _scenes(1, seed=4, size=size, two_objects_p=1.0)[0]
        r = render(scene)
        assert r.image.shape == (size, size, 3) and r.image.dtype == np.uint8
        assert r.masks.shape == (2, size, size) and r.masks.dtype == bool
        assert r.caption == caption(scene)


def test_masks_are_exact():
    """Mask pixels show the object's hue; pixels away from every mask are pure background."""
    checked = 0
    for scene in _scenes(120, seed=5, texture_p=0.5):
        r = render(scene)
        masks = r.masks
        assert not (masks[0] & masks[-1]).any() or len(masks) == 1
        if len(masks) == 2 and (_dilate(masks[0], 2) & masks[1]).any():
            continue  # touching objects mix colours at their border; see the occlusion test
        checked += 1
        hue, chroma = _hue_chroma(r.image)
        strongest = 0.0
        for obj, mask in zip(scene.objects, masks):
            obj_hue, obj_chroma = _hue_chroma(COLOR_RGB[obj.color])
            strongest = max(strongest, float(obj_chroma))
            assert mask.any()
            d = np.abs(hue[mask] - obj_hue)
            assert np.minimum(d, 360 - d).max() < 4.0  # anti-aliasing and texture keep the hue
            assert chroma[mask].min() >= 0.25 * obj_chroma  # at least half covered, texture >= 0.55
            assert np.median(chroma[mask]) >= 0.6 * obj_chroma  # mostly the full colour
        outside = ~masks.any(0)
        assert chroma[outside].max() < 0.5 * strongest + 1  # less than half covered
        far = ~_dilate(masks.any(0), 2)
        if scene.background == "checkered":
            allowed = np.array(shapes_data._CHECKER_RGB)
            ok = (r.image[far][:, None, :] == allowed[None]).all(-1).any(-1)
            assert ok.all()
        else:
            assert (r.image[far] == BACKGROUND_RGB[scene.background]).all()
    assert checked > 60


def test_mask_area_matches_geometry():
    for shape in SHAPES:
        for scale in (0.0, 0.5, 1.0):
            scene = Scene(
                (ObjectSpec(shape, "red", "small" if scale < 0.5 else "big", "striped", 31.3, 32.6, scale),), "gray"
            )
            area = render(scene).masks[0].sum()
            unit_area, _ = shapes_data._AREA_CENTROID[shape]
            expected = unit_area * (diameter(scale) / 2) ** 2
            assert abs(area - expected) <= 0.06 * expected + 2


def test_second_object_occludes_the_first():
    square = ObjectSpec("square", "red", "big", "plain", 32, 32, 0.9)
    circle = ObjectSpec("circle", "blue", "small", "striped", 32, 32, 0.2)
    alone = render(Scene((square,), "black")).masks[0]
    r = render(Scene((square, circle), "black"))
    assert not (r.masks[0] & r.masks[1]).any()
    assert r.masks[1].sum() > 100
    assert abs(int(r.masks[0].sum()) + int(r.masks[1].sum()) - int(alone.sum())) <= 2
    assert (r.masks[0] | r.masks[1])[alone].mean() > 0.99
    assert classify_color(r.image, r.masks[1]) == "blue"
    assert classify_color(r.image, r.masks[0]) == "red"
    assert tuple(r.image[32, 32]) != COLOR_RGB["red"]
    # drawn the other way round, the small circle disappears entirely
    hidden = render(Scene((circle, square), "black"))
    assert hidden.masks[0].sum() == 0
    assert (hidden.image == render(Scene((square,), "black")).image).all()


def test_big_is_more_than_twice_small():
    for shape in SHAPES:
        areas = {}
        for scale in (0.0, 0.15, 0.7, 1.0):
            scene = Scene(
                (ObjectSpec(shape, "green", "small" if scale < 0.5 else "big", "plain", 32, 32, scale),), "black"
            )
            areas[scale] = render(scene).masks[0].sum()
        assert areas[0.7] > 2 * areas[0.15]  # the smallest sampled big vs the largest sampled small
        assert areas[0.0] < areas[0.15] < areas[0.7] < areas[1.0]
    # diameters: small 18-20.7 px, big 30.6-36 px at 64 pixels
    for scale, lo, hi in ((0.0, 17, 19), (0.15, 19.5, 21.5), (0.7, 30, 32), (1.0, 35, 37)):
        mask = render(
            Scene((ObjectSpec("circle", "red", "small" if scale < 0.5 else "big", "plain", 32, 32, scale),), "black")
        ).masks[0]
        width = mask.any(0).sum()
        assert lo <= width <= hi


def test_sizes_scale_with_the_image():
    obj = dict(shape="heart", color="cyan", size="big", texture="dotted", scale=0.8)
    areas = {}
    for size in (32, 64, 128):
        scene = Scene((ObjectSpec(center_x=size / 2, center_y=size / 2, **obj),), "white", size)
        areas[size] = render(scene).masks[0].sum()
    assert areas[32] * 4 == pytest.approx(areas[64], rel=0.08)
    assert areas[128] == pytest.approx(4 * areas[64], rel=0.05)


# ----------------------------------------------------------------------------- sampling


def test_sampling_is_deterministic():
    images, captions = batch(24, seed=7)
    again, captions_again = batch(24, seed=7)
    assert (images == again).all() and captions == captions_again
    other, other_captions = batch(24, seed=8)
    assert captions != other_captions and not (images == other).all()
    listed = dataset(24, seed=7)
    assert [r.caption for r in listed] == captions
    assert all((r.image == im).all() for r, im in zip(listed, images))
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    assert [sample_scene(a) for _ in range(5)] == [sample_scene(b) for _ in range(5)]


def test_sampled_scenes_are_well_formed():
    scenes = _scenes(400, seed=9)
    two = [s for s in scenes if len(s.objects) == 2]
    assert 0.4 < len(two) / len(scenes) < 0.6
    objects = [o for s in scenes for o in s.objects]
    textured = np.mean([o.texture != "plain" for o in objects])
    assert 0.2 < textured < 0.4
    assert {o.shape for o in objects} == set(SHAPES)
    assert {o.color for o in objects} == set(COLORS)
    assert {s.background for s in scenes} == set(BACKGROUNDS)
    for s in two:
        a, b = s.objects
        assert a.color != b.color
        distance = math.dist((a.center_x, a.center_y), (b.center_x, b.center_y))
        assert distance >= 0.85 * (diameter(a.scale) + diameter(b.scale)) / 2 - 1e-9
    for s in scenes[:150]:
        r = render(s)
        border = np.concatenate([r.image[0], r.image[-1], r.image[:, 0], r.image[:, -1]])
        assert _hue_chroma(border)[1].max() == 0  # objects stay inside the image
        if len(s.objects) == 2:  # overlaps are light: most of the lower object stays visible
            alone = render(Scene(s.objects[:1], s.background)).masks[0]
            assert r.masks[0].sum() >= 0.7 * alone.sum()


# ----------------------------------------------------------------------------- measurement


def _noisy(image, rng):
    noisy = np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(noisy).filter(ImageFilter.GaussianBlur(0.6)))


def _accuracy(rendered, noise_seed=None, from_pixels=True):
    rng = np.random.default_rng(noise_seed)
    hits = {"found": [], "color": [], "shape": [], "size": [], "texture": []}
    for r in rendered:
        image = r.image if noise_seed is None else _noisy(r.image, rng)
        found = object_masks_from_pixels(image, r.scene.background) if from_pixels else []
        visible = [i for i, m in enumerate(r.masks) if m.any()]
        hits["found"].append(len(found) == len(visible) or not from_pixels)
        for i in visible:
            obj, truth = r.scene.objects[i], r.masks[i]
            mask = truth
            if from_pixels:
                ious = [(f & truth).sum() / (f | truth).sum() for f in found]
                if not ious or max(ious) < 0.7:
                    for k in ("color", "shape", "size", "texture"):
                        hits[k].append(False)
                    continue
                mask = found[int(np.argmax(ious))]
            above = r.masks[i + 1 :].any(0) if i + 1 < len(r.masks) else None
            shape = classify_shape(mask, above)
            hits["color"].append(classify_color(image, mask) == obj.color)
            hits["shape"].append(shape == obj.shape)
            if above is None or not (_dilate(truth, 1) & above).any():  # occlusion shrinks the area
                hits["size"].append(classify_size(mask, shape) == obj.size)
            hits["texture"].append(classify_texture(image, mask) == obj.texture)
    return {k: float(np.mean(v)) for k, v in hits.items()}


@pytest.fixture(scope="module")
def rendered():
    return dataset(160, seed=11, texture_p=0.5)


def test_classification_with_true_masks(rendered):
    acc = _accuracy(rendered, from_pixels=False)
    assert min(acc.values()) >= 0.98, acc


def test_classification_from_pixels(rendered):
    acc = _accuracy(rendered)
    assert min(acc.values()) >= 0.98, acc


def test_classification_is_robust_to_noise_and_blur(rendered):
    acc = _accuracy(rendered, noise_seed=0)
    assert min(acc.values()) >= 0.95, acc


def test_segmentation_separates_touching_objects():
    scene = Scene(
        (
            ObjectSpec("square", "yellow", "big", "dotted", 26, 30, 0.8),
            ObjectSpec("circle", "purple", "big", "striped", 44, 34, 0.7),
        ),
        "checkered",
    )
    r = render(scene)
    found = object_masks_from_pixels(r.image, "checkered")
    assert len(found) == 2
    for truth in r.masks:
        assert max((f & truth).sum() / (f | truth).sum() for f in found) > 0.9
    assert object_masks_from_pixels(render(Scene(scene.objects[:1], "white")).image)[0].sum() > 500
    blank = np.full((64, 64, 3), 128, np.uint8)
    assert object_masks_from_pixels(blank, "gray") == []
    with pytest.raises(ValueError, match="unknown background"):
        object_masks_from_pixels(blank, "purple")


def test_measurement_helpers():
    mask = np.zeros((64, 64), bool)
    mask[10:20, 30:34] = True
    assert centroid(mask) == (15.0, 32.0)
    with pytest.raises(ValueError, match="empty"):
        centroid(np.zeros((8, 8), bool))
    with pytest.raises(ValueError, match="empty"):
        classify_shape(np.zeros((8, 8), bool))
    for scale in (0.1, 0.4, 0.6, 0.9):
        obj = ObjectSpec("triangle", "blue", "small" if scale < 0.5 else "big", "plain", 30, 34, scale)
        r = render(Scene((obj,), "gray"))
        assert estimate_scale(r.masks[0], "triangle") == pytest.approx(scale, abs=0.04)
        # within half a pixel: the mask is the thresholded coverage
        assert centroid(r.masks[0]) == pytest.approx(
            (34 + shapes_data._AREA_CENTROID["triangle"][1][1] * diameter(scale) / 2, 30), abs=0.5
        )


def test_data_module_needs_no_torch():
    path = Path(shapes_data.__file__)
    code = (
        "import sys, importlib.util; sys.modules['torch'] = None\n"
        f"spec = importlib.util.spec_from_file_location('shapes_data', {str(path)!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['shapes_data'] = m; spec.loader.exec_module(m)\n"
        "images, captions = m.batch(2, 0)\n"
        "assert images.shape == (2, 64, 64, 3)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
