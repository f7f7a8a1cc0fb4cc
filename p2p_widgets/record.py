"""The attention record of a run, and maps of words from it.

For every branch and step the record keeps the cross-attention probabilities of the
conditional half, averaged over heads and over the layers of each resolution, for the
prompt's real tokens (begin-of-text to end-of-text), as fp16 on the CPU. These are the
maps each branch *computed*, before any injection or re-weighting replaced them, so a
target's map of a swapped word shows where that word attends; local blending's masks come
from the same maps.

A deliberate difference from the official code: its edit controllers store the tensor
they then edit in place, so by aliasing its record holds a target's maps *after*
injection, and its local blending works on the injected maps (inside the cross window a
target's "tiger" mask is the source's "cat" map carried over). Here a target's record and
blend mask are its own, inside the window too; after the window the two agree.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from .checks import is_index
from .processors import LayerPlace, map_size
from .prompts import Prompt

__all__ = ["AttentionRecord", "Recorder", "Heatmaps", "Maps", "Normalize", "StepsLike", "normalize"]

StepsLike = int | slice | tuple[int, int] | None
Normalize = Literal["map", "words"] | None


@dataclass(frozen=True, eq=False)
class AttentionRecord:
    """Cross-attention maps of every branch and step, per resolution.

    Attributes:
        prompts: the tokenised prompt of every branch (source first).
        latent_size: (height, width) of the latent.
        maps: for each downsampling factor, a tensor of shape
            (steps, branches, height, width, tokens), fp16, CPU. ``tokens`` covers
            positions 0 .. the longest prompt's end-of-text token.
        layers: for each factor, how many cross-attention layers were averaged.
        timesteps: the scheduler timestep of every step.
        self_maps: self-attention probabilities if requested: ``(step, factor)`` and a
            tensor (branches, pixels, pixels), fp16, CPU; else None.
    """

    prompts: tuple[Prompt, ...]
    latent_size: tuple[int, int]
    maps: dict[int, torch.Tensor]
    layers: dict[int, int]
    timesteps: tuple[int, ...]
    self_maps: tuple[tuple[int, int], torch.Tensor] | None = None

    @property
    def factors(self) -> tuple[int, ...]:
        return tuple(sorted(self.maps))

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def map_size(self, factor: int) -> tuple[int, int]:
        return tuple(self.maps[self._factor(factor)].shape[2:4])  # type: ignore[return-value]

    def heatmaps(self, branch: int, factor: int | None = None) -> Heatmaps:
        """Every step's token maps of one branch, computed once and kept (see :class:`Heatmaps`).

        ``factor``: one resolution (its downsampling factor), or None to aggregate all
        resolutions at the latent size.
        """
        if not is_index(branch) or not 0 <= branch < len(self.prompts):
            raise ValueError(f"branch {branch!r} does not exist; this run has branches 0..{len(self.prompts) - 1}")
        if factor is not None:
            self._factor(factor)
        key = (int(branch), factor)
        with _HEATMAPS_LOCK:
            cache = _HEATMAPS.setdefault(self, {})
            found = cache.get(key)
        if found is None:  # computed outside the lock; two threads may both compute it once
            found = Heatmaps(self, int(branch), factor)
            with _HEATMAPS_LOCK:
                found = _HEATMAPS.setdefault(self, {}).setdefault(key, found)
        return found

    def token_maps(
        self,
        branch: int,
        tokens: list[int] | tuple[int, ...],
        steps: StepsLike = None,
        factor: int | None = None,
    ) -> torch.Tensor:
        """Maps of some token positions, averaged over ``steps``: (len(tokens), h, w) fp32.

        ``steps``: one step index, a ``(start, end)`` range (end excluded), a slice, or
        None for all steps. ``factor``: one resolution (its downsampling factor), or None
        to aggregate all resolutions, each upsampled to the latent size and weighted by
        its number of layers (so every layer counts once).
        """
        return torch.from_numpy(self.heatmaps(branch, factor).token_maps(tokens, steps))

    def word_map(
        self,
        branch: int,
        word: str | int,
        steps: StepsLike = None,
        factor: int | None = None,
    ) -> np.ndarray:
        """A word's map (the mean of its tokens' maps): (h, w) float32 numpy array.

        Raises:
            ValueError: the word is not in the branch's prompt (the message lists its words).
        """
        return self.heatmaps(branch, factor).word_map(word, steps)

    def self_components(self, branch: int, count: int = 6) -> np.ndarray:
        """Top principal components of the recorded self-attention: (count, h, w) float32.

        As the official ``show_self_attention_comp``: the (pixels, pixels) self-attention
        matrix of the step and resolution given to ``run(record_self=(step, factor))``,
        each row centred, then the right singular vectors of the largest singular values,
        each a map over the pixels. A singular vector's sign is arbitrary; each is flipped
        so its largest-magnitude entry is positive.

        Raises:
            ValueError: self-attention was not recorded, or ``count`` is out of range.
        """
        if self.self_maps is None:
            raise ValueError(
                "this run recorded no self-attention; run it with record_self=(step, factor), "
                "e.g. run(pipe, recipe, record_self=(25, 2))"
            )
        if not is_index(branch) or not 0 <= branch < len(self.prompts):
            raise ValueError(f"branch {branch!r} does not exist; this run has branches 0..{len(self.prompts) - 1}")
        (_, factor), probabilities = self.self_maps
        height, width = map_size(self.latent_size, factor)
        pixels = height * width
        if not is_index(count) or not 1 <= count <= pixels:
            raise ValueError(f"count is the number of components, 1..{pixels} at this resolution, not {count!r}")
        matrix = probabilities[branch].double()  # (pixels, pixels): row = query pixel
        centred = matrix - matrix.mean(dim=1, keepdim=True)
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)  # rows of vh: components over key pixels
        components = vh[:count]
        peak = components.gather(1, components.abs().argmax(dim=1, keepdim=True))
        components = components * torch.sign(peak)
        return components.reshape(count, height, width).float().numpy()

    def _factor(self, factor: int) -> int:
        if factor not in self.maps:
            raise ValueError(
                f"no cross-attention was recorded at factor {factor}; recorded factors: "
                f"{', '.join(map(str, self.factors))} (map sides "
                f"{', '.join('x'.join(map(str, self.maps[f].shape[2:4])) for f in self.factors)})"
            )
        return factor


# Heatmaps computed from a record, kept while the record lives: the record itself stays a
# plain immutable value (compared by identity), the cache lives here.
_HEATMAPS: weakref.WeakKeyDictionary[AttentionRecord, dict] = weakref.WeakKeyDictionary()
_HEATMAPS_LOCK = threading.Lock()


class Recorder:
    """Accumulates one run's attention into an :class:`AttentionRecord`.

    The attention processors hand it, per layer, the conditional half's cross-attention
    probabilities (branches, heads, pixels, tokens) and, at the one requested step and
    resolution, the self-attention queries and keys. Per step it averages them over heads
    and over the layers of each resolution; at the end of a step it keeps that step's maps
    (fp16, on the device until :meth:`finish` copies them to the host) and a running sum
    over the steps so far of the resolution local blending reads.

    Args:
        prompts: every branch's tokenised prompt (source first).
        latent_size: (height, width) of the latent.
        places: the denoiser's attention layers.
        offset: the first conditional row of the batch (the number of unconditional rows).
        record: keep the per-step record.
        record_self: ``(step, factor)``: keep that step's self-attention maps at that resolution.
        running: the resolution (downsampling factor) to keep a running sum of, or None.
    """

    def __init__(
        self,
        prompts: Sequence[Prompt],
        latent_size: tuple[int, int],
        places: dict[str, LayerPlace],
        offset: int,
        record: bool = True,
        record_self: tuple[int, int] | None = None,
        running: int | None = None,
    ) -> None:
        self.prompts = tuple(prompts)
        self.latent_size = latent_size
        self.offset = offset
        self.record = record
        self.record_self_at = record_self
        self.running_factor = running
        self.tokens = max(p.length for p in self.prompts)  # recorded token positions
        self.factors = sorted({p.factor for p in places.values() if p.is_cross})
        self.layers = {f: sum(1 for p in places.values() if p.is_cross and p.factor == f) for f in self.factors}
        self.step = 0
        # Per factor, this step: the layers' probabilities summed over heads and layers, in
        # units of the first layer's head count (a layer with other heads is rescaled to it).
        self._sums: dict[int, torch.Tensor] = {}
        self._heads: dict[int, int] = {}
        self._history: dict[int, list[torch.Tensor]] = {f: [] for f in self.factors}
        self._running: torch.Tensor | None = None
        self._self_sum: torch.Tensor | None = None
        self._self_layers = 0

    def observes(self, place: LayerPlace) -> bool:
        """Whether this layer's cross-attention probabilities are needed."""
        return self.record or place.factor == self.running_factor

    def begin_step(self, step: int) -> None:
        self.step = step
        self._sums = {}
        self._heads = {}

    def add_cross(self, place: LayerPlace, conditional: torch.Tensor) -> None:
        """One layer's probabilities (branches, heads, pixels, tokens), before any edit."""
        if not self.observes(place):
            return
        # Summed over heads (a sum is cheaper than a mean, and slicing the tokens waits for
        # the end of the step): the per-layer work on the hot path is one reduction and one add.
        total = conditional.sum(1)  # (branches, pixels, all tokens)
        heads, factor = conditional.shape[1], place.factor
        previous = self._sums.get(factor)
        if previous is None:
            self._sums[factor], self._heads[factor] = total, heads
            return
        if heads != self._heads[factor]:
            total = total * (self._heads[factor] / heads)
        previous.add_(total)  # our own tensor: the first layer's sum

    def add_self(self, place: LayerPlace, query: torch.Tensor, key: torch.Tensor, scale: float) -> None:
        """A self-attention layer's queries and keys (batch, heads, pixels, dim), kept at the
        requested step and resolution only."""
        if self.record_self_at != (self.step, place.factor):
            return
        # (branches, heads, pixels, pixels) -> mean over heads
        probs = (torch.matmul(query[self.offset :], key[self.offset :].transpose(-1, -2)).float() * scale).softmax(-1)
        mean = probs.mean(1)
        self._self_sum = mean if self._self_sum is None else self._self_sum + mean
        self._self_layers += 1

    def end_step(self) -> None:
        """Close the step: keep its maps, add them to the running sum."""
        # (branches, pixels, tokens): the mean over heads, then over the layers of a factor
        means = {f: self._sums[f][..., : self.tokens] / (self._heads[f] * self.layers[f]) for f in self._sums}
        if self.record:
            for factor, mean in means.items():
                height, width = map_size(self.latent_size, factor)
                self._history[factor].append(mean.reshape(mean.shape[0], height, width, -1).to(torch.float16))
        if self.running_factor is not None and self.running_factor in means:
            current = means[self.running_factor]
            self._running = current if self._running is None else self._running + current

    def running(self) -> torch.Tensor | None:
        """The running resolution's maps summed over the steps so far (branches, pixels,
        tokens), as local blending reads them (the official code's attention store), or None."""
        return self._running

    def finish(self, timesteps: Sequence[int]) -> AttentionRecord | None:
        """The record (fp16, CPU), or None when nothing was recorded."""
        if not (self.record and self._history[self.factors[0]]):
            return None
        maps = {f: torch.stack(h).cpu() for f, h in self._history.items()}
        self_maps = None
        if self._self_sum is not None and self.record_self_at is not None:
            self_maps = (self.record_self_at, (self._self_sum / self._self_layers).to(torch.float16).cpu())
        return AttentionRecord(
            prompts=self.prompts,
            latent_size=self.latent_size,
            maps=maps,
            layers=dict(self.layers),
            timesteps=tuple(timesteps[: len(self._history[self.factors[0]])]),
            self_maps=self_maps,
        )


def select_steps(steps: StepsLike, total: int) -> list[int]:
    """Step indices chosen by ``steps`` (see :meth:`AttentionRecord.token_maps`)."""
    if steps is None:
        return list(range(total))
    if isinstance(steps, slice):
        chosen = list(range(total))[steps]
    elif isinstance(steps, tuple) and len(steps) == 2 and all(isinstance(v, (int, np.integer)) for v in steps):
        start, end = steps
        chosen = list(range(max(int(start), 0), min(int(end), total)))
    elif isinstance(steps, (int, np.integer)) and not isinstance(steps, bool):
        if not -total <= steps < total:
            raise ValueError(f"step {steps} does not exist; this run has steps 0..{total - 1}")
        chosen = [int(steps) % total]
    else:
        raise TypeError(f"steps is a step index, a (start, end) pair, a slice or None, not {steps!r}")
    if not chosen:
        raise ValueError(f"the step range {steps!r} selects no step; this run has steps 0..{total - 1}")
    return chosen


def normalize(maps: np.ndarray, how: Normalize) -> np.ndarray:
    """Scale maps of shape (..., n, h, w) for display, as float32.

    ``how``: ``"map"`` stretches each map to [0, 1] by its own minimum and maximum (where a
    word attends, whatever its strength); ``"words"`` stretches all n maps by their joint
    minimum and maximum (so words compare); None leaves attention probabilities as they
    are. A constant map (or a constant set, for ``"words"``) becomes all zeros: it says
    nothing about where the word is.
    """
    if how not in ("map", "words", None):
        raise ValueError(f'normalize is "map", "words" or None, not {how!r}')
    maps = np.asarray(maps, dtype=np.float32)
    if how is None:
        return maps.copy()
    axes = (-2, -1) if how == "map" else (-3, -2, -1)
    low = maps.min(axis=axes, keepdims=True)
    span = maps.max(axis=axes, keepdims=True) - low
    flat = span <= 1e-12 * np.maximum(np.abs(low), 1.0)
    return np.where(flat, 0.0, (maps - low) / np.where(flat, 1.0, span)).astype(np.float32)


@dataclass(frozen=True)
class Maps:
    """Labelled maps, e.g. one per word: ``labels[i]`` names ``maps[i]`` (n, h, w) float32."""

    labels: tuple[str, ...]
    maps: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, label: str) -> np.ndarray:
        """The map of the first entry with this label."""
        if label not in self.labels:
            raise KeyError(f"{label!r} is not among the maps; they are: {', '.join(self.labels)}")
        return self.maps[self.labels.index(label)]


class Heatmaps:
    """Every step's token maps of one branch, at one size, computed once.

    Built by :meth:`AttentionRecord.heatmaps`. Holds ``per_step``: (steps, tokens, h, w)
    float32 for the prompt's real tokens (begin-of-text .. end-of-text), either at one
    recorded resolution or, with ``factor=None``, all resolutions upsampled (bilinear) to
    the latent size and averaged with one vote per layer. Means over step ranges, words and
    normalisation are then cheap numpy reductions, fast enough for a timestep slider.

    Values are attention probabilities: at every pixel the maps of all tokens, padding
    included, sum to 1, so the maps kept here sum to at most 1 (begin-of-text usually
    takes most of it).
    """

    def __init__(self, record: AttentionRecord, branch: int, factor: int | None = None) -> None:
        self.prompt = record.prompts[branch]
        self.branch, self.factor, self.timesteps = branch, factor, record.timesteps
        tokens = self.prompt.length
        factors = record.factors if factor is None else (factor,)
        size = record.latent_size if factor is None else record.map_size(factor)
        total: torch.Tensor | None = None
        for f in factors:
            maps = record.maps[f][:, branch, :, :, :tokens].float().permute(0, 3, 1, 2)  # (steps, tokens, h, w)
            if tuple(maps.shape[-2:]) != tuple(size):
                maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
            weighted = maps * (record.layers[f] if factor is None else 1)
            total = weighted if total is None else total + weighted
        if total is None:
            raise ValueError("this record holds no cross-attention maps (no resolution was recorded)")
        weight = sum(record.layers[f] for f in factors) if factor is None else 1
        self.per_step = (total / weight).numpy()  # (steps, tokens, h, w)

    @property
    def steps(self) -> int:
        return self.per_step.shape[0]

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of every map."""
        height, width = self.per_step.shape[-2:]
        return height, width

    def token_maps(self, tokens: list[int] | tuple[int, ...], steps: StepsLike = None) -> np.ndarray:
        """Maps of token positions, averaged over ``steps``: (len(tokens), h, w) float32."""
        length = self.prompt.length
        for token in tokens:
            if not is_index(token) or not 0 <= token < length:
                raise ValueError(
                    f"token position {token!r} is not in the prompt {self.prompt.text!r}; "
                    f"its positions are 0 (begin-of-text) .. {length - 1} (end-of-text)"
                )
        chosen = select_steps(steps, self.steps)
        if len(chosen) == 1:
            return self.per_step[chosen[0]][list(tokens)].copy()
        return self.per_step[chosen][:, list(tokens)].mean(0)

    def word_map(self, word: str | int, steps: StepsLike = None) -> np.ndarray:
        """A word's map, the mean of its tokens' maps: (h, w) float32, probabilities.

        ``word``: its index in the prompt, or its text (every occurrence; a phrase of
        several words is one map of all their tokens).
        """
        return self.token_maps(self.prompt.token_indices(word), steps).mean(0)

    def word_steps(self, word: str | int) -> np.ndarray:
        """A word's map at every step: (steps, h, w) float32."""
        tokens = list(self.prompt.token_indices(word))
        return self.per_step[:, tokens].mean(1)

    def words(
        self,
        words: list[str | int] | tuple[str | int, ...] | None = None,
        steps: StepsLike = None,
        normalize: Normalize = "map",
    ) -> Maps:
        """Maps of several words, labelled: by default every word of the prompt in order."""
        chosen = list(range(len(self.prompt.words))) if words is None else list(words)
        if not chosen:
            raise ValueError("no word chosen; pass word texts or indices, or None for every word")
        selection = select_steps(steps, self.steps)
        per_step = self.per_step[selection].mean(0)  # (tokens, h, w)
        maps, labels = [], []
        for word in chosen:
            tokens = list(self.prompt.token_indices(word))
            maps.append(per_step[tokens].mean(0))
            labels.append(self.prompt.words[word].text if isinstance(word, (int, np.integer)) else str(word))
        return Maps(tuple(labels), _normalize(np.stack(maps), normalize))

    def tokens(
        self,
        tokens: list[int] | tuple[int, ...] | None = None,
        steps: StepsLike = None,
        normalize: Normalize = "map",
        special: bool = False,
    ) -> Maps:
        """Maps of token positions, labelled; by default every token, with begin- and
        end-of-text only if ``special``. A word split into several tokens labels them
        ``word[1/2]``, ``word[2/2]``."""
        if tokens is None:
            tokens = tuple(range(0 if special else 1, self.prompt.length if special else self.prompt.eos))
        chosen = list(tokens)
        if not chosen:
            raise ValueError("no token chosen; pass token positions, or None for every token")
        maps = self.token_maps(chosen, steps)
        return Maps(tuple(self.token_label(t) for t in chosen), _normalize(maps, normalize))

    def token_label(self, position: int) -> str:
        """A readable name for a token position."""
        if position == 0:
            return "<start>"
        if position == self.prompt.eos:
            return "<end>"
        if position > self.prompt.eos:
            return "<pad>"
        for word in self.prompt.words:
            if word.start <= position < word.end:
                if word.end - word.start == 1:
                    return word.text
                return f"{word.text}[{position - word.start + 1}/{word.end - word.start}]"
        return f"#{position}"


_normalize = normalize  # the methods' keyword argument shadows the function
