"""The attention record of a run, and maps of words from it.

For every branch and step the record keeps the cross-attention probabilities of the
conditional half, averaged over heads and over the layers of each resolution, for the
prompt's real tokens (begin-of-text to end-of-text), as fp16 on the CPU. These are the
maps each branch *computed* (before any injection or re-weighting replaced them), as in
the official code, so a target's map of a swapped word shows where that word attends.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .prompts import Prompt

__all__ = ["AttentionRecord", "StepsLike"]

StepsLike = int | slice | tuple[int, int] | None


@dataclass(frozen=True)
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
        if not 0 <= branch < len(self.prompts):
            raise ValueError(f"branch {branch} does not exist; this run has branches 0..{len(self.prompts) - 1}")
        length = self.maps[self.factors[0]].shape[-1]
        for token in tokens:
            if not 0 <= token < length:
                raise ValueError(f"token position {token} was not recorded (recorded: 0..{length - 1})")
        selection = self._steps(steps)
        index = torch.as_tensor(list(tokens), dtype=torch.long)
        if factor is not None:
            maps = self.maps[self._factor(factor)][selection, branch].float()  # (steps, h, w, tokens)
            return maps.index_select(-1, index).mean(0).permute(2, 0, 1)
        total, weight = None, 0
        for f, maps in self.maps.items():
            chosen = maps[selection, branch].float().index_select(-1, index).mean(0)  # (h, w, tokens)
            chosen = chosen.permute(2, 0, 1)[None]  # (1, tokens, h, w)
            if chosen.shape[-2:] != self.latent_size:
                chosen = F.interpolate(chosen, size=self.latent_size, mode="bilinear", align_corners=False)
            total = chosen[0] * self.layers[f] if total is None else total + chosen[0] * self.layers[f]
            weight += self.layers[f]
        return total / weight

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
        if not 0 <= branch < len(self.prompts):
            raise ValueError(f"branch {branch} does not exist; this run has branches 0..{len(self.prompts) - 1}")
        tokens = self.prompts[branch].token_indices(word)
        return self.token_maps(branch, tokens, steps, factor).mean(0).numpy()

    def _factor(self, factor: int) -> int:
        if factor not in self.maps:
            raise ValueError(
                f"no cross-attention was recorded at factor {factor}; recorded factors: "
                f"{', '.join(map(str, self.factors))} (map sides "
                f"{', '.join('x'.join(map(str, self.maps[f].shape[2:4])) for f in self.factors)})"
            )
        return factor

    def _steps(self, steps: StepsLike) -> slice | list[int]:
        total = self.steps
        if steps is None:
            return slice(None)
        if isinstance(steps, slice):
            chosen = list(range(total))[steps]
        elif isinstance(steps, tuple):
            start, end = steps
            chosen = list(range(max(start, 0), min(end, total)))
        elif isinstance(steps, (int, np.integer)) and not isinstance(steps, bool):
            if not -total <= steps < total:
                raise ValueError(f"step {steps} does not exist; this run has steps 0..{total - 1}")
            chosen = [int(steps) % total]
        else:
            raise TypeError(f"steps is a step index, a (start, end) pair, a slice or None, not {steps!r}")
        if not chosen:
            raise ValueError(f"the step range {steps!r} selects no step; this run has steps 0..{total - 1}")
        return chosen
