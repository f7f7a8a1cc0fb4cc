"""Loading pipelines by name, from folders, offline."""

import pytest

from p2p_widgets import edit, models
from p2p_widgets.models import load_pipeline


def test_tiny_pipelines_by_name():
    assert load_pipeline("tiny").scheduler.config.prediction_type == "epsilon"
    assert load_pipeline("tiny-sd2").scheduler.config.prediction_type == "v_prediction"


def test_a_saved_folder_loads_offline_through_from_pretrained(sd1, tmp_path, monkeypatch):
    sd1.save_pretrained(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = load_pipeline(str(tmp_path))
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"
    result = edit(pipe, "a cat", "a dog", steps=2, seed=1)
    expected = edit(sd1, "a cat", "a dog", steps=2, seed=1)
    assert result.latents.equal(expected.latents)


def test_missing_shapes_weights_say_how_to_make_them(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "SHAPES_WEIGHTS", tmp_path / "weights")
    with pytest.raises(FileNotFoundError, match="python -m p2p_widgets.shapes.train --out"):
        load_pipeline("shapes")


def test_bad_names():
    with pytest.raises(ValueError, match="give a model name"):
        load_pipeline("")
