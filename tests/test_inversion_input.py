"""Real-image input: any path, PIL image or array becomes an RGB image of the model's size,
with every change reported; bad input is refused with a message saying what to do."""

import numpy as np
import pytest
from PIL import Image

from p2p_widgets.inversion import prepare_image


def gradient(width=48, height=32):
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    return np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)), np.full((height, width, 1), 80.0)], 2).astype(np.uint8)


def test_an_image_of_the_right_size_is_returned_untouched():
    pixels = gradient(32, 32)
    prepared = prepare_image(Image.fromarray(pixels), (32, 32))
    assert prepared.notes == ()
    assert np.array_equal(np.asarray(prepared.image), pixels)
    assert prepared.original_size == (32, 32)


def test_crop_covers_the_size_and_keeps_the_centre():
    pixels = gradient(96, 32)  # wide: scaled to 32 high already, the centre 32 columns kept
    prepared = prepare_image(pixels, (32, 32), fit="crop")
    assert prepared.image.size == (32, 32)
    assert np.array_equal(np.asarray(prepared.image), pixels[:, 32:64])
    assert prepared.notes == ("centre-cropped to 32x32 (width x height)",)


def test_pad_fits_inside_with_the_mean_colour():
    pixels = gradient(64, 32)
    prepared = prepare_image(pixels, (64, 64), fit="pad")
    out = np.asarray(prepared.image)
    assert out.shape == (64, 64, 3)
    assert np.array_equal(out[16:48], pixels)  # the image, unscaled, in the middle
    mean = pixels.reshape(-1, 3).mean(0).round()
    assert np.array_equal(out[0, 0], mean) and np.array_equal(out[-1, -1], mean)
    assert "padded to 64x64" in prepared.notes[-1]


def test_resizing_is_reported_with_both_sizes():
    prepared = prepare_image(gradient(100, 50), (32, 48))
    assert prepared.image.size == (48, 32)
    assert prepared.notes == ("resized 100x50 to 64x32 and centre-cropped to 48x32 (width x height)",)


@pytest.mark.parametrize(
    "mode, note",
    [("CMYK", "CMYK converted to RGB"), ("L", "L converted to RGB"), ("RGBA", "RGBA with transparency composited on white"), ("I;16", "I;16 (16-bit) scaled to 8 bits")],
)
def test_other_modes_are_converted_and_reported(tmp_path, mode, note):
    base = Image.fromarray(gradient(16, 16))
    if mode == "I;16":
        image = Image.fromarray((np.asarray(base.convert("L"), dtype=np.uint16) * 257)).convert("I;16")
    elif mode == "RGBA":
        image = base.convert("RGBA")
        image.putalpha(Image.new("L", image.size, 0))  # fully transparent: becomes white
    else:
        image = base.convert(mode)
    path = tmp_path / ("image.tif" if mode in ("CMYK", "I;16") else "image.png")
    image.save(path)
    prepared = prepare_image(path, (16, 16))
    assert prepared.image.mode == "RGB" and prepared.image.size == (16, 16)
    assert prepared.notes[0] == note
    if mode == "RGBA":
        assert (np.asarray(prepared.image) == 255).all()
    if mode == "I;16":
        assert np.array_equal(np.asarray(prepared.image)[..., 0], np.asarray(base.convert("L")))


def test_arrays_of_every_kind():
    pixels = gradient(16, 16)
    as_float = prepare_image(pixels / 255.0, (16, 16)).image
    assert np.abs(np.asarray(as_float).astype(int) - pixels).max() <= 1
    sixteen = prepare_image(pixels.astype(np.uint16) * 257, (16, 16))
    assert np.array_equal(np.asarray(sixteen.image), pixels) and "16-bit" in sixteen.notes[0]
    gray = prepare_image(pixels[..., 0], (16, 16))
    assert np.array_equal(np.asarray(gray.image)[..., 2], pixels[..., 0])


@pytest.mark.parametrize(
    "source, size, error, message",
    [
        ("missing.png", (32, 32), FileNotFoundError, "no such image file"),
        (np.zeros((3, 16, 16)), (16, 16), ValueError, "channels first"),
        (np.zeros((16, 16, 2)), (16, 16), ValueError, r"\(height, width, 1\|3\|4\)"),
        (np.full((16, 16, 3), 2.0), (16, 16), ValueError, r"values in \[0, 1\]"),
        (np.full((16, 16, 3), np.nan), (16, 16), ValueError, "NaN"),
        (np.zeros((16, 16, 3), dtype=np.int64), (16, 16), ValueError, "uint8, uint16 or float"),
        ([[1, 2]], (16, 16), TypeError, "file path, a PIL image or a numpy array"),
        (np.zeros((16, 16, 3), np.uint8), (30, 32), ValueError, "height 30 is not a multiple of 8.*use 24 or 32"),
        (np.zeros((16, 16, 3), np.uint8), (32,), ValueError, r"size is \(height, width\)"),
    ],
)
def test_bad_input_says_what_to_do(tmp_path, source, size, error, message):
    if isinstance(source, str):
        source = tmp_path / source
    with pytest.raises(error, match=message):
        prepare_image(source, size)


def test_unreadable_and_oversized_files_are_refused_before_decoding(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match="cannot read .* as an image"):
        prepare_image(tmp_path / "notes.png", (32, 32))
    Image.new("RGB", (400, 300)).save(tmp_path / "big.png")
    with pytest.raises(ValueError, match=r"400x300 = 120,000 pixels, over the limit of 100,000"):
        prepare_image(tmp_path / "big.png", (32, 32), max_pixels=100_000)
    data = (tmp_path / "big.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        prepare_image(tmp_path / "cut.png", (32, 32))
    with pytest.raises(ValueError, match="'stretch'"):
        prepare_image(np.zeros((8, 8, 3), np.uint8), (8, 8), fit="stretch")
