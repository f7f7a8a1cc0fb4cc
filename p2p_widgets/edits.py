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
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Mapping, Union

__all__ = [
    "Window",
    "CrossWindow",
    "LocalBlend",
    "Target",
    "Recipe",
    "WindowLike",
    "CrossWindowLike",
]

WindowLike = Union["Window", float, int, tuple, list]
CrossWindowLike = Union["CrossWindow", WindowLike, Mapping[str, WindowLike]]


def _fraction(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
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
                f"a window's start ({self.start}) is after its end ({self.end}); "
                "give (start, end) with start <= end"
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
            return cls(value["start"], value["end"])
        return cls(0.0, _fraction(value, "a window"))

    def steps(self, total: int) -> range:
        """The step indices inside the window for a run of ``total`` steps."""
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
    words: tuple[tuple[str, Window], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "default", Window.parse(self.default))
        words = self.words.items() if isinstance(self.words, Mapping) else self.words
        parsed = []
        for word, window in words:
            if not isinstance(word, (str, int)) or isinstance(word, bool) or word == "":
                raise ValueError(f"a per-word window needs a word, not {word!r}")
            parsed.append((word, Window.parse(window)))
        object.__setattr__(self, "words", tuple(parsed))

    @classmethod
    def parse(cls, value: CrossWindowLike) -> CrossWindow:
        if isinstance(value, CrossWindow):
            return value
        if isinstance(value, Mapping) and not {"start", "end"} >= set(value):
            value = dict(value)
            default = value.pop("default_", 1.0)
            return cls(Window.parse(default), tuple(value.items()))
        return cls(Window.parse(value))

    def to_json(self) -> Any:
        if not self.words:
            return self.default.to_json()
        return {"default_": self.default.to_json(), **{str(w): win.to_json() for w, win in self.words}}


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

    words: tuple[str, ...]
    parent_words: tuple[str, ...] | None = None
    threshold: float = 0.3
    dilation: int = 1
    start: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "words", _words(self.words, "LocalBlend.words"))
        if self.parent_words is not None:
            object.__setattr__(
                self, "parent_words", _words(self.parent_words, "LocalBlend.parent_words", empty_ok=True)
            )
        if not self.words and not self.parent_words:
            raise ValueError("LocalBlend needs at least one word, e.g. LocalBlend(('cat',))")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise TypeError(f"the blend threshold must be a number, not {self.threshold!r}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"the blend threshold must be between 0 and 1 (exclusive), not {self.threshold}")
        object.__setattr__(self, "threshold", float(self.threshold))
        if isinstance(self.dilation, bool) or not isinstance(self.dilation, int) or self.dilation < 0:
            raise ValueError(f"the blend dilation is a max-pool radius (0, 1, 2, ...), not {self.dilation!r}")
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
        return cls(**_known(cls, data))


def _words(value: Any, what: str, empty_ok: bool = False) -> tuple:
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, (tuple, list)):
        raise TypeError(f"{what} is a list of words, not {value!r}")
    for word in value:
        if isinstance(word, bool) or not isinstance(word, (str, int)) or word == "":
            raise ValueError(f"{what} holds words (text or word index), not {word!r}")
    if not value and not empty_ok:
        raise ValueError(f"{what} is empty; name at least one word")
    return tuple(value)


@dataclass(frozen=True)
class Target:
    """One edited branch. See the module docstring for the fields."""

    prompt: str
    parent: int = 0
    kind: Literal["auto", "swap", "refine"] = "auto"
    cross: CrossWindow = field(default_factory=CrossWindow)
    self_attn: Window = field(default_factory=lambda: Window(0.0, 0.4))
    reweight: tuple[tuple[str, float], ...] = ()
    reweight_window: Window | None = None
    preserve: tuple[str, ...] = ()
    blend: LocalBlend | None = None
    values: Window = field(default_factory=lambda: Window(0.0, 0.0))
    value_beta: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise TypeError(f"a target's prompt is a string, not {type(self.prompt).__name__}")
        if not self.prompt.strip():
            raise ValueError('a target\'s prompt is empty; give the edited prompt, e.g. "a dog riding a bicycle"')
        if isinstance(self.parent, bool) or not isinstance(self.parent, int) or self.parent < 0:
            raise ValueError(
                f"parent is a branch index (0 = the source, k = the k-th target), not {self.parent!r}"
            )
        if self.kind not in ("auto", "swap", "refine"):
            raise ValueError(f"kind must be 'auto', 'swap' or 'refine', not {self.kind!r}")
        object.__setattr__(self, "cross", CrossWindow.parse(self.cross))
        object.__setattr__(self, "self_attn", Window.parse(self.self_attn))
        object.__setattr__(self, "values", Window.parse(self.values))
        beta = self.value_beta
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1.0:
            raise ValueError(f"value_beta is the parent's share of the values, a number from 0 to 1, not {beta!r}")
        object.__setattr__(self, "value_beta", float(beta))
        if self.reweight_window is not None:
            object.__setattr__(self, "reweight_window", Window.parse(self.reweight_window))
        pairs = self.reweight.items() if isinstance(self.reweight, Mapping) else self.reweight
        weights = []
        for word, scale in pairs:
            if isinstance(word, bool) or not isinstance(word, (str, int)) or word == "":
                raise ValueError(f"reweight maps words to scales, not {word!r}")
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
                raise ValueError(f"the weight of {word!r} must be a finite number, not {scale!r}")
            weights.append((word, float(scale)))
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
        if isinstance(data, str):
            return cls(data)
        data = _known(cls, data)
        if "reweight" in data:
            data["reweight"] = tuple(tuple(pair) for pair in data["reweight"])
        return cls(**data)


_SCHEDULER_DEFAULT = "DDIMScheduler"


@dataclass(frozen=True)
class Recipe:
    """Everything that determines a run's images.

    Args:
        prompt: the source prompt.
        targets: the edited branches (``Target`` or plain prompt strings).
        seed: seeds the initial noise, drawn on the CPU so it is the same on any device.
        steps: diffusion steps (50 in the paper).
        guidance: classifier-free guidance scale; <= 1 runs without an unconditional half.
        negative_prompt: the unconditional prompt ("" = the pipeline's default).
        height, width: image size in pixels (None: the model's default size).
        scheduler: a diffusers scheduler class name built from the pipeline's scheduler
            config, or "pipeline" for the pipeline's own scheduler as it is.
        eta: DDIM's eta (0: deterministic).
        guidance_rescale: rescale of the guided prediction (0: off).
        self_max_scale: self-attention is injected only in layers whose feature map side
            is at most this fraction of the latent side (0.25: the paper's 16x16 maps at
            512 px; 1.0: every layer).
        model: the model's hub id or path, recorded for reference.
        version: the p2p_widgets version that wrote the recipe.
    """

    prompt: str
    targets: tuple[Target, ...] = ()
    seed: int = 0
    steps: int = 50
    guidance: float = 7.5
    negative_prompt: str = ""
    height: int | None = None
    width: int | None = None
    scheduler: str = _SCHEDULER_DEFAULT
    eta: float = 0.0
    guidance_rescale: float = 0.0
    self_max_scale: float = 0.25
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
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(f"{name} must be a finite number, not {value!r}")
            object.__setattr__(self, name, float(value))
        if not 0.0 <= self.self_max_scale <= 1.0:
            raise ValueError(f"self_max_scale is a fraction of the latent side in [0, 1], not {self.self_max_scale}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive number of pixels or None, not {value!r}")
        if not isinstance(self.negative_prompt, str):
            raise TypeError(f"negative_prompt is a string, not {type(self.negative_prompt).__name__}")
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
        data = _known(cls, data)
        data["targets"] = tuple(Target.from_json(t) for t in data.get("targets", ()))
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"this is not a recipe: invalid JSON ({error})") from None
        if not isinstance(data, dict):
            raise ValueError("this is not a recipe: expected a JSON object")
        return cls.from_dict(data)


def check_seed_and_steps(seed: Any, steps: Any) -> None:
    """Raise a clear error unless ``seed`` is an integer and ``steps`` a positive one."""
    for name, value in (("seed", seed), ("steps", steps)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an integer, not {value!r}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, not {steps}")


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

