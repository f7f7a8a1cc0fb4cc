"""Saving results as PNGs that carry their recipe, and reading recipes back.

Saving is atomic as a set: every file is first written to a temporary name in the
target folder, and only when all of them are written are they renamed into place. A
failure at any point (a full disk on the second image, a rename refused) removes the
temporaries and puts back the files that were there before, byte for byte.

Reading a recipe never decodes pixels: the PNG's chunks are walked directly (its image
data is skipped with a seek), so a huge image costs no memory, and text chunks are capped.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import secrets
import stat
import struct
import threading
import warnings
import zlib
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from PIL import Image, PngImagePlugin

from .edits import Recipe

if TYPE_CHECKING:
    from .engine import Result

__all__ = ["save_result", "read_recipe", "recipe_from_bytes", "RECIPE_KEY"]

RECIPE_KEY = "p2p_widgets.recipe"  # the PNG text chunk holding the recipe JSON
BRANCH_KEY = "p2p_widgets.branch"

MAX_RECIPE_BYTES = 16 * 2**20  # a recipe JSON file, or one PNG text chunk (compressed or not)
MAX_FREE_STEMS = 10_000  # stem, stem-2, ... stem-10000: then saving without overwrite gives up

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")
_OTHER_IMAGES = {  # leading bytes of images that carry no recipe, for a helpful message
    b"\xff\xd8\xff": "a JPEG image",
    b"GIF87a": "a GIF image",
    b"GIF89a": "a GIF image",
    b"BM": "a BMP image",
    b"II*\x00": "a TIFF image",
    b"MM\x00*": "a TIFF image",
}
_NOT_A_RECIPE = "give a .json or .png written by p2p_widgets"


# -- saving ---------------------------------------------------------------------------------


def save_result(result: Result, folder: str | os.PathLike, stem: str = "p2p", *, overwrite: bool = True) -> list[Path]:
    """Write ``{stem}_0.png`` (the source), ``{stem}_1.png``, ... and ``{stem}.json``.

    Each PNG carries the run's recipe in a text chunk (``RECIPE_KEY``) and its branch
    index. The files appear together or not at all: on any failure the folder is left as
    it was. PNGs ``{stem}_k.png`` left by an earlier, larger run with the same stem are
    removed once the new set is in place, but only those written by p2p_widgets (they
    carry a recipe); other files are never touched. New files get the usual mode
    (``0o666`` less the umask).

    Args:
        result: what :func:`~p2p_widgets.edit` or :func:`~p2p_widgets.run` returned.
        folder: where to write; created if missing.
        stem: the files' common name.
        overwrite: replace the files of an earlier save with the same stem (the default).
            False never replaces a file: the first free stem of ``stem``, ``stem-2``,
            ``stem-3``, ... is used, reserved so that concurrent savers (threads,
            processes) never write over each other.

    Returns:
        The paths written: the PNGs in branch order, then the JSON.

    Raises:
        TypeError / ValueError: a bad result, stem or folder (e.g. a file).
        OSError: the files could not be written (e.g. the disk is full); the message names
            the folder, and nothing in it was changed.
    """
    images, recipe_json, prompts = _check_result(result)
    _check_stem(stem)
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite is True or False, not {overwrite!r}")
    # Encode everything in memory first: a picture PIL cannot write fails before any file.
    contents = [
        _png_bytes(image, recipe_json, index, prompt) for index, (image, prompt) in enumerate(zip(images, prompts))
    ]
    contents.append(recipe_json.encode("utf-8"))
    folder = _make_folder(Path(folder))
    reserved = None if overwrite else _reserve_stem(folder, stem)  # overwrite: every file is replaceable
    stem = reserved.name[: -len(".json")] if reserved is not None else stem
    targets = [folder / f"{stem}_{index}.png" for index in range(len(images))] + [folder / f"{stem}.json"]
    with _stem_lock(folder, stem):  # two savers of one stem in this process: one set after the other, never mixed
        try:
            if overwrite:
                for target in targets:
                    _check_replaceable(target)
            _write_set(folder, targets, contents, replace=targets if reserved is None else [reserved])
        except BaseException:
            if reserved is not None:
                reserved.unlink(missing_ok=True)
            raise
        _remove_stale(folder, _numbered(stem), len(images))
    return targets


_STEM_LOCKS: dict[tuple[str, str], threading.Lock] = {}
_STEM_LOCKS_LOCK = threading.Lock()


def _stem_lock(folder: Path, stem: str) -> threading.Lock:
    key = (os.path.realpath(folder), stem)
    with _STEM_LOCKS_LOCK:
        return _STEM_LOCKS.setdefault(key, threading.Lock())


def _save_pictures(result: Result, folder: Path, pictures: dict[str, Image.Image]) -> list[Path]:
    """Write pictures of a run (e.g. the CLI's heatmaps) into ``folder``, atomically as a
    set like :func:`save_result`, each carrying the run's recipe."""
    _, recipe_json, _ = _check_result(result)
    folder = _make_folder(Path(folder))
    contents = [_png_bytes(picture, recipe_json, None, None, name) for name, picture in pictures.items()]
    targets = [folder / name for name in pictures]
    for target in targets:
        _check_replaceable(target)
    _write_set(folder, targets, contents, replace=targets)
    return targets


def _check_result(result: Any) -> tuple[Sequence[Image.Image], str, tuple[str, ...]]:
    recipe = getattr(result, "recipe", None)
    images = getattr(result, "images", None)
    if not isinstance(recipe, Recipe) or images is None:
        raise TypeError(f"save_result takes the Result of edit() or run(), not {type(result).__name__}")
    images = tuple(images)
    if not all(isinstance(image, Image.Image) for image in images):
        raise TypeError("the result's images must be PIL images")
    if len(images) != len(recipe.prompts):
        raise ValueError(
            f"the result has {len(images)} images but its recipe {len(recipe.prompts)} prompts; "
            "save the Result that edit() or run() returned, unchanged"
        )
    return images, recipe.to_json(), recipe.prompts


def _check_stem(stem: Any) -> None:
    if not isinstance(stem, str):
        raise TypeError(f"stem is the files' name as a string, not {type(stem).__name__}")
    separators = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    if not stem.strip() or stem.startswith(".") or "\x00" in stem or any(s in stem for s in separators):
        raise ValueError(
            f"stem {stem!r} cannot name files: give a plain name without folders, e.g. 'p2p' "
            "(it must not be empty or start with a dot); the folder is its own argument"
        )


def _make_folder(folder: Path) -> Path:
    """The folder, created if missing; a clear error if it cannot be."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"cannot save to {folder}: it (or a folder above it) is a file; give a folder") from None
    except OSError as error:
        raise _os_error(error, f"cannot create the folder {folder}") from None
    return folder


def _png_bytes(image: Image.Image, recipe_json: str, index: int | None, prompt: str | None, what: str = "") -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text(RECIPE_KEY, recipe_json)
    if index is not None:
        info.add_text(BRANCH_KEY, str(index))
    if prompt is not None:
        info.add_text("prompt", prompt)
    stream = io.BytesIO()
    try:
        image.save(stream, format="PNG", pnginfo=info)
    except (OSError, ValueError, KeyError) as error:  # e.g. a mode PNG cannot hold
        what = what or f"image {index}"
        raise ValueError(
            f"{what} ({image.mode}, {image.width}x{image.height}) cannot be written as a PNG: {error}"
        ) from None
    return stream.getvalue()


def _reserve_stem(folder: Path, stem: str) -> Path:
    """Claim the first free stem among ``stem``, ``stem-2``, ...: create its ``.json``
    exclusively (O_EXCL, so exactly one saver wins it) and check that no PNG of that stem
    exists. Returns the reserved (empty) JSON path; the caller replaces or removes it."""
    for number in range(1, MAX_FREE_STEMS + 1):
        candidate = stem if number == 1 else f"{stem}-{number}"
        path = folder / f"{candidate}.json"
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            continue
        except OSError as error:
            raise _os_error(error, f"cannot save to {folder}") from None
        os.close(descriptor)
        try:
            taken = bool(_pngs_of(folder, candidate))  # an earlier save's images without their JSON
        except OSError as error:
            path.unlink(missing_ok=True)
            raise _os_error(error, f"cannot save to {folder}") from None
        if taken:
            path.unlink(missing_ok=True)
            continue
        return path
    raise ValueError(f"{folder} already holds {MAX_FREE_STEMS} saves named {stem!r}; choose another stem or folder")


def _numbered(stem: str, suffix: str = "") -> re.Pattern[str]:
    """Names ``{stem}_{k}{suffix}.png``, exactly as :func:`save_result` writes them."""
    return re.compile(re.escape(stem) + r"_(0|[1-9][0-9]*)" + re.escape(suffix) + r"\.png")


def _pngs_of(folder: Path, stem: str | re.Pattern[str]) -> dict[int, Path]:
    """The files of the folder named ``{stem}_k.png`` (or matching a :func:`_numbered`
    pattern), by k."""
    pattern = _numbered(stem) if isinstance(stem, str) else stem
    found = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            match = pattern.fullmatch(entry.name)
            if match:
                found[int(match.group(1))] = Path(entry.path)
    return found


def _check_replaceable(target: Path) -> None:
    try:
        mode = os.lstat(target).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        raise ValueError(f"cannot save {target.name}: {target} is a folder; remove it or choose another stem")


def _write_set(folder: Path, targets: list[Path], contents: list[bytes], replace: Collection[Path]) -> None:
    """Write every file to a temporary, then rename all into place (replacing only the
    files in ``replace``); on failure put the folder back as it was."""
    temporaries: list[Path] = []
    backups: dict[Path, Path] = {}  # target -> a hard link (or copy) of the file it replaces
    moved: list[Path] = []
    try:
        # 1. Every file to a temporary in the same folder (so the rename is atomic).
        for target, data in zip(targets, contents):
            temporaries.append(_new_temporary(folder, target.name, data))
        # 2. Keep what would be replaced, so that a failed rename can be undone.
        for target in targets:
            backup = _backup(target)
            if backup is not None:
                backups[target] = backup
        # 3. Rename into place.
        for temporary, target in zip(temporaries, targets):
            _move(temporary, target, replace=target in replace)
            moved.append(target)
    except BaseException as error:
        for target in reversed(moved):  # undo: the earlier file back, or no file
            try:
                if target in backups:
                    os.replace(backups.pop(target), target)
                else:
                    target.unlink(missing_ok=True)
            except OSError:
                pass  # best effort; the other files are still restored
        for path in (*temporaries, *backups.values()):
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass
        if isinstance(error, OSError):
            raise _os_error(error, f"cannot save to {folder}", done="nothing there was changed") from None
        raise
    for path in (*temporaries, *backups.values()):  # temporaries: only if a link left one
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass
    _sync_folder(folder)


def _temporary_name(folder: Path, name: str) -> Path:
    return folder / f".{name}.{secrets.token_hex(6)}.tmp"


def _new_temporary(folder: Path, name: str, data: bytes) -> Path:
    """A new temporary file in ``folder`` holding ``data``."""
    while True:
        path = _temporary_name(folder, name)
        try:
            _write_new_file(path, data)
        except FileExistsError:
            continue
        return path


def _write_new_file(path: Path, data: bytes) -> None:
    """Create ``path`` (it must not exist) with the usual mode and write ``data`` to disk;
    a partial file is removed."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _backup(target: Path) -> Path | None:
    """A second name for the file at ``target`` (a hard link; a copy where links are not
    supported), or None when there is no file."""
    try:
        os.lstat(target)
    except FileNotFoundError:
        return None
    while True:
        backup = _temporary_name(target.parent, target.name)
        try:
            os.link(target, backup, follow_symlinks=False)
            return backup
        except FileExistsError:
            continue
        except (OSError, NotImplementedError):
            break
    data = target.read_bytes() if not target.is_symlink() else None
    if data is None:  # a link we cannot duplicate: recreate it on undo
        backup = _temporary_name(target.parent, target.name)
        os.symlink(os.readlink(target), backup)
        return backup
    return _new_temporary(target.parent, target.name, data)


def _move(temporary: Path, target: Path, replace: bool = True) -> None:
    """Rename ``temporary`` to ``target``. With ``replace=False`` an existing ``target`` is
    kept and FileExistsError raised (a hard link then an unlink, where links work)."""
    if replace:
        os.replace(temporary, target)
        return
    try:
        os.link(temporary, target)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, f"{target.name} appeared while saving (another program wrote it)") from None
    except (OSError, NotImplementedError):  # no hard links here: check, then rename
        if os.path.lexists(target):
            raise FileExistsError(
                errno.EEXIST, f"{target.name} appeared while saving (another program wrote it)"
            ) from None
        os.replace(temporary, target)
        return
    try:
        os.unlink(temporary)
    except OSError:
        pass  # the file is in place; _write_set removes what is left


def _sync_folder(folder: Path) -> None:
    """Make the renames durable (POSIX); where folders cannot be synced, skip it."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _remove_stale(folder: Path, pattern: re.Pattern[str], count: int) -> list[Path]:
    """Remove the PNGs named by a :func:`_numbered` pattern with k >= count that
    p2p_widgets wrote (they hold a recipe); other files are never touched. Returns them."""
    removed: list[Path] = []
    try:
        stale = [path for index, path in _pngs_of(folder, pattern).items() if index >= count]
    except OSError:
        return removed
    for path in stale:
        if not _written_by_us(path):
            continue
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            pass
        except OSError as error:
            warnings.warn(
                f"saved, but could not remove {path} left by an earlier save: {error.strerror or error}", stacklevel=3
            )
    return removed


def _written_by_us(path: Path) -> bool:
    try:
        with _open_regular(path) as (stream, size):
            if stream.read(len(_PNG_SIGNATURE)) != _PNG_SIGNATURE:
                return False
            return RECIPE_KEY in _png_texts(stream, size, str(path), {RECIPE_KEY})
    except (OSError, ValueError):
        return False


def _os_error(error: OSError, what: str, done: str = "") -> OSError:
    """``error`` again, same class and errno, with a message that says what failed, where,
    and what to do."""
    reason = error.strerror or str(error) or type(error).__name__
    if error.errno == errno.ENOSPC or error.errno == getattr(errno, "EDQUOT", None):
        advice = "free some space or choose another folder"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        advice = "choose a folder you can write to"
    else:
        advice = "check the folder, or choose another one"
    message = f"{what}: {reason.rstrip('.')}" + (f"; {done}" if done else "") + f"; {advice}"
    new = type(error)(message)
    new.errno = error.errno  # only errno: with strerror set too, str() would drop the message
    return new


# -- reading --------------------------------------------------------------------------------


def read_recipe(path: str | os.PathLike) -> Recipe:
    """The recipe stored in a recipe JSON file or in a PNG written by :func:`save_result`.

    Only regular files are read (a folder, a FIFO or a device is refused before it is
    opened); a JSON file may have at most 16 MB; a PNG may be any size, as its image data
    is skipped, never decoded.

    Raises:
        ValueError: the file holds no recipe, is damaged or cannot be read (the message
            names the file and what was found instead).
        TypeError: the recipe's fields have the wrong types.
        FileNotFoundError: no such file.
    """
    path = Path(path)
    name = str(path)
    with _open_regular(path) as (stream, size):
        head = stream.read(len(_PNG_SIGNATURE))
        if head == _PNG_SIGNATURE:
            texts = _png_texts(stream, size, name, {RECIPE_KEY})
            return _recipe_in_png(texts, name)
        if size > MAX_RECIPE_BYTES:
            raise ValueError(
                f"{name} is too large to be a recipe ({size / 2**20:.0f} MB; recipes are a few kB); {_NOT_A_RECIPE}"
            )
        try:
            data = head + stream.read(MAX_RECIPE_BYTES + 1 - len(head))
        except OSError as error:
            raise ValueError(f"cannot read {name}: {error.strerror or error}") from None
    return recipe_from_bytes(data, name)


def recipe_from_bytes(data: bytes | bytearray | memoryview, name: str = "the file") -> Recipe:
    """The recipe in the contents of a recipe JSON file or a PNG written by
    :func:`save_result` (e.g. an upload); ``name`` is used in error messages.

    Raises:
        ValueError: the contents hold no recipe or are damaged.
        TypeError: ``data`` is not bytes, or the recipe's fields have the wrong types.
    """
    if isinstance(data, (str, os.PathLike)):
        raise TypeError("recipe_from_bytes takes a file's contents (bytes); for a path, use read_recipe")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"recipe_from_bytes takes a file's contents as bytes, not {type(data).__name__}")
    data = bytes(data)
    if data.startswith(_PNG_SIGNATURE):
        stream = io.BytesIO(data)
        stream.seek(len(_PNG_SIGNATURE))
        return _recipe_in_png(_png_texts(stream, len(data), name, {RECIPE_KEY}), name)
    for magic, kind in _OTHER_IMAGES.items():
        if data.startswith(magic):
            raise ValueError(f"{name} is {kind}, which holds no recipe; {_NOT_A_RECIPE}")
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        raise ValueError(f"{name} is a WebP image, which holds no recipe; {_NOT_A_RECIPE}")
    if len(data) > MAX_RECIPE_BYTES:
        raise ValueError(
            f"{name} is too large to be a recipe ({len(data) / 2**20:.0f} MB; recipes are a few kB); {_NOT_A_RECIPE}"
        )
    try:
        text = data.decode("utf-8-sig")
        json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{name} is neither a recipe JSON file nor a readable image; {_NOT_A_RECIPE}") from None
    except RecursionError:
        raise ValueError(f"{name} is not a recipe: its JSON is nested too deeply") from None
    return _parse_recipe(text, name)


def _recipe_in_png(texts: dict[str, str], name: str) -> Recipe:
    text = texts.get(RECIPE_KEY)
    if text is None:
        raise ValueError(
            f"{name} holds no p2p_widgets recipe (no {RECIPE_KEY!r} text chunk): it was not saved by "
            "p2p_widgets, or its text was stripped (many image tools and sites drop it); use the run's .json"
        )
    return _parse_recipe(text, name)


def _parse_recipe(text: str, name: str) -> Recipe:
    try:
        return Recipe.from_json(text)
    except TypeError as error:
        raise TypeError(f"{name}: {error}") from None
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None
    except RecursionError:
        raise ValueError(f"{name} is not a recipe: its JSON is nested too deeply") from None
    except (KeyError, AttributeError) as error:  # a shape from_json does not expect
        raise ValueError(f"{name} is not a valid recipe ({type(error).__name__}: {error})") from None


@contextmanager
def _open_regular(path: Path) -> Iterator[tuple[IO[bytes], int]]:
    """``with _open_regular(path) as (stream, size)``: a regular file opened for reading,
    checked before it is opened (a FIFO would block, a device never ends) and again after."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise _not_found(path) from None
    except (OSError, ValueError) as error:  # e.g. permission denied, a NUL in the path
        raise ValueError(f"cannot read {path}: {getattr(error, 'strerror', None) or error}") from None
    _check_regular(path, mode)
    try:
        # O_NONBLOCK: should the file have turned into a FIFO since, opening it won't hang.
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise _not_found(path) from None
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror or error}") from None
    with os.fdopen(descriptor, "rb") as stream:
        info = os.fstat(descriptor)
        _check_regular(path, info.st_mode)
        yield stream, info.st_size


def _not_found(path: Path) -> FileNotFoundError:
    error = FileNotFoundError(f"no such file: {path}")
    error.errno = errno.ENOENT  # only errno: with strerror or filename set, str() drops the message
    return error


def _check_regular(path: Path, mode: int) -> None:
    if stat.S_ISDIR(mode):
        raise ValueError(f"{path} is a folder, not a recipe file; {_NOT_A_RECIPE}")
    if not stat.S_ISREG(mode):
        kind = "not a regular file"
        if stat.S_ISFIFO(mode):
            kind = "a FIFO (named pipe)"
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            kind = "a device"
        elif stat.S_ISSOCK(mode):
            kind = "a socket"
        raise ValueError(f"{path} is {kind}, not a recipe file; {_NOT_A_RECIPE}")


def _png_texts(stream: IO[bytes], size: int, name: str, wanted: Collection[str]) -> dict[str, str]:
    """The text chunks named in ``wanted`` of the PNG in ``stream``, read from just after
    its signature up to IEND, without reading the image data (it is seeked over).

    Raises:
        ValueError: the PNG is truncated or damaged, or a wanted text is too large.
    """

    def damaged(problem: str) -> ValueError:
        return ValueError(f"{name} is a damaged PNG ({problem}); save the image again, or use the run's .json")

    def read(count: int) -> bytes:
        try:
            data = stream.read(count)
        except OSError as error:
            raise ValueError(f"cannot read {name}: {error.strerror or error}") from None
        if len(data) < count:
            raise damaged("it is truncated: it ends before its IEND chunk")
        return data

    texts: dict[str, str] = {}
    first = True
    position = len(_PNG_SIGNATURE)
    while True:
        length, kind = struct.unpack(">I4s", read(8))
        position += 8
        if length > 2**31 - 1:
            raise damaged(f"a chunk declares {length} bytes, more than PNG allows")
        if not kind.isalpha() or not kind.isascii():
            raise damaged(f"chunk type {kind!r} is not four letters")
        if first and kind != b"IHDR":
            raise damaged(f"the first chunk is {kind.decode('ascii')}, not IHDR")
        first = False
        if position + length + 4 > size:
            raise damaged(f"it is truncated: its {kind.decode('ascii')} chunk runs past the end of the file")
        if kind == b"IEND":
            return texts
        keyword = None
        if kind in _TEXT_CHUNKS:
            head = read(min(length, 80))  # keywords are 1-79 bytes, then a NUL
            keyword = head.split(b"\x00", 1)[0].decode("latin-1") if b"\x00" in head else None
            if keyword is not None and keyword in wanted:
                if length > MAX_RECIPE_BYTES:
                    raise ValueError(
                        f"{name}: its {keyword!r} text is {length / 2**20:.0f} MB, too large to be a recipe"
                    )
                body = head + read(length - len(head))
                (crc,) = struct.unpack(">I", read(4))
                if zlib.crc32(kind + body) != crc:
                    raise damaged(f"the {keyword!r} chunk's checksum is wrong")
                text = _decode_text(kind, body, keyword, damaged)
                if keyword in texts and texts[keyword] != text:
                    raise ValueError(
                        f"{name} holds two different {keyword!r} text chunks; it is not a file p2p_widgets wrote"
                    )
                texts[keyword] = text
                position += length + 4
                continue
            skip = length - len(head) + 4
        else:
            skip = length + 4
        _skip(stream, skip, read)
        position += length + 4


def _skip(stream: IO[bytes], count: int, read: Callable[[int], bytes]) -> None:
    try:
        stream.seek(count, os.SEEK_CUR)
    except (OSError, io.UnsupportedOperation):  # not seekable: read it in bounded pieces
        while count:
            count -= len(read(min(count, 2**20)))


def _decode_text(kind: bytes, body: bytes, keyword: str, damaged: Callable[[str], ValueError]) -> str:
    rest = body[len(keyword.encode("latin-1")) + 1 :]
    if kind == b"tEXt":
        return rest.decode("latin-1")
    if kind == b"zTXt":
        if not rest or rest[0] != 0:
            raise damaged(f"the {keyword!r} zTXt chunk uses an unknown compression method")
        return _inflate(rest[1:], keyword, damaged).decode("latin-1")
    # iTXt: compression flag, method, language tag NUL, translated keyword NUL, UTF-8 text
    if len(rest) < 2:
        raise damaged(f"the {keyword!r} iTXt chunk is cut short")
    compressed, method = rest[0], rest[1]
    parts = rest[2:].split(b"\x00", 2)
    if len(parts) != 3:
        raise damaged(f"the {keyword!r} iTXt chunk is cut short")
    text = parts[2]
    if compressed:
        if method != 0:
            raise damaged(f"the {keyword!r} iTXt chunk uses an unknown compression method")
        text = _inflate(text, keyword, damaged)
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError:
        raise damaged(f"the {keyword!r} iTXt chunk is not UTF-8") from None


def _inflate(data: bytes, keyword: str, damaged: Callable[[str], ValueError]) -> bytes:
    """zlib-decompressed ``data``, refused beyond MAX_RECIPE_BYTES (a decompression bomb)."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, MAX_RECIPE_BYTES + 1)
    except zlib.error as error:
        raise damaged(f"the {keyword!r} chunk's compressed text is corrupt: {error}") from None
    if len(out) > MAX_RECIPE_BYTES or inflater.unconsumed_tail:
        raise damaged(
            f"the {keyword!r} chunk expands to more than {MAX_RECIPE_BYTES // 2**20} MB, too large to be a recipe"
        )
    if not inflater.eof:
        raise damaged(f"the {keyword!r} chunk's compressed text is cut short")
    return out
