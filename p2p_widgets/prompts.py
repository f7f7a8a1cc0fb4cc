"""Prompts as the text encoder sees them: words, their token spans, and alignments.

A prompt is split into *words* (runs of letters/digits, optionally joined by an
apostrophe, and runs of punctuation), and every token the tokenizer produces is
assigned to the word it came from using the tokenizer's character offsets (or, for
tokenizers without offsets, by tokenizing word by word). Token index 0 is the
beginning-of-text token, the prompt's tokens follow, then end-of-text, then padding up
to the encoder's length (77 for CLIP).

Alignments map a parent prompt's token positions to a target prompt's, as the
matrices the controller uses to carry cross-attention maps from one branch to
another:

* **swap** (word swap, paper section 3.2): prompts with the same number of words,
  word ``k`` maps to word ``k``. Words with equal token counts map token to token;
  otherwise every target token receives ``1 / len(target word)`` of each source
  token of the word, so the word's total attention mass is kept. Everything after the
  last word (end-of-text and padding) stays aligned position by position from the
  end-of-text token.
* **refine** (adding words): a longest-common-subsequence alignment of the words;
  matched words map token to token, new words map to nothing and keep their own maps.
  End-of-text and padding stay aligned from the end-of-text token, as in a swap. (A
  deliberate difference from the official code, whose refinement mapper aligns padding
  position by position: when words are removed, it maps the target's end-of-text and
  padding onto the source's last real words.)

All functions here are pure: they take a tokenizer and strings, never a model.
"""

from __future__ import annotations

import bisect
import re
import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = [
    "Word",
    "Prompt",
    "Alignment",
    "tokenize",
    "encode_text",
    "align",
    "infer_kind",
    "Kind",
]

Kind = Literal["swap", "refine"]

# Letters and digits (with inner apostrophes: "cat's", "don't"), or a run of other
# non-space characters. Close to CLIP's pre-tokenizer, so no token crosses two words.
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*|(?:[^\w\s]|_)+")


@dataclass(frozen=True)
class Word:
    """One word of a prompt: its text and its token span ``[start, end)``."""

    text: str
    index: int
    start: int
    end: int

    @property
    def tokens(self) -> range:
        return range(self.start, self.end)


@dataclass(frozen=True)
class Prompt:
    """A tokenised prompt. Holds plain values only (no tokenizer)."""

    text: str
    words: tuple[Word, ...]
    ids: tuple[int, ...]  # padded to ``max_length``; ids[0] is begin-of-text
    eos: int  # index of the end-of-text token (= number of prompt tokens + 1)

    @property
    def max_length(self) -> int:
        return len(self.ids)

    @property
    def length(self) -> int:
        """Number of real tokens, begin- and end-of-text included."""
        return self.eos + 1

    @property
    def word_texts(self) -> tuple[str, ...]:
        return tuple(word.text for word in self.words)

    def find(self, word: str | int) -> tuple[Word, ...]:
        """The words matching ``word``.

        ``word`` is a word index, or text: one word or several separated by spaces
        (a phrase), matched case-insensitively at every occurrence.

        Raises:
            ValueError: nothing matches; the message lists the prompt's words.
        """
        if isinstance(word, bool) or not isinstance(word, (int, str)):
            raise TypeError(f"a word is given as text or a word index, not {type(word).__name__}")
        if isinstance(word, int):
            if not 0 <= word < len(self.words):
                raise ValueError(
                    f"word index {word} is out of range for {self.text!r}, which has "
                    f"{len(self.words)} words: {', '.join(self.word_texts)}"
                )
            return (self.words[word],)
        wanted = [part.lower() for part in _WORD.findall(word)]
        found: list[Word] = []
        lowered = [w.lower() for w in self.word_texts]
        for i in range(len(lowered) - len(wanted) + 1):
            if wanted and lowered[i : i + len(wanted)] == wanted:
                found.extend(self.words[i : i + len(wanted)])
        if not found:
            raise ValueError(f"{word!r} is not in {self.text!r}; its words are: {', '.join(self.word_texts)}")
        return tuple(dict.fromkeys(found))

    def token_indices(self, word: str | int) -> tuple[int, ...]:
        """Token positions of ``word`` (every occurrence), in order."""
        return tuple(i for w in self.find(word) for i in w.tokens)

    def word_of_token(self) -> tuple[int, ...]:
        """For every token position, the index of its word, or -1 (special tokens)."""
        owner = [-1] * self.max_length
        for word in self.words:
            for i in word.tokens:
                owner[i] = word.index
        return tuple(owner)


def tokenize(tokenizer: Any, text: str) -> Prompt:
    """Tokenise ``text`` as the pipeline does (padded to the encoder's length).

    Safe to call from several threads on one tokenizer, also while other code calls the
    tokenizer with padding or truncation: it never uses the tokenizer's shared settings.

    Raises:
        ValueError: empty prompt, or longer than the text encoder accepts.
    """
    if not isinstance(text, str):
        raise TypeError(f"a prompt is a string, not {type(text).__name__}")
    if not text.strip():
        raise ValueError('the prompt is empty; describe the image, e.g. "a cat riding a bicycle"')
    max_length = int(tokenizer.model_max_length)
    body, offsets = encode_text(tokenizer, text)
    if len(body) + 2 > max_length:  # before mapping tokens to words
        raise ValueError(
            f"the prompt is {len(body)} tokens long but the text encoder takes at most "
            f"{max_length - 2}; shorten it by {len(body) + 2 - max_length} tokens: {_shortened(text)!r}"
        )
    spans = [(m.start(), m.end()) for m in _WORD.finditer(text)]
    owners = _owners(tokenizer, text, spans, body, offsets)
    bos, eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    ids = [bos, *body, eos_id] + [pad] * (max_length - len(body) - 2)
    positions: list[list[int]] = [[] for _ in spans]
    for i, owner in enumerate(owners):
        positions[owner].append(1 + i)
    words: list[Word] = []
    for (start, end), tokens in zip(spans, positions):
        if not tokens:  # a character the tokenizer drops (e.g. some symbols)
            continue
        words.append(Word(text[start:end], len(words), tokens[0], tokens[-1] + 1))
    return Prompt(text=text, words=tuple(words), ids=tuple(ids), eos=len(body) + 1)


def _shortened(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# Fast tokenizers keep padding and truncation settings in their Rust backend, and every call
# with other settings rewrites them: two threads interfere. Each fast tokenizer gets a private
# copy of its backend here, configured once without padding or truncation.
# Tokenizers are typed Any here: any transformers tokenizer (fast or slow) or one built like
# them (``model_max_length``, special token ids, ``__call__``) will do.
_PRIVATE: weakref.WeakKeyDictionary[Any, Tokenizer] = weakref.WeakKeyDictionary()
_PRIVATE_LOCK = threading.Lock()


def _private_backend(tokenizer: Any) -> Tokenizer | None:
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None:
        return None
    with _PRIVATE_LOCK:
        try:
            private = _PRIVATE.get(tokenizer)
        except TypeError:  # a tokenizer class that cannot be a weak key: a copy per call
            return _copy_backend(backend)
        if private is None:
            private = _PRIVATE[tokenizer] = _copy_backend(backend)
    return private


def _copy_backend(backend: Tokenizer) -> Tokenizer:
    from tokenizers import Tokenizer

    private = Tokenizer.from_str(backend.to_str())
    private.no_padding()
    private.no_truncation()
    return private


def encode_text(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]] | None]:
    """Token ids of ``text`` without special tokens, and their character offsets (None for
    tokenizers without offsets), independent of the tokenizer's padding state."""
    private = _private_backend(tokenizer)
    if private is not None:
        encoding = private.encode(text, add_special_tokens=False)
        return list(encoding.ids), [(start, end) for start, end in encoding.offsets]
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
    except (NotImplementedError, ValueError, TypeError, KeyError):
        return list(tokenizer(text, add_special_tokens=False)["input_ids"]), None


def _owners(
    tokenizer: Any, text: str, spans: list[tuple[int, int]], ids: list[int], offsets: list[tuple[int, int]] | None
) -> list[int]:
    """For every token of ``ids``, the index of the word span it came from."""
    if offsets is not None:
        starts = [s for s, _ in spans]
        owners = []
        for start, _ in offsets:
            index = bisect.bisect_right(starts, start) - 1
            if index < 0 or start >= spans[index][1]:  # offsets point at a space before the word
                index = min(index + 1, len(spans) - 1)
            owners.append(index)
        return owners
    # Tokenizers without offsets: tokenize word by word and check nothing changed.
    pieces, owners = [], []
    for index, (start, end) in enumerate(spans):
        piece = encode_text(tokenizer, text[start:end])[0]
        pieces.extend(piece)
        owners.extend([index] * len(piece))
    if pieces != ids:
        raise ValueError(
            f"cannot map the tokens of {_shortened(text)!r} to its words with this tokenizer "
            "(it has no character offsets and tokenizes across word boundaries); "
            "use a fast tokenizer (transformers' CLIPTokenizerFast)"
        )
    return owners


@dataclass(frozen=True)
class Alignment:
    """How a parent prompt's tokens carry over to a target prompt.

    ``matrix[i, j]`` is the weight of parent token ``i`` in target token ``j``;
    ``mapped[j]`` is False for target tokens with no counterpart (new words), which keep
    their own attention.
    """

    kind: Kind
    matrix: np.ndarray  # (parent max_length, target max_length), float32
    mapped: np.ndarray  # (target max_length,), bool


def infer_kind(parent: Prompt, target: Prompt) -> Kind:
    """``"swap"`` when both prompts have the same number of words, else ``"refine"``."""
    return "swap" if len(parent.words) == len(target.words) else "refine"


def align(parent: Prompt, target: Prompt, kind: Kind | Literal["auto"] = "auto") -> Alignment:
    """Align ``target``'s tokens to ``parent``'s (see the module docstring).

    Raises:
        ValueError: a swap between prompts with different numbers of words.
    """
    if kind == "auto":
        kind = infer_kind(parent, target)
    if kind not in ("swap", "refine"):
        raise ValueError(f"alignment kind must be 'auto', 'swap' or 'refine', not {kind!r}")
    if parent.max_length != target.max_length:
        raise ValueError("both prompts must come from the same tokenizer")
    size = parent.max_length
    matrix = np.zeros((size, size), dtype=np.float32)
    mapped = np.zeros(size, dtype=bool)

    if kind == "swap":
        if len(parent.words) != len(target.words):
            raise ValueError(
                f"a word swap needs prompts with the same number of words, but {parent.text!r} "
                f"has {len(parent.words)} and {target.text!r} has {len(target.words)}; "
                "use refinement (kind='refine') to add or remove words"
            )
        pairs = list(zip(parent.words, target.words))
    else:
        pairs = _common_words(parent.words, target.words)

    matrix[0, 0] = 1.0  # begin-of-text
    for source_word, target_word in pairs:
        sources, targets = list(source_word.tokens), list(target_word.tokens)
        if len(sources) == len(targets):
            matrix[sources, targets] = 1.0
        else:  # each target token gets an equal share of the whole source word
            matrix[np.ix_(sources, targets)] = 1.0 / len(targets)
    # End-of-text and padding: aligned from the end-of-text token onwards.
    for offset in range(size - target.eos):
        matrix[min(parent.eos + offset, size - 1), target.eos + offset] = 1.0
    mapped[:] = matrix.sum(axis=0) > 0
    return Alignment(kind=kind, matrix=matrix, mapped=mapped)


def _common_words(parent: tuple[Word, ...], target: tuple[Word, ...]) -> list[tuple[Word, Word]]:
    """Pairs of equal words (case-insensitive) in a longest common subsequence."""
    a = [w.text.lower() for w in parent]
    b = [w.text.lower() for w in target]
    # suffix[i][j]: length of the longest common subsequence of a[i:] and b[j:]
    suffix = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) - 1, -1, -1):
        for j in range(len(b) - 1, -1, -1):
            if a[i] == b[j]:
                suffix[i][j] = suffix[i + 1][j + 1] + 1
            else:
                suffix[i][j] = max(suffix[i + 1][j], suffix[i][j + 1])
    pairs, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        if a[i] == b[j] and suffix[i][j] == suffix[i + 1][j + 1] + 1:
            pairs.append((parent[i], target[j]))
            i, j = i + 1, j + 1
        elif suffix[i + 1][j] >= suffix[i][j + 1]:
            i += 1
        else:
            j += 1
    return pairs
