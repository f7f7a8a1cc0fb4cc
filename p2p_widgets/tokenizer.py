"""Word-level CLIP tokenizers generated from a word list, with no download.

``word_tokenizer(words)`` writes a byte-level BPE vocabulary and merge list in which every
given word is exactly one token (``word</w>``) and any other text still tokenizes (every
byte is in the vocabulary), then loads them with transformers' real ``CLIPTokenizer``, the
class Stable Diffusion pipelines use. The tests' tiny pipelines and the bundled shapes model
build their tokenizers this way.
"""

from __future__ import annotations

import json
import tempfile
from functools import lru_cache
from itertools import pairwise
from pathlib import Path

from transformers import CLIPTokenizer

__all__ = ["word_tokenizer", "BOS", "EOS"]

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
_EOW = "</w>"  # CLIP's end-of-word suffix


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode character table (all 256 bytes)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    # Same order as CLIP's vocabulary: printable bytes first, then the remapped ones.
    return {b: table[b] for b in printable + [b for b in range(256) if b not in printable]}


def _symbols(text: str, *, final: bool) -> list[str]:
    """Initial BPE symbols of ``text``; the last carries ``</w>`` if ``text`` ends a word."""
    table = _bytes_to_unicode()
    symbols = [table[b] for b in text.encode("utf-8")]
    if final:
        symbols[-1] += _EOW
    return symbols


def _apply_bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Merge adjacent pairs by rank (lowest first, leftmost on ties) until none applies."""
    symbols = list(symbols)
    while len(symbols) > 1:
        rank, i = min((ranks.get(pair, len(ranks)), i) for i, pair in enumerate(pairwise(symbols)))
        if rank == len(ranks):
            break
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


@lru_cache(maxsize=8)
def _vocab_and_merges(
    words: tuple[str, ...], split_words: tuple[tuple[str, tuple[str, ...]], ...]
) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Generate a vocabulary and merge list (checked against the intended token counts).

    Every target is reduced to one symbol by appending merges, left to right, on top of
    what the merges so far already do to it. A merge appended at the lowest priority
    cannot change how an already single-token target tokenizes, so targets never break
    each other; the split words are re-checked as a whole at the end.
    """
    ranks: dict[tuple[str, str], int] = {}
    targets = [_symbols(w, final=True) for w in words]
    for _, pieces in split_words:
        targets += [_symbols(p, final=i == len(pieces) - 1) for i, p in enumerate(pieces)]
    for target in targets:
        while len(current := _apply_bpe(target, ranks)) > 1:
            ranks[(current[0], current[1])] = len(ranks)

    for word in words:
        if _apply_bpe(_symbols(word, final=True), ranks) != [word + _EOW]:
            raise ValueError(f"cannot make {word!r} a single token (is it one lower-case word?)")
    for word, pieces in split_words:
        want = [*pieces[:-1], pieces[-1] + _EOW]
        if _apply_bpe(_symbols(word, final=True), ranks) != want:
            raise ValueError(f"{word!r} does not split as {want}; its pieces must concatenate to it")

    base = list(_bytes_to_unicode().values())
    # CLIP's layout: bytes, bytes + "</w>", merge results in rank order, then bos, eos.
    tokens = [*base, *(c + _EOW for c in base), *(a + b for a, b in ranks), BOS, EOS]
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}, tuple(ranks)


def write_vocabulary_files(
    folder: str | Path, words: tuple[str, ...] | list[str], split_words: dict[str, tuple[str, ...]] | None = None
) -> None:
    """Write ``vocab.json`` and ``merges.txt`` of :func:`word_tokenizer` into ``folder``.

    transformers 5 saves a tokenizer as ``tokenizer.json`` only; older versions' CLIPTokenizer
    loads from these two files, so a saved model folder carries both.
    """
    split = tuple(sorted((split_words or {}).items()))
    vocab, merges = _vocab_and_merges(tuple(words), split)
    root = Path(folder)
    (root / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_txt = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (root / "merges.txt").write_text(merges_txt, encoding="utf-8")


def word_tokenizer(
    words: tuple[str, ...] | list[str],
    split_words: dict[str, tuple[str, ...]] | None = None,
    max_length: int = 77,
    *,
    pad_token: str = EOS,
) -> CLIPTokenizer:
    """A fresh ``CLIPTokenizer`` in which each of ``words`` is one token.

    ``split_words`` maps words to the pieces they should split into (e.g.
    ``{"bicycle": ("bicy", "cle")}``), for tokenizers with multi-token words. Any other text
    tokenizes into smaller pieces, never to an unknown token. bos = ``<|startoftext|>``,
    eos = ``<|endoftext|>`` (the last two ids), ``model_max_length = max_length``.

    ``pad_token`` is ``<|endoftext|>`` by default, as in CLIP ViT-L's tokenizer; SDXL's
    second (OpenCLIP bigG) tokenizer pads with ``"!"`` (id 0) instead. It must be in the
    vocabulary. As in SDXL (diffusers#4153), a pad token that is also a byte is a special
    token, so each ``"!"`` of the text encodes to it too, where the ``<|endoftext|>``-padded
    tokenizer gives ``"!</w>"``: another id at the same position (this vocabulary has no
    ``"!!"`` merge, so unlike real CLIP's, runs of ``"!"`` keep the positions too).
    """
    split = tuple(sorted((split_words or {}).items()))
    if pad_token not in _vocab_and_merges(tuple(words), split)[0]:
        raise ValueError(f"pad_token {pad_token!r} is not in the vocabulary; use {EOS!r} or a single byte such as '!'")
    with tempfile.TemporaryDirectory(prefix="p2p_word_tokenizer_") as tmp:
        write_vocabulary_files(tmp, words, split_words)
        return CLIPTokenizer.from_pretrained(
            tmp, model_max_length=max_length, bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=pad_token
        )
