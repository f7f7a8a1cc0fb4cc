"""The controller: for every step and layer, what each branch's attention becomes.

The engine tells the controller which step it is on (``begin_step``, ``end_step``). The
attention processors ask it, per layer, whose queries and keys a branch uses in
self-attention, and give it the cross-attention probabilities to edit (its recorder
records them first). After each scheduler step, a :class:`Blender` does local blending
from the recorder's running sum of maps.

Everything that depends only on the recipe (token mappings, per-step injection and
re-weighting factors, self-attention sources) is computed once, on the device, before
sampling starts, so the per-layer work is a few batched tensor operations and no
host synchronisation.

Notation (paper, section 3): ``M`` is a branch's cross-attention map, ``M*`` the map of
its edited branch; a target's map inside its window is ``Edit(M_parent, M_target)``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .edits import Recipe, Target, Window
from .processors import LayerPlace, map_size
from .prompts import Alignment, Prompt, align, tokenize
from .record import Recorder

__all__ = ["Branch", "plan_branches", "Controller", "Blender", "blend_factor", "same_tokens", "MIN_MASK_SIDE"]


@dataclass(frozen=True)
class Branch:
    """One branch of a run: its prompt and how it follows its parent."""

    prompt: Prompt
    parent: int  # -1 for the source
    kind: str  # "source", "swap" or "refine"
    alignment: Alignment | None  # parent -> this branch; None for the source
    target: Target | None  # the spec; None for the source


def plan_branches(recipe: Recipe, tokenizer: Any) -> tuple[Branch, ...]:
    """Tokenise every prompt and check every word an edit names, before anything runs.

    Raises:
        ValueError: with the branch and the problem (word not in the prompt, a swap
            between prompts of different lengths, a prompt too long, ...).
    """
    prompts = []
    for index, text in enumerate(recipe.prompts):
        try:
            prompts.append(tokenize(tokenizer, text))
        except ValueError as error:
            where = "the source prompt" if index == 0 else f"target {index}"
            raise ValueError(f"{where}: {error}") from None
    branches = [Branch(prompts[0], -1, "source", None, None)]
    for index, target in enumerate(recipe.targets, start=1):
        prompt, parent = prompts[index], prompts[target.parent]
        try:
            alignment = align(parent, prompt, target.kind)
            for word, _ in (*target.cross.words, *target.reweight):
                prompt.find(word)
            for word in target.preserve:
                prompt.find(word)
            if target.blend is not None:
                for word in target.blend.words:
                    prompt.find(word)
                for word in target.blend.parent_words or ():
                    parent.find(word)
        except ValueError as error:
            raise ValueError(f"target {index} ({target.prompt!r}): {error}") from None
        branches.append(Branch(prompt, target.parent, alignment.kind, alignment, target))
    return tuple(branches)


def _levels(parents: tuple[int, ...]) -> list[list[int]]:
    """Targets grouped by depth, so each group's parents are final before it is edited."""
    depth = {0: 0}

    def depth_of(branch: int) -> int:
        if branch not in depth:
            depth[branch] = depth_of(parents[branch]) + 1
        return depth[branch]

    for branch in range(1, len(parents)):
        depth_of(branch)
    deepest = max(depth.values())
    return [[b for b in range(1, len(parents)) if depth[b] == d] for d in range(1, deepest + 1)]


MIN_MASK_SIDE = 16  # local-blend masks are never coarser than this many cells, when maps allow


def blend_factor(latent_size: tuple[int, int], cross_factors: Sequence[int]) -> int:
    """The cross-attention resolution (downsampling factor) local-blend masks come from.

    The paper uses SD's 16x16 maps at 512 px: a quarter of the 64x64 latent side. A
    quarter is kept for larger latents (24x24 at 768 px), but small latents would get
    masks of a few cells that cover everything once dilated (4x4 for a 16x16 latent), so
    the wanted side is at least ``MIN_MASK_SIDE`` cells (or the latent side). The nearest
    recorded resolution on a log scale wins; ties go to the finer one.
    """
    side = min(latent_size)
    wanted = max(side / 4, min(MIN_MASK_SIDE, side))
    sides = {f: min(map_size(latent_size, f)) for f in cross_factors}
    return min(cross_factors, key=lambda f: (abs(math.log(sides[f] / wanted)), f))


class Controller:
    """Per-step, per-layer attention decisions for one run: injection, re-weighting,
    value injection and self-attention sources. What is recorded is its
    :class:`~p2p_widgets.record.Recorder`'s business; local blending is a :class:`Blender`'s.

    Args:
        branches: from :func:`plan_branches`.
        recipe: the run's recipe (windows are fractions of ``recipe.steps``).
        places: the denoiser's attention layers.
        latent_size: (height, width) of the latent.
        device: where the denoiser runs.
        guided: whether the batch holds an unconditional half first (classifier-free guidance).
        recorder: records the attention the layers computed (default: one that records nothing).
    """

    def __init__(
        self,
        branches: tuple[Branch, ...],
        recipe: Recipe,
        places: dict[str, LayerPlace],
        latent_size: tuple[int, int],
        device: torch.device,
        guided: bool,
        recorder: Recorder | None = None,
    ):
        self.branches = branches
        self.steps = recipe.steps
        self.latent_size = latent_size
        self.device = device
        self.offset = len(branches) if guided else 0  # first conditional row of the batch
        if recorder is None:
            recorder = Recorder([b.prompt for b in branches], latent_size, places, self.offset, record=False)
        self.recorder = recorder
        self.records_self = recorder.record_self_at is not None
        self.step = 0
        parents = tuple(b.parent for b in branches)
        self.level_lists = [(group, [parents[b] for b in group]) for group in _levels(parents)]
        self.pixels = {p.factor: p.map_size(*latent_size)[0] * p.map_size(*latent_size)[1] for p in places.values()}
        latent_side = min(latent_size)
        self.self_allowed = {
            name: min(place.map_size(*latent_size)) <= recipe.self_max_scale * latent_side + 1e-9
            for name, place in places.items()
            if not place.is_cross
        }
        self._build_cross(recipe)
        self._build_self(recipe)
        self._at(0)

    # -- set-up --------------------------------------------------------------------
    def _build_cross(self, recipe: Recipe) -> None:
        count, length = len(self.branches), self.branches[0].prompt.max_length
        mapping = torch.eye(length).repeat(count, 1, 1)  # (branches, parent tokens, tokens)
        alpha = torch.zeros(self.steps, count, length)  # (steps, branches, tokens): 1 = inject
        scale = torch.ones(self.steps, count, length)  # re-weighting factors
        beta = torch.zeros(self.steps, count, length)  # value injection: the parent's share
        for index, branch in enumerate(self.branches[1:], start=1):
            target, alignment = branch.target, branch.alignment
            assert target is not None and alignment is not None
            mapping[index] = torch.from_numpy(alignment.matrix)
            same = torch.from_numpy(same_tokens(self.branches[branch.parent].prompt, branch))
            beta[target.values.steps(self.steps), index] = target.value_beta * same
            windows = [target.cross.default] * length
            for word, window in target.cross.words:
                for token in branch.prompt.token_indices(word):
                    windows[token] = window
            if target.preserve:  # object preservation: only these words are injected
                kept = {t for word in target.preserve for t in branch.prompt.token_indices(word)}
                windows = [w if t in kept else Window(0.0, 0.0) for t, w in enumerate(windows)]
            mapped = torch.from_numpy(alignment.mapped)
            for token, window in enumerate(windows):
                if mapped[token]:
                    alpha[window.steps(self.steps), index, token] = 1.0
            reweight_window = target.reweight_window or target.cross.default
            for word, factor in target.reweight:
                tokens = list(branch.prompt.token_indices(word))
                for step in reweight_window.steps(self.steps):
                    scale[step, index, tokens] = factor
        # Host-side flags, so layers skip editing without looking at device tensors.
        self.cross_injected = [bool((alpha[s] > 0).any()) for s in range(self.steps)]
        self.cross_scaled = [bool((scale[s] != 1).any()) for s in range(self.steps)]
        self.values_injected = [bool((beta[s] > 0).any()) for s in range(self.steps)]
        self.edited = [a or b or c for a, b, c in zip(self.cross_injected, self.cross_scaled, self.values_injected)]
        self.levels = [
            _Level(group, parents, mapping, alpha, scale, beta, self.device) for group, parents in self.level_lists
        ]

    def _build_self(self, recipe: Recipe) -> None:
        count = len(self.branches)
        self.self_sources_at: list[torch.Tensor | None] = []
        for step in range(self.steps):
            source = list(range(count))
            for group, _ in self.level_lists:
                for branch in group:
                    target = self.branches[branch].target
                    assert target is not None
                    if step in target.self_attn.steps(self.steps):
                        source[branch] = source[self.branches[branch].parent]
            if source == list(range(count)):
                self.self_sources_at.append(None)
                continue
            rows = list(range(self.offset)) + [self.offset + s for s in source]
            self.self_sources_at.append(torch.tensor(rows, device=self.device))

    # -- called by the engine ------------------------------------------------------
    def begin_step(self, step: int) -> None:
        self.recorder.begin_step(step)
        self._at(step)

    def _at(self, step: int) -> None:
        """Look up what every layer asks at this step once (the layers' hot path)."""
        self.step = step
        self._all_explicit = self.edited[step] or self.recorder.record
        self._sources = self.self_sources_at[step]
        self._injected, self._scaled = self.cross_injected[step], self.cross_scaled[step]

    def end_step(self) -> None:
        self.recorder.end_step()

    # -- called by the processors --------------------------------------------------
    def self_sources(self, place: LayerPlace) -> torch.Tensor | None:
        if self._sources is None or not self.self_allowed[place.name]:
            return None
        return self._sources

    def record_self(self, place: LayerPlace, query: torch.Tensor, key: torch.Tensor, scale: float) -> None:
        self.recorder.add_self(place, query, key, scale)

    def explicit_rows(self, place: LayerPlace) -> int | None:
        """The first batch row whose cross-attention probabilities this step needs."""
        if self._all_explicit or self.recorder.observes(place):
            return self.offset
        return None

    def cross_values(self, place: LayerPlace, conditional: torch.Tensor) -> torch.Tensor:
        """Value injection (CL P2P) on the conditional half's values (branches, heads, tokens, dim):
        ``V* = V + beta * (V_parent re-indexed to this prompt's tokens - V)`` for aligned tokens."""
        if not self.values_injected[self.step]:
            return conditional
        edited = conditional.clone()
        for level in self.levels:  # parents before children: chains see edited parents
            carried = level.carry(edited[level.parents].transpose(-1, -2)).transpose(-1, -2)
            weight = level.beta[self.step][:, None, :, None].to(conditional.dtype)
            edited[level.rows] = torch.lerp(conditional[level.rows], carried, weight)
        return edited

    def cross_probabilities(self, place: LayerPlace, conditional: torch.Tensor) -> torch.Tensor:
        """Record and edit the conditional half's cross-attention (branches, heads, pixels, tokens)."""
        if conditional.shape[2] != self.pixels[place.factor]:
            height, width = place.map_size(*self.latent_size)
            raise RuntimeError(
                f"layer {place.name} has {conditional.shape[2]} pixels but {height}x{width} were expected "
                f"for a {self.latent_size[0]}x{self.latent_size[1]} latent; this model's layout is not supported"
            )
        self.recorder.add_cross(place, conditional)
        injected, scaled = self._injected, self._scaled
        if not (injected or scaled):
            return conditional
        # In place, level by level: parents before children, so chains see edited parents,
        # and a level's own rows are read before they are written.
        for level in self.levels:
            whole = injected and level.identity and level.fully_injected[self.step]  # M* = M_parent
            if whole and not scaled and isinstance(level.rows, slice) and isinstance(level.parents, slice):
                conditional[level.rows].copy_(conditional[level.parents])  # one copy (broadcast)
                continue
            maps = conditional[level.rows]
            if whole:
                maps = conditional[level.parents].expand_as(maps)
            elif injected:  # M* = M + alpha * (M_parent re-indexed to this prompt's tokens - M)
                carried = level.carry(conditional[level.parents])
                maps = torch.lerp(maps, carried, level.alpha[self.step][:, None, None, :])
            if scaled:  # re-weighting: M* = c * M for the chosen words' tokens
                maps = maps * level.scale[self.step][:, None, None, :]
            conditional[level.rows] = maps
        return conditional


class Blender:
    """Local blending (paper 3.2): after each step, outside the mask of the chosen words a
    target's latent is reset to its parent's.

    The mask comes from the running sum of the maps at one resolution (see
    :func:`blend_factor`) that the run's :class:`~p2p_widgets.record.Recorder` keeps:
    the words' maps, max-pooled (dilation), divided by their maximum, above the threshold,
    the union of the target's words and the aligned words in its parent.

    Build with :meth:`plan`, which returns None when no target blends.
    """

    def __init__(
        self, branches: tuple[Branch, ...], steps: int, latent_size: tuple[int, int], factor: int, device: torch.device
    ) -> None:
        self.branches = branches
        self.latent_size = latent_size
        self.factor = factor
        parents = tuple(b.parent for b in branches)
        self.level_lists = [(group, [parents[b] for b in group]) for group in _levels(parents)]
        tokens = max(b.prompt.length for b in branches)  # the recorded token positions
        count = len(branches)
        own = torch.zeros(count, tokens)  # (branches, tokens): tokens of the blend words
        parent = torch.zeros(count, tokens)  # same, in the parent's prompt
        self.start = [0] * count
        self.spec = {}
        for index, branch in enumerate(branches):
            blend = branch.target.blend if branch.target is not None else None
            if not blend:
                continue
            assert branch.alignment is not None
            own[index, list(_tokens(branch.prompt, blend.words))] = 1.0
            if blend.parent_words is not None:
                parent_tokens = list(_tokens(branches[branch.parent].prompt, blend.parent_words))
            else:  # the parent's tokens aligned with the blend words
                weights = torch.from_numpy(branch.alignment.matrix)[:, own[index].nonzero().flatten()]
                parent_tokens = [t for t in weights.sum(1).nonzero().flatten().tolist() if t < tokens]
            parent[index, parent_tokens] = 1.0
            self.start[index] = math.floor(blend.start * steps + 1e-9)
            self.spec[index] = blend
        self.own = own.to(device)
        self.parent = parent.to(device)
        self._masks: list[torch.Tensor] = []

    @classmethod
    def plan(
        cls,
        branches: tuple[Branch, ...],
        steps: int,
        latent_size: tuple[int, int],
        places: dict[str, LayerPlace],
        device: torch.device,
    ) -> Blender | None:
        """The blender of a run, or None when no target blends."""
        if not any(b.target is not None and b.target.blend for b in branches):
            return None
        factors = sorted({p.factor for p in places.values() if p.is_cross})
        return cls(branches, steps, latent_size, blend_factor(latent_size, factors), device)

    def __call__(
        self, latents: torch.Tensor, step: int, running: torch.Tensor, reference: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Blend the targets' latents after step ``step`` (a new tensor).

        ``running``: the maps at this blender's resolution summed over the steps so far
        (branches, pixels, tokens). ``reference``: (channels, h, w) latent that the source's
        direct edits are restored to outside their masks instead of the source branch's own
        (a real image's inversion).
        """
        count = latents.shape[0]
        masks = torch.ones(count, *latents.shape[2:], dtype=torch.bool, device=latents.device)
        latents = latents.clone()
        height, width = map_size(self.latent_size, self.factor)
        for group, parents in self.level_lists:
            for branch, parent in zip(group, parents):
                if branch not in self.spec or step < self.start[branch]:
                    continue
                blend = self.spec[branch]
                # (2, pixels): the branch's words in the branch, the aligned words in the parent
                maps = torch.stack(
                    [running[branch].float() @ self.own[branch], running[parent].float() @ self.parent[branch]]
                ).reshape(2, 1, height, width)
                size = 2 * blend.dilation + 1
                maps = F.max_pool2d(maps, size, stride=1, padding=blend.dilation)
                maps = F.interpolate(maps, size=tuple(latents.shape[2:]), mode="nearest")
                peak = maps.amax(dim=(2, 3), keepdim=True).clamp_min(torch.finfo(maps.dtype).tiny)
                mask = ((maps / peak) > blend.threshold).any(dim=0)[0]  # union: (h, w)
                masks[branch] = mask
                weight = mask.to(latents.dtype)
                base = reference if reference is not None and parent == 0 else latents[parent]
                latents[branch] = base + weight * (latents[branch] - base)
        self._masks.append(masks)
        return latents

    def masks(self) -> torch.Tensor | None:
        """Every step's masks (steps, branches, h, w) bool, CPU."""
        return torch.stack(self._masks).cpu() if self._masks else None


class _Level:
    """Targets of one depth: their rows, parents, token mappings and per-step factors.

    A token mapping is mostly a permutation, so instead of a (tokens x tokens) matrix
    product it is applied as a gather of ``width`` parent tokens per target token,
    weighted (``width`` is 1 unless a swapped word has more tokens in the parent).
    """

    def __init__(
        self,
        group: list[int],
        parents: list[int],
        mapping: torch.Tensor,
        alpha: torch.Tensor,
        scale: torch.Tensor,
        beta: torch.Tensor,
        device: torch.device,
    ) -> None:
        self.rows = _rows(group)
        self.parents = _rows(parents)
        self.count = len(group)
        matrix = mapping[group]  # (targets, parent tokens, tokens)
        width = max(1, int((matrix > 0).sum(1).max()))
        length = matrix.shape[-1]
        index = torch.zeros(self.count, length, width, dtype=torch.long)
        weight = torch.zeros(self.count, length, width)
        for b in range(self.count):
            for token in range(length):
                sources = matrix[b, :, token].nonzero().flatten()
                index[b, token, : len(sources)] = sources
                weight[b, token, : len(sources)] = matrix[b, sources, token]
        self.width = width
        self.index = index.reshape(self.count, 1, 1, length * width).to(device)
        self.weight = None if width == 1 and bool((weight == 1).all()) else weight.to(device)
        # The common word swap: every token maps to the same position in the parent, so
        # carrying maps over is the parent's maps as they are (no gather).
        self.identity = self.weight is None and bool((index[..., 0] == torch.arange(length)).all())
        # Steps at which every token of every target of this level is injected (no lerp needed).
        group_alpha = alpha[:, group]
        self.fully_injected = [bool((group_alpha[s] == 1).all()) for s in range(alpha.shape[0])]
        self.alpha = group_alpha.to(device)  # (steps, targets, tokens)
        self.scale = scale[:, group].to(device)
        self.beta = beta[:, group].to(device)

    def carry(self, parent_maps: torch.Tensor) -> torch.Tensor:
        """Parent maps (targets, heads, pixels, parent tokens) re-indexed to the targets' tokens."""
        _, heads, pixels, length = parent_maps.shape
        parent_maps = parent_maps.expand(self.count, heads, pixels, length)
        gathered = parent_maps.gather(-1, self.index.expand(self.count, heads, pixels, -1))
        if self.weight is None:
            return gathered
        gathered = gathered.view(self.count, heads, pixels, length, self.width)
        return (gathered * self.weight[:, None, None]).sum(-1)


def _rows(indices: list[int]) -> slice | list[int]:
    """A slice when the indices are consecutive (cheaper than gathering), else the list."""
    if all(b - a == 1 for a, b in itertools.pairwise(indices)):
        return slice(indices[0], indices[-1] + 1)
    if len(set(indices)) == 1:
        return slice(indices[0], indices[0] + 1)
    return indices


def same_tokens(parent: Prompt, branch: Branch) -> np.ndarray:
    """(tokens,) float: 1 where the branch's token is its parent's token carried over
    unchanged (one parent token, weight 1, the same id: unchanged words, begin- and
    end-of-text, padding), 0 for swapped and new words."""
    if branch.alignment is None:
        raise ValueError("the source branch has no parent to share tokens with")
    matrix = branch.alignment.matrix
    same = np.zeros(matrix.shape[1], dtype=np.float32)
    for token in range(matrix.shape[1]):
        sources = np.flatnonzero(matrix[:, token])
        if len(sources) == 1 and matrix[sources[0], token] == 1 and parent.ids[sources[0]] == branch.prompt.ids[token]:
            same[token] = 1.0
    return same


def _tokens(prompt: Prompt, words: tuple) -> list[int]:
    return sorted({t for word in words for t in prompt.token_indices(word)})
