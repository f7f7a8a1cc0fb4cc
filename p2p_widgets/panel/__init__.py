"""The notebook panel: ``P2PPanel(pipe)`` in a cell.

>>> from p2p_widgets.panel import P2PPanel
>>> panel = P2PPanel("tiny", source="a cat riding a bicycle", edits=["a dog riding a bicycle"])
>>> panel  # shows the widgets in a notebook

Everything the panel does is a call on ``panel.session`` (a :class:`Session`): tests
and notebooks can drive it without a browser.
"""

from __future__ import annotations

from typing import Any

from .session import EditRow, Entry, Session, Settings, State, View, WordChoice
from .view import PanelView

__all__ = ["P2PPanel", "Session", "Settings", "EditRow", "WordChoice", "State", "View", "Entry", "PanelView"]


class P2PPanel:
    """The Prompt-to-Prompt panel for a pipeline.

    Args:
        pipe: a Stable Diffusion pipeline, or a name for
            :func:`~p2p_widgets.models.load_pipeline` ("shapes", "tiny", a folder, a hub id).
        source: the source prompt to start with.
        edits: edited prompts to start with (strings or :class:`EditRow`).
        preview_every: a live preview every this many steps (0: none).
        **settings: other :class:`Settings` fields (seed, steps, guidance, size, cross,
            self_attn, threshold).
    """

    def __init__(
        self,
        pipe: Any,
        source: str = "",
        edits: tuple[str | EditRow, ...] | list[str | EditRow] = ("",),
        *,
        preview_every: int = 5,
        **settings: Any,
    ):
        model = None
        if isinstance(pipe, str):
            from ..models import load_pipeline

            model, pipe = pipe, load_pipeline(pipe)
        rows = tuple(e if isinstance(e, EditRow) else EditRow(e) for e in (edits or ("",)))
        self.session = Session(pipe, Settings(source=source, edits=rows, **settings), preview_every=preview_every, model=model)
        self.view = PanelView(self.session)

    @property
    def widgets(self) -> dict[str, Any]:
        """Every widget of the panel by name."""
        return self.view.widgets

    @property
    def root(self):
        return self.view.root

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.view.root)

    def __repr__(self) -> str:
        state = self.session.state
        return f"P2PPanel(source={state.settings.source!r}, edits={len(state.settings.edits)}, runs={len(state.history)}, status={state.status!r})"
