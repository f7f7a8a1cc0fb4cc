"""Binder's setup: CPU torch pinned like CI, every dependency, the shapes model by default."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent
BINDER = ROOT / "binder"


def _requirements() -> list[str]:
    lines = (BINDER / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_torch_is_the_cpu_build_pinned_as_in_ci():
    requirements = _requirements()
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in requirements
    (torch,) = [r for r in requirements if _name(r) == "torch"]
    ci_pin = re.search(r'"torch==([0-9.]+)"', (ROOT / ".ci" / "run").read_text()).group(1)
    assert torch == f"torch=={ci_pin}+cpu"


def test_every_dependency_of_the_package_is_installed():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    needed = {_name(d) for d in project["dependencies"]} | {"jupyterlab"}
    assert needed <= {_name(r) for r in _requirements() if not r.startswith("--")}
    assert "pip install --no-deps -e ." in (BINDER / "postBuild").read_text()


def _start(env: dict[str, str]) -> str:
    command = ["bash", str(BINDER / "start"), sys.executable, "-c", "import os; print(os.environ['P2P_WIDGETS_MODEL'])"]
    return subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout.strip()


def test_start_defaults_to_the_shapes_model_and_keeps_a_users_choice():
    env = {k: v for k, v in os.environ.items() if k != "P2P_WIDGETS_MODEL"}
    assert _start(env) == "shapes"
    assert _start({**env, "P2P_WIDGETS_MODEL": "tiny"}) == "tiny"
    assert os.access(BINDER / "start", os.X_OK) and os.access(BINDER / "postBuild", os.X_OK)
