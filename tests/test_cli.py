"""The command line, as the README's Quick start uses it."""

import errno
import os
import stat
from pathlib import Path

import pytest
from PIL import Image

from conftest import within
from p2p_widgets import Recipe, read_recipe
from p2p_widgets.__main__ import main


def test_edit_saves_images_recipe_and_heatmaps(tmp_path, capsys):
    code = main(
        [
            "edit",
            "a cat riding a bicycle",
            "a dog riding a bicycle",
            "--steps",
            "2",
            "--out",
            str(tmp_path),
            "--heatmaps",
        ]
    )
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
    ((command, env),) = calls
    assert command[1:3] == ["-m", "jupyterlab"] and command[3:6] == ["--no-browser", "--port", "8901"]
    assert ("--allow-root" in command) == (os.geteuid() == 0)  # JupyterLab refuses root without it
    assert (
        command[-1] == str(cli.NOTEBOOKS / "01_quickstart.ipynb") and (cli.NOTEBOOKS / "01_quickstart.ipynb").exists()
    )
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


# -- every failure: exit 2, one line "error: ...", nothing written, no traceback -------------

RECIPE = Recipe("a cat riding a bicycle", ("a dog riding a bicycle",), steps=2)


def cli(argv, capsys):
    """Exit status, stderr lines and stdout of ``python -m p2p_widgets ARGV``."""
    capsys.readouterr()
    try:
        code = within(120, main, argv)
    except SystemExit as exit:  # argparse's refusals
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.err.splitlines(), captured.out


def files_under(folder: Path) -> dict[str, bytes]:
    """Every regular file below ``folder`` and its bytes (FIFOs are not read)."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = Path(root) / name
            if stat.S_ISREG(path.lstat().st_mode):
                found[str(path.relative_to(folder))] = path.read_bytes()
    return found


@pytest.fixture
def loaded(monkeypatch, sd1):
    """Record the models the CLI loads; load the tiny pipeline for every name."""
    import p2p_widgets.models as models

    names = []
    monkeypatch.setattr(models, "load_pipeline", lambda name, device=None, **kw: names.append(name) or sd1)
    return names


def _recipe(model, name="r.json"):
    def make(tmp_path, monkeypatch):
        (tmp_path / name).write_text(RECIPE.replace(model=model).to_json())
        return {}

    return make


def _fifo(tmp_path, monkeypatch):
    os.mkfifo(tmp_path / "pipe.png")
    return {}


def _not_a_recipe(tmp_path, monkeypatch):
    (tmp_path / "notes.json").write_text("[1, 2]")
    return {}


def _taken(tmp_path, monkeypatch):
    (tmp_path / "taken").write_text("my notes")
    return {}


def _no_gpu(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return {}


def _one_gpu(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    return {}


def _unwritable(tmp_path, monkeypatch):
    """A folder this process cannot write in: a read-only one, or /sys when running as root."""
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        return {"unwritable": str(locked / "out")}
    try:  # /sys is read-only even for root
        (Path("/sys") / ".p2p-probe").touch()
    except OSError:
        return {"unwritable": "/sys/p2p-out"}
    pytest.skip("running as root with no read-only folder to try")


def _disk_full(tmp_path, monkeypatch):
    """An earlier run's files in the output folder, and a disk that fills on the 2nd file."""
    from p2p_widgets import files

    out = tmp_path / "out"
    out.mkdir()
    for name in ("p2p_0.png", "p2p_1.png", "p2p.json"):
        (out / name).write_bytes(b"an earlier run: " + name.encode())
    real, calls = files._write_new_file, []

    def failing(*args):
        calls.append(args)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args)

    monkeypatch.setattr(files, "_write_new_file", failing)
    return {}


def _broken_loader(tmp_path, monkeypatch):
    import p2p_widgets.models as models

    def broken(name, **kwargs):
        raise RuntimeError(
            "Error(s) in loading state_dict for UNet2DConditionModel:\n\tsize mismatch for conv_in.weight"
        )

    monkeypatch.setattr(models, "load_pipeline", broken)
    return {}


def _sampling_bug(tmp_path, monkeypatch):
    import p2p_widgets
    import p2p_widgets.models as models
    from p2p_widgets.testing import tiny_pipeline

    monkeypatch.setattr(models, "load_pipeline", lambda name, **kwargs: tiny_pipeline("sd1"))
    monkeypatch.setattr(p2p_widgets, "run", lambda pipe, recipe: 1 / 0)
    return {}


PROMPTS = ["a cat riding a bicycle", "a dog riding a bicycle"]
OUT = ["--out", "{tmp}/out"]

# (id, arguments, setup, words the one error line must hold, whether it gets as far as loading)
BAD_COMMANDS = [
    ("no-prompts", ["edit", *OUT], None, ["give a source prompt"], False),
    ("no-command", [], None, ["required: command"], False),
    (
        "unknown-option",
        ["edit", *PROMPTS, "--no-such-option"],
        None,
        ["unrecognized arguments: --no-such-option"],
        False,
    ),
    (
        "steps-not-a-number",
        ["edit", *PROMPTS, "--steps", "abc", *OUT],
        None,
        ["--steps", "invalid int value: 'abc'"],
        False,
    ),
    ("zero-steps", ["edit", *PROMPTS, "--steps", "0", *OUT], None, ["steps"], False),
    ("guidance-nan", ["edit", *PROMPTS, "--guidance", "nan", *OUT], None, ["guidance", "nan"], False),
    ("cross-beyond-1", ["edit", *PROMPTS, "--cross", "2", *OUT], None, ["between 0 and 1"], False),
    ("size-zero", ["edit", *PROMPTS, "--size", "0", "64", *OUT], None, ["height", "0"], False),
    ("seed-out-of-range", ["edit", *PROMPTS, "--seed", str(10**30), *OUT], None, ["seed", str(10**30)], False),
    ("unknown-device", ["edit", *PROMPTS, "--device", "banana", *OUT], None, ["unknown device 'banana'", "cpu"], False),
    (
        "meta-device",
        ["edit", *PROMPTS, "--device", "meta", *OUT],
        None,
        ["meta is not available", "--device cpu"],
        False,
    ),
    (
        "cuda-without-a-gpu",
        ["edit", *PROMPTS, "--device", "cuda", *OUT],
        _no_gpu,
        ["no GPU", "drop --device or use --device cpu"],
        False,
    ),
    (
        "a-gpu-that-is-not-there",
        ["edit", *PROMPTS, "--device", "cuda:3", *OUT],
        _one_gpu,
        ["1 GPU(s)", "cuda:0"],
        False,
    ),
    (
        "recipe-is-a-folder",
        ["edit", "--recipe", "{tmp}", *OUT],
        None,
        ["is a folder, not a recipe file", ".json or .png"],
        False,
    ),
    ("recipe-missing", ["edit", "--recipe", "{tmp}/nothing.json", *OUT], None, ["no such file", "nothing.json"], False),
    ("recipe-is-a-fifo", ["edit", "--recipe", "{tmp}/pipe.png", *OUT], _fifo, ["FIFO"], False),
    (
        "recipe-is-not-a-recipe",
        ["edit", "--recipe", "{tmp}/notes.json", *OUT],
        _not_a_recipe,
        ["notes.json", "not a recipe"],
        False,
    ),
    (
        "recipe-and-settings",
        ["edit", "--recipe", "{tmp}/r.json", "--steps", "9", *OUT],
        _recipe("tiny"),
        ["--recipe re-runs", "--steps"],
        False,
    ),
    (
        "recipe-and-prompts",
        ["edit", *PROMPTS, "--recipe", "{tmp}/r.json", *OUT],
        _recipe("tiny"),
        ["--recipe re-runs", "prompts"],
        False,
    ),
    (
        "out-is-a-file",
        ["edit", *PROMPTS, "--out", "{tmp}/taken"],
        _taken,
        ["--out", "taken is a file", "give a folder"],
        False,
    ),
    ("out-below-a-file", ["edit", *PROMPTS, "--out", "{tmp}/taken/images"], _taken, ["taken is a file"], False),
    (
        "out-not-writable",
        ["edit", *PROMPTS, "--out", "{unwritable}"],
        _unwritable,
        ["cannot write in", "choose a folder you can write to"],
        False,
    ),
    ("model-empty", ["edit", *PROMPTS, "--model", "", *OUT], None, ["--model is empty"], False),
    (
        "model-folder-missing",
        ["edit", *PROMPTS, "--model", "{tmp}/no/such/model", *OUT],
        None,
        ["no such folder"],
        False,
    ),
    (
        "recipe-names-an-uncached-hub-model",
        ["edit", "--recipe", "{tmp}/r.json", *OUT],
        _recipe("someone/not-cached-model"),
        [
            (
                "the recipe names the hub model someone/not-cached-model, which is not on this machine; "
                "to download it, pass --model someone/not-cached-model"
            )
        ],
        False,
    ),
    (
        "recipe-names-a-missing-folder",
        ["edit", "--recipe", "{tmp}/r.json", *OUT],
        _recipe("/no/such/model/folder"),
        ["folder /no/such/model/folder", "--model"],
        False,
    ),
    (
        "hub-model-cannot-be-loaded",
        ["edit", *PROMPTS, "--model", "p2p-widgets-tests/no-such-model", "--steps", "1", *OUT],
        None,
        ["could not load the model p2p-widgets-tests/no-such-model", "network"],
        True,
    ),
    (
        "loading-fails-deep-inside",
        ["edit", *PROMPTS, "--model", "tiny-sd2", "--steps", "1", *OUT],
        _broken_loader,
        ["could not load the model tiny-sd2", "RuntimeError", "size mismatch"],
        True,
    ),
    (
        "disk-full-while-saving",
        ["edit", *PROMPTS, "--steps", "1", *OUT],
        _disk_full,
        ["No space left on device", "out", "free some space"],
        True,
    ),
    (
        "a-bug-while-sampling",
        ["edit", *PROMPTS, "--steps", "1", *OUT],
        _sampling_bug,
        ["unexpected ZeroDivisionError", "division by zero"],
        True,
    ),
]


SLOW_COMMANDS = {"hub-model-cannot-be-loaded"}  # the hub's refusal comes after a connection timeout, about 20 s


@pytest.mark.parametrize(
    "arguments, setup, words, loads",
    [
        pytest.param(*case[1:], id=case[0], marks=pytest.mark.slow if case[0] in SLOW_COMMANDS else ())
        for case in BAD_COMMANDS
    ],
)
def test_every_failure_is_one_error_line_and_exit_2(tmp_path, monkeypatch, capsys, arguments, setup, words, loads):
    import p2p_widgets.models as models

    if not loads:  # refused before anything is loaded (or sampled)
        monkeypatch.setattr(models, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    places = {"tmp": str(tmp_path), **(setup(tmp_path, monkeypatch) if setup else {})}
    before = files_under(tmp_path)
    code, err, out = cli([argument.format(**places) for argument in arguments], capsys)
    assert code == 2
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and err[-1] == errors[0], err
    assert all(line.startswith("model: ") for line in err[:-1]) and len(err) <= (2 if loads else 1), err
    for word in words:
        assert word.format(**places) in errors[0]
    assert not any("Traceback" in line for line in err)
    assert files_under(tmp_path) == before  # nothing written, nothing earlier changed
    assert out == ""


def test_ctrl_c_is_exit_130_with_one_line(tmp_path, monkeypatch, capsys, loaded):
    import p2p_widgets

    def interrupted(pipe, recipe):
        raise KeyboardInterrupt

    monkeypatch.setattr(p2p_widgets, "run", interrupted)
    code, err, _ = cli(["edit", *PROMPTS, "--steps", "1", "--out", str(tmp_path / "out")], capsys)
    assert code == 130
    assert err[-1] == "error: interrupted (Ctrl-C); nothing was saved" and len(err) == 2
    assert not (tmp_path / "out").exists()


# -- which model, and why: always said, never a silent download ---------------------------------

# (id, recipe's model (None: prompts, no recipe), --model, hub ids in the cache, loaded, the model line)
MODEL_CHOICES = [
    ("prompts-default", None, None, (), "tiny", "model: tiny (the default"),
    ("prompts-explicit", None, "tiny-sd2", (), "tiny-sd2", "model: tiny-sd2 (--model)"),
    ("recipe-built-in", "shapes", None, (), "shapes", "model: shapes (from the recipe)"),
    ("recipe-no-model", "", None, (), "tiny", "model: tiny (the recipe names no model"),
    (
        "recipe-cached-hub-model",
        "someone/cached-model",
        None,
        ("someone/cached-model",),
        "someone/cached-model",
        "model: someone/cached-model (from the recipe, in the local Hugging Face cache)",
    ),
    ("recipe-local-folder", "{tmp}", None, (), "{tmp}", "model: {tmp} (from the recipe, a local folder)"),
    (
        "explicit-beats-the-recipe",
        "someone/not-cached",
        "tiny",
        (),
        "tiny",
        "model: tiny (--model; the recipe names someone/not-cached)",
    ),
    (
        "explicit-uncached-hub-model",
        "shapes",
        "someone/big-model",
        (),
        "someone/big-model",
        "model: someone/big-model (--model; the recipe names shapes)",
    ),
]


@pytest.mark.parametrize(
    "recipe_model, explicit, cached, expected, line",
    [case[1:] for case in MODEL_CHOICES],
    ids=[case[0] for case in MODEL_CHOICES],
)
def test_the_model_is_chosen_and_said(
    tmp_path, monkeypatch, capsys, loaded, recipe_model, explicit, cached, expected, line
):
    import p2p_widgets.models as models

    monkeypatch.setattr(models, "_in_cache", lambda name: name in cached)
    out = tmp_path / "out"
    arguments = ["edit", "--out", str(out)] + (["--model", explicit] if explicit else [])
    if recipe_model is None:
        arguments += [*PROMPTS, "--steps", "2"]
    else:
        (tmp_path / "r.json").write_text(RECIPE.replace(model=recipe_model.format(tmp=tmp_path) or None).to_json())
        arguments += ["--recipe", str(tmp_path / "r.json")]
    code, err, _ = cli(arguments, capsys)
    assert code == 0, err
    expected = expected.format(tmp=tmp_path)
    assert loaded == [expected]
    assert [e for e in err if e.startswith("model:")] == [e for e in err if e.startswith(line.format(tmp=tmp_path))]
    assert len([e for e in err if e.startswith("model:")]) == 1
    assert read_recipe(out / "p2p.json").model == expected  # the saved recipe names the model that made it


def test_a_smaller_run_into_the_same_folder_leaves_no_stale_files(tmp_path, capsys):
    out = str(tmp_path)
    assert main(["edit", "a cat", "a dog", "a cow", "--steps", "1", "--out", out, "--heatmaps"]) == 0
    Image.new("RGB", (4, 4)).save(tmp_path / "p2p_5_words.png")  # not ours: kept
    assert main(["edit", "a cat", "a fox", "--steps", "1", "--out", out, "--heatmaps"]) == 0
    names = sorted(path.name for path in tmp_path.iterdir())
    assert names == [
        "p2p.json",
        "p2p_0.png",
        "p2p_0_words.png",
        "p2p_1.png",
        "p2p_1_words.png",
        "p2p_5_words.png",
        "p2p_gallery.png",
    ]
    assert read_recipe(tmp_path / "p2p_gallery.png").targets[0].prompt == "a fox"  # the pictures carry the recipe too
