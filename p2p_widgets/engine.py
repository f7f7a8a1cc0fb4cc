"""Joint sampling of a source and its edited branches in one batch.

``run(pipe, recipe)`` works with any diffusers ``StableDiffusionPipeline``-compatible
object (it needs ``unet``, ``vae``, ``text_encoder``, ``tokenizer`` and ``scheduler``).
It never changes the pipeline: it samples with a fresh copy of the scheduler and
installs its attention processors only for the duration of the run.

The loop follows the stock pipeline step for step, so that with no edit the source
image is the one ``pipe(prompt, latents=...)`` makes.
"""

from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass, fields
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from .control import Branch, Controller, plan_branches
from .edits import Recipe, Target
from .memory import MemoryEstimate
from .processors import active, attached, find_places, map_size
from .prompts import encode_text
from .record import AttentionRecord

__all__ = [
    "run",
    "edit",
    "Result",
    "Progress",
    "Cancelled",
    "NotFinite",
    "make_scheduler",
    "initial_noise",
    "estimate_run",
]


class Cancelled(Exception):
    """The run was cancelled; the pipeline is as it was before the run."""


class NotFinite(ValueError):
    """The latents (or the decoded pixels) became NaN or infinite: the message names the
    settings that likely caused it. Nothing is returned; the pipeline is unchanged."""


@dataclass(frozen=True)
class Progress:
    """Passed to the per-step callback.

    Attributes:
        step: the step just finished (0-based); ``steps`` in all.
        timestep: the scheduler's timestep of that step.
        preview: the predicted clean images of every branch (PIL), on preview steps only.
        stage: "sample" for a run; an inversion reports "invert" (DDIM inversion) and
            "null-text" (its optimisation), its ``step`` counting across both.
    """

    step: int
    steps: int
    timestep: int
    preview: tuple[Image.Image, ...] | None = None
    stage: str = "sample"

    @property
    def fraction(self) -> float:
        return (self.step + 1) / self.steps


@dataclass(frozen=True)
class Result:
    """What a run produced.

    Attributes:
        recipe: the run's recipe, completed (size, scheduler, model) so it reproduces it.
        images: one PIL image per branch, the source first.
        latents: the final latents, (branches, channels, h, w), float32, CPU.
        branches: every branch's tokenised prompt, parent and edit kind.
        attention: the attention record (None when recording was off).
        blend_masks: the local-blend masks, (steps, branches, h, w) bool on the latent
            grid (True where the branch may differ from its parent), or None without blending.
    """

    recipe: Recipe
    images: tuple[Image.Image, ...]
    latents: torch.Tensor
    branches: tuple[Branch, ...]
    attention: AttentionRecord | None
    blend_masks: torch.Tensor | None

    @property
    def source(self) -> Image.Image:
        return self.images[0]

    @property
    def targets(self) -> tuple[Image.Image, ...]:
        return self.images[1:]

    @property
    def kinds(self) -> tuple[str, ...]:
        """The edit kind of every branch ("source", "swap", "refine"): what "auto" chose."""
        return tuple(b.kind for b in self.branches)


_REQUIRED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def _check_pipeline(pipe: Any) -> None:
    missing = [name for name in _REQUIRED if getattr(pipe, name, None) is None]
    if missing:
        raise ValueError(
            f"the pipeline has no {', '.join(missing)}; p2p_widgets needs a Stable Diffusion "
            "pipeline with unet, vae, text_encoder, tokenizer and scheduler "
            "(e.g. diffusers.StableDiffusionPipeline.from_pretrained(...))"
        )


def make_scheduler(pipe: Any, name: str):
    """A fresh scheduler: class ``name`` built from the pipeline's scheduler config.

    ``name="pipeline"`` copies the pipeline's own scheduler class.
    """
    import diffusers

    own = type(pipe.scheduler)
    if name == "pipeline":
        cls = own
    else:
        cls = getattr(diffusers, name, None) if isinstance(name, str) else None
        compatible = {c for c in getattr(pipe.scheduler, "compatibles", []) if isinstance(c, type)} | {own}
        known = ", ".join(sorted(c.__name__ for c in compatible))
        backends = getattr(cls, "_backends", None)
        if backends is not None and not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
            missing = [b for b in backends if b != "torch"]
            raise ValueError(f"{name} needs the optional package(s) {', '.join(missing)}: pip install {' '.join(missing)}")
        if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
            raise ValueError(f"{name!r} is not a diffusers scheduler; use 'pipeline' or one of: {known}")
        if cls not in compatible:
            raise ValueError(
                f"{name} does not sample this pipeline's model (its scheduler is {own.__name__}); "
                f"use 'pipeline' or one of: {known}"
            )
    return cls.from_config(scheduler_config(pipe.scheduler))


def scheduler_config(scheduler: Any) -> dict[str, Any]:
    """A scheduler's config as it acts, for ``from_config``.

    diffusers lists the keys a scheduler was built without in ``_use_default_values``, and
    ``from_config`` drops them so that another class's defaults apply. But pipelines patch
    some of them afterwards (``StableDiffusionPipeline`` sets ``steps_offset`` to 1 on a
    scheduler built without it): those are kept, or the copy would sample other timesteps.
    Keys still at their default are dropped as diffusers does.
    """
    config = dict(scheduler.config)
    defaulted = config.pop("_use_default_values", None) or ()
    parameters = inspect.signature(type(scheduler).__init__).parameters
    for key in defaulted:
        parameter = parameters.get(key)
        if parameter is None or parameter.default is inspect.Parameter.empty:
            continue
        try:
            unchanged = bool(config.get(key) == parameter.default)
        except (TypeError, ValueError):  # e.g. arrays: keep the value as it is
            unchanged = False
        if unchanged:
            config.pop(key, None)
    return config


def vae_factor(pipe: Any) -> int:
    """How many image pixels one latent pixel covers, per side (8 for Stable Diffusion)."""
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def initial_noise(pipe: Any, seed: int, height: int, width: int) -> torch.Tensor:
    """x_T for one branch: standard normal from a CPU generator (same on every device)."""
    factor = vae_factor(pipe)
    generator = torch.Generator("cpu").manual_seed(seed)
    shape = (1, pipe.unet.config.in_channels, height // factor, width // factor)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def _size(pipe: Any, recipe: Recipe) -> tuple[int, int]:
    factor = vae_factor(pipe)
    sample = pipe.unet.config.sample_size
    default = (sample if isinstance(sample, int) else sample[0]) * factor
    height, width = recipe.height or default, recipe.width or default
    check_multiple("height", height, factor)
    check_multiple("width", width, factor)
    return height, width


def check_multiple(name: str, value: int, factor: int) -> None:
    """Raise a ValueError suggesting the nearest valid sizes unless ``value`` is a
    multiple of the VAE's downsampling ``factor``."""
    if value % factor:
        lower, upper = value - value % factor, value - value % factor + factor
        raise ValueError(
            f"{name} {value} is not a multiple of {factor} (the VAE's downsampling factor); "
            f"use {lower or factor} or {upper}"
        )


def _encode(pipe: Any, ids: list[tuple[int, ...]], lengths: list[int], device: torch.device) -> torch.Tensor:
    """Text embeddings of padded token ids, as the stock pipeline computes them.

    ``lengths``: real tokens per sequence (begin- and end-of-text included), for text
    encoders configured to use an attention mask.
    """
    tokens = torch.tensor(ids, device=device)
    mask = None
    if getattr(pipe.text_encoder.config, "use_attention_mask", False):
        positions = torch.arange(tokens.shape[1], device=device)
        mask = (positions[None, :] < torch.tensor(lengths, device=device)[:, None]).long()
    embeddings = pipe.text_encoder(tokens, attention_mask=mask)[0]
    return embeddings.to(dtype=pipe.text_encoder.dtype, device=device)


def embeddings(pipe: Any, branches: tuple[Branch, ...], negative_prompt: str, guided: bool, device) -> torch.Tensor:
    """The UNet's text input: every branch's embedding c, preceded (when ``guided``) by the
    unconditional embedding once per branch, as the stock pipeline computes them."""
    text = _encode(pipe, [b.prompt.ids for b in branches], [b.prompt.length for b in branches], device)
    if not guided:
        return text
    ids, length = negative_ids(pipe.tokenizer, negative_prompt, branches[0].prompt.max_length)
    unconditional = _encode(pipe, [ids], [length], device)
    return torch.cat([unconditional.expand(len(branches), -1, -1), text])


def negative_ids(tokenizer: Any, text: str, max_length: int) -> tuple[tuple[int, ...], int]:
    """The stock pipeline's unconditional input: ``text`` truncated and padded to
    ``max_length`` (begin- and end-of-text included), and its number of real tokens;
    computed without touching the tokenizer's shared padding settings."""
    body = encode_text(tokenizer, text)[0][: max_length - 2]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = (tokenizer.bos_token_id, *body, tokenizer.eos_token_id) + (pad,) * (max_length - len(body) - 2)
    return ids, len(body) + 2


def is_guided(pipe: Any, guidance: float) -> bool:
    """Whether a run uses classifier-free guidance (not for guidance-distilled UNets)."""
    return guidance > 1.0 and getattr(pipe.unet.config, "time_cond_proj_dim", None) is None


@torch.no_grad()
def _decode(pipe: Any, latents: torch.Tensor) -> list[Image.Image]:
    images = []
    scaling = pipe.vae.config.scaling_factor
    shift = getattr(pipe.vae.config, "shift_factor", None) or 0.0
    for latent in latents:  # one at a time: decoding is the memory peak at large sizes
        decoded = pipe.vae.decode(latent[None].to(pipe.vae.dtype) / scaling + shift, return_dict=False)[0]
        if not bool(torch.isfinite(decoded).all()):
            raise NotFinite(
                f"the VAE decoded non-finite pixels (NaN or inf) in {pipe.vae.dtype}; a float16 VAE "
                "overflows at some sizes: decode in float32 (pipe.vae.to(torch.float32)) and run again"
            )
        array = (decoded[0].float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).cpu().numpy()
        images.append(Image.fromarray((array * 255).round().astype(np.uint8)))
    return images


def _step_kwargs(scheduler, eta: float, seed: int) -> dict[str, Any]:
    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict[str, Any] = {}
    if "eta" in accepted:
        kwargs["eta"] = eta
    if "generator" in accepted:
        kwargs["generator"] = torch.Generator("cpu").manual_seed(seed + 1)
    return kwargs


def _rescale(guided: torch.Tensor, text: torch.Tensor, factor: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023, section 3.4), as the stock pipeline does it."""
    dims = list(range(1, text.ndim))
    rescaled = guided * (text.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return factor * rescaled + (1 - factor) * guided


def run(
    pipe: Any,
    recipe: Recipe,
    *,
    record: bool = True,
    callback: Callable[[Progress], None] | None = None,
    preview_every: int = 0,
    cancel: threading.Event | None = None,
    record_self: tuple[int, int] | None = None,
    latents: torch.Tensor | None = None,
    inversion: Any = None,
) -> Result:
    """Generate the source and every target of ``recipe`` in one batch.

    Args:
        pipe: a Stable Diffusion pipeline (SD 1.x / 2.x, epsilon or v-prediction).
        recipe: prompts, edits and settings.
        record: keep the cross-attention record (fp16 on the CPU).
        callback: called after every step with a :class:`Progress`.
        preview_every: every this many steps, decode the predicted clean images for
            the callback (0: never).
        cancel: an event another thread may set; the run then stops at the next step
            and raises :class:`Cancelled`.
        record_self: ``(step, factor)``: also keep the self-attention maps of that step
            at that resolution (for the self-attention components view).
        latents: x_T for one branch, (1, channels, h, w); default: from ``recipe.seed``
            (given latents are not part of the recipe: it reproduces the run only if they
            equal ``initial_noise(pipe, recipe.seed, height, width)``).
        inversion: an :class:`~p2p_widgets.inversion.Inversion` of a real image: the run
            starts from its x_T and edits that image. The recipe's source prompt, steps,
            size and scheduler must be the inversion's (``inversion.edit`` fills them in),
            and for null-text its guidance. Null-text replaces the unconditional embedding
            step by step, negative-prompt uses the source prompt's embedding in its place,
            direct keeps the source branch on the inversion's trajectory. With local
            blending, the targets are restored outside their masks to the inversion's
            trajectory, that is to the original image, whatever the method (paper fig. 12).

    Raises:
        ValueError / TypeError: bad input, before the pipeline is touched.
        Cancelled: ``cancel`` was set. The pipeline is restored in every case.
    """
    if not isinstance(recipe, Recipe):
        raise TypeError(f"run() takes a Recipe, not {type(recipe).__name__}; use edit() for prompts")
    if isinstance(preview_every, bool) or not isinstance(preview_every, int) or preview_every < 0:
        raise ValueError(f"preview_every is a number of steps (0 = no preview), not {preview_every!r}")
    if not isinstance(record, bool):
        raise TypeError(f"record is True or False, not {record!r}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback is a function of a Progress, not {type(callback).__name__}")
    if cancel is not None and not callable(getattr(cancel, "is_set", None)):
        raise TypeError(f"cancel is a threading.Event (set it to stop the run), not {type(cancel).__name__}")
    _check_pipeline(pipe)
    unet = pipe.unet
    device = unet.device
    height, width = _size(pipe, recipe)
    factor = vae_factor(pipe)
    latent_size = (height // factor, width // factor)
    branches = plan_branches(recipe, pipe.tokenizer)
    places = find_places(unet)
    scheduler = make_scheduler(pipe, recipe.scheduler)
    if record_self is not None:
        self_factors = sorted({p.factor for p in places.values() if not p.is_cross})
        valid = (
            isinstance(record_self, (tuple, list))
            and len(record_self) == 2
            and record_self[1] in self_factors
            and isinstance(record_self[0], int)
            and 0 <= record_self[0] < recipe.steps
        )
        if not valid:
            raise ValueError(
                f"record_self is (step, factor) with step in 0..{recipe.steps - 1} and factor one of "
                f"{', '.join(map(str, self_factors))}, not {record_self!r}"
            )
        record_self = (int(record_self[0]), int(record_self[1]))
    check_steps(scheduler, recipe.steps)
    if inversion is not None:
        _check_inversion(inversion, recipe, scheduler, (height, width), latents)
    # The schedule, set before the memory check: Heun samples 2 * steps - 1 steps.
    scheduler.set_timesteps(recipe.steps, device=device)
    timesteps = scheduler.timesteps
    estimate_run(
        pipe, branches, len(timesteps), (height, width), is_guided(pipe, recipe.guidance), record, record_self, places
    ).check("use fewer steps, a smaller size or fewer targets (or record=False)")
    if inversion is not None:
        latents = inversion.trajectory[-1:]
    if latents is None:
        latents = initial_noise(pipe, recipe.seed, height, width)
    expected = (1, unet.config.in_channels, *latent_size)
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"latents is a torch.Tensor of shape {expected}, not {type(latents).__name__}")
    if tuple(latents.shape) != expected:
        raise ValueError(f"latents must have shape {expected} for a {height}x{width} image, not {tuple(latents.shape)}")
    if not bool(torch.isfinite(latents).all()):
        raise ValueError("the latents hold NaN or infinite values; give finite x_T (e.g. initial_noise(pipe, seed, h, w))")
    recipe = recipe.replace(
        height=height,
        width=width,
        scheduler=type(scheduler).__name__,
        model=recipe.model or getattr(getattr(pipe, "config", None), "_name_or_path", None) or None,
    )
    count = len(branches)
    guided = is_guided(pipe, recipe.guidance)

    with torch.no_grad():
        # 1. Text embeddings c of every branch; the unconditional embedding for guidance.
        text = embeddings(pipe, branches, recipe.negative_prompt, guided, device)
        per_step, trajectory, pin = None, None, False
        if inversion is not None:
            trajectory = inversion.trajectory.to(device=device, dtype=text.dtype)
            pin = inversion.method == "direct"
            if guided and inversion.unconditional is not None:  # null-text
                per_step = inversion.unconditional.to(device=device, dtype=text.dtype)
            elif guided and inversion.method == "negative-prompt":
                text = torch.cat([text[count : count + 1].expand(count, -1, -1), text[count:]])
        # 2. x_T shared by every branch (the paper: same seed for all), on the schedule set above.
        x = latents.to(device=device, dtype=text.dtype).expand(count, -1, -1, -1) * scheduler.init_noise_sigma
        step_kwargs = _step_kwargs(scheduler, recipe.eta, recipe.seed)
        controller = Controller(
            branches, recipe.replace(steps=len(timesteps)), places, latent_size, device, guided, record, record_self
        )
        with attached(unet, controller, places):
            for i, t in enumerate(timesteps):
                if cancel is not None and cancel.is_set():
                    raise Cancelled(f"cancelled at step {i} of {len(timesteps)}")
                controller.begin_step(i)
                # 3. epsilon (or v) for every branch, both halves in one UNet call.
                model_input = torch.cat([x, x]) if guided else x
                model_input = scheduler.scale_model_input(model_input, t)
                if per_step is not None:
                    text = torch.cat([per_step[i][None].expand(count, -1, -1), text[count:]])
                with active(controller):  # only this run's calls are edited (the UNet may be shared)
                    prediction = unet(model_input, t, encoder_hidden_states=text, return_dict=False)[0]
                if guided:
                    unconditional_pred, text_pred = prediction.chunk(2)
                    prediction = unconditional_pred + recipe.guidance * (text_pred - unconditional_pred)
                    if recipe.guidance_rescale > 0:
                        prediction = _rescale(prediction, text_pred, recipe.guidance_rescale)
                # 4. x_{t-1} from x_t, then local blending of the targets.
                output = scheduler.step(prediction, t, x, **step_kwargs, return_dict=True)
                x, reference = output.prev_sample, None
                if trajectory is not None:
                    reference = trajectory[len(timesteps) - i - 1]
                    if pin:  # direct inversion: the source follows the trajectory exactly
                        x = torch.cat([reference[None], x[1:]])
                x = controller.end_step(x, reference)
                if not bool(torch.isfinite(x).all()):  # one check per step, never per layer
                    raise NotFinite(_not_finite(x, i, len(timesteps), recipe, pipe))
                if callback is not None:
                    preview = None
                    clean = getattr(output, "pred_original_sample", None)
                    if preview_every and clean is not None and ((i + 1) % preview_every == 0 or i + 1 == len(timesteps)):
                        preview = tuple(_decode(pipe, clean))
                    callback(Progress(i, len(timesteps), int(t), preview))
        attention, masks = controller.finish(tuple(int(t) for t in timesteps))
        # 5. Decode x_0.
        images = _decode(pipe, x)
    return Result(
        recipe=recipe,
        images=tuple(images),
        latents=x.float().cpu(),
        branches=branches,
        attention=attention,
        blend_masks=masks,
    )


def check_steps(scheduler: Any, steps: int) -> None:
    """Refuse more steps than the scheduler has training timesteps (before any work)."""
    trained = getattr(scheduler.config, "num_train_timesteps", None)
    if isinstance(trained, int) and steps > trained:
        raise ValueError(
            f"steps {steps} is more than the {trained} timesteps {type(scheduler).__name__} was trained with; "
            f"use at most {trained} (50 in the paper)"
        )


def _not_finite(x: torch.Tensor, step: int, steps: int, recipe: Recipe, pipe: Any) -> str:
    """Which branch went non-finite, when, and the settings most likely to blame."""
    bad = [b for b in range(x.shape[0]) if not bool(torch.isfinite(x[b]).all())]
    where = ", ".join("the source" if b == 0 else f"target {b}" for b in bad)
    causes = []
    if abs(recipe.guidance) > 30:
        causes.append(f"guidance {recipe.guidance:g} (usual: 1 to 20)")
    for number, target in enumerate(recipe.targets, start=1):
        for word, weight in target.reweight:
            if abs(weight) > 20:
                causes.append(f"target {number}'s re-weight {weight:g} of {word!r} (usual: -2 to 5)")
    if recipe.eta > 0:
        causes.append(f"eta {recipe.eta:g}")
    dtype = pipe.unet.dtype
    if dtype == torch.float16:
        causes.append("float16 weights, which overflow where bfloat16 or float32 do not")
    blame = "; likely cause: " + ", ".join(causes) if causes else "; no setting is out of the usual range: check the model's weights"
    return (
        f"the latents of {where} became non-finite (NaN or inf) at step {step + 1} of {steps}{blame}. "
        "Nothing was returned and the pipeline is unchanged; change that and run again"
    )


def estimate_run(
    pipe: Any,
    branches: Any,
    steps: int,
    size: tuple[int, int],
    guided: bool,
    record: bool = True,
    record_self: tuple[int, int] | None = None,
    places: dict | None = None,
) -> MemoryEstimate:
    """What a run allocates beyond the model's weights (:class:`~p2p_widgets.memory.MemoryEstimate`).

    ``branches``: the planned branches (or their number, for prompts of full length).
    Counts the latents, the UNet's largest activations at the finest level, the explicit
    cross-attention probabilities, the attention record (fp16, on the device during the run
    and copied to the host at its end), the optional self-attention maps, the controller's
    per-step tables, the blend masks and decoding.
    """
    count = branches if isinstance(branches, int) else len(branches)
    tokens = (
        pipe.tokenizer.model_max_length if isinstance(branches, int) else max(b.prompt.length for b in branches)
    )
    length = int(pipe.tokenizer.model_max_length)
    height, width = size
    factor = vae_factor(pipe)
    latent = (height // factor, width // factor)
    pixels = latent[0] * latent[1]
    rows = 2 * count if guided else count
    element = torch.finfo(pipe.unet.dtype).bits // 8
    places = find_places(pipe.unet) if places is None else places
    cross = [p for p in places.values() if p.is_cross]
    factors = sorted({p.factor for p in cross})
    cells = {f: _cells(latent, f) for f in factors}
    heads = max(getattr(pipe.unet.get_submodule(p.name), "heads", 1) for p in cross)
    first_channels = pipe.unet.config.block_out_channels[0]
    channels = pipe.unet.config.in_channels
    record_bytes = steps * count * tokens * sum(cells.values()) * 2 if record else 0
    on_device = [
        ("latents", rows * channels * pixels * 4 * 8),
        ("UNet activations", rows * first_channels * pixels * element * 12),
        ("explicit cross-attention", count * heads * cells[factors[0]] * length * 4 * 3),
        ("attention record", record_bytes),
        ("controller tables", steps * count * length * 4 * 3 + steps * rows * 8),
        ("blend masks", steps * count * pixels),
    ]
    if record_self is not None:
        self_cells = _cells(latent, record_self[1])
        on_device.append(("self-attention maps", count * heads * self_cells * self_cells * 4 * 2))
    vae_channels = pipe.vae.config.block_out_channels[0]
    on_device.append(("decoding", vae_channels * height * width * element * 4))
    on_host = [("attention record (host copy)", record_bytes), ("images", count * height * width * 3 * 5)]
    what = f"this run ({count} branches, {steps} steps, {height}x{width} pixels)"
    return MemoryEstimate(what, pipe.unet.device, tuple(on_device), tuple(on_host))


def _cells(latent: tuple[int, int], factor: int) -> int:
    height, width = map_size(latent, factor)
    return height * width


def _check_inversion(inversion: Any, recipe: Recipe, scheduler: Any, size: tuple[int, int], latents: Any) -> None:
    """Refuse a run that would not edit the inverted image as it was inverted."""
    from .inversion import Inversion

    if not isinstance(inversion, Inversion):
        raise TypeError(f"inversion is what p2p_widgets.invert() returns, not {type(inversion).__name__}")
    if latents is not None:
        raise ValueError("give latents or an inversion, not both (an inversion brings its own x_T)")
    problems = []
    if recipe.prompt != inversion.prompt:
        problems.append(f"the source prompt must be the inverted one, {inversion.prompt!r}, not {recipe.prompt!r}")
    if recipe.steps != inversion.steps:
        problems.append(f"steps must be {inversion.steps}, not {recipe.steps}")
    if size != (inversion.height, inversion.width):
        problems.append(f"the size must be {inversion.height}x{inversion.width} (height x width), not {size[0]}x{size[1]}")
    if type(scheduler).__name__ != inversion.scheduler:
        problems.append(f"the scheduler must be {inversion.scheduler}, not {type(scheduler).__name__}")
    if recipe.eta != 0:
        problems.append(f"eta must be 0 (inversion follows deterministic DDIM), not {recipe.eta}")
    if inversion.unconditional is not None and recipe.guidance != inversion.guidance:
        problems.append(
            f"guidance must be {inversion.guidance}: the null-text embeddings were optimised for it, "
            f"not for {recipe.guidance} (invert again for another guidance)"
        )
    if problems:
        raise ValueError("this run does not match the inversion: " + "; ".join(problems) + " (inversion.edit(pipe, ...) sets them)")


def edit(pipe: Any, prompt: str, *targets: Target | str, **settings: Any) -> Result:
    """Generate ``prompt`` and its edits in one batch: ``edit(pipe, "a cat", "a dog")``.

    ``settings`` are :class:`Recipe` fields (seed, steps, guidance, ...) and the keyword
    arguments of :func:`run` (record, callback, preview_every, cancel, record_self, latents).
    """
    options = ("record", "callback", "preview_every", "cancel", "record_self", "latents", "inversion")
    run_options = {name: settings.pop(name) for name in options if name in settings}
    known = {f.name for f in fields(Recipe)} - {"prompt", "targets", "version"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise TypeError(
            f"edit() got unknown setting(s) {', '.join(unknown)}; recipe settings: {', '.join(sorted(known))}; "
            f"run options: {', '.join(options)}"
        )
    recipe = Recipe(prompt, tuple(targets), **settings)
    return run(pipe, recipe, **run_options)
