"""Tiny, offline, randomly initialised Stable Diffusion components for demos and tests.

Nothing here touches the network: the tokenizer's vocabulary and merges are generated on
the fly and every model is built from a config with random (seeded) weights.  The images
such a pipeline makes are noise, but every code path of a real Stable Diffusion pipeline
(tokenizer, text encoder, cross-attention UNet, VAE, scheduler) runs, in tens of ms.

>>> from p2p_widgets.testing import tiny_pipeline
>>> pipe = tiny_pipeline()
>>> image = pipe("a red cat", num_inference_steps=2).images[0]  # 32x32 PIL image
"""

from __future__ import annotations

import json
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

__all__ = ["MULTI_TOKEN_WORDS", "TINY_WORDS", "tiny_pipeline", "tiny_tokenizer"]

_BOS = "<|startoftext|>"
_EOS = "<|endoftext|>"
_EOW = "</w>"  # CLIP's end-of-word suffix
_M = TypeVar("_M", bound=torch.nn.Module)

#: Everyday prompt words that the tiny tokenizer encodes as exactly one token (``word</w>``).
TINY_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "on", "in", "at", "and", "with", "photo",
    "painting", "drawing", "cat", "dog", "tiger", "lion", "bird", "horse", "car", "tree",
    "house", "riding", "red", "blue", "green", "yellow", "black", "white", "big", "small",
    "circle", "square", "triangle", "star", "heart", "striped", "dotted", "background", "sitting", "table",
    "fluffy", "sunny", "snowy", "street", "forest", "beach", "cake", "apple", "pizza", "man",
    "woman", "boy", "girl", "hat", "flowers", "castle", "mountain", "river", "night", "day",
    "old", "new", "wooden", "glass", "basket", "bowl",
)  # fmt: skip

# Words deliberately split into several tokens; the last piece carries the ``</w>`` suffix.
_MULTI_TOKEN_PIECES: dict[str, tuple[str, ...]] = {
    "bicycle": ("bicy", "cle"),
    "motorcycle": ("motor", "cy", "cle"),
    "butterfly": ("butter", "fly"),
    "elephant": ("ele", "phant"),
}

#: Words that the tiny tokenizer splits into several tokens: word -> number of tokens.
MULTI_TOKEN_WORDS: dict[str, int] = {w: len(p) for w, p in _MULTI_TOKEN_PIECES.items()}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode character table (all 256 bytes)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    # Same order as CLIP's vocabulary: printable bytes first, then the remapped ones.
    return {b: table[b] for b in printable + [b for b in range(256) if b not in printable]}


def _symbols(text: str, *, final: bool) -> list[str]:
    """Initial BPE symbols of ``text``; the last carries ``</w>`` if ``text`` ends a word."""
    table = _bytes_to_unicode()
    symbols = [table[b] for b in text.encode("utf-8")]
    if final:
        symbols[-1] += _EOW
    return symbols


def _apply_bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Merge adjacent pairs by rank (lowest first, leftmost on ties) until none applies."""
    symbols = list(symbols)
    while len(symbols) > 1:
        rank, i = min((ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:])))
        if rank == len(ranks):
            break
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Generate the tiny vocabulary and merge list (checked against the intended token counts).

    Every target is reduced to one symbol by appending merges, left to right, on top of
    what the merges so far already do to it.  A merge appended at the lowest priority
    cannot change how an already single-token target tokenizes, so targets never break
    each other; the multi-token words are re-checked as a whole at the end.
    """
    ranks: dict[tuple[str, str], int] = {}
    targets = [_symbols(w, final=True) for w in TINY_WORDS]
    for pieces in _MULTI_TOKEN_PIECES.values():
        targets += [_symbols(p, final=i == len(pieces) - 1) for i, p in enumerate(pieces)]
    for target in targets:
        while len(current := _apply_bpe(target, ranks)) > 1:
            ranks[(current[0], current[1])] = len(ranks)

    for word in TINY_WORDS:
        if _apply_bpe(_symbols(word, final=True), ranks) != [word + _EOW]:
            raise RuntimeError(f"tiny tokenizer: {word!r} is not a single token")
    for word, pieces in _MULTI_TOKEN_PIECES.items():
        want = [*pieces[:-1], pieces[-1] + _EOW]
        if _apply_bpe(_symbols(word, final=True), ranks) != want:
            raise RuntimeError(f"tiny tokenizer: {word!r} does not split as {want}")

    base = list(_bytes_to_unicode().values())
    # CLIP's layout: bytes, bytes + "</w>", merge results in rank order, then bos, eos.
    tokens = [*base, *(c + _EOW for c in base), *(a + b for a, b in ranks), _BOS, _EOS]
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}, tuple(ranks)


def tiny_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """A fresh, real ``CLIPTokenizer`` over a generated ~750-token byte-level BPE vocabulary.

    Any text tokenizes without unknown tokens; each word of :data:`TINY_WORDS` is one token,
    each word of :data:`MULTI_TOKEN_WORDS` the stated number.  bos = ``<|startoftext|>``,
    eos = pad = ``<|endoftext|>`` (the last two ids), ``model_max_length = max_length``.
    """
    vocab, merges = _vocab_and_merges()
    with tempfile.TemporaryDirectory(prefix="p2p_tiny_tokenizer_") as tmp:
        root = Path(tmp)
        (root / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        merges_txt = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
        (root / "merges.txt").write_text(merges_txt, encoding="utf-8")
        return CLIPTokenizer.from_pretrained(
            tmp,
            model_max_length=max_length,
            bos_token=_BOS,
            eos_token=_EOS,
            unk_token=_EOS,
            pad_token=_EOS,
        )


def _prepare(module: _M, dtype: torch.dtype) -> _M:
    """Put ``module`` in eval mode (as ``from_pretrained`` does) and cast it to ``dtype``.

    The cast uses ``torch.nn.Module.to`` directly: diffusers' ``ModelMixin.to(dtype)`` logs a spurious
    "modules ... should be kept in float32: []" warning even when there are none.
    """
    if next(module.parameters()).dtype != dtype:
        torch.nn.Module.to(module, dtype=dtype)
    return module.eval()


def tiny_pipeline(
    kind: str = "sd1",
    *,
    seed: int = 0,
    sample_size: int = 16,
    dtype: torch.dtype = torch.float32,
) -> StableDiffusionPipeline:
    """A ``StableDiffusionPipeline`` with tiny random weights, seeded by ``seed``.

    ``kind="sd1"``: SD 1.x layout (epsilon prediction, conv proj_in/out, 8 heads per block).
    ``kind="sd2"``: SD 2.x layout (v-prediction, linear proj_in/out, 2/4 heads per block).
    Both have cross-attention at two resolutions plus the mid block, ``sample_size`` is the
    latent side and the VAE factor is 2, so images are ``2 * sample_size`` pixels a side.
    The global torch RNG state is left untouched; there is no safety checker.
    """
    if kind not in ("sd1", "sd2"):
        raise ValueError(f"kind must be 'sd1' or 'sd2', not {kind!r}")
    sd2 = kind == "sd2"
    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                hidden_act="gelu" if sd2 else "quick_gelu",
                projection_dim=32,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        unet = UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            mid_block_type="UNetMidBlock2DCrossAttn",
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            # diffusers reads `attention_head_dim` as the number of heads (diffusers#2011).
            attention_head_dim=(2, 4) if sd2 else 8,
            use_linear_projection=sd2,
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            norm_num_groups=32,
            sample_size=sample_size * 2,
        )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction" if sd2 else "epsilon",
    )
    pipe = StableDiffusionPipeline(
        vae=_prepare(vae, dtype),
        text_encoder=_prepare(text_encoder, dtype),
        tokenizer=tokenizer,
        unet=_prepare(unet, dtype),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
