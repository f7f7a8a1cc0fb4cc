"""Edits as frozen, JSON-serialisable data, and the recipe that describes a whole run.

A run has one *source* prompt and any number of *targets*. Each target names its
*parent* branch (0 is the source, ``k`` the k-th target), so edits chain
(A -> B -> C) or cycle (A -> B -> A), and says how its attention follows its parent's:

* ``kind``: ``"swap"`` (word swap), ``"refine"`` (words added or removed) or
  ``"auto"`` (swap when the prompts have the same number of words, else refine);
* ``cross``: the cross-attention injection window, as a fraction ``f`` of the steps
  (steps ``[0, f)``), a ``(start, end)`` pair of fractions, or per word:
  ``{"default_": 0.8, "car": 0.4}``;
* ``self_attn``: the self-attention injection window (fraction or pair);
* ``reweight``: ``{"word": c}`` scales the word's cross-attention by ``c`` (negative and
  zero allowed), inside the cross window unless ``reweight_window`` is given;
* ``values``: the value-injection window (CL P2P): inside it, the cross-attention values
  of the tokens aligned with the parent's (unchanged words, begin- and end-of-text,
  padding) become ``(1 - value_beta) * V_target + value_beta * V_parent``; swapped and new
  words keep their own values. It keeps the rest of the image closer to the parent, but
  the edit is not carried by its own words alone: a causal text encoder writes the new
  word into every later token, and those are aligned, so a long or strong injection pulls
  the edit back (on the shapes model a swap survives values over the first half of the
  steps, or over all of them at ``value_beta`` 0.25, but not over all at 1;
  ``benchmarks/cl_p2p_study.py``). None by default;
* ``preserve``: inject only these words' maps (object preservation, paper fig. 5);
* ``blend``: a :class:`LocalBlend`, to confine the change to the regions of some words.

Specs validate what they can on their own in ``__post_init__``; checks that need the
tokenizer (is the word in the prompt? do the word counts allow a swap?) happen when a
run is planned, before the pipeline is touched.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal, Union

from .checks import is_int, is_real

__all__ = [
    "Window",
    "CrossWindow",
    "LocalBlend",
    "Target",
    "Recipe",
    "WindowLike",
    "CrossWindowLike",
    "WordLike",
    "WordsLike",
    "ReweightLike",
    "check_seed_and_steps",
    "MAX_SEED",
    "MAX_STEPS",
    "MAX_DILATION",
]

MAX_DILATION = 32  # local-blend dilation radius, in cells of the mask's map (1 in the paper)

# What the specs' constructors accept; their fields hold the parsed form (a Window, a tuple
# of words), which is what every reader of a spec sees.
#: a window: a Window, ``f`` (steps [0, f)), ``(start, end)`` or ``{"start": s, "end": e}``
WindowLike = Union["Window", float, int, tuple, list, Mapping[str, float]]
#: a word: its text, or its index (from 0) in the prompt
WordLike = str | int
#: a cross window: a window, ``{"default_": w, word: w, ...}`` (word keys: text or indices)
#: or the JSON form of :meth:`CrossWindow.to_json`
CrossWindowLike = Union[
    "CrossWindow", WindowLike, Mapping[str, WindowLike], Mapping[int, WindowLike], Mapping[WordLike, WindowLike]
]
#: words: one word, or a tuple or list of them
WordsLike = WordLike | Sequence[WordLike]
#: word weights: ``{word: c}``, or (word, c) pairs (Mapping is invariant in its key type:
#: a dict keyed by text alone or by indices alone is each its own member)
ReweightLike = Mapping[str, float] | Mapping[int, float] | Mapping[WordLike, float] | Sequence[tuple[WordLike, float]]


def _fraction(value: Any, what: str) -> float:
    if not is_real(value) or not math.isfinite(value):
        raise TypeError(f"{what} must be a number between 0 and 1, not {value!r}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{what} must be between 0 and 1 (a fraction of the steps), not {value}")
    return float(value)


@dataclass(frozen=True)
class Window:
    """Steps ``[start * steps, end * steps)`` of the diffusion, as fractions in [0, 1]."""

    start: float = 0.0
    end: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", _fraction(self.start, "a window's start"))
        object.__setattr__(self, "end", _fraction(self.end, "a window's end"))
        if self.start > self.end:
            raise ValueError(
                f"a window's start ({self.start}) is after its end ({self.end}); give (start, end) with start <= end"
            )

    @classmethod
    def parse(cls, value: WindowLike) -> Window:
        """A window from ``f`` (meaning ``(0, f)``), ``(start, end)`` or a Window."""
        if isinstance(value, Window):
            return value
        if isinstance(value, (tuple, list)):
            if len(value) != 2:
                raise ValueError(f"a window is (start, end), not {tuple(value)!r}")
            return cls(value[0], value[1])
        if isinstance(value, Mapping):
            missing = sorted({"start", "end"} - set(value))
            extra = sorted(map(str, set(value) - {"start", "end"}))
            if missing or extra:
                problem = f"missing {', '.join(missing)}" if missing else f"unknown key(s) {', '.join(extra)}"
                raise ValueError(
                    f'a window is a fraction f, [start, end] or {{"start": s, "end": e}}; {dict(value)!r} has {problem}'
                )
            return cls(value["start"], value["end"])
        return cls(0.0, _fraction(value, "a window"))

    def steps(self, total: int) -> range:
        """The step indices inside the window for a run of ``total`` steps:
        ``floor(start * total)`` to ``floor(end * total)``, end excluded.

        The official code ends its cross-attention windows at ``int(end * (total + 1))``
        (self-attention windows as here): one step more whenever ``end * total`` has a
        fraction of at least ``1 - end``; for cross 0.8 at every step count that is not a
        multiple of 5 (its notebooks use 50, where both give steps 0..39)."""
        # A small epsilon so that e.g. 0.29 * 100 is 29 steps, not 28.
        return range(math.floor(self.start * total + 1e-9), math.floor(self.end * total + 1e-9))

    def to_json(self) -> list[float]:
        return [self.start, self.end]


@dataclass(frozen=True)
class CrossWindow:
    """A cross-attention window with optional per-word windows.

    ``CrossWindow.parse({"default_": 0.8, "car": 0.4})`` injects "car" for the first 40%
    of the steps and every other token for the first 80%.
    """

    default: Window = field(default_factory=lambda: Window(0.0, 0.8))
    words: tuple[tuple[WordLike, Window], ...] = ()

    if TYPE_CHECKING:  # what the constructor accepts; __post_init__ parses it into the fields

        def __init__(
            self,
            default: WindowLike = ...,
            words: Mapping[str, WindowLike]
            | Mapping[int, WindowLike]
            | Mapping[WordLike, WindowLike]
            | Sequence[tuple[WordLike, WindowLike]] = ...,
        ) -> None: ...

    def __post_init__(self) -> None:
        object.__setattr__(self, "default", Window.parse(self.default))
        if not isinstance(self.words, (Mapping, tuple, list)):
            raise TypeError(f"per-word windows are (word, window) pairs, not {self.words!r}")
        words = self.words.items() if isinstance(self.words, Mapping) else self.words
        parsed = []
        for pair in words:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"a per-word window is a (word, window) pair, not {pair!r}")
            parsed.append((_word(pair[0], "a per-word window"), Window.parse(pair[1])))
        _unique([w for w, _ in parsed], "per-word windows")
        object.__setattr__(self, "words", tuple(parsed))

    @classmethod
    def parse(cls, value: CrossWindowLike) -> CrossWindow:
        """From a CrossWindow, a window (fraction, pair), ``{"default_": w, word: w, ...}``
        (word keys: text, or int word indices in Python) or the JSON form of :meth:`to_json`.
        A mapping with "start" or "end" is one window (``{"start": s, "end": e}``, strictly)."""
        if isinstance(value, CrossWindow):
            return value
        if not isinstance(value, Mapping):
            return cls(Window.parse(value))
        mapping: Mapping[Any, Any] = value  # keys: text ("default_", a word) or word indices, checked below
        if set(mapping) == {"default", "words"}:
            words = mapping["words"]
            if not isinstance(words, (list, tuple)):
                raise ValueError(f'"words" of a cross window is a list of [word, window] pairs, not {words!r}')
            return cls(Window.parse(mapping["default"]), tuple(words))
        if not {"start", "end"} & set(mapping):
            per_word = dict(mapping)
            default = per_word.pop("default_", 1.0)
            return cls(Window.parse(default), tuple(per_word.items()))
        return cls(Window.parse(mapping))

    def to_json(self) -> Any:
        """``[start, end]``, or with per-word windows ``{"default": [s, e], "words": [[word, [s, e]], ...]}``
        (a list, not an object: JSON keys are text, and a word index must stay a number)."""
        if not self.words:
            return self.default.to_json()
        return {"default": self.default.to_json(), "words": [[w, win.to_json()] for w, win in self.words]}


@dataclass(frozen=True)
class LocalBlend:
    """Confine a target's change to the regions of some words (paper section 3.2).

    After every step from ``start`` on, the target's latent is reset to its parent's
    outside a mask: the union of where ``words`` (in the target prompt) and
    ``parent_words`` (in the parent prompt) attend. Maps are averaged over the steps so
    far at about a quarter of the latent side (at least 16x16 where maps allow; see
    :func:`~p2p_widgets.control.blend_factor`), dilated by a max-pool of radius
    ``dilation``, normalised by their maximum and thresholded at ``threshold``.

    ``parent_words=None`` uses the parent's words aligned with ``words`` (for a swap
    "cat" -> "tiger", blending on "tiger" also covers "cat" in the parent).
    """

    words: tuple[WordLike, ...]
    parent_words: tuple[WordLike, ...] | None = None
    threshold: float = 0.3
    dilation: int = 1
    start: float = 0.0

    if TYPE_CHECKING:  # what the constructor accepts; __post_init__ parses it into the fields

        def __init__(
            self,
            words: WordsLike,
            parent_words: WordsLike | None = ...,
            threshold: float = ...,
            dilation: int = ...,
            start: float = ...,
        ) -> None: ...

    def __post_init__(self) -> None:
        object.__setattr__(self, "words", _words(self.words, "LocalBlend.words"))
        if self.parent_words is not None:
            object.__setattr__(
                self, "parent_words", _words(self.parent_words, "LocalBlend.parent_words", empty_ok=True)
            )
        if not self.words and not self.parent_words:
            raise ValueError("LocalBlend needs at least one word, e.g. LocalBlend(('cat',))")
        if not is_real(self.threshold):
            raise TypeError(f"the blend threshold must be a number, not {self.threshold!r}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"the blend threshold must be between 0 and 1 (exclusive), not {self.threshold}")
        object.__setattr__(self, "threshold", float(self.threshold))
        if not is_int(self.dilation) or not 0 <= self.dilation <= MAX_DILATION:
            raise ValueError(
                f"the blend dilation is a max-pool radius in cells from 0 to {MAX_DILATION} (1 in the paper), "
                f"not {self.dilation!r}"
            )
        object.__setattr__(self, "start", _fraction(self.start, "the blend start"))

    def to_json(self) -> dict[str, Any]:
        return {
            "words": list(self.words),
            "parent_words": None if self.parent_words is None else list(self.parent_words),
            "threshold": self.threshold,
            "dilation": self.dilation,
            "start": self.start,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LocalBlend:
        if not isinstance(data, Mapping):
            raise TypeError(
                f'a local blend is an object like {{"words": ["dog"], "threshold": 0.3}}, not {_kind(data)}'
            )
        data = _known(cls, data)
        for name in ("words", "parent_words"):
            if isinstance(data.get(name), list):
                data[name] = tuple(data[name])
        if "words" not in data:
            raise ValueError('a local blend needs its "words"')
        return cls(**data)


def _words(value: Any, what: str, empty_ok: bool = False) -> tuple:
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, (tuple, list)):
        raise TypeError(f"{what} is a list of words, not {value!r}")
    words = tuple(_word(word, what) for word in value)
    if not words and not empty_ok:
        raise ValueError(f"{what} is empty; name at least one word")
    return words


def _word(word: Any, what: str) -> str | int:
    """A word: non-empty text, or a word index (an int from 0)."""
    if isinstance(word, str) and word.strip():
        return word
    if isinstance(word, int) and not isinstance(word, bool) and word >= 0:
        return word
    raise ValueError(f"{what}: a word is its text or its index (0, 1, ...) in the prompt, not {word!r}")


def _unique(words: list, what: str) -> None:
    seen = set()
    for word in words:
        key = word.lower() if isinstance(word, str) else word
        if key in seen:
            raise ValueError(f"{what} name {word!r} twice; give each word once")
        seen.add(key)


@dataclass(frozen=True)
class Target:
    """One edited branch. See the module docstring for the fields."""

    prompt: str
    parent: int = 0
    kind: Literal["auto", "swap", "refine"] = "auto"
    cross: CrossWindow = field(default_factory=CrossWindow)
    self_attn: Window = field(default_factory=lambda: Window(0.0, 0.4))
    reweight: tuple[tuple[WordLike, float], ...] = ()
    reweight_window: Window | None = None
    preserve: tuple[WordLike, ...] = ()
    blend: LocalBlend | None = None
    values: Window = field(default_factory=lambda: Window(0.0, 0.0))
    value_beta: float = 1.0

    if TYPE_CHECKING:  # what the constructor accepts; __post_init__ parses it into the fields

        def __init__(
            self,
            prompt: str,
            parent: int = ...,
            kind: str = ...,  # checked: "auto", "swap" or "refine"
            cross: CrossWindowLike = ...,
            self_attn: WindowLike = ...,
            reweight: ReweightLike = ...,
            reweight_window: WindowLike | None = ...,
            preserve: WordsLike = ...,
            blend: LocalBlend | Mapping[str, Any] | WordsLike | None = ...,  # a mapping: its JSON form; words
            values: WindowLike = ...,
            value_beta: float = ...,
        ) -> None: ...

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise TypeError(f"a target's prompt is a string, not {type(self.prompt).__name__}")
        if not self.prompt.strip():
            raise ValueError('a target\'s prompt is empty; give the edited prompt, e.g. "a dog riding a bicycle"')
        if not is_int(self.parent) or self.parent < 0:
            raise ValueError(f"parent is a branch index (0 = the source, k = the k-th target), not {self.parent!r}")
        if self.kind not in ("auto", "swap", "refine"):
            raise ValueError(f"kind must be 'auto', 'swap' or 'refine', not {self.kind!r}")
        object.__setattr__(self, "cross", CrossWindow.parse(self.cross))
        object.__setattr__(self, "self_attn", Window.parse(self.self_attn))
        object.__setattr__(self, "values", Window.parse(self.values))
        beta = self.value_beta
        if not is_real(beta) or not 0.0 <= beta <= 1.0:
            raise ValueError(f"value_beta is the parent's share of the values, a number from 0 to 1, not {beta!r}")
        object.__setattr__(self, "value_beta", float(beta))
        if self.reweight_window is not None:
            object.__setattr__(self, "reweight_window", Window.parse(self.reweight_window))
        if not isinstance(self.reweight, (Mapping, tuple, list)):
            raise TypeError(f'reweight maps words to weights, e.g. {{"cat": 2.0}}, not {self.reweight!r}')
        pairs = self.reweight.items() if isinstance(self.reweight, Mapping) else self.reweight
        weights = []
        for pair in pairs:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"reweight holds (word, weight) pairs, not {pair!r}")
            word, scale = _word(pair[0], "reweight"), pair[1]
            if not is_real(scale) or not abs(scale) <= FLOAT32_MAX:
                raise ValueError(
                    f"the weight of {word!r} must be a finite number (within float32, |c| <= 3.4e38), not {scale!r}"
                )
            weights.append((word, float(scale)))
        _unique([w for w, _ in weights], "reweight")
        object.__setattr__(self, "reweight", tuple(weights))
        object.__setattr__(self, "preserve", _words(self.preserve, "preserve", empty_ok=True))
        if self.blend is not None and not isinstance(self.blend, LocalBlend):
            if isinstance(self.blend, Mapping):
                object.__setattr__(self, "blend", LocalBlend.from_json(self.blend))
            else:
                object.__setattr__(self, "blend", LocalBlend(self.blend))

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "parent": self.parent,
            "kind": self.kind,
            "cross": self.cross.to_json(),
            "self_attn": self.self_attn.to_json(),
            "reweight": [[w, s] for w, s in self.reweight],
            "reweight_window": None if self.reweight_window is None else self.reweight_window.to_json(),
            "preserve": list(self.preserve),
            "blend": None if self.blend is None else self.blend.to_json(),
            "values": self.values.to_json(),
            "value_beta": self.value_beta,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | str) -> Target:
        """A target from its JSON form (:meth:`to_json`), or a plain prompt string."""
        if isinstance(data, str):
            return cls(data)
        if not isinstance(data, Mapping):
            raise TypeError(f'a target is a prompt string or an object like {{"prompt": "a dog"}}, not {_kind(data)}')
        data = _known(cls, data)
        if "prompt" not in data:
            raise ValueError('a target needs its "prompt"')
        for name in ("reweight", "preserve"):
            if name in data and not isinstance(data[name], (list, tuple, Mapping)):
                raise TypeError(
                    f"{name} is a list (or an object of word: weight for reweight), not {_kind(data[name])}"
                )
        if isinstance(data.get("reweight"), Mapping):
            data["reweight"] = tuple(data["reweight"].items())
        elif "reweight" in data:
            data["reweight"] = tuple(tuple(p) if isinstance(p, list) else p for p in data["reweight"])
        if "preserve" in data:
            data["preserve"] = tuple(data["preserve"])
        if data.get("blend") is not None:
            data["blend"] = LocalBlend.from_json(data["blend"])
        return cls(**data)


MAX_SIDE = 65536  # SDXL's size conditions are pixel counts; larger ones are surely a mistake
MAX_SEED = 2**63  # seeds are 0 .. 2**63 - 1 (torch generators take 64-bit seeds; the engine uses seed + 1)
MAX_STEPS = 10_000  # more than any scheduler's training timesteps (1000 for Stable Diffusion)
MAX_GUIDANCE = 1e4  # |guidance| beyond this is no guidance scale anyone means; 7.5 in the paper
MAX_RECIPE_CHARS = 4_000_000  # a recipe is a few kB of JSON
FLOAT32_MAX = 3.4028234663852886e38  # weights must be finite in float32, the attention's dtype


@dataclass(frozen=True)
class Recipe:
    """Everything that determines a run's images.

    Args:
        prompt: the source prompt.
        targets: the edited branches (``Target`` or plain prompt strings).
        seed: seeds the initial noise, drawn on the CPU so it is the same on any device.
        steps: diffusion steps (50 in the paper).
        guidance: classifier-free guidance scale; <= 1 runs without an unconditional half
            (None: the model family's stock default, 7.5 for Stable Diffusion, 5 for SDXL).
        negative_prompt: the unconditional prompt ("" = the pipeline's default: the empty
            prompt, or zeros for SDXL models that ask for them).
        height, width: image size in pixels (None: the model's default size).
        scheduler: a diffusers scheduler class name built from the pipeline's scheduler
            config, or "pipeline" for the pipeline's own scheduler as it is (None: the model
            family's default, DDIM for Stable Diffusion 1.x/2.x as in the paper, the
            pipeline's own for SDXL).
        eta: DDIM's eta (0: deterministic).
        guidance_rescale: rescale of the guided prediction (0: off).
        self_max_scale: self-attention is injected only in layers whose feature map side
            is at most this fraction of the latent side (0.25: the paper's 16x16 maps at
            512 px; 1.0: every layer).
        original_size, crop, target_size: SDXL's size conditions ("micro-conditioning"):
            the (height, width) the model is told the training image had, the (top, left)
            corner it was cropped at, and the size it was made for; None: the image's size,
            and crop (0, 0). Other families refuse them.
        model: the model's hub id or path, recorded for reference.
        version: the p2p_widgets version that wrote the recipe.
    """

    prompt: str
    targets: tuple[Target, ...] = ()
    seed: int = 0
    steps: int = 50
    guidance: float | None = None
    negative_prompt: str = ""
    height: int | None = None
    width: int | None = None
    scheduler: str | None = None
    eta: float = 0.0
    guidance_rescale: float = 0.0
    self_max_scale: float = 0.25
    original_size: tuple[int, int] | None = None
    crop: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    model: str | None = None
    version: str = ""

    def __post_init__(self) -> None:
        from . import __version__

        if not isinstance(self.prompt, str):
            raise TypeError(f"the source prompt is a string, not {type(self.prompt).__name__}")
        if not self.prompt.strip():
            raise ValueError('the source prompt is empty; describe the image, e.g. "a cat riding a bicycle"')
        targets = (self.targets,) if isinstance(self.targets, (str, Target)) else tuple(self.targets)
        targets = tuple(t if isinstance(t, Target) else Target.from_json(t) for t in targets)
        object.__setattr__(self, "targets", targets)
        for i, target in enumerate(targets, start=1):
            if target.parent == i:
                raise ValueError(f"target {i} names itself as its parent; use 0 for the source")
            if target.parent > len(targets):
                raise ValueError(
                    f"target {i} names parent {target.parent}, but there are only {len(targets)} "
                    "targets; use 0 for the source or the index of another target"
                )
        _check_no_loops(targets)
        check_seed_and_steps(self.seed, self.steps)
        for name in ("guidance", "eta", "guidance_rescale", "self_max_scale"):
            value = getattr(self, name)
            if value is None and name == "guidance":
                continue
            if not is_real(value):
                raise TypeError(f"{name} must be a number, not {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, not {value!r}")
            object.__setattr__(self, name, float(value))
        if self.guidance is not None and not abs(self.guidance) <= MAX_GUIDANCE:
            raise ValueError(
                f"guidance {self.guidance:g} is out of range: it is a classifier-free guidance scale "
                f"(7.5 in the paper; <= 1 runs without guidance), at most {MAX_GUIDANCE:g} in size"
            )
        for name, meaning in (
            ("eta", "DDIM's eta: 0 is deterministic, 1 as noisy as DDPM"),
            ("guidance_rescale", "the share of rescaled guidance (0: off; 0.7 in Lin et al.)"),
            ("self_max_scale", "a fraction of the latent side"),
        ):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is {meaning}, in [0, 1], not {getattr(self, name):g}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < 1):
                raise ValueError(f"{name} must be a positive number of pixels or None, not {value!r}")
        if not isinstance(self.negative_prompt, str):
            raise TypeError(f"negative_prompt is a string, not {type(self.negative_prompt).__name__}")
        if self.scheduler is not None and (not isinstance(self.scheduler, str) or not self.scheduler):
            raise TypeError(
                f"scheduler is a diffusers scheduler class name, 'pipeline' or None (the model's default), "
                f"not {self.scheduler!r}"
            )
        for name in ("original_size", "crop", "target_size"):
            value = getattr(self, name)
            if value is None and name != "crop":
                continue
            what = "(top, left) in pixels, each >= 0" if name == "crop" else "(height, width) in pixels, each >= 1"
            low = 0 if name == "crop" else 1
            if (
                not isinstance(value, (tuple, list))
                or len(value) != 2
                or any(not is_int(v) or not low <= v <= MAX_SIDE for v in value)
            ):
                raise ValueError(f"{name} is {what} (at most {MAX_SIDE}), not {value!r}")
            object.__setattr__(self, name, (int(value[0]), int(value[1])))
        if isinstance(self.model, os.PathLike):  # a folder: recorded as its path's text
            object.__setattr__(self, "model", os.fspath(self.model))
        if self.model is not None and not isinstance(self.model, str):
            raise TypeError(f"model is a hub id or a folder (text) or None, not {self.model!r}")
        if not isinstance(self.version, str):
            raise TypeError(f"version is the p2p_widgets version that wrote the recipe (text), not {self.version!r}")
        if not self.version:
            object.__setattr__(self, "version", __version__)

    @property
    def prompts(self) -> tuple[str, ...]:
        return (self.prompt, *(t.prompt for t in self.targets))

    def parents(self) -> tuple[int, ...]:
        """The parent of every branch; the source (branch 0) is its own root: -1."""
        return (-1, *(t.parent for t in self.targets))

    def replace(self, **changes: Any) -> Recipe:
        """A copy with some fields changed (validated again)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data.update(changes)
        return Recipe(**data)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["targets"] = [t.to_json() for t in self.targets]
        return data

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        """A recipe from its JSON form (:meth:`to_dict`); the one strict schema every loader
        uses: known fields only, each of its type, targets a list.

        Raises:
            ValueError: naming the field and the problem (TypeErrors included, as a
                recipe file's content is data, not a call).
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"this is not a recipe: expected a JSON object, not {_kind(data)}")
        try:
            data = _known(cls, data)
            _check_version(data.get("version", ""))
            if "prompt" not in data:
                raise ValueError('the recipe has no "prompt" (the source prompt)')
            targets = data.get("targets", [])
            if not isinstance(targets, (list, tuple)):
                raise ValueError(f'"targets" is a list of targets (prompt strings or objects), not {_kind(targets)}')
            parsed = []
            for number, target in enumerate(targets, start=1):
                try:
                    parsed.append(Target.from_json(target))
                except (TypeError, ValueError) as error:
                    raise ValueError(f"target {number}: {error}") from None
            data["targets"] = tuple(parsed)
            return cls(**data)
        except TypeError as error:
            raise ValueError(f"this recipe is not valid: {error}") from None

    @classmethod
    def from_json(cls, text: str | bytes) -> Recipe:
        """A recipe from JSON text (see :meth:`from_dict`).

        Raises:
            ValueError: invalid JSON, too large or too deeply nested, or not a valid recipe.
        """
        if isinstance(text, (bytes, bytearray)):
            try:
                text = bytes(text).decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError("this is not a recipe: the text is not UTF-8") from None
        if not isinstance(text, str):
            raise TypeError(f"Recipe.from_json takes JSON text, not {type(text).__name__}")
        if len(text) > MAX_RECIPE_CHARS:
            raise ValueError(
                f"this is not a recipe: {len(text):,} characters of JSON, "
                f"more than the {MAX_RECIPE_CHARS:,} a recipe may have"
            )
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"this is not a recipe: invalid JSON ({error})") from None
        except RecursionError:
            raise ValueError("this is not a recipe: its JSON is nested too deeply") from None
        if not isinstance(data, dict):
            raise ValueError(f"this is not a recipe: expected a JSON object, not {_kind(data)}")
        try:
            return cls.from_dict(data)
        except RecursionError:
            raise ValueError("this is not a recipe: its JSON is nested too deeply") from None


def check_seed_and_steps(seed: Any, steps: Any) -> None:
    """Raise a clear error unless ``seed`` is an integer in ``[0, 2**63)`` and ``steps``
    a positive one (at most :data:`MAX_STEPS`)."""
    for name, value in (("seed", seed), ("steps", steps)):
        if not is_int(value):
            raise TypeError(f"{name} must be an integer, not {value!r}")
    if not 0 <= seed < MAX_SEED:
        raise ValueError(f"seed must be from 0 to 2**63 - 1 (a torch generator seed), not {seed}")
    if not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be at least 1 and at most {MAX_STEPS} (50 in the paper), not {steps}")


def _check_version(version: Any) -> None:
    """Refuse a recipe written by a newer p2p_widgets (its fields may mean more than ours)."""
    from . import __version__

    if version in ("", None):
        return
    if not isinstance(version, str):
        raise ValueError(f'"version" is the p2p_widgets version that wrote the recipe (text), not {version!r}')
    from packaging.version import InvalidVersion, Version

    try:
        written = Version(version)
    except InvalidVersion:
        raise ValueError(f'"version" {version!r} is not a p2p_widgets version number (e.g. "0.1.0")') from None
    if written > Version(__version__):
        raise ValueError(
            f"this recipe was written by p2p_widgets {version}, newer than this one ({__version__}); "
            "upgrade to re-run it: pip install -U p2p-widgets"
        )


def _kind(value: Any) -> str:
    """How a JSON value reads in an error message."""
    names = {str: "a string", list: "a list", dict: "an object", bool: "true/false", type(None): "null"}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"the number {value!r}"
    return names.get(type(value), type(value).__name__) + (
        f" {value!r}" if isinstance(value, str) and len(value) < 40 else ""
    )


def _check_no_loops(targets: tuple[Target, ...]) -> None:
    parents = (-1, *(t.parent for t in targets))
    for start in range(1, len(parents)):
        seen, branch = [start], parents[start]
        while branch > 0:
            if branch in seen:
                chain = " -> ".join(str(b) for b in (*seen, branch))
                raise ValueError(
                    f"the parents of target {start} form a loop ({chain}); every chain of "
                    "parents must end at the source (0)"
                )
            seen.append(branch)
            branch = parents[branch]


def _known(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` restricted to ``cls``'s fields, with a clear error for unknown keys."""
    if not isinstance(data, Mapping):
        raise TypeError(f"expected a JSON object for {cls.__name__}, not {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(
            f"unknown {cls.__name__} field(s): {', '.join(unknown)}; known fields: {', '.join(sorted(names))}"
        )
    return dict(data)
