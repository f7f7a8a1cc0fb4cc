"""diffusers attention processors that hand attention decisions to a controller.

A processor knows only its fixed place in the UNet (layer name, self or cross, and how
many times the latent was downsampled before it). It computes queries, keys and values
exactly as diffusers' ``AttnProcessor2_0`` does and asks the controller two things:

* self-attention: whose queries and keys each batch row uses (``None``: its own).
  Injection is then ``sdpa(Q_parent, K_parent, V_target)``, identical to replacing
  the target's attention probabilities by the parent's, without materialising them.
* cross-attention: from which batch row on the probabilities are needed (``None``:
  none, at a step with nothing to record or edit: SDPA). Those rows' probabilities are
  computed explicitly (fp32 softmax) and given to the controller, which records them and
  edits the targets' rows in place, and so are their values (value injection); the other
  rows (the unconditional half) use SDPA, or join the explicit product on small layers.

``attached(unet, controller)`` installs the processors for the duration of a ``with``
block and restores the originals on exit, whatever happened.

A UNet is often shared: the panel runs in a background thread while a notebook cell calls
``pipe(...)`` or ``invert()`` on the same pipeline. So a processor acts only for the calls
of the run that installed it: the run marks its own UNet calls with ``active(controller)``
(a context variable, so it is per thread and per asyncio task), and every other call goes
to the layer's original processor, unchanged. Installing is reference-counted per UNet
under a lock: concurrent runs on one pipeline each see only their own controller, and the
originals come back when the last of them ends.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F

__all__ = ["LayerPlace", "find_places", "map_size", "P2PAttnProcessor", "attached", "active", "AttentionHandler"]


def map_size(latent_size: tuple[int, int], factor: int) -> tuple[int, int]:
    """(height, width) of a feature map after downsampling a latent ``factor`` times."""
    height, width = latent_size
    while factor > 1:  # each downsampler is a stride-2 convolution: ceil(n / 2)
        height, width, factor = (height + 1) // 2, (width + 1) // 2, factor // 2
    return height, width


@dataclass(frozen=True)
class LayerPlace:
    """Where an attention layer sits: its module name, kind, and downsampling factor."""

    name: str
    is_cross: bool
    factor: int  # the layer's feature map is the latent downsampled ``factor`` times (1, 2, 4, ...)

    def map_size(self, latent_height: int, latent_width: int) -> tuple[int, int]:
        """(height, width) of this layer's feature map for a latent of the given size."""
        return map_size((latent_height, latent_width), self.factor)


class AttentionHandler(Protocol):
    """What a run's controller answers the processors (see the module docstring).

    ``cross_probabilities`` and ``cross_values`` return the tensor they were given when
    nothing changes, and may edit it in place; ``record_self`` is called only when
    ``records_self`` is true.
    """

    @property
    def records_self(self) -> bool: ...

    def explicit_rows(self, place: LayerPlace) -> int | None: ...

    def self_sources(self, place: LayerPlace) -> torch.Tensor | None: ...

    def cross_probabilities(self, place: LayerPlace, probs: torch.Tensor) -> torch.Tensor: ...

    def cross_values(self, place: LayerPlace, values: torch.Tensor) -> torch.Tensor: ...

    def record_self(self, place: LayerPlace, query: torch.Tensor, key: torch.Tensor, scale: float) -> None: ...


def _is_attention(module: torch.nn.Module) -> bool:
    return hasattr(module, "set_processor") and hasattr(module, "get_processor") and hasattr(module, "to_q")


def find_places(unet: torch.nn.Module) -> dict[str, LayerPlace]:
    """Every attention layer of a diffusers UNet, found by structure.

    The downsampling factor of a layer counts the downsamplers of the blocks before it
    (down blocks), all of them (mid block), or all of them minus the upsamplers before
    it (up blocks).
    """
    down_blocks = list(getattr(unet, "down_blocks", []))
    up_blocks = list(getattr(unet, "up_blocks", []))
    downs = [1 if getattr(b, "downsamplers", None) else 0 for b in down_blocks]
    ups = [1 if getattr(b, "upsamplers", None) else 0 for b in up_blocks]
    places = {}
    for name, module in unet.named_modules():
        if not _is_attention(module):
            continue
        parts = name.split(".")
        if parts[0] == "down_blocks":
            level = sum(downs[: int(parts[1])])
        elif parts[0] == "mid_block":
            level = sum(downs)
        elif parts[0] == "up_blocks":
            level = sum(downs) - sum(ups[: int(parts[1])])
        else:
            raise ValueError(
                f"cannot place attention layer {name!r}: p2p_widgets supports UNets with "
                "down_blocks / mid_block / up_blocks (Stable Diffusion 1.x and 2.x)"
            )
        places[name] = LayerPlace(name, bool(getattr(module, "is_cross_attention", False)), 2**level)
    if not any(p.is_cross for p in places.values()):
        raise ValueError("this UNet has no cross-attention layers; it is not a text-to-image Stable Diffusion UNet")
    return places


#: Above this many unconditional probabilities (rows x heads x pixels x tokens) a layer's
#: unconditional half takes SDPA; at or below, the explicit product over every row. Measured
#: on one CPU thread: SD 1.x-like tiny layers (8 heads of 4 channels, 256 pixels, 315k) are
#: 1.3x slower explicit, SDXL-like tiny ones (2 heads, 64 pixels, 20k) 1.3x faster; every
#: layer of a real model at 512 px or more is far above.
SMALL_LAYER = 2**17

# The handler whose run is calling the UNet in this thread (or task), if any.
_ACTIVE: contextvars.ContextVar[AttentionHandler | None] = contextvars.ContextVar(
    "p2p_widgets_active_run", default=None
)


@contextlib.contextmanager
def active(handler: AttentionHandler) -> Iterator[None]:
    """Mark the UNet calls inside this block as ``handler``'s run: only they are edited."""
    token = _ACTIVE.set(handler)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


class P2PAttnProcessor:
    """Attention like ``AttnProcessor2_0``, with decisions delegated to a handler.

    ``handler``: a fixed handler (used directly, as in unit tests), or None for the
    installed form, which serves the run active in the calling thread when that run is
    one of ``handlers`` and otherwise calls ``original`` with the same arguments.
    """

    def __init__(
        self,
        handler: AttentionHandler | None,
        place: LayerPlace,
        original: Any = None,
        handlers: frozenset | set | None = None,
    ):
        self.handler = handler
        self.place = place
        self.original = original
        self.handlers = handlers if handlers is not None else set()

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        handler = self.handler
        if handler is None:
            handler = _ACTIVE.get()
            if handler is None or handler not in self.handlers:  # another caller: as if we were not here
                return self._original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, args, kwargs)
        return self._attend(handler, attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def _original(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        temb: torch.Tensor | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> torch.Tensor:
        if args:  # called positionally beyond temb: pass on the same way
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        # diffusers' Attention passes everything but hidden_states by keyword; so do we
        if temb is not None:
            kwargs = {"temb": temb, **kwargs}
        return self.original(
            attn, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, **kwargs
        )

    def _attend(
        self,
        handler: AttentionHandler,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        temb: torch.Tensor | None,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        channels = height = width = 0
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        keys_length = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape[1]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, keys_length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        # (batch, heads, tokens, head_dim)
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        first = handler.explicit_rows(self.place) if self.place.is_cross else None
        if first is not None:
            # Explicit probabilities (rows, heads, pixels, tokens), fp32 softmax, for the
            # conditional rows (``first`` on), which the controller records and edits in
            # place, times their (possibly injected) values. The unconditional half needs
            # neither: on a small layer one batched product over every row is cheaper than
            # SDPA on that half plus a concatenation (per-operation costs dominate); on a
            # larger one SDPA is (fewer operations per element, no probabilities in memory).
            # The conditional rows are computed alike either way, so the source and a
            # target's return to its prompt give the same bits. The scale goes on the keys:
            # the smallest operand (tokens x head_dim).
            split = first > 0 and first * attn.heads * query.shape[2] * keys_length > SMALL_LAYER
            rows = first if split else 0
            scores = torch.matmul(query[rows:], (key[rows:] * attn.scale).transpose(-1, -2))
            if attention_mask is not None:
                scores = scores + attention_mask[rows:]
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
            conditional = probs[first - rows :]
            edited = handler.cross_probabilities(self.place, conditional)
            if edited is not conditional:
                conditional.copy_(edited)
            tail = value[first:]
            values = handler.cross_values(self.place, tail)
            if values is not tail:  # value injection
                value = torch.cat([value[:first], values])
            hidden_states = torch.matmul(probs.to(value.dtype), value[rows:])
            if split:
                mask = None if attention_mask is None else attention_mask[:first]
                plain = F.scaled_dot_product_attention(
                    query[:first], key[:first], value[:first], attn_mask=mask, scale=attn.scale
                )
                hidden_states = torch.cat([plain, hidden_states])
        elif self.place.is_cross:
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False, scale=attn.scale
            )
        else:
            if handler.records_self:
                handler.record_self(self.place, query, key, attn.scale)
            sources = handler.self_sources(self.place)
            if sources is not None:  # Q and K of the parent, V of the branch itself
                query, key = query.index_select(0, sources), key.index_select(0, sources)
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False, scale=attn.scale
            )

        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@dataclass
class _Installed:
    """The processors installed on one UNet, and the runs they serve."""

    originals: dict[str, Any]
    handlers: set = field(default_factory=set)


_INSTALLED: weakref.WeakKeyDictionary[torch.nn.Module, _Installed] = weakref.WeakKeyDictionary()
_INSTALL_LOCK = threading.Lock()  # check-and-install and restore are one step per UNet


@contextlib.contextmanager
def attached(unet: torch.nn.Module, handler: AttentionHandler, places: dict[str, LayerPlace]) -> Iterator[None]:
    """Install a :class:`P2PAttnProcessor` on every attention layer, restore on exit.

    Only UNet calls made inside ``active(handler)`` are edited; any other call (a stock
    ``pipe(...)`` from another thread, another run's calls) gets the original processors.
    Several runs may be attached to one UNet at once; the originals are restored when the
    last one ends, on layers that still hold the installed processor (a processor the user
    set meanwhile is left alone).
    """
    modules: dict[str, Any] = {name: unet.get_submodule(name) for name in places}
    with _INSTALL_LOCK:
        installed = _INSTALLED.get(unet)
        if installed is None:
            originals = {name: module.get_processor() for name, module in modules.items()}
            if any(isinstance(p, P2PAttnProcessor) for p in originals.values()):
                raise RuntimeError(
                    "this UNet holds Prompt-to-Prompt processors that p2p_widgets did not install "
                    "(copied from another pipeline?); give it its own processors with "
                    "unet.set_default_attn_processor()"
                )
            installed = _Installed(originals)
            try:
                for name, module in modules.items():
                    module.set_processor(P2PAttnProcessor(None, places[name], originals[name], installed.handlers))
            except BaseException:
                _restore(modules, installed)
                raise
            _INSTALLED[unet] = installed
        elif set(installed.originals) != set(modules):
            raise RuntimeError("this UNet's attention layers changed during another run; wait for it to finish")
        installed.handlers.add(handler)
    try:
        yield
    finally:
        with _INSTALL_LOCK:
            installed.handlers.discard(handler)
            if not installed.handlers:
                _restore(modules, installed)
                _INSTALLED.pop(unet, None)


def _restore(modules: dict[str, Any], installed: _Installed) -> None:
    for name, module in modules.items():
        current = module.get_processor()
        if isinstance(current, P2PAttnProcessor) and current.handlers is installed.handlers:
            module.set_processor(installed.originals[name])
