"""The panel's widgets: laid out, linked, and turned into session calls.

No torch here. :class:`PanelView` builds the widgets (``view.widgets``: every widget by
name, so tests and notebooks can reach them), turns user changes into
:class:`~p2p_widgets.panel.session.Session` calls, and redraws from the session's state
after every change. Only widgets and traits that ipywidgets 7.7.1 has are used; the
7/8 differences are in :mod:`.compat`.
"""

from __future__ import annotations

import html
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets

from . import compat

if TYPE_CHECKING:
    from .session import Session, State

__all__ = ["PanelView"]

_CHIP = widgets.Layout(width="auto", height="28px", margin="1px")
_WIDE = {"description_width": "110px"}


def _png(image: Any) -> bytes:
    from .session import png_bytes

    return png_bytes(image)


def _replace_children(box: widgets.Box, children: list[widgets.Widget]) -> None:
    """Put new children in a box and close the old ones (closed widgets free their
    front-end models; rebuilt chips would otherwise pile up in the kernel and browser)."""
    old = list(box.children)
    box.children = children
    for widget in old:
        for child in getattr(widget, "children", ()):
            child.close()
        widget.close()


def _show(image: widgets.Image, png: bytes) -> None:
    """Show a PNG at its own pixel size (an Image widget otherwise stretches to the cell)."""
    image.value = png
    image.width = str(int.from_bytes(png[16:20], "big"))  # the IHDR chunk's width


class PanelView:
    """Widgets for a session. ``root`` is the panel; ``widgets`` maps names to widgets."""

    def __init__(self, session: Session):
        self.session = session
        self._local = threading.local()  # set while the view writes widgets from state
        self._draw_lock = threading.RLock()
        self._last: State | None = None
        self.errors: list[str] = []  # exceptions raised inside callbacks (ipywidgets would hide them)
        w: dict[str, Any] = {}  # ipywidgets ships no types: its widgets are Any to the type checker
        self.widgets = w
        # -- prompts
        w["source"] = widgets.Text(
            description="Source", placeholder="a cat riding a bicycle", style=_WIDE, layout=widgets.Layout(width="98%")
        )
        w["edits"] = widgets.VBox()
        w["add_edit"] = compat.tooltip(
            widgets.Button(description="+ edited prompt", layout=widgets.Layout(width="160px")),
            "add another edited prompt",
        )
        # -- token picker
        w["chips"] = widgets.VBox()
        w["word"] = widgets.HTML(
            "<i>click a word of an edited prompt to re-weight it, preserve it or edit only there</i>"
        )
        lo, hi = session.weight_range
        w["weight"] = widgets.FloatSlider(
            value=1.0, min=lo, max=hi, step=0.1, description="re-weight", style=_WIDE, continuous_update=False
        )
        w["preserve"] = compat.tooltip(
            widgets.Checkbox(description="preserve (inject from the source)", indent=False),
            "object preservation: inject only the preserved words' maps from the source",
        )
        w["local"] = compat.tooltip(
            widgets.Checkbox(description="edit only here (local blend)", indent=False),
            "confine the edit to where this word attends",
        )
        # -- settings
        w["seed"] = widgets.IntText(description="seed", style=_WIDE, layout=widgets.Layout(width="260px"))
        w["new_seed"] = compat.tooltip(
            widgets.Button(description="new seed", layout=widgets.Layout(width="100px")), "draw a random seed"
        )
        w["steps"] = widgets.IntSlider(min=1, max=100, description="steps", style=_WIDE, continuous_update=False)
        w["guidance"] = widgets.FloatSlider(
            min=1.0, max=15.0, step=0.5, description="guidance", style=_WIDE, continuous_update=False
        )
        self._sizes = list(session.size_options())  # Dropdown values are indices: None means "no selection" in 8.x
        w["size"] = widgets.Dropdown(
            options=[(label, i) for i, (label, _) in enumerate(self._sizes)], description="size", style=_WIDE
        )
        w["cross"] = widgets.FloatRangeSlider(
            min=0.0, max=1.0, step=0.05, description="cross inject", style=_WIDE, continuous_update=False
        )
        w["self_attn"] = widgets.FloatRangeSlider(
            min=0.0, max=1.0, step=0.05, description="self inject", style=_WIDE, continuous_update=False
        )
        w["threshold"] = compat.tooltip(
            widgets.FloatSlider(
                min=0.0, max=0.95, step=0.05, description="blend k", style=_WIDE, continuous_update=False
            ),
            "local-blend threshold k; 0: no blending",
        )
        w["values"] = compat.tooltip(
            widgets.FloatRangeSlider(
                min=0.0, max=1.0, step=0.05, description="value inject", style=_WIDE, continuous_update=False
            ),
            "CL P2P value injection: unchanged words take the source's attention values in these steps; "
            "keeps the rest closer to the source, but past about half the steps it can undo the edit",
        )
        w["value_beta"] = compat.tooltip(
            widgets.FloatSlider(
                min=0.0, max=1.0, step=0.05, description="value beta", style=_WIDE, continuous_update=False
            ),
            "the source's share of the injected values: (1 - beta) V + beta V_source; "
            "a low share can run over all the steps and keep the edit",
        )
        presets = [
            ("custom", ""),
            ("literature: k 0.3, cross 0.8, self 0.2", "literature"),
            ("optimised (CL P2P): k 0, cross 0.2, self 0.8", "optimised"),
        ]
        w["preset"] = widgets.Dropdown(options=presets, value="", description="preset", style=_WIDE)
        # -- run
        w["generate"] = widgets.Button(description="Generate", button_style="primary", icon="play")
        w["cancel"] = widgets.Button(description="Cancel", button_style="danger", icon="stop", disabled=True)
        w["cycle"] = compat.tooltip(
            widgets.Button(description="Cycle", icon="refresh"),
            "generate, and also edit 1's result back to the prompt it edits; the status shows how close it returns",
        )
        w["continue"] = compat.tooltip(
            widgets.Button(description="edit this result", icon="pencil", layout=widgets.Layout(width="190px")),
            "continue the chain from the image shown: it becomes the prompt the edits start from",
        )
        w["crumbs"] = widgets.HBox(layout=widgets.Layout(flex_flow="row wrap"))
        w["progress"] = widgets.IntProgress(min=0, max=1, value=0, layout=widgets.Layout(width="300px"))
        w["status"] = widgets.HTML()
        w["preview"] = widgets.Image(format="png", layout=widgets.Layout(display="none", max_width="100%"))
        # -- output
        w["images"] = widgets.Image(format="png", layout=widgets.Layout(max_width="100%"))
        w["branch"] = widgets.Dropdown(description="heatmaps of", options=[("source", 0)], style=_WIDE)
        w["mode"] = widgets.ToggleButtons(
            options=[("heatmaps", "heatmaps"), ("difference", "difference")], style={"button_width": "85px"}
        )
        w["overlay"] = widgets.ToggleButtons(
            options=[("overlay", True), ("raw", False)], style={"button_width": "70px"}
        )
        self._factors: list[int | None] = [None]
        w["resolution"] = widgets.Dropdown(description="resolution", options=[("all", 0)], style=_WIDE)
        w["all_steps"] = widgets.Checkbox(value=True, description="average of all steps", indent=False)
        w["step"] = widgets.IntSlider(min=1, max=1, value=1, description="step", style=_WIDE)
        w["play"] = widgets.Play(min=1, max=1, value=1, interval=250, step=1)
        widgets.jslink((w["play"], "value"), (w["step"], "value"))
        w["heatmaps"] = widgets.Image(format="png", layout=widgets.Layout(max_width="100%"))
        # -- history and files
        w["history"] = widgets.HBox(layout=widgets.Layout(flex_flow="row wrap"))
        w["folder"] = widgets.Text(value="p2p_exports", description="folder", style=_WIDE)
        w["export"] = compat.tooltip(
            widgets.Button(description="Export"), "write the shown run's PNGs (recipe embedded) and recipe JSON"
        )
        w["recipe_path"] = widgets.Text(
            placeholder="path/to/p2p_run1_0.png or .json", description="recipe file", style=_WIDE
        )
        w["load"] = widgets.Button(description="Load recipe")
        w["upload"] = widgets.FileUpload(accept=".png,.json", multiple=False, description="upload recipe")

        for name in ("preview", "images", "heatmaps", "status", "step", "history"):
            w[name].add_class(f"p2p-{name}")  # stable handles for browser tests and custom CSS
        settings_box = widgets.VBox(
            [
                widgets.HBox([w["seed"], w["new_seed"]]),
                w["steps"],
                w["guidance"],
                w["size"],
                w["preset"],
                w["cross"],
                w["self_attn"],
                w["threshold"],
                w["values"],
                w["value_beta"],
            ]
        )
        w["settings"] = widgets.Accordion(children=[settings_box])
        compat.set_titles(
            w["settings"], ["settings: seed, steps, guidance, size, injection windows and presets, blend threshold"]
        )
        self.root = widgets.VBox(
            [
                w["source"],
                w["crumbs"],
                w["edits"],
                w["add_edit"],
                w["chips"],
                widgets.HBox([w["word"]]),
                widgets.HBox([w["weight"], w["preserve"], w["local"]]),
                w["settings"],
                widgets.HBox([w["generate"], w["cycle"], w["cancel"], w["progress"], w["status"]]),
                w["preview"],
                w["images"],
                widgets.HBox([w["branch"], w["continue"], w["mode"], w["overlay"], w["resolution"]]),
                widgets.HBox([w["all_steps"], w["step"], w["play"]]),
                w["heatmaps"],
                widgets.HTML("<b>history</b> (click a run to restore it)"),
                w["history"],
                widgets.HBox([w["folder"], w["export"]]),
                widgets.HBox([w["recipe_path"], w["load"], w["upload"]]),
            ]
        )
        self._edit_rows: list[dict[str, widgets.Widget]] = []
        self._last_words: tuple | None = None
        self._last_crumbs: tuple[str, ...] | None = None
        self._history_items: dict[int, widgets.Widget] = {}
        self._connect()
        session.observe(self._on_state)
        self._on_state(session.state)

    # -- user -> session --------------------------------------------------------------
    def _guard(self, action: Callable[..., object]) -> Callable[..., None]:
        """Wrap a callback: skip it while the view itself writes widgets; show any
        exception in the status line (replacing any error shown before) and keep it in
        ``errors``, instead of letting ipywidgets swallow it into a log."""

        def handler(*args: Any) -> None:
            if getattr(self._local, "drawing", False):
                return
            try:
                action(*args)
            except Exception as error:  # shown in the status line, kept for tests
                self.errors.append(f"{type(error).__name__}: {error}")
                self.session.report(error)

        return handler

    def _on_value(self, name: str, action: Callable[[Any], object]) -> None:
        self.widgets[name].observe(self._guard(lambda change: action(change["new"])), names="value")

    def _connect(self) -> None:
        w, s = self.widgets, self.session
        self._on_value("source", lambda value: s.update(source=value))
        w["add_edit"].on_click(self._guard(lambda _: s.add_edit()))
        self._on_value("weight", lambda value: self._choose(weight=value))
        self._on_value("preserve", lambda value: self._choose(preserve=value))
        self._on_value("local", lambda value: self._choose(local=value))
        self._on_value("seed", lambda value: s.update(seed=int(value)))
        w["new_seed"].on_click(self._guard(lambda _: s.new_seed()))
        self._on_value("steps", lambda value: s.update(steps=int(value)))
        self._on_value("guidance", lambda value: s.update(guidance=float(value)))
        self._on_value("size", lambda index: s.update(size=self._sizes[index][1]))
        self._on_value("cross", lambda value: s.update(cross=tuple(value)))
        self._on_value("self_attn", lambda value: s.update(self_attn=tuple(value)))
        self._on_value("threshold", lambda value: s.update(threshold=float(value)))
        self._on_value("values", lambda value: s.update(values=tuple(value)))
        self._on_value("value_beta", lambda value: s.update(value_beta=float(value)))
        self._on_value("preset", lambda name: s.apply_preset(name) if name else None)
        w["generate"].on_click(self._guard(lambda _: s.run()))
        w["cancel"].on_click(self._guard(lambda _: s.cancel()))
        w["cycle"].on_click(self._guard(lambda _: s.run(cycle=True)))
        w["continue"].on_click(self._guard(lambda _: s.continue_from()))
        self._on_value("branch", lambda value: s.show(branch=value))
        self._on_value("mode", lambda value: s.show(mode=value))
        self._on_value("overlay", lambda value: s.show(overlay=value))
        self._on_value("resolution", lambda index: s.show(factor=self._factors[index]))
        self._on_value("all_steps", lambda value: s.set_step(None if value else w["step"].value - 1))
        self._on_value("step", self._scrub)
        w["export"].on_click(self._guard(lambda _: s.export(w["folder"].value)))
        w["load"].on_click(self._guard(lambda _: s.load_recipe(w["recipe_path"].value.strip())))
        self._on_value("upload", self._uploaded)

    def _scrub(self, step: int) -> None:
        if self.widgets["all_steps"].value:
            with self._drawing():
                self.widgets["all_steps"].value = False
        self.session.set_step(int(step) - 1)

    def _uploaded(self, _value: Any) -> None:
        files = compat.uploaded_files(self.widgets["upload"])
        if not files:
            return
        name, data = files[-1]
        try:
            self.session.load_recipe(data, name)
        finally:
            with self._drawing():
                compat.clear_upload(self.widgets["upload"])

    def _choose(self, **choice: Any) -> None:
        selected = self.session.state.selected
        if selected is None or selected[0] == 0:
            return
        self.session.choose(selected[0], selected[1], **choice)

    # -- session -> widgets -----------------------------------------------------------
    @contextmanager
    def _drawing(self) -> Iterator[None]:
        """While the view writes widgets from state: their change events are not user input."""
        previous = getattr(self._local, "drawing", False)
        self._local.drawing = True
        try:
            yield
        finally:
            self._local.drawing = previous

    def _on_state(self, state: State) -> None:
        with self._draw_lock, self._drawing():
            last, self._last = self._last, state
            try:
                if last is None or state.settings != last.settings:
                    self._draw_settings(state)
                words = self._words_key(state)
                if words != self._last_words:
                    self._last_words = words
                    self._draw_words(state)
                self._draw_status(state)
                if last is None or state.preview is not last.preview:
                    self._draw_preview(state)
                if last is None or state.history != last.history:
                    self._draw_history(state)
                if last is None or state.view != last.view or state.history != last.history:
                    self._draw_output(state, last)
            except Exception as error:  # a drawing bug must not take the session down, nor hide
                self.errors.append(f"{type(error).__name__}: {error}")
                problem = html.escape(
                    f"the panel could not redraw ({type(error).__name__}: {error}); what it shows may be out of date"
                )
                self.widgets["status"].value = f"<span style='color:#b00020'>&#9888; {problem}</span>"

    def _set(self, name: str, value: Any) -> None:
        widget = self.widgets[name]
        if widget.value != value:
            widget.value = value

    def _draw_settings(self, state: State) -> None:
        settings = state.settings
        self._set("source", settings.source)
        self._set("seed", settings.seed)
        self._set("steps", settings.steps)
        self._set("guidance", settings.guidance)
        if settings.size is not None and settings.size not in [size for _, size in self._sizes]:  # e.g. from a recipe
            self._sizes.append((f"{settings.size[0]}x{settings.size[1]}", settings.size))
            self.widgets["size"].options = [(label, i) for i, (label, _) in enumerate(self._sizes)]
        self._set("size", [size for _, size in self._sizes].index(settings.size))
        self._set("cross", settings.cross)
        self._set("self_attn", settings.self_attn)
        self._set("threshold", settings.threshold)
        self._set("values", settings.values)
        self._set("value_beta", settings.value_beta)
        self._set("preset", self.session.preset_name() or "")
        self._draw_crumbs()
        if len(self._edit_rows) != len(settings.edits):
            self._build_edit_rows(len(settings.edits))
        for row, (edit, widgets_) in enumerate(zip(settings.edits, self._edit_rows), start=1):
            if widgets_["prompt"].value != edit.prompt:
                widgets_["prompt"].value = edit.prompt
            if widgets_["kind"].value != edit.kind:
                widgets_["kind"].value = edit.kind
            inferred = self.session.inferred_kind(row)
            widgets_["inferred"].value = f"<span style='color:#555'>&rarr; {inferred}</span>" if inferred else ""

    def _build_edit_rows(self, count: int) -> None:
        rows = []
        self._edit_rows = []
        for row in range(1, count + 1):
            prompt = widgets.Text(
                description=f"Edit {row}",
                placeholder="edited prompt (empty: the source, to re-weight)",
                style=_WIDE,
                layout=widgets.Layout(width="60%"),
            )
            kind = compat.tooltip(
                widgets.Dropdown(options=list(self.session.kinds), layout=widgets.Layout(width="90px")),
                "auto: a swap when the word counts match, else a refinement",
            )
            inferred = widgets.HTML(layout=widgets.Layout(width="80px"))
            remove = compat.tooltip(
                widgets.Button(description="remove", layout=widgets.Layout(width="80px")), "remove this edited prompt"
            )
            prompt.observe(
                self._guard(lambda change, r=row: self.session.set_edit(r, prompt=change["new"])), names="value"
            )
            kind.observe(self._guard(lambda change, r=row: self.session.set_edit(r, kind=change["new"])), names="value")
            remove.on_click(self._guard(lambda _, r=row: self.session.remove_edit(r)))
            self._edit_rows.append(dict(prompt=prompt, kind=kind, inferred=inferred, remove=remove))
            rows.append(widgets.HBox([prompt, kind, inferred, remove]))
        _replace_children(self.widgets["edits"], rows)

    def chip(self, row: int, word: int) -> widgets.Button:
        """The chip button of a word (row 0: the source), for tests and notebooks."""
        return self.widgets["chips"].children[row].children[1 + word]

    def _words_key(self, state: State) -> tuple:
        """What the chips show: each row's prompt, its choices, the selected word."""
        settings = state.settings
        return (settings.source, tuple((e.prompt, e.words) for e in settings.edits), state.selected)

    def _draw_words(self, state: State) -> None:
        rows = []
        for row in range(len(state.settings.edits) + 1):
            label = "source" if row == 0 else f"edit {row}"
            choices = {} if row == 0 else dict(state.settings.edits[row - 1].words)
            chips = [widgets.HTML(f"<span style='display:inline-block;width:60px;color:#555'>{label}</span>")]
            for word in self.session.words(row):
                choice = choices.get(word.index)
                badge = choice.badge() if choice is not None else ""
                chosen = state.selected == (row, word.index)
                button = widgets.Button(
                    description=word.text + (f" [{badge}]" if badge else ""),
                    button_style="info" if chosen else ("warning" if badge else ""),
                    layout=_CHIP,
                )
                tokens = len(word.tokens)
                compat.tooltip(button, f"word {word.index}: {tokens} token{'s' if tokens != 1 else ''}")
                button.on_click(self._guard(lambda _, r=row, k=word.index: self.session.select_word(r, k)))
                chips.append(button)
            rows.append(widgets.HBox(chips, layout=widgets.Layout(flex_flow="row wrap")))
        _replace_children(self.widgets["chips"], rows)
        selected = state.selected
        editable = selected is not None and selected[0] > 0
        for name in ("weight", "preserve", "local"):
            self.widgets[name].disabled = not editable
        if selected is None:
            return
        row, index = selected
        words = self.session.words(row)
        text = words[index].text if index < len(words) else "?"
        if not editable:
            self.widgets["word"].value = (
                f"<b>{html.escape(text)}</b> (source): pick the word in an edited prompt to change it "
                "(an empty edited prompt re-weights the source itself)"
            )
            return
        choice = state.settings.edits[row - 1].choice(index)
        self.widgets["word"].value = f"edit {row}, word <b>{html.escape(text)}</b>:"
        self._set("weight", choice.weight)
        self._set("preserve", choice.preserve)
        self._set("local", choice.local)

    def _draw_crumbs(self) -> None:
        """The chain as a breadcrumb: one button per step (click: go back there)."""
        crumbs = self.session.breadcrumb()
        if crumbs == self._last_crumbs:
            return
        self._last_crumbs = crumbs
        if len(crumbs) == 1:
            self.widgets["crumbs"].children = ()
            return
        items: list[widgets.Widget] = [widgets.HTML("<b>chain</b>")]
        for step, prompt in enumerate(crumbs):
            label = prompt if len(prompt) <= 40 else prompt[:37] + "..."
            button = compat.tooltip(
                widgets.Button(description=f"{step}: {label}", layout=widgets.Layout(width="auto")), prompt
            )
            button.on_click(self._guard(lambda _, n=step: self.session.back_to(n)))
            items += [widgets.HTML("&rsaquo;")] if step else []
            items.append(button)
        self.widgets["crumbs"].children = tuple(items)

    def _draw_status(self, state: State) -> None:
        w = self.widgets
        w["generate"].disabled = state.running
        w["cycle"].disabled = state.running
        w["cancel"].disabled = not state.running
        w["progress"].max = max(1, state.steps)
        w["progress"].value = state.step if state.running or state.status != "done" else w["progress"].max
        w["progress"].bar_style = {"done": "success", "error": "danger", "cancelled": "warning"}.get(state.status, "")
        if state.error:
            w["status"].value = f"<span style='color:#b00020'>&#9888; {html.escape(state.error)}</span>"
        else:
            w["status"].value = html.escape(state.message)

    def _draw_preview(self, state: State) -> None:
        preview = self.widgets["preview"]
        if state.preview:
            from .. import plot

            _show(preview, _png(plot.tile_images(state.preview, tile=128)))
            preview.layout.display = None
        else:
            preview.layout.display = "none"

    def _draw_history(self, state: State) -> None:
        """One thumbnail and restore button per run; built once per run."""
        for entry in state.history:
            if entry.number in self._history_items:
                continue
            thumbnail = widgets.Image(value=_png(entry.thumbnail), format="png")
            button = compat.tooltip(
                widgets.Button(description=f"restore run {entry.number}", layout=widgets.Layout(width="auto")),
                entry.result.recipe.prompt,
            )
            button.on_click(self._guard(lambda _, n=entry.number: self.session.restore(n)))
            self._history_items[entry.number] = widgets.VBox([thumbnail, button])
        self.widgets["history"].children = [self._history_items[e.number] for e in state.history]

    def _draw_output(self, state: State, last: State | None) -> None:
        w = self.widgets
        entry = state.entry
        if entry is None:
            return
        result = entry.result
        if last is None or last.view.entry != state.view.entry or last.entry is None:
            _show(w["images"], _png(self.session.images()))
            w["branch"].options = [("source", 0)] + [(f"edit {i}", i) for i in range(1, len(result.images))]
            resolutions = self.session.resolutions()
            self._factors = [factor for _, factor in resolutions]
            w["resolution"].options = [(label, i) for i, (label, _) in enumerate(resolutions)]
            steps = result.attention.steps if result.attention is not None else result.recipe.steps
            w["step"].max = steps
            w["play"].max = steps
        view = state.view
        self._set("branch", view.branch)
        self._set("mode", view.mode)
        self._set("overlay", view.overlay)
        self._set("resolution", self._factors.index(view.factor))
        self._set("all_steps", view.step is None)
        if view.step is not None:
            self._set("step", view.step + 1)
        frame = self.session.heatmap_png()
        if frame is not None and w["heatmaps"].value != frame:
            _show(w["heatmaps"], frame)
