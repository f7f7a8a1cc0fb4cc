"""Joint sampling of a source and its edited branches in one batch.

``run(pipe, recipe)`` works with the pipeline objects of every supported model family
(:mod:`p2p_widgets.families`: Stable Diffusion 1.x/2.x, SDXL). There is one sampling loop;
it talks to the family's adapter, never to a pipeline class. It never changes the
pipeline: it samples with a fresh copy of the scheduler and installs its attention
processors only for the duration of the run.

The loop follows the stock pipeline step for step, so that with no edit the source
image is the one ``pipe(prompt, latents=...)`` makes.

A run may follow a :class:`Guide` instead of plain noise: what a real image's inversion
(:mod:`p2p_widgets.inversion`) hands the engine, without the engine knowing inversion methods.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
from PIL import Image

from .checks import is_int
from .control import Blender, Branch, Controller, plan_branches
from .edits import Recipe, Target
from .families import Conditioning, Family, NotFinite, family_of
from .memory import MemoryEstimate
from .processors import active, attached, map_size
from .record import AttentionRecord, Recorder

__all__ = [
    "run",
    "edit",
    "Result",
    "Progress",
    "Cancelled",
    "NotFinite",
    "Guide",
    "make_scheduler",
    "initial_noise",
    "estimate_run",
    "resolve",
]


class Cancelled(Exception):
    """The run was cancelled; the pipeline is as it was before the run."""


@dataclass(frozen=True)
class Guide:
    """What a run follows instead of plain noise from the seed (a real image's inversion
    builds one: :meth:`p2p_widgets.Inversion.guide`).

    Attributes:
        latents: x_T for one branch, (1, channels, h, w).
        unconditional: per sampling step, the unconditional conditioning that replaces the
            negative prompt's (null-text: one row per step, text and pooled embeddings), or None.
        trajectory: reference latents x_0 .. x_T, (steps + 1, channels, h, w): sampling step
            ``i`` goes from ``trajectory[steps - i]`` to ``trajectory[steps - i - 1]``; with
            local blending, targets of the source are restored outside their masks to it. Or None.
        pin_source: the source branch follows the trajectory exactly (direct inversion).
        source_as_negative: the source prompt's conditioning replaces the negative prompt's
            (negative-prompt inversion).
    """

    latents: torch.Tensor
    unconditional: Conditioning | None = None
    trajectory: torch.Tensor | None = None
    pin_source: bool = False
    source_as_negative: bool = False

    def check(self, steps: int, shape: tuple[int, ...], text: tuple[int, ...]) -> None:
        """Refuse a guide that does not fit the run (before any work)."""
        if not isinstance(self.latents, torch.Tensor) or tuple(self.latents.shape) != shape:
            raise ValueError(f"the guide's latents must have shape {shape}, not {_shape(self.latents)}")
        if self.trajectory is not None and tuple(self.trajectory.shape) != (steps + 1, *shape[1:]):
            raise ValueError(
                f"the guide's trajectory must have shape {(steps + 1, *shape[1:])} (x_0 .. x_T of {steps} steps), "
                f"not {_shape(self.trajectory)}"
            )
        if self.pin_source and self.trajectory is None:
            raise ValueError("a guide that pins the source needs a trajectory to pin it to")
        if self.unconditional is not None:
            found = tuple(self.unconditional.text.shape)
            if found != (steps, *text):
                raise ValueError(f"the guide's unconditional embeddings must have shape {(steps, *text)}, not {found}")


def _shape(value: Any) -> Any:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


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


def make_scheduler(pipe: Any, name: str) -> Any:
    """A fresh scheduler: class ``name`` built from the pipeline's scheduler config.

    ``name="pipeline"`` copies the pipeline's own scheduler class.
    """
    import diffusers

    own = type(pipe.scheduler)
    cls: Any
    if name == "pipeline":
        cls = own
    else:
        cls = getattr(diffusers, name, None) if isinstance(name, str) else None
        compatible = {c for c in getattr(pipe.scheduler, "compatibles", []) if isinstance(c, type)} | {own}
        known = ", ".join(sorted(c.__name__ for c in compatible))
        backends = getattr(cls, "_backends", None)
        if backends is not None and not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
            missing = [b for b in backends if b != "torch"]
            raise ValueError(
                f"{name} needs the optional package(s) {', '.join(missing)}: pip install {' '.join(missing)}"
            )
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
    return family_of(pipe).vae_factor


def initial_noise(pipe: Any, seed: int, height: int, width: int) -> torch.Tensor:
    """x_T for one branch: standard normal from a CPU generator (same on every device)."""
    return family_of(pipe).initial_noise(seed, height, width)


def resolve(family: Family, recipe: Recipe) -> Recipe:
    """The recipe with what it leaves to the model filled in: the size, guidance and
    scheduler the family's stock pipeline uses by default (checked)."""
    height, width = family.size(recipe.height, recipe.width)
    guidance = family.default_guidance if recipe.guidance is None else recipe.guidance
    scheduler = family.default_scheduler if recipe.scheduler is None else recipe.scheduler
    recipe = recipe.replace(height=height, width=width, guidance=guidance, scheduler=scheduler)
    family.check_recipe(recipe)
    return recipe


def _step_kwargs(scheduler: Any, eta: float, seed: int, count: int, shape: tuple[int, ...]) -> dict[str, Any]:
    """The scheduler step's extra arguments: DDIM's eta, and for stochastic samplers
    (eta > 0, ancestral, SDE) the noise generators.

    Every branch gets its own CPU generator in the same state, so all branches draw the
    same noise at every step (the paper's "same seed for all": a stochastic sampler must not
    tell branches apart), and the state is the stock pipeline's after it drew x_T from
    ``seed``, so the source's noise is the stock pipeline's too.
    """
    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict[str, Any] = {}
    if "eta" in accepted:
        kwargs["eta"] = eta
    if "generator" in accepted:
        generators = []
        for _ in range(count):
            generator = torch.Generator("cpu").manual_seed(seed)
            torch.randn(shape, generator=generator)  # x_T, as the stock pipeline draws it first
            generators.append(generator)
        kwargs["generator"] = generators
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
    guide: Any = None,
) -> Result:
    """Generate the source and every target of ``recipe`` in one batch.

    Args:
        pipe: a pipeline of a supported family (:func:`p2p_widgets.families.family_of`):
            Stable Diffusion 1.x / 2.x (epsilon or v-prediction), SDXL.
        recipe: prompts, edits and settings; what it leaves open (size, guidance,
            scheduler) is the family's stock default.
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
        guide: a :class:`Guide`, or an object that makes one for the recipe (an
            :class:`~p2p_widgets.Inversion` of a real image: ``guide.guide(recipe)``
            checks that the recipe edits the image as it was inverted).

    Raises:
        ValueError / TypeError: bad input, before the pipeline is touched.
        Cancelled: ``cancel`` was set. The pipeline is restored in every case.
    """
    if not isinstance(recipe, Recipe):
        raise TypeError(f"run() takes a Recipe, not {type(recipe).__name__}; use edit() for prompts")
    if not is_int(preview_every) or preview_every < 0:
        raise ValueError(f"preview_every is a number of steps (0 = no preview), not {preview_every!r}")
    if not isinstance(record, bool):
        raise TypeError(f"record is True or False, not {record!r}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback is a function of a Progress, not {type(callback).__name__}")
    if cancel is not None and not callable(getattr(cancel, "is_set", None)):
        raise TypeError(f"cancel is a threading.Event (set it to stop the run), not {type(cancel).__name__}")
    if guide is not None and not isinstance(guide, Guide) and not callable(getattr(guide, "guide", None)):
        raise TypeError(f"guide is a Guide or what p2p_widgets.invert() returns, not {type(guide).__name__}")
    if guide is not None and latents is not None:
        raise ValueError("give latents or a guide, not both (a guide brings its own x_T)")
    family = family_of(pipe)
    recipe = resolve(family, recipe)
    denoiser = family.denoiser
    device = family.device
    height, width = recipe.height, recipe.width
    assert height is not None and width is not None and recipe.guidance is not None and recipe.scheduler is not None
    guidance = recipe.guidance
    latent_size = family.latent_size(height, width)
    branches = plan_branches(recipe, family.tokenizer)
    places = family.places()
    scheduler = make_scheduler(pipe, recipe.scheduler)
    recipe = recipe.replace(
        scheduler=type(scheduler).__name__,
        model=recipe.model or getattr(getattr(pipe, "config", None), "_name_or_path", None) or None,
    )
    if guide is not None and not isinstance(guide, Guide):
        guide = guide.guide(recipe)  # e.g. an Inversion: checks the recipe edits its image as inverted
    if record_self is not None:
        record_self = _check_record_self(record_self, places, recipe.steps)
    check_steps(scheduler, recipe.steps)
    # The schedule, set before the memory check: Heun samples 2 * steps - 1 steps.
    scheduler.set_timesteps(recipe.steps, device=device)
    timesteps = scheduler.timesteps
    steps = len(timesteps)
    guided = family.is_guided(guidance)
    estimate_run(family, branches, steps, (height, width), guided, record, record_self, places).check(
        "use fewer steps, a smaller size or fewer targets (or record=False)"
    )
    expected = (1, family.latent_channels, *latent_size)
    max_length = branches[0].prompt.max_length
    if guide is not None:
        guide.check(steps, expected, (max_length, family.text_width))
        latents = guide.latents
    if latents is None:
        latents = family.initial_noise(recipe.seed, height, width)
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"latents is a torch.Tensor of shape {expected}, not {type(latents).__name__}")
    if tuple(latents.shape) != expected:
        raise ValueError(f"latents must have shape {expected} for a {height}x{width} image, not {tuple(latents.shape)}")
    if not bool(torch.isfinite(latents).all()):
        raise ValueError(
            "the latents hold NaN or infinite values; give finite x_T (e.g. initial_noise(pipe, seed, h, w))"
        )
    count = len(branches)

    with torch.no_grad():
        # 1. The conditioning c of every branch; the unconditional one for guidance.
        conditional = family.encode(branches, recipe, (height, width))
        dtype = conditional.text.dtype
        negative = per_step = None
        if guided:
            negative = family.encode_negative(recipe, (height, width), max_length)
            if guide is not None and guide.source_as_negative:
                negative = conditional.take(slice(0, 1))
            if guide is not None and guide.unconditional is not None:
                per_step = guide.unconditional.to(device, dtype)
        batch = Conditioning.cat([negative.repeat(count), conditional]) if negative is not None else conditional
        trajectory = (
            None if guide is None or guide.trajectory is None else guide.trajectory.to(device=device, dtype=dtype)
        )
        pin = guide is not None and guide.pin_source
        # 2. x_T shared by every branch (the paper: same seed for all), on the schedule set above.
        x = latents.to(device=device, dtype=dtype).expand(count, -1, -1, -1) * scheduler.init_noise_sigma
        step_kwargs = _step_kwargs(scheduler, recipe.eta, recipe.seed, count, expected)
        blender = Blender.plan(branches, steps, latent_size, places, device)
        recorder = Recorder(
            [b.prompt for b in branches],
            latent_size,
            places,
            count if guided else 0,
            record=record,
            record_self=record_self,
            running=None if blender is None else blender.factor,
        )
        controller = Controller(branches, recipe.replace(steps=steps), places, latent_size, device, guided, recorder)
        with attached(denoiser, controller, places):
            for i, t in enumerate(timesteps):
                if cancel is not None and cancel.is_set():
                    raise Cancelled(f"cancelled at step {i} of {steps}")
                controller.begin_step(i)
                # 3. epsilon (or v) for every branch, both halves in one denoiser call.
                model_input = torch.cat([x, x]) if guided else x
                model_input = scheduler.scale_model_input(model_input, t)
                if per_step is not None and negative is not None:
                    step_negative = negative.learned(per_step.text[i : i + 1], _row(per_step.pooled, i))
                    batch = Conditioning.cat([step_negative.repeat(count), conditional])
                with active(controller):  # only this run's calls are edited (the model may be shared)
                    prediction = family.denoise(model_input, t, batch)
                if guided:
                    unconditional_pred, text_pred = prediction.chunk(2)
                    prediction = unconditional_pred + guidance * (text_pred - unconditional_pred)
                    if recipe.guidance_rescale > 0:
                        prediction = _rescale(prediction, text_pred, recipe.guidance_rescale)
                controller.end_step()
                # 4. x_{t-1} from x_t, then local blending of the targets.
                output = scheduler.step(prediction, t, x, **step_kwargs, return_dict=True)
                x, reference = output.prev_sample, None
                if trajectory is not None:
                    reference = trajectory[steps - i - 1]
                    if pin:  # direct inversion: the source follows the trajectory exactly
                        x = torch.cat([reference[None], x[1:]])
                if blender is not None:
                    running = recorder.running()
                    assert running is not None
                    x = blender(x, i, running, reference)
                if not bool(torch.isfinite(x).all()):  # one check per step, never per layer
                    raise NotFinite(_not_finite(x, i, steps, recipe, family))
                if callback is not None:
                    preview = None
                    clean = getattr(output, "pred_original_sample", None)
                    if preview_every and clean is not None and ((i + 1) % preview_every == 0 or i + 1 == steps):
                        preview = tuple(family.decode(clean))
                    callback(Progress(i, steps, int(t), preview))
        attention = recorder.finish(tuple(int(t) for t in timesteps))
        masks = None if blender is None else blender.masks()
        # 5. Decode x_0.
        images = family.decode(x)
    return Result(
        recipe=recipe,
        images=tuple(images),
        latents=x.float().cpu(),
        branches=branches,
        attention=attention,
        blend_masks=masks,
    )


def _row(tensor: torch.Tensor | None, index: int) -> torch.Tensor | None:
    return None if tensor is None else tensor[index : index + 1]


def _check_record_self(record_self: Any, places: dict, steps: int) -> tuple[int, int]:
    self_factors = sorted({p.factor for p in places.values() if not p.is_cross})
    valid = (
        isinstance(record_self, (tuple, list))
        and len(record_self) == 2
        and record_self[1] in self_factors
        and isinstance(record_self[0], int)
        and 0 <= record_self[0] < steps
    )
    if not valid:
        raise ValueError(
            f"record_self is (step, factor) with step in 0..{steps - 1} and factor one of "
            f"{', '.join(map(str, self_factors))}, not {record_self!r}"
        )
    return int(record_self[0]), int(record_self[1])


def check_steps(scheduler: Any, steps: int) -> None:
    """Refuse more steps than the scheduler has training timesteps (before any work)."""
    trained = getattr(scheduler.config, "num_train_timesteps", None)
    if isinstance(trained, int) and steps > trained:
        raise ValueError(
            f"steps {steps} is more than the {trained} timesteps {type(scheduler).__name__} was trained with; "
            f"use at most {trained} (50 in the paper)"
        )


def _not_finite(x: torch.Tensor, step: int, steps: int, recipe: Recipe, family: Family) -> str:
    """Which branch went non-finite, when, and the settings most likely to blame."""
    bad = [b for b in range(x.shape[0]) if not bool(torch.isfinite(x[b]).all())]
    where = ", ".join("the source" if b == 0 else f"target {b}" for b in bad)
    causes = []
    if recipe.guidance is not None and abs(recipe.guidance) > 30:
        causes.append(f"guidance {recipe.guidance:g} (usual: 1 to 20)")
    for number, target in enumerate(recipe.targets, start=1):
        for word, weight in target.reweight:
            if abs(weight) > 20:
                causes.append(f"target {number}'s re-weight {weight:g} of {word!r} (usual: -2 to 5)")
    if recipe.eta > 0:
        causes.append(f"eta {recipe.eta:g}")
    if family.dtype == torch.float16:
        causes.append("float16 weights, which overflow where bfloat16 or float32 do not")
    blame = (
        "; likely cause: " + ", ".join(causes)
        if causes
        else "; no setting is out of the usual range: check the model's weights"
    )
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

    ``pipe``: the pipeline or its family adapter. ``branches``: the planned branches (or
    their number, for prompts of full length). Counts the latents, the denoiser's largest
    activations at the finest level, the explicit cross-attention probabilities, the
    attention record (fp16, on the device during the run and copied to the host at its
    end), the optional self-attention maps, the controller's per-step tables, the blend
    masks and decoding.
    """
    family = family_of(pipe)
    denoiser = family.denoiser
    length = int(family.tokenizer.model_max_length)
    count = branches if isinstance(branches, int) else len(branches)
    tokens = length if isinstance(branches, int) else max(b.prompt.length for b in branches)
    height, width = size
    latent = family.latent_size(height, width)
    pixels = latent[0] * latent[1]
    rows = 2 * count if guided else count
    element = torch.finfo(family.dtype).bits // 8
    places = family.places() if places is None else places
    cross = [p for p in places.values() if p.is_cross]
    factors = sorted({p.factor for p in cross})
    cells = {f: _cells(latent, f) for f in factors}
    heads = max(getattr(denoiser.get_submodule(p.name), "heads", 1) for p in cross)
    first_channels = denoiser.config.block_out_channels[0]
    channels = family.latent_channels
    record_bytes = steps * count * tokens * sum(cells.values()) * 2 if record else 0
    on_device = [
        ("latents", rows * channels * pixels * 4 * 8),
        ("denoiser activations", rows * first_channels * pixels * element * 12),
        ("explicit cross-attention", rows * heads * cells[factors[0]] * length * 4 * 3),
        ("attention record", record_bytes),
        ("controller tables", steps * count * length * 4 * 3 + steps * rows * 8),
        ("blend masks", steps * count * pixels),
    ]
    if record_self is not None:
        self_cells = _cells(latent, record_self[1])
        on_device.append(("self-attention maps", count * heads * self_cells * self_cells * 4 * 2))
    vae_channels = family.pipe.vae.config.block_out_channels[0]
    vae_element = 4 if family._vae_dtype() is not None else element
    on_device.append(("decoding", vae_channels * height * width * vae_element * 4))
    on_host = [("attention record (host copy)", record_bytes), ("images", count * height * width * 3 * 5)]
    what = f"this run ({count} branches, {steps} steps, {height}x{width} pixels)"
    return MemoryEstimate(what, family.device, tuple(on_device), tuple(on_host))


def _cells(latent: tuple[int, int], factor: int) -> int:
    height, width = map_size(latent, factor)
    return height * width


def edit(pipe: Any, prompt: str, *targets: Target | str, **settings: Any) -> Result:
    """Generate ``prompt`` and its edits in one batch: ``edit(pipe, "a cat", "a dog")``.

    ``settings`` are :class:`Recipe` fields (seed, steps, guidance, ...) and the keyword
    arguments of :func:`run` (record, callback, preview_every, cancel, record_self, latents, guide).
    """
    options = ("record", "callback", "preview_every", "cancel", "record_self", "latents", "guide")
    run_options = {name: settings.pop(name) for name in options if name in settings}
    known = {f.name for f in fields(Recipe)} - {"prompt", "targets", "version"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise TypeError(
            f"edit() got unknown setting(s) {', '.join(unknown)}; recipe settings: {', '.join(sorted(known))}; "
            f"run options: {', '.join(options)}"
        )
    recipe = Recipe(prompt, tuple(t if isinstance(t, Target) else Target.from_json(t) for t in targets), **settings)
    return run(pipe, recipe, **run_options)
