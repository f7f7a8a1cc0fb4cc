"""The README's ten-line example runs as written (on the bundled shapes model)."""

import re
from pathlib import Path

import pytest
from PIL import Image

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.slow
def test_the_ten_line_example_runs_and_saves_its_pictures(tmp_path, monkeypatch):
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## In ten lines") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 12
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    gallery, words = Image.open(tmp_path / "edits.png"), Image.open(tmp_path / "words.png")
    assert gallery.width > 3 * gallery.height / 2 and words.width > gallery.width  # 4 images; 13 word maps
