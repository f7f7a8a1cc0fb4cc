"""Real-image input: any path, PIL image or array becomes an RGB image of the model's size,
with every change reported; bad input is refused with a message saying what to do."""

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from conftest import processors_of
from p2p_widgets.engine import vae_factor
from p2p_widgets.inversion import invert, prepare_image


def gradient(width=48, height=32):
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    return np.concatenate(
        [
            np.broadcast_to(x, (height, width, 1)),
            np.broadcast_to(y, (height, width, 1)),
            np.full((height, width, 1), 80.0),
        ],
        2,
    ).astype(np.uint8)


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
    [
        ("CMYK", "CMYK converted to RGB"),
        ("L", "L converted to RGB"),
        ("RGBA", "RGBA with transparency composited on white"),
        ("I;16", "I;16 (16-bit) scaled to 8 bits"),
    ],
)
def test_other_modes_are_converted_and_reported(tmp_path, mode, note):
    base = Image.fromarray(gradient(16, 16))
    if mode == "I;16":
        image = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257).convert("I;16")
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


# --- bad input: one table, each case refused with its type and a message naming the problem ---


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims ``width`` x ``height`` (a decompression bomb's shape,
    without the memory)."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])  # after the signature and chunk head
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def encoded(pixels: np.ndarray, kind: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, kind, **options)
    return buffer.getvalue()


def write(name: str, data: bytes | str):
    """A source: a file written in the test's folder."""

    def make(folder):
        path = folder / name
        (path.write_text if isinstance(data, str) else path.write_bytes)(data)
        return path

    return make


def closed_image():
    image = Image.new("RGB", (8, 8))
    image.close()
    return image


NOISE = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
JPEG, PNG = encoded(NOISE, "JPEG"), encoded(NOISE, "PNG")
OK = (16, 16)

# (id, source: a value or a function of the test's folder, size, keywords, error, message)
BAD = [
    # files
    (
        "missing file",
        lambda folder: folder / "missing.png",
        OK,
        {},
        FileNotFoundError,
        "no such image file: .*missing.png",
    ),
    ("a URL", "https://example.com/cat.png", OK, {}, FileNotFoundError, "a URL must be downloaded first"),
    ("a folder", lambda folder: folder, OK, {}, ValueError, "is a folder, not an image file"),
    ("empty path", "", OK, {}, ValueError, "the image path is empty"),
    ("path too long", "x" * 5000, OK, {}, ValueError, r"cannot use x+\.\.\.x+ \(5000 characters\) as a file path"),
    ("not a regular file", Path("/dev/null"), OK, {}, ValueError, "not a regular file"),
    ("text file", write("notes.png", "not an image"), OK, {}, ValueError, "cannot read .*notes.png as an image"),
    ("truncated PNG", write("cut.png", PNG[: len(PNG) // 2]), OK, {}, ValueError, "cut.png.*truncated or corrupt"),
    ("truncated JPEG", write("cut.jpg", JPEG[: len(JPEG) // 2]), OK, {}, ValueError, "cut.jpg.*truncated or corrupt"),
    (
        "decompression bomb",
        write("bomb.png", png_claiming(20_000, 20_000)),
        OK,
        {},
        ValueError,
        "bomb.png is too large to decode safely",
    ),
    (
        "over the pixel limit",
        write("big.png", png_claiming(9_000, 9_000)),
        OK,
        {},
        ValueError,
        "9000x9000 = 81,000,000 pixels, over the limit of 64,000,000",
    ),
    (
        "over max_pixels",
        write("big.png", encoded(np.zeros((300, 400), np.uint8), "PNG")),
        OK,
        dict(max_pixels=100_000),
        ValueError,
        r"400x300 = 120,000 pixels, over the limit of 100,000",
    ),
    # PIL images
    ("0x0 image", Image.new("RGB", (0, 0)), OK, {}, ValueError, r"the image is empty \(0x0 pixels\)"),
    ("closed image", lambda folder: closed_image(), OK, {}, ValueError, "cannot decode the image .*closed"),
    (
        "truncated JPEG opened",
        lambda folder: Image.open(io.BytesIO(JPEG[: len(JPEG) // 2])),
        OK,
        {},
        ValueError,
        "cannot decode the image .*truncated",
    ),
    ("La mode", Image.new("La", (8, 8)), OK, {}, ValueError, "cannot convert a La image to RGB"),
    (
        "F image of 2000",
        Image.fromarray(np.full((8, 8), 2000, np.float32)),
        OK,
        {},
        ValueError,
        r"F \(32-bit float\) image holds values in \[2000, 2000\]; a float image is in \[0, 1\] or \[0, 255\]",
    ),
    (
        "F image with NaN",
        Image.fromarray(np.full((8, 8), np.nan, np.float32)),
        OK,
        {},
        ValueError,
        "F .* holds NaN or infinite values",
    ),
    (
        "I image beyond 16 bits",
        Image.fromarray(np.full((8, 8), 100_000, np.int32)),
        OK,
        {},
        ValueError,
        r"I \(32-bit integer\) image holds values in \[100000, 100000\], beyond 0..65535",
    ),
    (
        "I image negative",
        Image.fromarray(np.full((8, 8), -5, np.int32)),
        OK,
        {},
        ValueError,
        r"values in \[-5, -5\], beyond 0..65535",
    ),
    # arrays
    ("empty array", np.zeros((0, 0, 3), np.uint8), OK, {}, ValueError, r"the array is empty \(0x0 pixels\)"),
    (
        "2 channels",
        np.zeros((16, 16, 2), np.uint8),
        OK,
        {},
        ValueError,
        r"\(height, width, 1\|3\|4\) for gray, RGB or RGBA, not \(16, 16, 2\)",
    ),
    ("5 channels", np.zeros((16, 16, 5), np.uint8), OK, {}, ValueError, r"not \(16, 16, 5\)"),
    ("1-d", np.zeros(16, np.uint8), OK, {}, ValueError, r"not \(16,\)"),
    ("channels first", np.zeros((3, 16, 16)), OK, {}, ValueError, r"channels first.*array.transpose\(1, 2, 0\)"),
    (
        "a batch",
        np.zeros((1, 16, 16, 3), np.uint8),
        OK,
        {},
        ValueError,
        r"a batch of one; give the image itself: array\[0\]",
    ),
    ("bool", np.ones((16, 16), bool), OK, {}, ValueError, r"boolean .*astype\(np.uint8\) \* 255"),
    ("object", np.full((16, 16, 3), 1, object), OK, {}, ValueError, "not object"),
    ("complex", np.zeros((16, 16), complex), OK, {}, ValueError, "not complex128"),
    ("strings", np.full((16, 16), "a"), OK, {}, ValueError, "not <U1"),
    ("float NaN", np.full((16, 16, 3), np.nan), OK, {}, ValueError, "float64 array holds NaN or infinite values"),
    ("float inf", np.full((16, 16, 3), np.inf, np.float32), OK, {}, ValueError, "float32 array holds NaN or infinite"),
    (
        "float 300",
        np.full((16, 16, 3), 300.0),
        OK,
        {},
        ValueError,
        r"values in \[300, 300\]; a float image is in \[0, 1\] or \[0, 255\]",
    ),
    (
        "float in [-1, 1]",
        np.linspace(-1, 1, 256).reshape(16, 16),
        OK,
        {},
        ValueError,
        r"looks like \[-1, 1\]: give \(x \+ 1\) / 2",
    ),
    (
        "int beyond 16 bits",
        np.full((16, 16), 70_000, np.int64),
        OK,
        {},
        ValueError,
        r"int64 array holds values in \[70000, 70000\], beyond 0..65535",
    ),
    # neither
    ("a list", [[1, 2]], OK, {}, TypeError, "file path, a PIL image or a numpy array, not list"),
    ("None", None, OK, {}, TypeError, "not NoneType"),
    ("bytes", b"\x89PNG", OK, {}, TypeError, r"Image.open\(io.BytesIO\(data\)\)"),
    ("a tensor", torch.zeros(3, 16, 16), OK, {}, TypeError, r"tensor.permute\(1, 2, 0\)"),
    # the size
    ("not a multiple", NOISE, (30, 32), {}, ValueError, "height 30 is not a multiple of 8.*use 24 or 32"),
    ("one side", NOISE, (32,), {}, ValueError, r"size is \(height, width\) in pixels, not \(32,\)"),
    ("a string size", NOISE, "32x32", {}, ValueError, r"size is \(height, width\)"),
    (
        "zero side",
        NOISE,
        (0, 32),
        {},
        ValueError,
        r"height 0 is too small: each side is at least 8 pixels.*smallest size is \(8, 8\)",
    ),
    ("negative side", NOISE, (32, -8), {}, ValueError, r"width -8 is too small.*\(8, 8\)"),
    ("side below the factor", NOISE, (4, 32), {}, ValueError, r"height 4 is too small.*\(8, 8\)"),
    ("float side", NOISE, (32.0, 32), {}, ValueError, "in whole pixels, not .*the height is a float"),
    ("bool side", NOISE, (32, True), {}, ValueError, "the width is a bool"),
    (
        "size over the limit",
        NOISE,
        (16_000, 16_000),
        {},
        ValueError,
        r"size 16000x16000 \(height x width\) is 256,000,000 pixels, over the limit of 64,000,000",
    ),
    (
        "size over max_pixels",
        NOISE,
        (64, 64),
        dict(max_pixels=1_000),
        ValueError,
        "size 64x64 .* over the limit of 1,000",
    ),
    # the other settings
    ("unknown fit", NOISE, OK, dict(fit="stretch"), ValueError, "'crop' .* or 'pad' .*, not 'stretch'"),
    ("fit None", NOISE, OK, dict(fit=None), ValueError, "not None"),
    ("multiple 0", NOISE, OK, dict(multiple=0), ValueError, "multiple is a positive whole number, not 0"),
    (
        "max_pixels text",
        NOISE,
        OK,
        dict(max_pixels="big"),
        ValueError,
        "max_pixels is a positive whole number, not 'big'",
    ),
]


@pytest.mark.parametrize(
    "source, size, keywords, error, message", [pytest.param(*case[1:], id=case[0]) for case in BAD]
)
def test_bad_input_is_refused_with_what_to_do(tmp_path, source, size, keywords, error, message):
    if callable(source):
        source = source(tmp_path)
    with pytest.raises(error, match=message) as caught:
        prepare_image(source, size, **keywords)
    assert type(caught.value) is error  # not a subclass leaking from PIL or numpy
    refusal = caught.value  # and no chain of PIL's or numpy's errors above it
    assert refusal.__cause__ is None and (refusal.__context__ is None or refusal.__suppress_context__)


def test_a_callers_image_is_not_changed_by_a_refusal_or_a_success():
    pixels = gradient(16, 16)
    image = Image.fromarray(pixels)
    with pytest.raises(ValueError, match="height 4 is too small"):
        prepare_image(image, (4, 4))
    prepare_image(image, (32, 32))
    assert image.size == (16, 16) and image.mode == "RGB" and np.array_equal(np.asarray(image), pixels)


# --- orientation, depth and frames: applied, measured on pixels, and noted ---

# An asymmetric pattern: no flip or rotation of it equals another.
PATTERN = np.zeros((8, 16, 3), np.uint8)
PATTERN[:4, :4] = (255, 0, 0)  # red top-left
PATTERN[:, -2:] = (0, 0, 255)  # blue right edge
PATTERN[-1, :] = (0, 255, 0)  # green bottom row

UPRIGHT = {  # EXIF orientation -> how the stored pixels must be turned to stand upright
    2: (np.fliplr, "mirrored left-right"),
    3: (lambda a: np.rot90(a, 2), "rotated 180°"),
    4: (np.flipud, "mirrored top-bottom"),
    5: (lambda a: np.rot90(np.fliplr(a), 1), "mirrored left-right and rotated 90° counter-clockwise"),
    6: (lambda a: np.rot90(a, -1), "rotated 90° clockwise"),
    7: (lambda a: np.rot90(np.fliplr(a), -1), "mirrored left-right and rotated 90° clockwise"),
    8: (lambda a: np.rot90(a, 1), "rotated 90° counter-clockwise"),
}


def with_orientation(pixels: np.ndarray, orientation, kind: str) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(pixels, kind, exif=exif.tobytes(), **({"quality": 95} if kind == "JPEG" else {}))


@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
@pytest.mark.parametrize("as_path", [True, False], ids=["path", "PIL image"])
def test_exif_orientation_is_applied_and_noted(tmp_path, orientation, as_path):
    path = tmp_path / "photo.png"
    path.write_bytes(with_orientation(PATTERN, orientation, "PNG"))
    turn, words = UPRIGHT[orientation]
    expected = np.ascontiguousarray(turn(PATTERN))
    source = path if as_path else Image.open(path)
    prepared = prepare_image(source, expected.shape[:2])  # the upright size: no resizing
    assert np.array_equal(np.asarray(prepared.image), expected)
    assert prepared.notes == (f"{words} per its EXIF orientation ({orientation})",)
    assert prepared.original_size == (8, 16)  # as stored
    with Image.open(path) as opened:  # the same as PIL's own rule
        assert np.array_equal(np.asarray(ImageOps.exif_transpose(opened).convert("RGB")), expected)


@pytest.mark.parametrize("orientation, red_corner", [(6, "top right"), (8, "bottom left")])
def test_a_phone_photo_stands_upright(tmp_path, orientation, red_corner):
    """A JPEG stored landscape with orientation 6 or 8 is prepared portrait: its red
    top-left corner ends at the top right (6) or the bottom left (8)."""
    stored = np.full((32, 64, 3), 128, np.uint8)
    stored[:16, :16] = (255, 0, 0)
    path = tmp_path / "phone.jpg"
    path.write_bytes(with_orientation(stored, orientation, "JPEG"))
    prepared = prepare_image(path, (64, 32))
    out = np.asarray(prepared.image).astype(int)
    assert out.shape == (64, 32, 3)
    corners = {  # the mean colour of each 16x16 corner, away from JPEG's ringing at its edges
        f"{row} {col}": out[rows, cols][3:-3, 3:-3].mean((0, 1))
        for row, rows in (("top", slice(0, 16)), ("bottom", slice(-16, None)))
        for col, cols in (("left", slice(0, 16)), ("right", slice(-16, None)))
    }
    for name, colour in corners.items():
        expected = (255, 0, 0) if name == red_corner else (128, 128, 128)
        assert np.abs(colour - expected).max() < 25, (name, colour)
    assert prepared.notes[0].endswith(f"per its EXIF orientation ({orientation})")


def test_an_invalid_orientation_is_ignored_with_a_note(tmp_path):
    path = tmp_path / "odd.png"
    path.write_bytes(with_orientation(PATTERN, 9, "PNG"))
    prepared = prepare_image(path, (8, 16))
    assert np.array_equal(np.asarray(prepared.image), PATTERN)
    assert prepared.notes == ("its EXIF orientation 9 is not one of 1-8; ignored",)


@pytest.mark.parametrize(
    "pixels, expected, note",
    [
        pytest.param(np.full((8, 8), 0.5, np.float32), 128, "{} in [0, 1] scaled to 0..255", id="F 0.5"),
        pytest.param(np.full((8, 8), 1.0, np.float32), 255, "{} in [0, 1] scaled to 0..255", id="F 1.0"),
        pytest.param(np.full((8, 8), 200.0, np.float32), 200, "{} in [0, 255] taken as 8-bit levels", id="F 200"),
        pytest.param(
            np.full((8, 8), 200, np.int32), 200, "{} with values in [0, 255] taken as 8-bit levels", id="I 8-bit"
        ),
        pytest.param(
            np.full((8, 8), 200 * 257, np.int32),
            200,
            "{} with values up to 51400 taken as 16 bits, scaled to 8 bits",
            id="I 16-bit",
        ),
    ],
)
def test_float_and_integer_images_are_scaled_by_one_rule(pixels, expected, note):
    """A mode F / I image and an array of the same numbers give the same pixels."""
    image = Image.fromarray(pixels)
    prepared = prepare_image(image, (8, 8))
    assert (np.asarray(prepared.image) == expected).all()
    kind = {"F": "F (32-bit float) image", "I": "I (32-bit integer) image"}[image.mode]
    assert prepared.notes[0] == note.format(kind)
    array = pixels.astype(np.float64 if pixels.dtype.kind == "f" else np.int64)
    as_array = prepare_image(array, (8, 8))
    assert (np.asarray(as_array.image) == expected).all()
    assert as_array.notes[0] == note.format(f"{array.dtype} array")


def test_arrays_of_other_integer_types_and_byte_orders():
    pixels = gradient(16, 16)
    for array in (pixels.astype(np.int64), pixels.astype(np.int16), pixels.astype(np.uint32)):
        prepared = prepare_image(array, (16, 16))
        assert np.array_equal(np.asarray(prepared.image), pixels)
        assert prepared.notes[0] == f"{array.dtype} array with values in [0, 255] taken as 8-bit levels"
    big_endian = (pixels.astype(np.uint16) * 257).astype(">u2")
    assert np.array_equal(np.asarray(prepare_image(big_endian, (16, 16)).image), pixels)
    levels = prepare_image(pixels.astype(np.float32), (16, 16))  # 0..255 floats: levels, not refused
    assert np.array_equal(np.asarray(levels.image), pixels)
    assert levels.notes[0] == "float32 array in [0, 255] taken as 8-bit levels"
    views = prepare_image(pixels[::-1, :, ::-1], (16, 16))  # strided views (BGR, flipped)
    assert np.array_equal(np.asarray(views.image), pixels[::-1, :, ::-1])


FRAMES = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


@pytest.mark.parametrize("kind", ["GIF", "PNG", "TIFF"])
def test_a_multi_frame_image_gives_its_first_frame(tmp_path, kind):
    frames = [Image.new("RGB", (8, 8), colour) for colour in FRAMES]
    path = tmp_path / f"frames.{kind.lower()}"
    frames[0].save(path, kind, save_all=True, append_images=frames[1:])
    prepared = prepare_image(path, (8, 8))
    assert (np.asarray(prepared.image) == FRAMES[0]).all()
    assert prepared.notes[0] == "first of 3 frames used"
    with Image.open(path) as opened:  # a caller's image on its last frame: the first is used, the caller's frame kept
        opened.seek(2)
        again = prepare_image(opened, (8, 8))
        assert (np.asarray(again.image) == FRAMES[0]).all() and again.notes[0] == "first of 3 frames used"
        assert opened.tell() == 2


def test_tiny_and_thin_images_are_resized_without_huge_intermediates(monkeypatch):
    one = prepare_image(np.array([[[10, 200, 30]]], np.uint8), (32, 32))
    assert (np.asarray(one.image) == (10, 200, 30)).all()
    assert one.original_size == (1, 1)
    thin = np.zeros((1, 400_000, 3), np.uint8)  # cover-scaling it whole would be 32 x 12,800,000
    thin[0, 200_000 - 5 : 200_000 + 5] = (0, 255, 0)
    sizes, resize = [], Image.Image.resize

    def recorded(image, size, *args, **kwargs):
        sizes.append(tuple(size))
        return resize(image, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recorded)
    prepared = prepare_image(thin, (32, 32))
    assert sizes and max(w * h for w, h in sizes) <= 32 * 32  # only the kept part is resized (no 1.2 GB image)
    assert prepared.notes == ("resized 400000x1 to 12800000x32 and centre-cropped to 32x32 (width x height)",)
    assert (np.asarray(prepared.image)[:, 16] == (0, 255, 0)).all()  # the middle, as cropping would keep it
    padded = prepare_image(thin, (32, 32), fit="pad")
    assert padded.image.size == (32, 32)


def test_a_transparent_colour_key_is_composited_on_white(tmp_path):
    pixels = gradient(16, 16)
    pixels[:8] = (1, 2, 3)
    path = tmp_path / "key.png"
    Image.fromarray(pixels).save(path, transparency=(1, 2, 3))
    prepared = prepare_image(path, (16, 16))
    out = np.asarray(prepared.image)
    assert (out[:8] == 255).all() and np.array_equal(out[8:], pixels[8:])
    assert prepared.notes == ("RGB with transparency composited on white",)


# --- invert: the size is checked before the VAE runs -----------------------------------


@pytest.mark.parametrize(
    "size, message",
    [
        ((1, 32), r"height 1 is too small: each side is at least 2 pixels.*smallest size is \(2, 2\)"),
        ((0, 0), r"height 0 is too small.*\(2, 2\)"),
        ((32, 31), "width 31 is not a multiple of 2"),
        ((32.0, 32), "the height is a float"),
        ((16_000, 16_000), "over the limit of 64,000,000"),
    ],
)
def test_invert_refuses_a_bad_size_before_the_vae_runs(sd1, monkeypatch, size, message):
    assert vae_factor(sd1) == 2  # the tiny pipeline's, as the messages say
    before = processors_of(sd1)
    encoded_calls = []
    monkeypatch.setattr(sd1.vae, "encode", lambda *args, **kwargs: encoded_calls.append(args))
    progress = []
    with pytest.raises(ValueError, match=message):
        invert(sd1, gradient(32, 32), "a gradient", "ddim", steps=2, size=size, callback=progress.append)
    assert encoded_calls == [] and progress == []
    assert processors_of(sd1) == before
