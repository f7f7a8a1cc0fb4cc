"""The command line, as the README's Quick start uses it."""

import os

from PIL import Image

from p2p_widgets import read_recipe
from p2p_widgets.__main__ import main


def test_edit_saves_images_recipe_and_heatmaps(tmp_path, capsys):
    code = main(["edit", "a cat riding a bicycle", "a dog riding a bicycle", "--steps", "2", "--out", str(tmp_path), "--heatmaps"])
    assert code == 0
    names = {"p2p_0.png", "p2p_1.png", "p2p.json", "p2p_gallery.png", "p2p_0_words.png", "p2p_1_words.png"}
    assert names <= {path.name for path in tmp_path.iterdir()}
    assert read_recipe(tmp_path / "p2p_1.png").targets[0].prompt == "a dog riding a bicycle"
    # a word grid of 5 words is wider than the gallery of 2 images
    assert Image.open(tmp_path / "p2p_1_words.png").width > Image.open(tmp_path / "p2p_gallery.png").width
    printed = capsys.readouterr().out.split()
    assert str(tmp_path / "p2p_gallery.png") in printed


def test_rerunning_a_saved_recipe_gives_the_same_image(tmp_path):
    assert main(["edit", "a red cat", "a blue cat", "--steps", "2", "--seed", "4", "--out", str(tmp_path / "a")]) == 0
    assert main(["edit", "--recipe", str(tmp_path / "a" / "p2p_1.png"), "--out", str(tmp_path / "b")]) == 0
    first, again = (Image.open(tmp_path / run / "p2p_1.png").tobytes() for run in ("a", "b"))
    assert first == again


def test_bad_input_is_an_error_message_not_a_traceback(tmp_path, capsys):
    assert main(["edit", "--out", str(tmp_path)]) == 2
    assert "give a source prompt" in capsys.readouterr().err
    assert main(["edit", "a cat", "a dog", "--steps", "0", "--out", str(tmp_path)]) == 2
    assert "steps" in capsys.readouterr().err


def test_demo_opens_the_quick_start_notebook_in_jupyterlab(monkeypatch):
    import p2p_widgets.__main__ as cli

    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda command, env: calls.append((command, env)) or 0)
    assert main(["demo", "--model", "tiny", "--no-browser", "--port", "8901"]) == 0
    (command, env), = calls
    assert command[1:3] == ["-m", "jupyterlab"] and command[3:6] == ["--no-browser", "--port", "8901"]
    assert ("--allow-root" in command) == (os.geteuid() == 0)  # JupyterLab refuses root without it
    assert command[-1] == str(cli.NOTEBOOKS / "01_quickstart.ipynb") and (cli.NOTEBOOKS / "01_quickstart.ipynb").exists()
    assert env["P2P_WIDGETS_MODEL"] == "tiny"


def test_demo_without_the_notebooks_says_where_they_are(monkeypatch, tmp_path, capsys):
    import p2p_widgets.__main__ as cli

    monkeypatch.setattr(cli, "NOTEBOOKS", tmp_path)
    assert main(["demo"]) == 2
    assert "source repository" in capsys.readouterr().err


def test_unknown_options_of_edit_are_refused(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["edit", "a cat", "a dog", "--no-such-option"])
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err
