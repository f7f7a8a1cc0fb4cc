import os

# OpenMP's threads sleep instead of spinning while they wait, unless the developer chose:
# where the cores are shared (two test runs at once, a notebook kernel beside the tests)
# spinning threads starve each other; beside another run a 20-step shapes edit took 70 s
# spinning, 8 s sleeping. Set before torch is imported: OpenMP reads it once, on loading.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # see below

import matplotlib

matplotlib.use("agg")

import threading

import pytest
import torch

from p2p_widgets.testing import tiny_pipeline

# One CPU thread per test process, and the cores used by running test files side by side
# (pytest-xdist, ``-n auto`` in pyproject.toml): the tiny models are too small for torch's
# threads to pay (a 20-step shapes edit: 1.56 s on one thread, 1.59 s on two spinning, 2.47 s
# on two sleeping), and torch's float reductions split with the thread count, so one thread
# gives the same last bits on every machine. The notebooks' kernels inherit OMP_NUM_THREADS.
torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The notebooks' cells (nbval) are slow together: each notebook runs the shapes model
    for tens of seconds. Marked, not skipped: ``-m "not slow"`` leaves them out."""
    for item in items:
        if item.path.suffix == ".ipynb":
            item.add_marker(pytest.mark.slow)
            item.add_marker(pytest.mark.notebook)


@pytest.fixture(scope="session")
def sd1():
    """A tiny SD 1.x-like pipeline (epsilon prediction), random weights, 32x32 images."""
    return tiny_pipeline("sd1")


@pytest.fixture(scope="session")
def sd2():
    """A tiny SD 2.x-like pipeline (v-prediction, linear projections)."""
    return tiny_pipeline("sd2")


@pytest.fixture(scope="session")
def tokenizer(sd1):
    return sd1.tokenizer


def processors_of(pipe):
    """The identity of every attention processor, to check nothing was left attached."""
    return {name: id(p) for name, p in pipe.unet.attn_processors.items()}


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shapes():
    """The bundled shapes model, loaded by name, offline."""
    from p2p_widgets.models import load_pipeline

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        return load_pipeline("shapes")


def within(seconds, function, *args):
    """``function(*args)`` in a thread; fail (instead of hanging the suite) if it takes
    longer than ``seconds``. Returns its value or raises its exception (SystemExit too)."""
    outcome = {}

    def target():
        try:
            outcome["value"] = function(*args)
        except BaseException as error:  # handed to the test thread
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{function.__name__} did not return within {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
