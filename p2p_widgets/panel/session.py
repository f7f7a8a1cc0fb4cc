"""The panel's engine room: settings, runs in a background thread, history, heatmap frames.

A :class:`Session` owns the pipeline, the run thread and the history, and hands out plain
values: frozen settings, PIL images, PNG bytes. The widget view (``view.py``) only turns
clicks into session calls and redraws from the session's state, so everything the panel
does can be driven from code::

    session = Session(pipe, Settings(source="a big red circle on a black background"))
    session.set_edit(1, prompt="a big blue circle on a black background")
    session.choose(1, "blue", weight=2.0)
    session.run(wait=True)
    session.set_step(10)
    session.heatmap_image()

State changes by replacement: :attr:`Session.state` is a frozen :class:`State`, swapped
whole on every change, and every observer is called with the new state once per change.
Errors (bad prompts, words not found, out of memory, a cancelled run) become
``state.error``, a readable message; the history is never touched by a failed run. A new
error replaces the one before; a valid change or a finished run clears it. A word's
setting dropped because its word left a prompt is said in ``state.message``.
"""

from __future__ import annotations

import dataclasses
import difflib
import io
import math
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from PIL import Image

from ..checks import is_int, is_real
from ..edits import CrossWindow, LocalBlend, Recipe, Target, Window, check_seed_and_steps
from ..engine import Cancelled, Progress, Result, run, vae_factor
from ..families import Family, family_of
from ..files import read_recipe, recipe_from_bytes, save_result
from ..prompts import Word, infer_kind, tokenize

if TYPE_CHECKING:
    from ..plot import Scrubber  # plot loads matplotlib: imported where a scrubber is first made

__all__ = ["WordChoice", "EditRow", "Settings", "Entry", "View", "State", "Session", "KINDS"]

KINDS: tuple[str, ...] = ("auto", "swap", "refine")
Status = Literal["idle", "running", "done", "error", "cancelled"]
Mode = Literal["heatmaps", "difference"]

_WEIGHT_RANGE = (-2.0, 5.0)  # the re-weight slider's range; code may go beyond it
_THUMBNAIL = 96  # history thumbnails: height in pixels
_TILE = (128, 192)  # heatmap tiles: this many pixels high at least / at most
_DISPLAY = (160, 320)  # the run's images: this many pixels high at least / at most
_FRAME_CACHE = 256  # encoded heatmap frames kept (PNG bytes)
_RECIPE_DEFAULTS = {  # recipe fields the panel has no input for, with the values it runs with
    f.name: f.default
    for f in dataclasses.fields(Recipe)
    if f.name in ("negative_prompt", "scheduler", "eta", "guidance_rescale", "self_max_scale")
}


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class WordChoice:
    """What to do with one word of an edited prompt.

    ``weight``: scale of the word's cross-attention (1 = unchanged; negative allowed);
    ``preserve``: inject this word's maps from the source (object preservation: only the
    preserved words are injected); ``local``: confine the edit to where this word attends
    (local blending).
    """

    weight: float = 1.0
    preserve: bool = False
    local: bool = False

    def __post_init__(self) -> None:
        if not is_real(self.weight) or self.weight != self.weight:
            raise ValueError(f"a word's weight is a number (1 = unchanged), not {self.weight!r}")
        object.__setattr__(self, "weight", float(self.weight))
        object.__setattr__(self, "preserve", bool(self.preserve))
        object.__setattr__(self, "local", bool(self.local))

    @property
    def is_default(self) -> bool:
        return self.weight == 1.0 and not self.preserve and not self.local

    def badge(self) -> str:
        """A short mark for a word chip: ``x2``, ``keep``, ``local``."""
        marks = []
        if self.weight != 1.0:
            marks.append(f"x{self.weight:g}")
        if self.preserve:
            marks.append("keep")
        if self.local:
            marks.append("local")
        return " ".join(marks)


@dataclass(frozen=True)
class EditRow:
    """One edited prompt: its text ("" = the source prompt, for pure re-weighting), its
    edit kind and the choices on its words, by word index."""

    prompt: str = ""
    kind: str = "auto"
    words: tuple[tuple[int, WordChoice], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise TypeError(f"an edited prompt is a string, not {type(self.prompt).__name__}")
        if self.kind not in KINDS:
            raise ValueError(f"the edit kind is one of {', '.join(KINDS)}, not {self.kind!r}")

    def choice(self, word: int) -> WordChoice:
        return dict(self.words).get(word, WordChoice())


@dataclass(frozen=True)
class Settings:
    """Everything the panel's inputs hold. ``size`` is (height, width) or None for the
    model's default; ``cross``, ``self_attn`` and ``values`` (value injection, CL P2P) are
    (start, end) fractions of the steps; ``value_beta`` is the parent's share of the
    injected values; ``threshold`` is the local-blend threshold k (0: no blending, as in
    the CL P2P report's optimised preset)."""

    source: str = ""
    edits: tuple[EditRow, ...] = (EditRow(),)
    seed: int = 0
    steps: int = 50
    guidance: float = 7.5
    size: tuple[int, int] | None = None
    cross: tuple[float, float] = (0.0, 0.8)
    self_attn: tuple[float, float] = (0.0, 0.4)
    threshold: float = 0.3
    values: tuple[float, float] = (0.0, 0.0)
    value_beta: float = 1.0
    chain: tuple[Target, ...] = ()  # conversational editing: P1 .. Pk, each editing the one before

    def __post_init__(self) -> None:
        if not isinstance(self.source, str):
            raise TypeError(f"the source prompt is a string, not {type(self.source).__name__}")
        object.__setattr__(self, "edits", tuple(self.edits))
        check_seed_and_steps(self.seed, self.steps)
        if not is_real(self.guidance) or not math.isfinite(self.guidance):
            raise TypeError(f"guidance must be a finite number, not {self.guidance!r}")
        for name in ("cross", "self_attn", "values"):
            window = Window.parse(getattr(self, name))  # validates
            object.__setattr__(self, name, (window.start, window.end))
        if self.size is not None:
            size = tuple(self.size)
            if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
                raise ValueError(f"size is (height, width) in pixels or None, not {self.size!r}")
            object.__setattr__(self, "size", size)
        chain = tuple(self.chain)
        for i, step in enumerate(chain):
            if not isinstance(step, Target) or step.parent != i:
                raise ValueError(f"chain step {i + 1} must be a Target editing step {i} (parent {i})")
        object.__setattr__(self, "chain", chain)
        if self.threshold != 0:  # 0: no blending
            LocalBlend(("x",), threshold=self.threshold)  # validates the threshold
        object.__setattr__(self, "value_beta", Target("x", value_beta=self.value_beta).value_beta)  # validates

    def target(self, row: int) -> Target:
        """The :class:`Target` of edit row ``row`` (1-based, as branches are)."""
        edit = self.edits[row - 1]
        reweight = tuple((word, c.weight) for word, c in edit.words if c.weight != 1.0)
        preserve = tuple(word for word, c in edit.words if c.preserve)
        local = tuple(word for word, c in edit.words if c.local)
        return Target(
            edit.prompt.strip() or self.head,
            parent=len(self.chain),
            kind=edit.kind,
            cross=CrossWindow(Window(*self.cross)),
            self_attn=Window(*self.self_attn),
            reweight=reweight,
            preserve=preserve,
            blend=LocalBlend(local, threshold=self.threshold) if local and self.threshold > 0 else None,
            values=Window(*self.values),
            value_beta=self.value_beta,
        )

    @property
    def head(self) -> str:
        """The prompt the edit rows edit: the chain's last step, or the source."""
        return self.chain[-1].prompt if self.chain else self.source

    @property
    def first_row_branch(self) -> int:
        """The branch of edit row 1 in the run (after the chain's steps)."""
        return len(self.chain) + 1

    def recipe(self, model: str | None = None, extra: tuple[Target, ...] = ()) -> Recipe:
        """The run's recipe (the chain, then the edit rows, then ``extra``). Raises
        ValueError naming the problem (empty prompt, ...)."""
        height, width = self.size if self.size is not None else (None, None)
        return Recipe(
            self.source,
            (*self.chain, *(self.target(row) for row in range(1, len(self.edits) + 1)), *extra),
            seed=self.seed,
            steps=self.steps,
            guidance=self.guidance,
            height=height,
            width=width,
            model=model,
        )

    @classmethod
    def from_recipe(cls, recipe: Recipe, family: Family | None = None) -> tuple[Settings, tuple[str, ...]]:
        """The panel settings of a recipe, and notes on what the panel cannot show (it
        has one cross window, one self window and one blend threshold for all edits, and
        edits whose parent is the source; no negative prompt, scheduler, eta, guidance
        rescale or self-injection scale). A word that is not in its prompt raises
        ValueError naming it: the panel could only drop it. ``family``: the model family
        the panel runs (its defaults fill in what the recipe leaves open)."""
        notes: list[str] = []
        targets = recipe.targets
        split = next(  # a chain P1 .. Pk (each editing the one before), then edits of Pk
            (
                k
                for k in range(len(targets) - 1, 0, -1)
                if all(t.parent == i for i, t in enumerate(targets[:k])) and all(t.parent == k for t in targets[k:])
            ),
            0,
        )
        chain, targets = targets[:split], targets[split:]
        first = targets[0] if targets else Target(recipe.prompt)
        rows = []
        for i, target in enumerate(targets, start=1):
            words: dict[int, WordChoice] = {}
            where = f"target {split + i}"  # as the recipe file numbers it
            for word, weight in target.reweight:
                for k in _word_indices(word, target.prompt, f"{where} re-weights"):
                    words[k] = dataclasses.replace(words.get(k, WordChoice()), weight=weight)
            for word in target.preserve:
                for k in _word_indices(word, target.prompt, f"{where} preserves"):
                    words[k] = dataclasses.replace(words.get(k, WordChoice()), preserve=True)
            if target.blend is not None:
                for word in target.blend.words:
                    for k in _word_indices(word, target.prompt, f"{where} blends on"):
                        words[k] = dataclasses.replace(words.get(k, WordChoice()), local=True)
                if target.blend.parent_words is not None or target.blend.dilation != 1 or target.blend.start:
                    notes.append(f"edit {i}: the blend's parent words, dilation and start are not shown; defaults used")
            if target.parent != split:
                notes.append(f"edit {i}: its parent {target.parent} is not shown; it edits the source here")
            if target.cross.words:
                notes.append(f"edit {i}: per-word cross windows are not shown; one window used")
            if target.reweight_window is not None:
                notes.append(f"edit {i}: the separate re-weight window is not shown; the cross window used")
            if (target.cross.default, target.self_attn, target.values, target.value_beta) != (
                first.cross.default,
                first.self_attn,
                first.values,
                first.value_beta,
            ):
                notes.append(
                    f"edit {i}: its windows or value beta differ from edit 1's; the panel uses edit 1's for all"
                )
            rows.append(EditRow(target.prompt, target.kind, tuple(sorted(words.items()))))
        blends = [t.blend.threshold for t in targets if t.blend is not None]
        if len(set(blends)) > 1:
            notes.append("the edits use different blend thresholds; the panel uses the first for all")
        defaults = dict(_RECIPE_DEFAULTS)
        same_scheduler: set[str | None] = {None}
        if family is not None:
            same_scheduler |= {family.default_scheduler, family.default_scheduler_class()}
        if recipe.scheduler in same_scheduler:
            defaults.pop("scheduler")
        elif family is not None:
            defaults["scheduler"] = family.default_scheduler_class()
        for name, default in defaults.items():  # run settings the panel has no input for
            if getattr(recipe, name) != default:
                notes.append(
                    f"the recipe's {name} {getattr(recipe, name)!r} is not shown; the panel runs with {default!r}"
                )
        size = None if recipe.height is None or recipe.width is None else (recipe.height, recipe.width)
        settings = cls(
            source=recipe.prompt,
            edits=tuple(rows) or (EditRow(),),
            seed=recipe.seed,
            steps=recipe.steps,
            guidance=recipe.guidance if recipe.guidance is not None else family.default_guidance if family else 7.5,
            size=size,
            cross=(first.cross.default.start, first.cross.default.end),
            self_attn=(first.self_attn.start, first.self_attn.end),
            threshold=blends[0] if blends else 0.3,
            values=(first.values.start, first.values.end),
            value_beta=first.value_beta,
            chain=chain,
        )
        return settings, tuple(notes)


def tokenize_words(text: str) -> tuple[Word, ...]:
    """The words of a prompt as the panel splits them, without a tokenizer (for recipes)."""
    from ..prompts import _WORD

    return tuple(Word(m.group(0), i, 0, 0) for i, m in enumerate(_WORD.finditer(text)))


def _word_indices(word: str | int, text: str, what: str) -> list[int]:
    """The word indices a recipe's word means in ``text``, as the engine finds them: an
    index, or every occurrence of a word or phrase (case aside). A word that is not
    there raises ValueError naming it: the panel could only drop it, and the recipe
    would not run anyway."""
    words = tokenize_words(text)
    listing = ", ".join(w.text for w in words)
    if isinstance(word, int):
        if 0 <= word < len(words):
            return [word]
        raise ValueError(
            f"{what} word {word}, but {text!r} has {len(words)} words ({listing}); "
            "correct the word index or the prompt in the recipe"
        )
    wanted = [w.text.lower() for w in tokenize_words(word)]
    lowered = [w.text.lower() for w in words]
    found = {
        start + k
        for start in range(len(lowered) - len(wanted) + 1)
        if wanted and lowered[start : start + len(wanted)] == wanted
        for k in range(len(wanted))
    }
    if not found:
        raise ValueError(
            f"{what} {word!r}, which is not in {text!r}; its words are: {listing}; "
            "correct the word or the prompt in the recipe"
        )
    return sorted(found)


# --------------------------------------------------------------------------- state
@dataclass(frozen=True)
class Entry:
    """A finished run in the history: its number (1, 2, ...), settings, result, duration
    and a thumbnail (the images side by side)."""

    number: int
    settings: Settings
    result: Result
    seconds: float
    thumbnail: Image.Image = field(repr=False, compare=False)
    cycle: Any = None  # a study.CycleScore when the run was a cycle


@dataclass(frozen=True)
class View:
    """What the output area shows: a history entry, a branch, a step (None = averaged
    over all steps), a resolution (None = all aggregated), overlay on the image or raw
    maps, and heatmaps or the difference image."""

    entry: int | None = None
    branch: int = 0
    step: int | None = None
    factor: int | None = None
    overlay: bool = True
    mode: Mode = "heatmaps"


@dataclass(frozen=True)
class State:
    """The whole panel state, replaced whole on every change."""

    settings: Settings = field(default_factory=Settings)
    selected: tuple[int, int] | None = None  # (row, word index); row 0 is the source
    status: Status = "idle"
    message: str = ""
    error: str | None = None
    step: int = 0  # steps done in the current run
    steps: int = 0
    preview: tuple[Image.Image, ...] | None = field(default=None, repr=False, compare=False)
    history: tuple[Entry, ...] = ()
    view: View = field(default_factory=View)

    @property
    def running(self) -> bool:
        return self.status == "running"

    @property
    def entry(self) -> Entry | None:
        """The history entry shown, or None."""
        for entry in self.history:
            if entry.number == self.view.entry:
                return entry
        return None


Observer = Callable[[State], None]


def _os_message(error: OSError) -> str:
    """An OSError's message without the ``[Errno n]`` prefix (its file named)."""
    text = str(error)
    if text.startswith("[Errno") and error.strerror:
        text = error.strerror + (f": {error.filename}" if error.filename is not None else "")
    return text or type(error).__name__


def _readable(error: BaseException) -> str:
    """A message for the panel: what went wrong and what to do."""
    text = str(error) or type(error).__name__
    if isinstance(error, MemoryError) or "out of memory" in text.lower():
        return (
            f"out of memory ({text.splitlines()[0]}); try fewer edits, fewer steps or a smaller size, "
            "or a half-precision pipeline"
        )
    if isinstance(error, (ValueError, TypeError, KeyError, FileNotFoundError)):
        return text
    return f"{type(error).__name__}: {text}"


# --------------------------------------------------------------------------- session
class Session:
    """Runs, history and views for one pipeline (see the module docstring).

    Args:
        pipe: a Stable Diffusion pipeline.
        settings: the initial settings (default: empty prompts, the model's size).
        preview_every: decode a live preview every this many steps (0: none).
        model: the model's name for recipes (default: the pipeline's name or path).
    """

    kinds = KINDS
    weight_range = _WEIGHT_RANGE

    def __init__(
        self, pipe: Any, settings: Settings | None = None, *, preview_every: int = 5, model: str | None = None
    ):
        for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            if getattr(pipe, name, None) is None:
                raise ValueError(f"the panel needs a Stable Diffusion pipeline; this one has no {name}")
        self.pipe = pipe
        self.model = model or getattr(getattr(pipe, "config", None), "_name_or_path", None) or None
        self.preview_every = preview_every
        self._state = State(settings=settings or Settings(guidance=family_of(pipe).default_guidance))
        self._observers: list[Observer] = []
        self._lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._cancel = threading.Event()
        self._render_lock = threading.RLock()  # the frame caches are shared by the run thread and the UI
        self._scrubbers: OrderedDict[tuple, Any] = OrderedDict()
        self._frames: OrderedDict[tuple, bytes] = OrderedDict()

    # -- state ------------------------------------------------------------------------
    @property
    def state(self) -> State:
        return self._state

    @property
    def settings(self) -> Settings:
        return self._state.settings

    def observe(self, observer: Observer) -> None:
        """Call ``observer(state)`` after every change (from the thread that changed it)."""
        self._observers.append(observer)

    def unobserve(self, observer: Observer) -> None:
        self._observers.remove(observer)

    def _replace(self, **changes: Any) -> State:
        with self._lock:
            old = self._state
            if (
                changes.get("error", old.error) is None
                and old.error is not None
                and "message" not in changes
                and old.message == old.error
            ):
                changes["message"] = ""  # an error cleared leaves no trace of itself in the status line
            self._state = dataclasses.replace(old, **changes)
            state = self._state
        for observer in list(self._observers):
            observer(state)
        return state

    def report(self, error: BaseException | str) -> None:
        """Show an error (an exception or a message) in the panel's status line; it
        replaces any error shown before."""
        message = error if isinstance(error, str) else _readable(error)
        self._replace(error=message, message=message)

    # -- settings ---------------------------------------------------------------------
    def update(self, **changes: Any) -> bool:
        """Change settings fields (seed, steps, guidance, size, cross, self_attn, values,
        value_beta, threshold, source). Returns False and sets ``state.error`` on bad
        values, leaving the settings as they were. A new source keeps the word choices of
        edit rows that follow it (empty prompt) on their words; those whose word is gone
        are named in ``state.message``."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(Settings)} - {"edits"})
        if unknown:
            self.report(
                f"unknown setting(s) {', '.join(unknown)}; settings: "
                f"{', '.join(f.name for f in dataclasses.fields(Settings))}"
            )
            return False
        try:
            settings = dataclasses.replace(self.settings, **changes)
        except (ValueError, TypeError) as error:
            self.report(error)
            return False
        selected = self.state.selected
        dropped: tuple[str, ...] = ()
        if "source" in changes or "chain" in changes:
            settings, selected, dropped = _keep_choices(settings, self.settings, selected)
        self._settle(settings, selected, dropped)
        return True

    def _settle(self, settings: Settings, selected: tuple[int, int] | None, dropped: tuple[str, ...] = ()) -> None:
        """Take valid new settings: any error is cleared, and word settings dropped
        because their word left a prompt are reported (never silently lost)."""
        changes: dict[str, Any] = dict(settings=settings, selected=selected, error=None)
        if dropped:
            changes["message"] = "; ".join(dropped)
        self._replace(**changes)

    def apply_preset(self, name: str) -> bool:
        """Set the windows and the blend threshold to a CL P2P preset ("literature" or
        "optimised", see :mod:`p2p_widgets.study`). Returns False (``state.error`` set) for
        an unknown name."""
        from ..study import preset

        try:
            chosen = preset(name)
        except ValueError as error:
            self.report(error)
            return False
        return self.update(cross=(0.0, chosen.cross), self_attn=(0.0, chosen.self_attn), threshold=chosen.k)

    def preset_name(self) -> str | None:
        """The preset the current windows and threshold match, or None (custom)."""
        from ..study import PRESETS

        s = self.settings
        for name, p in PRESETS.items():
            if (s.cross, s.self_attn, s.threshold) == ((0.0, p.cross), (0.0, p.self_attn), p.k):
                return name
        return None

    def new_seed(self) -> int:
        seed = random.SystemRandom().randrange(2**31)
        self.update(seed=seed)
        return seed

    def add_edit(self, prompt: str = "", kind: str = "auto") -> int:
        """Add an edited prompt; returns its row (= branch) number."""
        self.update(edits=(*self.settings.edits, EditRow(prompt, kind)))
        return len(self.settings.edits)

    def remove_edit(self, row: int) -> None:
        self._check_row(row, edits_only=True)
        if len(self.settings.edits) == 1:
            self.update(edits=(EditRow(),))
        else:
            self.update(edits=tuple(e for i, e in enumerate(self.settings.edits, start=1) if i != row))
        selected = self.state.selected
        if selected is not None and selected[0] >= row:
            self._replace(selected=None)

    def set_edit(self, row: int, prompt: str | None = None, kind: str | None = None) -> bool:
        """Change edit row ``row`` (1-based; ``add_edit`` first if it does not exist).
        Word choices follow their words (same text) to where they are in the new prompt;
        a choice whose word is gone is dropped and named in ``state.message``."""
        self._check_row(row, edits_only=True)
        old = self.settings.edits[row - 1]
        try:
            new = EditRow(old.prompt if prompt is None else prompt, old.kind if kind is None else kind, old.words)
        except (ValueError, TypeError) as error:
            self.report(error)
            return False
        selected = self.state.selected
        dropped: tuple[str, ...] = ()
        if prompt is not None and prompt != old.prompt:
            head = self.settings.head
            words, moved, dropped = _carry(
                old.words, tokenize_words(old.prompt or head), tokenize_words(new.prompt or head), f"edit {row}"
            )
            new = dataclasses.replace(new, words=words)
            if selected is not None and selected[0] == row:
                selected = (row, moved[selected[1]]) if selected[1] in moved else None
        edits = list(self.settings.edits)
        edits[row - 1] = new
        self._settle(dataclasses.replace(self.settings, edits=tuple(edits)), selected, dropped)
        return True

    def _check_row(self, row: int, edits_only: bool = False) -> None:
        low = 1 if edits_only else 0
        if not is_int(row) or not low <= row <= len(self.settings.edits):
            what = "an edit row" if edits_only else "a row (0 = the source)"
            raise ValueError(f"{what} is {low}..{len(self.settings.edits)}, not {row!r}")

    def _words_of(self, text: str) -> tuple[Word, ...]:
        try:
            return tokenize(self.pipe.tokenizer, text).words
        except ValueError:
            return ()

    def words(self, row: int) -> tuple[Word, ...]:
        """The words of a row's prompt as the model tokenises them (row 0: the source; an
        empty edited prompt: the prompt it edits, the chain's last step or the source)."""
        self._check_row(row)
        text = self.settings.source if row == 0 else (self.settings.edits[row - 1].prompt or self.settings.head)
        return self._words_of(text)

    def inferred_kind(self, row: int) -> str | None:
        """The kind "auto" picks for an edit row ("swap" or "refine"), or None while a
        prompt is empty or too long."""
        self._check_row(row, edits_only=True)
        try:
            source = tokenize(self.pipe.tokenizer, self.settings.source)
            edit = self.settings.edits[row - 1]
            target = tokenize(self.pipe.tokenizer, edit.prompt or self.settings.head)
        except ValueError:
            return None
        return infer_kind(source, target)

    def select_word(self, row: int, word: int | str) -> Word:
        """Select a word (by index or text) of a row; returns it. The choices of
        :meth:`choose` apply to the selected word of an edit row."""
        self._check_row(row)
        found = self._find_word(row, word)
        self._replace(selected=(row, found.index))
        return found

    def _find_word(self, row: int, word: int | str) -> Word:
        words = self.words(row)
        listing = ", ".join(w.text for w in words) or "(none: the prompt is empty)"
        if isinstance(word, int) and not isinstance(word, bool):
            if 0 <= word < len(words):
                return words[word]
            raise ValueError(f"word {word} does not exist in row {row}; it has {len(words)} words: {listing}")
        matches = [w for w in words if w.text.lower() == str(word).lower()]
        if not matches:
            raise ValueError(f"{word!r} is not in row {row}; its words are: {listing}")
        return matches[0]

    def choose(
        self,
        row: int,
        word: int | str,
        *,
        weight: float | None = None,
        preserve: bool | None = None,
        local: bool | None = None,
    ) -> WordChoice:
        """Set a word's re-weight / preserve / local-edit choice on an edit row; the
        word is selected. Returns the word's new choice."""
        self._check_row(row)
        if row == 0:
            raise ValueError(
                "re-weighting, preserving and local editing apply to an edited prompt; pick the word in an "
                "edit row (leave the edited prompt empty to re-weight the source prompt itself)"
            )
        found = self._find_word(row, word)
        edit = self.settings.edits[row - 1]
        old = edit.choice(found.index)
        new = dataclasses.replace(
            old,
            weight=old.weight if weight is None else weight,
            preserve=old.preserve if preserve is None else preserve,
            local=old.local if local is None else local,
        )
        choices = dict(edit.words)
        if new.is_default:
            choices.pop(found.index, None)
        else:
            choices[found.index] = new
        edits = list(self.settings.edits)
        edits[row - 1] = dataclasses.replace(edit, words=tuple(sorted(choices.items())))
        with self._lock:
            self.update(edits=tuple(edits))
            self._replace(selected=(row, found.index))
        return new

    def _default_size(self) -> tuple[int, int]:
        return family_of(self.pipe).default_size()

    def size_options(self) -> tuple[tuple[str, tuple[int, int] | None], ...]:
        """(label, size) choices for the image size: the model's default first."""
        factor = vae_factor(self.pipe)
        default = self._default_size()[0]
        sides = sorted(
            {max(factor, round(default * scale / factor) * factor) for scale in (0.5, 0.75, 1.5, 2.0)} - {default}
        )
        return ((f"{default}x{default} (model default)", None), *((f"{s}x{s}", (s, s)) for s in sides))

    def recipe(self) -> Recipe:
        """The recipe the next run would use. Raises ValueError naming the problem."""
        return self.settings.recipe(self.model)

    # -- runs -------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._state.running

    def run(self, wait: bool = False, cycle: bool = False) -> bool:
        """Start a run of the current settings in a background thread.

        ``cycle=True`` also runs edit row 1 back to the prompt it edits (same windows) and
        scores the return (:func:`p2p_widgets.study.cycle_score`, kept as ``entry.cycle``).
        Returns False (with ``state.error`` set) when the settings are invalid or a run
        is already going; nothing else changes then. ``wait=True`` returns when done.
        """
        with self._lock:
            if self.running:
                self.report("a run is already going; wait for it or cancel it")
                return False
            try:
                extra: tuple[Target, ...] = ()
                if cycle:
                    from ..study import _way_back

                    settings = self.settings
                    forward = settings.target(1)
                    back = _way_back(
                        self.pipe, settings.head, dataclasses.replace(forward, parent=0), settings.first_row_branch
                    )
                    extra = (back,)
                recipe = self.settings.recipe(self.model, extra)
                from ..control import plan_branches

                plan_branches(recipe, self.pipe.tokenizer)  # word and alignment errors, before starting
            except (ValueError, TypeError) as error:
                self.report(error)
                return False
            self._cancel.clear()
            settings = self.settings
            self._replace(status="running", error=None, message="starting...", step=0, steps=recipe.steps, preview=None)
            back_branch = len(recipe.targets) if cycle else None
            self._thread = threading.Thread(
                target=self._work, args=(recipe, settings, back_branch), name="p2p-run", daemon=True
            )
            self._thread.start()
        if wait:
            self.wait()
        return True

    def _work(self, recipe: Recipe, settings: Settings, back_branch: int | None = None) -> None:
        started = time.perf_counter()

        def progress(p: Progress) -> None:
            changes: dict[str, Any] = dict(step=p.step + 1, steps=p.steps, message=f"step {p.step + 1}/{p.steps}")
            if p.preview is not None:
                changes["preview"] = p.preview
            self._replace(**changes)

        try:
            result = run(self.pipe, recipe, callback=progress, preview_every=self.preview_every, cancel=self._cancel)
            seconds = time.perf_counter() - started
            score, scored = None, ""
            if back_branch is not None:
                from ..study import cycle_score

                score = cycle_score(result, back_branch)
                scored = (
                    f"; cycle back to step {settings.first_row_branch - 1}: "
                    f"PSNR {score.psnr:.1f} dB, SSIM {score.ssim:.3f} "
                    f"(outside the edit {score.psnr_outside:.1f} dB, {score.ssim_outside:.3f})"
                )
            thumbnail = _thumbnail(result.images)
        except Cancelled as stopped:
            self._replace(status="cancelled", message=f"{stopped}; the pipeline is unchanged", error=None, preview=None)
            return
        except BaseException as error:  # shown in the panel; the kernel must not lose it
            message = _readable(error)
            self._replace(status="error", error=message, message=message, preview=None)
            return
        with self._lock:
            number = max((e.number for e in self.state.history), default=0) + 1
            entry = Entry(number, settings, result, seconds, thumbnail, cycle=score)
            view = _view_of(self.state.view, entry, branch=min(settings.first_row_branch, len(result.images) - 1))
            self._replace(
                status="done",
                message=f"run {number} done in {seconds:.1f} s "
                f"({', '.join(result.kinds[1:]) or 'source only'}){scored}",
                error=None,  # a finished run replaces any refusal made while it ran
                history=(*self.state.history, entry),
                view=view,
                preview=None,
            )

    def cancel(self) -> None:
        """Stop the current run at its next step (the pipeline is restored)."""
        if self.running:
            self._cancel.set()
            self._replace(message="cancelling...", error=None)

    def wait(self, timeout: float | None = None) -> State:
        """Block until the current run (if any) has finished; returns the state."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self.state

    # -- history ----------------------------------------------------------------------
    def _entry(self, number: int | None) -> Entry:
        if number is None:
            number = self.state.view.entry
        for entry in self.state.history:
            if entry.number == number:
                return entry
        numbers = ", ".join(str(e.number) for e in self.state.history) or "none yet"
        if number is None:
            raise ValueError(f"no run is shown yet (runs: {numbers}); click Generate first")
        raise ValueError(f"there is no run {number!r} in the history (runs: {numbers})")

    def restore(self, number: int) -> Entry:
        """Show history entry ``number`` and put its settings back in the inputs."""
        entry = self._entry(number)
        view = _view_of(self.state.view, entry, branch=min(self.state.view.branch, len(entry.result.images) - 1))
        self._replace(settings=entry.settings, view=view, selected=None, error=None, message=f"restored run {number}")
        return entry

    def continue_from(self, number: int | None = None, branch: int | None = None) -> Settings:
        """Edit a result further: image ``branch`` of history run ``number`` (default: the
        one shown) becomes the chain's head; one edit row starts with its prompt. The
        chain (P0 -> P1 -> ... -> Pk) is re-run with every later edit, so each step stays
        exactly what it was."""
        entry = self._entry(number)
        branch = self.state.view.branch if branch is None else branch
        recipe = entry.result.recipe
        if not is_int(branch) or not 0 <= branch <= len(recipe.targets):
            raise ValueError(f"run {entry.number} has images 0..{len(recipe.targets)}, not {branch!r}")
        path = []
        while branch != 0:
            path.append(branch)
            branch = recipe.targets[branch - 1].parent
        chain = tuple(dataclasses.replace(recipe.targets[b - 1], parent=i) for i, b in enumerate(reversed(path)))
        settings = dataclasses.replace(
            entry.settings, chain=chain, edits=(EditRow(chain[-1].prompt if chain else recipe.prompt),)
        )
        self._replace(
            settings=settings, selected=None, error=None, message=f"editing step {len(chain)} of the chain further"
        )
        return settings

    def breadcrumb(self) -> tuple[str, ...]:
        """The chain's prompts: the source (step 0), then every step."""
        settings = self.settings
        return (settings.source, *(step.prompt for step in settings.chain))

    def back_to(self, step: int) -> Settings:
        """Go back to chain step ``step`` (0: the source) and edit from there."""
        chain = self.settings.chain
        if not is_int(step) or not 0 <= step <= len(chain):
            raise ValueError(f"the chain has steps 0..{len(chain)}, not {step!r}")
        kept = chain[:step]
        settings = dataclasses.replace(
            self.settings, chain=kept, edits=(EditRow(kept[-1].prompt if kept else self.settings.source),)
        )
        self._replace(settings=settings, selected=None, error=None, message=f"back to step {step} of the chain")
        return settings

    def export(self, folder: str | Path, number: int | None = None) -> list[Path]:
        """Write a run's PNGs (recipe embedded) and recipe JSON, atomically; default the
        run shown. Files already there are never replaced: ``p2p_run1`` becomes
        ``p2p_run1-2``, ... (another panel may export into the same folder). Returns the
        paths; the status line names the files written. Raises ValueError (also shown)
        when there is no such run or the folder cannot be written."""
        try:
            entry = self._entry(number)
            if not str(folder).strip():
                raise ValueError("no export folder given; type the folder to write the run's files to")
            stem = f"p2p_run{entry.number}"
            try:
                paths = save_result(entry.result, folder, stem=stem, overwrite=False)  # a free stem, reserved
            except OSError as error:  # a bare system message gets the folder and what to do
                bare = str(error).startswith("[Errno") or str(Path(folder)) not in str(error)
                text = (
                    f"cannot save run {entry.number} to {Path(folder)}: {error.strerror or error}; "
                    "choose another folder"
                )
                raise ValueError(text if bare else str(error)) from None
        except ValueError as error:
            self.report(error)
            raise
        written = ", ".join(p.name for p in paths)
        taken = "" if Path(paths[-1]).stem == stem else f" ({stem} was taken)"
        self._replace(message=f"saved run {entry.number} to {Path(folder)}{taken}: {written}", error=None)
        return paths

    def load_recipe(self, source: str | Path | bytes, name: str = "the upload") -> tuple[str, ...]:
        """Put a recipe's settings in the inputs, from a recipe JSON or PNG file (path or
        bytes; ``name`` names bytes in messages). Returns notes on what the panel cannot
        show (also in ``state.message``). When the file holds no recipe the panel can
        load, raises ValueError (FileNotFoundError: no such file) with a message naming
        the file and the problem, also set as ``state.error``; nothing else changes."""
        is_bytes = isinstance(source, (bytes, bytearray))
        name = name if is_bytes else str(source)
        try:
            if not is_bytes and not name.strip():
                raise ValueError(
                    "no recipe file given; type the path of a recipe JSON or PNG file (e.g. p2p_run1_0.png)"
                )
            recipe = recipe_from_bytes(source, name) if isinstance(source, (bytes, bytearray)) else read_recipe(source)
            settings, notes = Settings.from_recipe(recipe, family_of(self.pipe))
            if settings.size is not None and settings.size == self._default_size():
                settings = dataclasses.replace(settings, size=None)
        except (ValueError, TypeError, KeyError, OSError) as error:
            text = _os_message(error) if isinstance(error, OSError) else str(error)
            message = text if name in text else f"{name}: {text}"  # every load error names its file
            self.report(message)
            raise (FileNotFoundError if isinstance(error, FileNotFoundError) else ValueError)(message) from None
        if recipe.model and self.model and recipe.model != self.model:
            notes = (
                *notes,
                f"it was made with {recipe.model!r}; this panel runs {self.model!r}, so the images will differ",
            )
        message = f"recipe loaded from {name}" + (f" ({'; '.join(notes)})" if notes else "")
        self._replace(settings=settings, selected=None, error=None, message=message)
        return notes

    # -- output views -----------------------------------------------------------------
    def show(self, **changes: Any) -> View:
        """Change what the output shows: ``entry``, ``branch``, ``step`` (None = all
        steps), ``factor`` (None = all resolutions), ``overlay``, ``mode``."""
        view = dataclasses.replace(self.state.view, **changes)
        entry = self._entry(view.entry) if view.entry is not None else None
        if entry is not None:
            count = len(entry.result.images)
            if not is_int(view.branch) or not 0 <= view.branch < count:
                raise ValueError(f"branch {view.branch!r} does not exist; this run has branches 0..{count - 1}")
            record = entry.result.attention
            steps = record.steps if record is not None else entry.result.recipe.steps
            if view.step is not None and (not is_int(view.step) or not 0 <= view.step < steps):
                raise ValueError(f"step {view.step!r} does not exist; this run has steps 0..{steps - 1} (None: all)")
            if view.factor is not None and (record is None or view.factor not in record.factors):
                have = ", ".join(str(f) for f in record.factors) if record is not None else "none"
                raise ValueError(f"resolution factor {view.factor!r} was not recorded (factors: {have}; None: all)")
        if view.mode not in ("heatmaps", "difference"):
            raise ValueError(f"mode is 'heatmaps' or 'difference', not {view.mode!r}")
        self._replace(view=view)
        return view

    def set_step(self, step: int | None) -> View:
        """Scrub: show the heatmaps of one step (None: averaged over all steps)."""
        return self.show(step=step)

    def resolutions(self) -> tuple[tuple[str, int | None], ...]:
        """(label, factor) of every resolution of the run shown, "all" first."""
        entry = self.state.entry
        if entry is None or entry.result.attention is None:
            return (("all", None),)
        record = entry.result.attention
        sizes = [(f"{h}x{w}", f) for f in record.factors for h, w in [record.map_size(f)]]
        return (("all", None), *sizes)

    def _scrubber(self, entry: Entry, view: View) -> Scrubber:
        from .. import plot

        key = (entry.number, view.branch, view.factor, view.overlay)
        scrubber = self._scrubbers.get(key)
        if scrubber is None:
            image = entry.result.images[view.branch]
            tile = _display_height(image.height, _TILE)
            size = (tile, max(1, round(image.width * tile / image.height)))
            scrubber = plot.Scrubber(
                entry.result, view.branch, factor=view.factor, alpha=0.5 if view.overlay else 1.0, size=size
            )
            self._scrubbers[key] = scrubber
            while len(self._scrubbers) > 8:
                self._scrubbers.popitem(last=False)
        self._scrubbers.move_to_end(key)
        return scrubber

    def heatmap_image(self) -> Image.Image | None:
        """The output picture of the current view: one heatmap per word of the branch at
        the chosen step (or the difference image), as one labelled image; None before
        the first run."""
        return self._render(self.state)

    def _render(self, state: State) -> Image.Image | None:
        from .. import plot

        view, entry = state.view, state.entry
        if entry is None:
            return None
        if view.mode == "difference":
            tile = _display_height(entry.result.images[0].height, _DISPLAY)
            if view.branch == 0:
                return plot.tile_images(
                    [entry.result.images[0]], ["the source: pick an edit to see its difference"], tile=tile
                )
            parent = entry.result.branches[view.branch].parent
            picture = plot.difference(entry.result, view.branch, gain=2.0)
            return plot.tile_images([picture], [f"|edit {view.branch} - branch {parent}| x2"], tile=tile)
        if entry.result.attention is None:
            return None
        with self._render_lock:
            scrubber = self._scrubber(entry, view)
            steps = (0, scrubber.steps) if view.step is None else view.step
            frames = scrubber.frame(steps)
        return plot.tile_images(frames, list(scrubber.labels), columns=min(len(frames), 8))

    def heatmap_png(self) -> bytes | None:
        """:meth:`heatmap_image` as PNG bytes, cached per view: a scrub back to a step
        already seen costs nothing."""
        state = self.state
        view, entry = state.view, state.entry
        if entry is None:
            return None
        key = (entry.number, view)
        with self._render_lock:
            frame = self._frames.get(key)
            if frame is None:
                image = self._render(state)
                if image is None:
                    return None
                frame = png_bytes(image)
                self._frames[key] = frame
                while len(self._frames) > _FRAME_CACHE:
                    self._frames.popitem(last=False)
            self._frames.move_to_end(key)
        return frame

    def images(self) -> Image.Image | None:
        """The run shown, source and edits side by side with their prompts underneath."""
        from .. import plot

        entry = self.state.entry
        if entry is None:
            return None
        result = entry.result
        labels = [f'source: "{result.recipe.prompt}"'] + [
            f'{kind} {i}: "{prompt}"'
            for i, (kind, prompt) in enumerate(zip(result.kinds[1:], result.recipe.prompts[1:]), start=1)
        ]
        return plot.tile_images(result.images, labels, tile=_display_height(result.images[0].height, _DISPLAY))


def _view_of(view: View, entry: Entry, branch: int) -> View:
    """The view switched to another run: the step and resolution are kept where that run
    has them (else: all steps, all resolutions)."""
    record = entry.result.attention
    step = view.step if record is not None and view.step is not None and view.step < record.steps else None
    factor = view.factor if record is not None and view.factor in record.factors else None
    return dataclasses.replace(view, entry=entry.number, branch=branch, step=step, factor=factor)


def _display_height(height: int, bounds: tuple[int, int]) -> int:
    """Small models' images are scaled up to be seen, large ones down to fit a notebook."""
    return max(bounds[0], min(bounds[1], height))


def png_bytes(image: Image.Image) -> bytes:
    stream = io.BytesIO()
    image.save(stream, format="PNG", compress_level=1)  # speed over size: frames are shown, not stored
    return stream.getvalue()


def _thumbnail(images: tuple[Image.Image, ...]) -> Image.Image:
    scaled = [im.convert("RGB").resize((max(1, round(im.width * _THUMBNAIL / im.height)), _THUMBNAIL)) for im in images]
    strip = Image.new("RGB", (sum(s.width for s in scaled) + 2 * (len(scaled) - 1), _THUMBNAIL), "white")
    x = 0
    for picture in scaled:
        strip.paste(picture, (x, 0))
        x += picture.width + 2
    return strip


def _carry(
    choices: tuple[tuple[int, WordChoice], ...], before: tuple[Word, ...], after: tuple[Word, ...], where: str
) -> tuple[tuple[tuple[int, WordChoice], ...], dict[int, int], tuple[str, ...]]:
    """Word choices across a prompt change: each follows its word (same text, case
    aside) to its new place. Returns the kept choices, the old -> new index of every
    word that stayed, and a report of each setting dropped because its word is gone
    (``where``: the row, e.g. "edit 1")."""
    matcher = difflib.SequenceMatcher(
        None, [w.text.lower() for w in before], [w.text.lower() for w in after], autojunk=False
    )
    moved = {block.a + k: block.b + k for block in matcher.get_matching_blocks() for k in range(block.size)}
    kept, dropped = [], []
    for index, choice in choices:
        if index in moved:
            kept.append((moved[index], choice))
            continue
        word = repr(before[index].text) if index < len(before) else f"word {index}"
        settings = (
            ([f"the re-weight of {word} (x{choice.weight})"] if choice.weight != 1.0 else [])
            + ([f"the preservation of {word}"] if choice.preserve else [])
            + ([f"the local blend on {word}"] if choice.local else [])
        )
        dropped += [f"{setting} was dropped: {word} is no longer in {where}" for setting in settings]
    return tuple(sorted(kept)), moved, tuple(dropped)


def _keep_choices(
    new: Settings, old: Settings, selected: tuple[int, int] | None
) -> tuple[Settings, tuple[int, int] | None, tuple[str, ...]]:
    """After a source (or chain) change, edit rows that follow the prompt they edit
    (empty prompt) keep the choices whose words are still there, and the selection
    follows its word. Returns the settings, the selection and what was dropped."""
    rows: list[EditRow] = []
    dropped: list[str] = []
    moves: dict[int, dict[int, int]] = {}
    for row, edit in enumerate(new.edits, start=1):
        if edit.prompt.strip():
            rows.append(edit)
            continue
        words, moves[row], lost = _carry(edit.words, tokenize_words(old.head), tokenize_words(new.head), f"edit {row}")
        rows.append(dataclasses.replace(edit, words=words))
        dropped += lost
    if old.source != new.source:
        _, moves[0], _ = _carry((), tokenize_words(old.source), tokenize_words(new.source), "the source")
    if selected is not None and selected[0] in moves:
        selected = (selected[0], moves[selected[0]][selected[1]]) if selected[1] in moves[selected[0]] else None
    return dataclasses.replace(new, edits=tuple(rows)), selected, tuple(dropped)
