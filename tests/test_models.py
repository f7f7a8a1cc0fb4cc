"""Loading pipelines by name, from folders, offline."""

import pytest
import torch

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
    with pytest.raises(FileNotFoundError, match=r"python -m p2p_widgets\.shapes\.train --out"):
        load_pipeline("shapes")


def test_bad_names():
    with pytest.raises(ValueError, match="give a model name"):
        load_pipeline("")


def test_choose_model_prefers_the_variable_then_a_cached_real_model_on_a_gpu():
    never, always = (lambda name: False), (lambda name: True)
    named = models.choose_model(environ={"P2P_WIDGETS_MODEL": "tiny"}, gpu=True, cached=always)
    assert (named.name, named.device, named.dtype) == ("tiny", "cuda", None)
    assert "P2P_WIDGETS_MODEL is set" in str(named)
    folder = models.choose_model(environ={"P2P_WIDGETS_MODEL": "/models/sd"}, gpu=True, cached=never)
    assert (folder.name, folder.dtype) == ("/models/sd", torch.float16)
    real = models.choose_model(environ={}, gpu=True, cached=always)
    assert (real.name, real.device, real.dtype) == (models.REAL_MODEL, "cuda", torch.float16)
    not_cached = models.choose_model(environ={}, gpu=True, cached=never)
    assert not_cached.is_shapes and "not in the local cache" in not_cached.reason
    assert f"P2P_WIDGETS_MODEL={models.REAL_MODEL}" in not_cached.reason
    cpu = models.choose_model(environ={"P2P_WIDGETS_MODEL": "  "}, gpu=False, cached=always)
    assert (cpu.name, cpu.device, cpu.dtype) == ("shapes", "cpu", None) and "no GPU" in cpu.reason


def test_choose_model_asks_no_server_about_an_uncached_model(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert not models._in_cache("someone/not-a-cached-model")
    assert models._in_cache(str(tmp_path))  # a folder is there
    assert models.choose_model("someone/not-a-cached-model", environ={}, gpu=True).is_shapes


def test_the_chosen_model_loads(monkeypatch):
    choice = models.choose_model(environ={"P2P_WIDGETS_MODEL": "tiny"}, gpu=False)
    assert choice.load().unet.device.type == "cpu"


def test_loading_a_folder_is_quiet_and_leaves_logging_as_it_was(sd1, tmp_path, capfd):
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    sd1.save_pretrained(tmp_path)
    before = [(m.get_verbosity(), m.is_progress_bar_enabled()) for m in (diffusers_logging, transformers_logging)]
    capfd.readouterr()
    load_pipeline(str(tmp_path))
    assert "Loading" not in capfd.readouterr().err  # no progress bars
    assert [
        (m.get_verbosity(), m.is_progress_bar_enabled()) for m in (diffusers_logging, transformers_logging)
    ] == before


@pytest.mark.parametrize(
    "name, options, error, message",
    [
        (5, {}, ValueError, "give a model name"),
        ("", {}, ValueError, "give a model name"),
        ("/nonexistent/model", {}, FileNotFoundError, "no such model folder: /nonexistent/model"),
        ("./not/here/either", {}, FileNotFoundError, "no such model folder"),
        ("someone/not-a-model", {}, OSError, "could not load the model someone/not-a-model: it is not in the local"),
        ("tiny", {"dtype": "float16"}, TypeError, "dtype is a torch dtype"),
        ("tiny", {"device": "banana"}, ValueError, "unknown device 'banana'"),
        ("tiny", {"device": "cuda:7"}, ValueError, "there is no GPU|this machine has"),
    ],
)
def test_a_model_that_cannot_be_loaded_is_refused_by_name(monkeypatch, name, options, error, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never the network, in tests
    with pytest.raises(error, match=message):
        load_pipeline(name, **options)


def test_a_folder_that_is_not_a_pipeline_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ValueError, match=r"no model_index\.json"):
        load_pipeline(str(tmp_path))
