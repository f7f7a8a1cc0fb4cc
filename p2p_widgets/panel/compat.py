"""The differences between ipywidgets 7.7 (Colab's) and 8.x (JupyterLab 4), in one place.

The panel uses only widgets and traits that both have; what differs is wrapped here:
tooltips (``description_tooltip`` in 7, ``tooltip`` in 8), accordion titles
(``set_title`` in 7, the ``titles`` trait in 8), the file upload's value (a dict by file
name in 7, a tuple of dicts in 8), and Colab's custom widget manager.
"""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets

__all__ = ["MAJOR", "tooltip", "set_titles", "uploaded_files", "clear_upload", "enable_colab"]

MAJOR = int(widgets.__version__.split(".")[0])


def tooltip(widget: widgets.Widget, text: str) -> widgets.Widget:
    """Set a hover text on a widget (either version); returns the widget."""
    if MAJOR >= 8:
        widget.tooltip = text
    else:
        widget.description_tooltip = text
    return widget


def set_titles(container: widgets.Widget, titles: list[str]) -> None:
    """Titles of an Accordion's sections."""
    if MAJOR >= 8:
        container.titles = tuple(titles)
    else:
        for index, title in enumerate(titles):
            container.set_title(index, title)


def uploaded_files(upload: widgets.FileUpload) -> list[tuple[str, bytes]]:
    """(name, contents) of every file in a FileUpload."""
    value: Any = upload.value
    if isinstance(value, dict):  # 7.x: {name: {"metadata": {...}, "content": bytes}}
        return [(name, bytes(item["content"])) for name, item in value.items()]
    return [(item["name"], bytes(item["content"])) for item in value]  # 8.x: tuple of dicts


def clear_upload(upload: widgets.FileUpload) -> None:
    """Empty a FileUpload so the same file can be chosen again."""
    if MAJOR >= 8:
        upload.value = ()
    else:  # 7.x keeps its files in several traits; value is read-only
        upload.metadata = []
        upload.data = []
        upload.set_trait("value", {})
        upload._counter = 0


def enable_colab() -> bool:
    """On Colab, turn on the custom widget manager (third-party widgets need it); returns
    whether this is Colab."""
    try:
        from google.colab import output
    except ImportError:
        return False
    output.enable_custom_widget_manager()
    return True
