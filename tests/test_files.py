"""Saving and reading recipes: atomic sets, no stale or clobbered files, and every bad
file a clear error that names it (never a hang, a decoded giant image, or a traceback
from deep inside PIL or zlib)."""

from __future__ import annotations

import errno
import io
import os
import stat
import struct
import threading
import tracemalloc
import zlib
from pathlib import Path

import pytest
from PIL import Image, ImageFile, PngImagePlugin

from conftest import within
from p2p_widgets import Recipe, edit, files
from p2p_widgets.files import RECIPE_KEY, read_recipe, recipe_from_bytes, save_result

RECIPE = Recipe("a cat riding a bicycle", ("a dog riding a bicycle",), steps=2, seed=3)


@pytest.fixture(scope="module")
def result(sd1):
    return edit(sd1, "a cat", "a dog", steps=2)


@pytest.fixture(scope="module")
def four(sd1):
    """A run with four images (a source and three targets)."""
    return edit(sd1, "a cat", "a dog", "a cow", "a fox", steps=2)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of a folder (hidden ones too) and its bytes."""
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


# -- PNGs built chunk by chunk ---------------------------------------------------------------


def chunk(kind: bytes, data: bytes, crc: int | None = None) -> bytes:
    crc = zlib.crc32(kind + data) if crc is None else crc
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def chunks_of(png: bytes) -> list[bytes]:
    """The chunks of a PNG, whole (length, type, data, CRC)."""
    found, position = [], 8
    while position < len(png):
        (length,) = struct.unpack(">I", png[position : position + 4])
        found.append(png[position : position + 12 + length])
        position += 12 + length
    return found


def png(*extra: bytes, size=(4, 4), after_data: bool = False) -> bytes:
    """A small valid PNG with ``extra`` chunks before its image data (or after it)."""
    stream = io.BytesIO()
    Image.new("L", size).save(stream, format="PNG")
    header, *data, end = chunks_of(stream.getvalue())
    middle = [*data, *extra] if after_data else [*extra, *data]
    return b"\x89PNG\r\n\x1a\n" + header + b"".join(middle) + end


def text(keyword: str, value: str) -> bytes:
    return chunk(b"tEXt", keyword.encode("latin-1") + b"\x00" + value.encode("latin-1"))


def ztxt(keyword: str, compressed: bytes) -> bytes:
    return chunk(b"zTXt", keyword.encode("latin-1") + b"\x00\x00" + compressed)


def itxt(keyword: str, value: bytes, compressed: bool = False) -> bytes:
    body = zlib.compress(value) if compressed else value
    return chunk(b"iTXt", keyword.encode("latin-1") + b"\x00" + bytes([int(compressed), 0]) + b"en\x00\x00" + body)


def saved_png(result, tmp_path) -> bytes:
    return save_result(result, tmp_path / "saved")[1].read_bytes()


# -- reading: the bad-input matrix ----------------------------------------------------------


def _fifo(tmp_path):
    path = tmp_path / "pipe.json"
    os.mkfifo(path)
    return path


def _write(name, data):
    def make(tmp_path):
        path = tmp_path / name
        path.write_bytes(data(tmp_path) if callable(data) else data)
        return path

    return make


def _sparse_json(tmp_path):
    path = tmp_path / "huge.json"
    with open(path, "wb") as stream:
        stream.write(b'{"prompt": "')
        stream.truncate(17 * 2**20)  # a hole: 17 MB on paper, nothing on disk
    return path


def _jpeg(tmp_path):
    stream = io.BytesIO()
    Image.new("RGB", (8, 8)).save(stream, format="JPEG")
    return stream.getvalue()


def _plain_png(tmp_path):
    stream = io.BytesIO()
    Image.new("RGB", (8, 8)).save(stream, format="PNG")
    return stream.getvalue()


BOMB = zlib.compress(b" " * (20 * 2**20), 9)  # 20 MB of spaces in about 20 kB

# (id, make the file from tmp_path, error type, words the message must hold besides the file's name)
BAD_FILES = [
    ("folder", lambda tmp_path: tmp_path, ValueError, ["is a folder, not a recipe file", ".json or .png"]),
    ("missing", lambda tmp_path: tmp_path / "nothing.json", FileNotFoundError, ["no such file"]),
    (
        "missing-below-a-file",
        lambda tmp_path: _write("a.json", b"{}")(tmp_path) / "b.json",
        FileNotFoundError,
        ["no such file"],
    ),
    ("fifo", _fifo, ValueError, ["FIFO", "not a recipe file"]),
    ("empty", _write("empty.json", b""), ValueError, ["neither a recipe JSON file nor a readable image"]),
    (
        "random-bytes",
        _write("noise.bin", bytes(range(256)) * 4),
        ValueError,
        ["neither a recipe JSON file nor a readable image"],
    ),
    (
        "not-utf-8",
        _write("latin.json", '{"prompt": "caf\xe9"}'.encode("latin-1")),
        ValueError,
        ["neither a recipe JSON"],
    ),
    ("json-list", _write("list.json", b"[1, 2]"), ValueError, ["not a recipe"]),
    ("json-nested-deeply", _write("deep.json", b"[" * 100_000), ValueError, ["nested too deeply"]),
    ("json-too-large", _sparse_json, ValueError, ["too large to be a recipe"]),
    ("empty-prompt", _write("empty-prompt.json", b'{"prompt": ""}'), ValueError, ["prompt is empty"]),
    ("jpeg", _write("photo.jpg", _jpeg), ValueError, ["JPEG", "holds no recipe"]),
    ("png-without-recipe", _write("plain.png", _plain_png), ValueError, ["holds no p2p_widgets recipe", RECIPE_KEY]),
    (
        "png-truncated-in-data",
        _write("cut.png", lambda t: png(text(RECIPE_KEY, RECIPE.to_json()))[:-20]),
        ValueError,
        ["truncated"],
    ),
    ("png-truncated-in-header", _write("cut.png", lambda t: png()[:20]), ValueError, ["truncated"]),
    ("png-signature-only", _write("sig.png", b"\x89PNG\r\n\x1a\n"), ValueError, ["truncated"]),
    (
        "png-no-ihdr-first",
        _write("odd.png", lambda t: b"\x89PNG\r\n\x1a\n" + text(RECIPE_KEY, "{}") + png()[8:]),
        ValueError,
        ["damaged", "IHDR"],
    ),
    (
        "png-bad-chunk-type",
        _write("odd.png", lambda t: png(chunk(b"a\x00b!", b""))),
        ValueError,
        ["damaged", "four letters"],
    ),
    (
        "png-huge-chunk-length",
        _write("odd.png", lambda t: png(struct.pack(">I", 2**32 - 1) + b"IDAT")),
        ValueError,
        ["more than PNG allows"],
    ),
    (
        "recipe-bad-crc",
        _write("crc.png", lambda t: png(chunk(b"tEXt", RECIPE_KEY.encode() + b"\x00{}", crc=1))),
        ValueError,
        ["checksum"],
    ),
    (
        "recipe-not-json",
        _write("nojson.png", lambda t: png(text(RECIPE_KEY, "not json"))),
        ValueError,
        ["not a recipe"],
    ),
    (
        "recipe-twice",
        _write("two.png", lambda t: png(text(RECIPE_KEY, RECIPE.to_json()), text(RECIPE_KEY, "{}"))),
        ValueError,
        ["two different"],
    ),
    ("ztxt-bomb", _write("bomb.png", lambda t: png(ztxt(RECIPE_KEY, BOMB))), ValueError, ["more than 16 MB"]),
    (
        "ztxt-corrupt",
        _write("zcorrupt.png", lambda t: png(ztxt(RECIPE_KEY, b"\x78\x9c garbage"))),
        ValueError,
        ["corrupt"],
    ),
    (
        "ztxt-cut-short",
        _write("zshort.png", lambda t: png(ztxt(RECIPE_KEY, zlib.compress(RECIPE.to_json().encode())[:-6]))),
        ValueError,
        ["cut short"],
    ),
    (
        "ztxt-unknown-method",
        _write("zmethod.png", lambda t: png(chunk(b"zTXt", RECIPE_KEY.encode() + b"\x00\x07abc"))),
        ValueError,
        ["compression method"],
    ),
    (
        "itxt-bomb",
        _write("ibomb.png", lambda t: png(chunk(b"iTXt", RECIPE_KEY.encode() + b"\x00\x01\x00\x00\x00" + BOMB))),
        ValueError,
        ["more than 16 MB"],
    ),
    (
        "itxt-not-utf-8",
        _write("iutf.png", lambda t: png(itxt(RECIPE_KEY, b'{"prompt": "caf\xe9"}'))),
        ValueError,
        ["not UTF-8"],
    ),
    (
        "itxt-cut-short",
        _write("ishort.png", lambda t: png(chunk(b"iTXt", RECIPE_KEY.encode() + b"\x00\x00"))),
        ValueError,
        ["cut short"],
    ),
    (
        "recipe-chunk-over-16-mb",
        _write("big.png", lambda t: png(text(RECIPE_KEY, " " * (17 * 2**20)))),
        ValueError,
        ["too large to be a recipe"],
    ),
]


@pytest.mark.parametrize(
    "make, error_type, words", [case[1:] for case in BAD_FILES], ids=[case[0] for case in BAD_FILES]
)
def test_a_bad_file_is_a_clear_error_that_names_it(tmp_path, make, error_type, words):
    path = make(tmp_path)
    with pytest.raises(error_type) as caught:
        within(30, read_recipe, path)  # a FIFO or device must not hang
    message = str(caught.value)
    assert type(caught.value) is error_type or error_type is FileNotFoundError
    assert str(path) in message
    for word in words:
        assert word in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "make, error_type, words",
    [
        case[1:]
        for case in BAD_FILES
        if case[0].startswith(("png", "recipe", "ztxt", "itxt", "jpeg", "random", "empty", "json", "not-utf"))
    ],
    ids=[
        case[0]
        for case in BAD_FILES
        if case[0].startswith(("png", "recipe", "ztxt", "itxt", "jpeg", "random", "empty", "json", "not-utf"))
    ],
)
def test_bad_bytes_are_the_same_errors(tmp_path, make, error_type, words):
    data = make(tmp_path).read_bytes()
    with pytest.raises(error_type) as caught:
        recipe_from_bytes(data, "upload.png")
    assert "upload.png" in str(caught.value)
    for word in words:
        assert word in str(caught.value)


def test_a_device_is_refused_before_it_is_read():
    if not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero here")
    with pytest.raises(ValueError, match="/dev/zero is a device, not a recipe file"):
        within(30, read_recipe, "/dev/zero")  # reading it would never end


@pytest.mark.parametrize("data", ["recipe.json", Path("recipe.json"), 5, None])
def test_recipe_from_bytes_takes_bytes(data):
    with pytest.raises(TypeError, match="bytes"):
        recipe_from_bytes(data)


# -- reading: what works, and what it costs ----------------------------------------------------

RECIPE_JSON = RECIPE.to_json().encode()
GOOD_PNGS = [
    ("text", lambda: png(text(RECIPE_KEY, RECIPE.to_json()))),
    ("text-after-the-image-data", lambda: png(text(RECIPE_KEY, RECIPE.to_json()), after_data=True)),
    ("ztxt", lambda: png(ztxt(RECIPE_KEY, zlib.compress(RECIPE_JSON)))),
    ("itxt", lambda: png(itxt(RECIPE_KEY, RECIPE_JSON))),
    ("itxt-compressed", lambda: png(itxt(RECIPE_KEY, RECIPE_JSON, compressed=True))),
    (
        "other-chunks-ignored",
        lambda: png(
            text("Software", "x"),
            ztxt("Comment", BOMB),
            chunk(b"tIME", b"\x07\xe9\x01\x01\x00\x00\x00"),
            text(RECIPE_KEY, RECIPE.to_json()),
        ),
    ),
    ("pil-compressed", lambda: _pil_png(zip=True)),
    ("pil-itxt", lambda: _pil_png(itxt=True)),
]


def _pil_png(zip=False, itxt=False):
    info = PngImagePlugin.PngInfo()
    if itxt:
        info.add_itxt(RECIPE_KEY, RECIPE.to_json(), zip=zip)
    else:
        info.add_text(RECIPE_KEY, RECIPE.to_json(), zip=zip)
    stream = io.BytesIO()
    Image.new("RGB", (8, 8)).save(stream, format="PNG", pnginfo=info)
    return stream.getvalue()


@pytest.mark.parametrize("make", [case[1] for case in GOOD_PNGS], ids=[case[0] for case in GOOD_PNGS])
def test_every_kind_of_text_chunk_is_read(tmp_path, make):
    data = make()
    (tmp_path / "r.png").write_bytes(data)
    assert read_recipe(tmp_path / "r.png") == RECIPE
    assert recipe_from_bytes(data, "r.png") == RECIPE


def refuse_decoding(monkeypatch):
    """PIL may not open or decode any image from now on (in this test)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the image was opened or decoded to read its recipe")

    monkeypatch.setattr(Image, "open", refuse)
    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


@pytest.fixture
def no_decoding(monkeypatch):
    refuse_decoding(monkeypatch)


def test_a_huge_declared_image_is_read_without_decoding(tmp_path, no_decoding):
    data = png(text(RECIPE_KEY, RECIPE.to_json()))
    header = bytearray(chunks_of(data)[0])
    header[8:16] = struct.pack(">II", 60_000, 60_000)  # 3.6 gigapixels: PIL would refuse it as a bomb
    header[-4:] = struct.pack(">I", zlib.crc32(bytes(header[4:-4])))
    path = tmp_path / "giant.png"
    path.write_bytes(data[:8] + bytes(header) + data[8 + len(header) :])
    assert read_recipe(path) == RECIPE
    assert recipe_from_bytes(path.read_bytes(), "giant.png") == RECIPE


def test_a_large_png_is_skipped_not_read(tmp_path, no_decoding):
    """40 MB of image data (a sparse file) between the header and the recipe: the reader
    seeks over it, so it allocates almost nothing."""
    small = png(text(RECIPE_KEY, RECIPE.to_json()), after_data=True)
    header, *rest = chunks_of(small)
    size = 40 * 2**20
    path = tmp_path / "large.png"
    with open(path, "wb") as stream:
        stream.write(small[:8] + header + struct.pack(">I", size) + b"IDAT")
        stream.seek(size + 4, os.SEEK_CUR)  # a hole for the data, and a CRC that is never checked
        stream.write(b"".join(rest))
    tracemalloc.start()
    try:
        assert read_recipe(path) == RECIPE
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20, f"reading the recipe allocated {peak / 2**20:.1f} MB"


def test_a_large_image_saved_by_pil_is_not_decoded(tmp_path, monkeypatch):
    info = PngImagePlugin.PngInfo()
    info.add_text(RECIPE_KEY, RECIPE.to_json())
    path = tmp_path / "6000.png"
    Image.frombuffer("L", (6000, 6000), bytes(6000 * 6000)).save(path, format="PNG", pnginfo=info)
    refuse_decoding(monkeypatch)
    assert read_recipe(path) == RECIPE


# -- saving -------------------------------------------------------------------------------------


def test_a_save_is_complete_and_readable(result, tmp_path):
    paths = save_result(result, tmp_path, stem="run")
    assert [p.name for p in paths] == ["run_0.png", "run_1.png", "run.json"]
    assert all(read_recipe(p) == result.recipe for p in paths)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json", "run_0.png", "run_1.png"]  # no temporaries


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_saved_files_get_the_usual_mode(result, tmp_path, umask):
    previous = os.umask(umask)
    try:
        paths = save_result(result, tmp_path)
    finally:
        os.umask(previous)
    assert {stat.S_IMODE(p.stat().st_mode) for p in paths} == {0o666 & ~umask}


# (id, which writer fails, on which call (1-based), overwrite)
FAILURES = [
    ("disk-full-on-the-first-file", "_write_new_file", 1, True),
    ("disk-full-on-the-second-file", "_write_new_file", 2, True),
    ("disk-full-on-the-json", "_write_new_file", 3, True),
    ("rename-fails-on-the-second-file", "_move", 2, True),
    ("rename-fails-on-the-json", "_move", 3, True),
    ("disk-full-without-overwrite", "_write_new_file", 2, False),
    ("rename-fails-without-overwrite", "_move", 2, False),
]


@pytest.mark.parametrize(
    "writer, failing_call, overwrite", [case[1:] for case in FAILURES], ids=[case[0] for case in FAILURES]
)
def test_a_failed_save_leaves_the_earlier_files_exactly_as_they_were(
    result, four, tmp_path, monkeypatch, writer, failing_call, overwrite
):
    save_result(four, tmp_path)  # an earlier run: 4 PNGs and a JSON
    (tmp_path / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    real, calls = getattr(files, writer), []

    def failing(*args, **kwargs):
        calls.append(args)
        if len(calls) == failing_call:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(files, writer, failing)
    with pytest.raises(OSError, match="No space left on device") as caught:
        save_result(result, tmp_path, overwrite=overwrite)
    assert caught.value.errno == errno.ENOSPC
    message = str(caught.value)
    assert str(tmp_path) in message and "No space left on device" in message and "free some space" in message
    assert snapshot(tmp_path) == before  # byte for byte, and no temporaries or reservations left


def test_an_interrupted_save_changes_nothing(result, tmp_path, monkeypatch):
    save_result(result, tmp_path)
    before = snapshot(tmp_path)
    real, calls = files._move, []

    def interrupted(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(files, "_move", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_result(result, tmp_path)
    assert snapshot(tmp_path) == before


def _make_file(tmp_path):
    (tmp_path / "taken").write_text("a file")
    return tmp_path / "taken"


def _png_is_a_folder(tmp_path):
    (tmp_path / "p2p_0.png").mkdir()
    return tmp_path


# (id, keyword arguments as a function of tmp_path, the result fixture's name or a stand-in, error type, words)
BAD_SAVES = [
    ("empty-stem", lambda t: {"folder": t, "stem": ""}, ValueError, ["stem", "plain name"]),
    ("stem-with-a-folder", lambda t: {"folder": t, "stem": "sub/p2p"}, ValueError, ["without folders"]),
    ("hidden-stem", lambda t: {"folder": t, "stem": ".p2p"}, ValueError, ["start with a dot"]),
    ("stem-not-a-string", lambda t: {"folder": t, "stem": 5}, TypeError, ["stem"]),
    ("overwrite-not-a-bool", lambda t: {"folder": t, "overwrite": "no"}, TypeError, ["overwrite is True or False"]),
    ("folder-is-a-file", lambda t: {"folder": _make_file(t)}, ValueError, ["is a file", "taken"]),
    ("folder-below-a-file", lambda t: {"folder": _make_file(t) / "sub"}, ValueError, ["is a file", "taken"]),
    ("a-png-name-is-a-folder", lambda t: {"folder": _png_is_a_folder(t)}, ValueError, ["p2p_0.png", "is a folder"]),
]


@pytest.mark.parametrize(
    "arguments, error_type, words", [case[1:] for case in BAD_SAVES], ids=[case[0] for case in BAD_SAVES]
)
def test_a_bad_save_request_is_a_clear_error_and_changes_nothing(result, tmp_path, arguments, error_type, words):
    (tmp_path / "earlier.txt").write_text("mine")
    kwargs = arguments(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(error_type) as caught:
        save_result(result, **kwargs)
    for word in words:
        assert word in str(caught.value)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("thing", ["not a result", None, RECIPE])
def test_save_result_takes_a_result(tmp_path, thing):
    with pytest.raises(TypeError, match="takes the Result of edit"):
        save_result(thing, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_fewer_images_remove_the_stale_ones_but_only_ours(result, four, tmp_path):
    save_result(four, tmp_path)
    foreign = tmp_path / "p2p_3.png"
    foreign.unlink()
    Image.new("RGB", (4, 4), "red").save(foreign)  # someone else's file with our name pattern
    (tmp_path / "p2p_03.png").write_bytes((tmp_path / "p2p_2.png").read_bytes())  # not a name we write
    (tmp_path / "other_5.png").write_bytes((tmp_path / "p2p_2.png").read_bytes())  # another stem
    kept = {name: (tmp_path / name).read_bytes() for name in ("p2p_3.png", "p2p_03.png", "other_5.png")}
    paths = save_result(result, tmp_path)
    assert [p.name for p in paths] == ["p2p_0.png", "p2p_1.png", "p2p.json"]
    assert not (tmp_path / "p2p_2.png").exists()  # ours, stale: removed
    assert {name: (tmp_path / name).read_bytes() for name in kept} == kept
    assert read_recipe(tmp_path / "p2p_1.png") == result.recipe


def test_without_overwrite_the_first_free_stem_is_used(result, four, tmp_path):
    save_result(four, tmp_path)
    (tmp_path / "p2p-2_0.png").write_bytes(b"an orphan image: p2p-2 is taken too")
    before = snapshot(tmp_path)
    paths = save_result(result, tmp_path, stem="p2p", overwrite=False)
    assert [p.name for p in paths] == ["p2p-3_0.png", "p2p-3_1.png", "p2p-3.json"]
    assert {name: data for name, data in snapshot(tmp_path).items() if name in before} == before
    assert read_recipe(paths[2]) == result.recipe


def test_concurrent_saves_without_overwrite_never_collide(result, tmp_path):
    count = 8
    barrier = threading.Barrier(count)
    outcomes: list = [None] * count

    def save(index):
        barrier.wait()
        try:
            outcomes[index] = save_result(result, tmp_path, stem="p2p_run1", overwrite=False)
        except BaseException as error:
            outcomes[index] = error

    threads = [threading.Thread(target=save, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert all(isinstance(outcome, list) for outcome in outcomes), outcomes
    stems = {paths[-1].name[: -len(".json")] for paths in outcomes}
    assert stems == {"p2p_run1", *(f"p2p_run1-{n}" for n in range(2, count + 1))}
    for paths in outcomes:
        assert len(paths) == 3 and all(read_recipe(p) == result.recipe for p in paths)
    assert len(list(tmp_path.iterdir())) == 3 * count  # no temporaries, no reservations


def test_concurrent_overwriting_saves_of_one_stem_leave_one_whole_set(result, four, tmp_path, monkeypatch):
    import time

    move = files._move

    def slow_move(*args, **kwargs):  # widen the window between a set's renames, where savers interleave
        time.sleep(0.02)
        return move(*args, **kwargs)

    monkeypatch.setattr(files, "_move", slow_move)
    count = 8
    barrier = threading.Barrier(count)
    errors: list = []
    runs = [result if index % 2 else four for index in range(count)]  # 2 and 4 images, different recipes

    def save(index):
        barrier.wait()
        try:
            save_result(runs[index], tmp_path, stem="p2p")
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=save, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(t.is_alive() for t in threads) and not errors, errors
    recipe = read_recipe(tmp_path / "p2p.json")
    pngs = sorted(p.name for p in tmp_path.glob("p2p_*.png"))
    assert pngs == [f"p2p_{k}.png" for k in range(len(recipe.prompts))]  # the last set whole, no stale image
    assert all(read_recipe(tmp_path / name) == recipe for name in pngs)  # never mixed with another set
