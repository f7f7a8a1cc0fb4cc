"""The notebook panel: ``P2PPanel(pipe)`` in a cell.

>>> from p2p_widgets.panel import P2PPanel
>>> panel = P2PPanel("tiny", source="a cat riding a bicycle", edits=["a dog riding a bicycle"])
>>> panel  # shows the widgets in a notebook

Everything the panel does is a call on ``panel.session`` (a :class:`Session`): tests
and notebooks can drive it without a browser.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .session import EditRow, Entry, Session, Settings, State, View, WordChoice
from .view import PanelView

if TYPE_CHECKING:
    import ipywidgets

__all__ = ["P2PPanel", "Session", "Settings", "EditRow", "WordChoice", "State", "View", "Entry", "PanelView"]


_EXAMPLES = {  # prompts to start from when none are given, by model name
    "shapes": (
        "a big red circle and a small blue square on a black background",
        "a big red star and a small blue square on a black background",
    ),
}
_DEFAULT_EXAMPLE = ("a cat riding a bicycle", "a dog riding a bicycle")
_MODEL_SETTINGS = {  # defaults that suit a model, unless given
    "shapes": {"threshold": 0.7},  # its word maps keep a floor of 0.2-0.5 of their peak (see its model card)
}


class P2PPanel:
    """The Prompt-to-Prompt panel for a pipeline.

    Args:
        pipe: a Stable Diffusion pipeline, or a name for
            :func:`~p2p_widgets.models.load_pipeline` ("shapes", "tiny", a folder, a hub id).
        source: the source prompt to start with (default: an example for the model).
        edits: edited prompts to start with (strings or :class:`EditRow`; default: an
            example edit when ``source`` is not given either).
        preview_every: a live preview every this many steps (0: none).
        **settings: other :class:`Settings` fields (seed, steps, guidance, size, cross,
            self_attn, threshold).
    """

    def __init__(
        self,
        pipe: Any,
        source: str | None = None,
        edits: tuple[str | EditRow, ...] | list[str | EditRow] | None = None,
        *,
        preview_every: int = 5,
        **settings: Any,
    ):
        from ..models import load_pipeline, model_name

        model: str | None
        if isinstance(pipe, str):
            model, pipe = pipe, load_pipeline(pipe)
        else:
            model = model_name(pipe)
        for name, value in _MODEL_SETTINGS.get(model or "", {}).items():
            settings.setdefault(name, value)
        if source is None:
            source, example = _EXAMPLES.get(model or "", _DEFAULT_EXAMPLE)
            edits = (example,) if edits is None else edits
        rows = tuple(e if isinstance(e, EditRow) else EditRow(e) for e in (edits or ("",)))
        self.session = Session(
            pipe, Settings(source=source, edits=rows, **settings), preview_every=preview_every, model=model
        )
        self.view = PanelView(self.session)

    @property
    def widgets(self) -> dict[str, Any]:
        """Every widget of the panel by name."""
        return self.view.widgets

    @property
    def root(self) -> ipywidgets.VBox:
        """The panel's outermost widget (what a notebook cell shows)."""
        return self.view.root

    def _ipython_display_(self) -> None:
        from IPython.display import display

        from .compat import enable_colab

        enable_colab()  # a no-op outside Colab
        display(self.view.root)

    def __repr__(self) -> str:
        state = self.session.state
        return (
            f"P2PPanel(source={state.settings.source!r}, edits={len(state.settings.edits)}, "
            f"runs={len(state.history)}, status={state.status!r})"
        )
