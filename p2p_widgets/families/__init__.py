"""Model families: what differs between the pipelines the engine samples.

The engine has one sampling loop; a :class:`Family` adapter owns everything that depends
on the kind of model: how prompts become the denoiser's conditioning (hidden states,
pooled embeddings, added conditions), how the denoiser is called, the latent's shape,
encoding and decoding images, the default size, guidance and scheduler, and where the
attention layers are. ``family_of(pipe)`` recognises the family of a pipeline object by
its parts, never by a class the engine imports; an unknown one is refused by name.

Families here: Stable Diffusion 1.x/2.x (:class:`~p2p_widgets.families.sd.StableDiffusion`)
and SDXL (:class:`~p2p_widgets.families.sdxl.StableDiffusionXL`).
"""

from __future__ import annotations

from .base import Conditioning, Family, NotFinite, check_multiple
from .sd import StableDiffusion
from .sdxl import StableDiffusionXL

__all__ = [
    "Family",
    "Conditioning",
    "NotFinite",
    "FAMILIES",
    "family_of",
    "check_multiple",
    "StableDiffusion",
    "StableDiffusionXL",
]

#: Every supported family, most specific first (SDXL before SD: both have a UNet and a VAE).
FAMILIES: tuple[type[Family], ...] = (StableDiffusionXL, StableDiffusion)


def family_of(pipe: object) -> Family:
    """The family adapter of ``pipe``.

    Raises:
        ValueError: the pipeline is of no supported family (the message says which are),
            or lacks a part its family needs.
    """
    if isinstance(pipe, Family):
        return pipe
    for family in FAMILIES:
        if family.recognises(pipe):
            return family(pipe)
    supported = "; ".join(f"{f.name} ({f.pipeline})" for f in reversed(FAMILIES))
    names = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
    parts = [name for name in names if getattr(pipe, name, None) is not None]
    detail = f" (it has {', '.join(parts)})" if parts else ""
    raise ValueError(
        f"p2p_widgets cannot edit with this {type(pipe).__name__}{detail}; supported model families: {supported}. "
        "Load one with p2p_widgets.models.load_pipeline(...) or diffusers' from_pretrained"
    )
