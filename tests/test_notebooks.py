"""The notebooks as committed: no outputs, Colab's first cell, one model cell, README badges.

(Running them is nbval's job: ``notebooks/`` is in the test paths.)
"""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
EXPECTED = [
    "01_quickstart",
    "02_word_swap",
    "03_refinement_and_style",
    "04_reweighting",
    "05_attention_maps",
    "06_hyperparameters",
]


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def _source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def test_the_six_notebooks_are_there():
    assert [path.stem for path in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    for cell in _cells(path):
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [] and cell.get("execution_count") is None, _source(cell)[:60]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_colab_cell_first_then_the_model_choice(path):
    code = [_source(cell) for cell in _cells(path) if cell["cell_type"] == "code"]
    assert 'if "google.colab" in sys.modules:' in code[0]
    assert "%pip install" in code[0] and "output.enable_custom_widget_manager()" in code[0]
    assert "choice = choose_model()" in code[1] and "print(choice)" in code[1]
    assert not any("choose_model(" in later for later in code[2:]), "one model cell per notebook"


def test_the_readme_links_every_notebook_on_colab_and_binder():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    colab = re.findall(r"colab\.research\.google\.com/github/[^)]+/notebooks/([\w]+)\.ipynb", readme)
    assert colab == EXPECTED
    assert "mybinder.org/v2/gh/" in readme and "notebooks/01_quickstart.ipynb" in readme
