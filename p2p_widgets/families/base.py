"""The family interface, and what every latent-diffusion family shares (the VAE's side).

A :class:`Family` wraps one pipeline object the user already has; it never changes it.
The engine and the inversion talk to it, never to the pipeline's class.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from PIL import Image

from ..processors import LayerPlace, find_places
from ..prompts import encode_text

if TYPE_CHECKING:
    from ..control import Branch
    from ..edits import Recipe

__all__ = ["Family", "Conditioning", "NotFinite", "check_multiple"]


class NotFinite(ValueError):
    """The latents (or the decoded pixels) became NaN or infinite: the message names the
    settings that likely caused it. Nothing is returned; the pipeline is unchanged."""


def check_multiple(name: str, value: int, factor: int) -> None:
    """Raise a ValueError suggesting the nearest valid sizes unless ``value`` is a
    multiple of the VAE's downsampling ``factor``."""
    if value % factor:
        lower, upper = value - value % factor, value - value % factor + factor
        raise ValueError(
            f"{name} {value} is not a multiple of {factor} (the VAE's downsampling factor); "
            f"use {lower or factor} or {upper}"
        )


@dataclass(frozen=True)
class Conditioning:
    """What the denoiser is conditioned on, for a batch of rows (dimension 0 of every tensor).

    Attributes:
        text: the text encoder's hidden states (rows, tokens, dim): what cross-attention reads.
        pooled: pooled text embeddings (rows, dim), for families that use them (SDXL), else None.
        extra: other per-row inputs that are given, not learned (SDXL's size conditions,
            a distilled model's guidance embedding).

    ``text`` and ``pooled`` are what null-text inversion optimises.
    """

    text: torch.Tensor
    pooled: torch.Tensor | None = None
    extra: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.text.shape[0])

    def take(self, rows: slice | Sequence[int]) -> Conditioning:
        """Some rows (a slice or a list of row indices)."""
        index = rows if isinstance(rows, slice) else list(rows)
        return Conditioning(
            self.text[index],
            None if self.pooled is None else self.pooled[index],
            {k: v[index] for k, v in self.extra.items()},
        )

    def repeat(self, count: int) -> Conditioning:
        """A one-row conditioning repeated ``count`` times (views, no copy)."""
        if len(self) != 1:
            raise ValueError(f"only a one-row conditioning can be repeated, not one of {len(self)} rows")
        return Conditioning(
            self.text.expand(count, *self.text.shape[1:]),
            None if self.pooled is None else self.pooled.expand(count, *self.pooled.shape[1:]),
            {k: v.expand(count, *v.shape[1:]) for k, v in self.extra.items()},
        )

    def learned(self, text: torch.Tensor, pooled: torch.Tensor | None) -> Conditioning:
        """The same given inputs with other text embeddings (a null-text step's)."""
        return Conditioning(text, pooled if self.pooled is not None else None, dict(self.extra))

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> Conditioning:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)

        return Conditioning(
            move(self.text),
            None if self.pooled is None else move(self.pooled),
            {k: move(v) for k, v in self.extra.items()},
        )

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        """Rows of several conditionings, in order (they must have the same parts)."""
        first = parts[0]
        if any((p.pooled is None) != (first.pooled is None) or set(p.extra) != set(first.extra) for p in parts):
            raise ValueError("cannot join conditionings with different parts")
        if len(parts) == 1:
            return first
        return Conditioning(
            torch.cat([p.text for p in parts]),
            None if first.pooled is None else torch.cat([p.pooled for p in parts]),  # type: ignore[misc]
            {k: torch.cat([p.extra[k] for p in parts]) for k in first.extra},
        )


_PLACES: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, LayerPlace]] = weakref.WeakKeyDictionary()
_PLACES_LOCK = threading.Lock()

# One lock per VAE for decoding with a temporary upcast (SDXL's float16 VAE overflows).
_VAE_LOCKS: weakref.WeakKeyDictionary[torch.nn.Module, threading.Lock] = weakref.WeakKeyDictionary()
_VAE_LOCKS_LOCK = threading.Lock()


def _vae_lock(vae: torch.nn.Module) -> threading.Lock:
    with _VAE_LOCKS_LOCK:
        lock = _VAE_LOCKS.get(vae)
        if lock is None:
            lock = _VAE_LOCKS[vae] = threading.Lock()
        return lock


def _guidance(recipe: Recipe) -> float:
    """A resolved recipe's guidance (the engine fills in the family's default first)."""
    if recipe.guidance is None:
        raise ValueError("the recipe's guidance is not resolved; run it through p2p_widgets.engine.resolve first")
    return recipe.guidance


class Family:
    """One model family's adapter over a pipeline object (see the package docstring).

    Subclasses set the class attributes and implement :meth:`recognises`, :meth:`encode`,
    :meth:`encode_negative` and :meth:`denoise`; the VAE side (sizes, noise, encoding and
    decoding images) is shared.
    """

    #: the family's name, for messages ("Stable Diffusion 1.x/2.x")
    name: ClassVar[str] = ""
    #: the diffusers pipeline class users hold, for messages
    pipeline: ClassVar[str] = ""
    #: the parts the family needs on the pipeline
    parts: ClassVar[tuple[str, ...]] = ()
    #: the recipe defaults when a recipe leaves them open (None): the stock pipeline's
    default_guidance: ClassVar[float] = 7.5
    default_scheduler: ClassVar[str] = "pipeline"
    #: decode (and encode) with a float16 VAE in float32, as the stock pipeline does
    upcast_vae: ClassVar[bool] = False

    def __init__(self, pipe: Any) -> None:
        missing = [name for name in self.parts if getattr(pipe, name, None) is None]
        if missing:
            raise ValueError(
                f"this {self.name} pipeline has no {', '.join(missing)}; p2p_widgets needs its "
                f"{', '.join(self.parts)} (e.g. diffusers.{self.pipeline}.from_pretrained(...))"
            )
        self.pipe = pipe
        self._places: dict[str, LayerPlace] | None = None

    @classmethod
    def recognises(cls, pipe: Any) -> bool:
        """Whether ``pipe`` is of this family (by its parts, not its class)."""
        raise NotImplementedError

    # -- the model ----------------------------------------------------------------------
    @property
    def denoiser(self) -> Any:
        """The network whose attention layers are edited (a diffusers model: its ``config``
        attributes are dynamic, so it is typed ``Any``)."""
        return self.pipe.unet

    @property
    def tokenizer(self) -> Any:
        """The tokenizer whose token positions prompts, edits and maps are in."""
        return self.pipe.tokenizer

    # Read once per adapter (a run makes its own): diffusers' ``device`` walks every module.
    @functools.cached_property
    def device(self) -> torch.device:
        return torch.device(self.denoiser.device)

    @functools.cached_property
    def dtype(self) -> torch.dtype:
        dtype: torch.dtype = self.denoiser.dtype
        return dtype

    @property
    def latent_channels(self) -> int:
        return int(self.denoiser.config.in_channels)

    @property
    def vae_factor(self) -> int:
        """How many image pixels one latent pixel covers, per side (8 for Stable Diffusion)."""
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    @property
    def text_width(self) -> int:
        """The width of the text embeddings the denoiser reads."""
        return int(self.denoiser.config.cross_attention_dim)

    def default_scheduler_class(self) -> str:
        """The class name of the scheduler a recipe gets by default."""
        if self.default_scheduler == "pipeline":
            return type(self.pipe.scheduler).__name__
        return self.default_scheduler

    def places(self) -> dict[str, LayerPlace]:
        """The attention layers, by module name (found once per denoiser: its structure
        does not change, whatever processors or weights it gets)."""
        if self._places is None:
            with _PLACES_LOCK:
                places = _PLACES.get(self.denoiser)
            if places is None:
                places = find_places(self.denoiser)
                with _PLACES_LOCK:
                    _PLACES[self.denoiser] = places
            self._places = places
        return self._places

    def default_size(self) -> tuple[int, int]:
        """(height, width) the stock pipeline makes by default."""
        sample = self.denoiser.config.sample_size
        height, width = (sample, sample) if isinstance(sample, int) else tuple(sample)
        return int(height) * self.vae_factor, int(width) * self.vae_factor

    def size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """A recipe's (height, width), the defaults filled in, checked against the VAE."""
        default = self.default_size()
        height, width = height or default[0], width or default[1]
        check_multiple("height", height, self.vae_factor)
        check_multiple("width", width, self.vae_factor)
        return height, width

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        return height // self.vae_factor, width // self.vae_factor

    def is_guided(self, guidance: float) -> bool:
        """Whether a run uses classifier-free guidance (not for guidance-distilled models)."""
        return guidance > 1.0 and getattr(self.denoiser.config, "time_cond_proj_dim", None) is None

    def check_recipe(self, recipe: Recipe) -> None:
        """Refuse recipe settings this family cannot honour (before any work)."""

    # -- conditioning and the denoiser -------------------------------------------------
    def encode(self, branches: Sequence[Branch], recipe: Recipe, size: tuple[int, int]) -> Conditioning:
        """Every branch's conditioning, as the stock pipeline computes it."""
        raise NotImplementedError

    def encode_negative(self, recipe: Recipe, size: tuple[int, int], max_length: int) -> Conditioning:
        """The unconditional row for guidance: the recipe's negative prompt (one row)."""
        raise NotImplementedError

    def denoise(self, x: torch.Tensor, t: torch.Tensor | int, conditioning: Conditioning) -> torch.Tensor:
        """The denoiser's prediction for a batch of latents."""
        raise NotImplementedError

    def guidance_embedding(self, rows: int, guidance: float) -> dict[str, torch.Tensor]:
        """A guidance-distilled UNet's guidance input (LCM), as the stock pipeline computes it."""
        dim = getattr(self.denoiser.config, "time_cond_proj_dim", None)
        if dim is None:
            return {}
        scale = torch.tensor(guidance - 1).repeat(rows)
        embedding = self.pipe.get_guidance_scale_embedding(scale, embedding_dim=dim)
        return {"timestep_cond": embedding.to(device=self.device, dtype=self.dtype)}

    def token_ids(self, tokenizer: Any, text: str, max_length: int) -> tuple[tuple[int, ...], int]:
        """``text`` as ``tokenizer`` pads it for its encoder: begin-of-text, the tokens
        (truncated to fit), end-of-text, the tokenizer's own padding; and the number of real
        tokens. Computed without touching the tokenizer's shared padding settings."""
        body = encode_text(tokenizer, text)[0][: max_length - 2]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids = (tokenizer.bos_token_id, *body, tokenizer.eos_token_id) + (pad,) * (max_length - len(body) - 2)
        return ids, len(body) + 2

    # -- the VAE side --------------------------------------------------------------------
    def initial_noise(self, seed: int, height: int, width: int) -> torch.Tensor:
        """x_T for one branch: standard normal from a CPU generator (same on every device)."""
        generator = torch.Generator("cpu").manual_seed(seed)
        shape = (1, self.latent_channels, *self.latent_size(height, width))
        return torch.randn(shape, generator=generator, dtype=torch.float32)

    def _vae_scale(self, like: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """(scale, shift) with ``latent = (vae_latent - shift) * scale`` (per channel with
        a VAE that has latents_mean and latents_std, as SDXL's pipelines handle them)."""
        config = self.pipe.vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            channels = len(mean)
            mean_t = torch.tensor(mean).view(1, channels, 1, 1).to(like)
            std_t = torch.tensor(std).view(1, channels, 1, 1).to(like)
            return config.scaling_factor / std_t, mean_t
        return config.scaling_factor, getattr(config, "shift_factor", None) or 0.0

    def _vae_dtype(self) -> torch.dtype | None:
        """The dtype to run the VAE in when it must be upcast, else None."""
        vae = self.pipe.vae
        if self.upcast_vae and vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            return torch.float32
        return None

    def _with_vae(self, work: Any) -> Any:
        """``work(vae)``, in float32 for the duration when the family upcasts the VAE
        (under a per-VAE lock, restored after, as the stock pipeline does it)."""
        vae, upcast = self.pipe.vae, self._vae_dtype()
        if upcast is None:
            return work(vae)
        with _vae_lock(vae):
            original = vae.dtype
            vae.to(dtype=upcast)
            try:
                return work(vae)
            finally:
                vae.to(dtype=original)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """PIL images of latents (batch, channels, h, w), decoded one at a time.

        Raises:
            NotFinite: the VAE decoded NaN or infinite pixels.
        """

        def work(vae: Any) -> list[Image.Image]:
            images = []
            device, dtype = vae.device, vae.dtype  # once: diffusers finds them by walking the modules
            for latent in latents:  # one at a time: decoding is the memory peak at large sizes
                latent = latent[None].to(device=device, dtype=dtype)
                scale, shift = self._vae_scale(latent)
                decoded = vae.decode(latent / scale + shift, return_dict=False)[0]
                if not bool(torch.isfinite(decoded).all()):
                    raise NotFinite(
                        f"the VAE decoded non-finite pixels (NaN or inf) in {dtype}; a float16 VAE "
                        "overflows at some sizes: decode in float32 (pipe.vae.to(torch.float32)) and run again"
                    )
                array = (decoded[0].float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).cpu().numpy()
                images.append(Image.fromarray((array * 255).round().astype(np.uint8)))
            return images

        return self._with_vae(work)

    @torch.no_grad()
    def encode_image(self, image: Image.Image) -> torch.Tensor:
        """The latent of an RGB image (the VAE posterior's mean, scaled as the denoiser
        expects), (1, channels, h, w) on the denoiser's device and dtype."""

        def work(vae: Any) -> torch.Tensor:
            pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0)
            pixels = pixels.permute(2, 0, 1)[None].to(device=vae.device, dtype=vae.dtype)
            mean = vae.encode(pixels).latent_dist.mean
            scale, shift = self._vae_scale(mean)
            return (mean - shift) * scale

        return self._with_vae(work).to(device=self.device, dtype=self.dtype)

    def __repr__(self) -> str:
        return f"<{self.name} family: {type(self.pipe).__name__}>"
