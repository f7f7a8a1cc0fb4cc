"""The panel in a real browser: JupyterLab on localhost, driven with Debian's Chromium.

Runs a notebook that shows the panel on the bundled shapes model, clicks Generate, waits
for the images, scrubs the timestep slider and checks the heatmaps change, runs another
cell while a run is going (the kernel answers), cancels, and saves screenshots (to
``P2P_SCREENSHOT_DIR`` when set: the README's is ``docs/images/panel.png``).

Needs ``/usr/bin/chromium`` (``apt-get install chromium``) and the ``playwright``
package (no browser download: it drives the system Chromium). Without them the test is
skipped, unless ``P2P_REQUIRE_BROWSER=1`` (set in ``.ci/run``), where it fails instead.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]

CELLS = [
    'from p2p_widgets.panel import P2PPanel\npanel = P2PPanel("shapes", steps=20)\npanel',
    "panel.session.update(steps=400)",
    'print("kernel answers while running:", panel.session.state.running)',
]


def _missing() -> str | None:
    import ipywidgets

    if int(ipywidgets.__version__.split(".")[0]) < 8:
        return "ipywidgets 7 does not render in JupyterLab 4 (its own front end is for Notebook 6 and Colab)"
    if not Path(CHROMIUM).exists():
        return f"no browser at {CHROMIUM} (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install playwright)"
    if shutil.which("jupyter-lab", path=str(Path(sys.executable).parent)) is None:
        return "jupyterlab is not installed in this environment"
    return None


def _require() -> None:
    missing = _missing()
    if missing is None:
        return
    if os.environ.get("P2P_REQUIRE_BROWSER") == "1" and not missing.startswith("ipywidgets 7"):
        pytest.fail(f"the browser test must run here (P2P_REQUIRE_BROWSER=1), but {missing}")
    pytest.skip(missing)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _notebook(path: Path) -> None:
    cells = [
        {"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [], "source": source}
        for source in CELLS
    ]
    notebook = {
        "cells": cells,
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    path.write_text(json.dumps(notebook), encoding="utf-8")


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on localhost, with its own settings (no news pop-ups)."""
    _require()
    root = tmp_path / "root"
    root.mkdir()
    _notebook(root / "panel.ipynb")
    settings = tmp_path / "lab-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False})
    )
    port, token = _free_port(), "p2p-browser-test"
    env = {
        **os.environ,
        "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "lab-settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "OMP_NUM_THREADS": "1",
    }
    log = (tmp_path / "lab.log").open("w")
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "jupyter-lab"),
            "--no-browser",
            f"--port={port}",
            "--ip=127.0.0.1",
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={root}",
            "--LabApp.expose_app_in_browser=True",
            "--ServerApp.open_browser=False",
            "--allow-root",  # CI containers run as root
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if server.poll() is not None:
                    raise RuntimeError(f"JupyterLab exited: {(tmp_path / 'lab.log').read_text()[-2000:]}") from None
                time.sleep(0.5)
        else:
            raise RuntimeError(f"JupyterLab did not start: {(tmp_path / 'lab.log').read_text()[-2000:]}")
        yield url, token
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def _run_cell(page, index: int) -> None:
    page.evaluate(
        """async (index) => {
            const panel = window.jupyterapp.shell.currentWidget;
            panel.content.activeCellIndex = index;
            await window.jupyterapp.commands.execute('notebook:run-cell');
        }""",
        index,
    )


@pytest.mark.slow  # starts JupyterLab and Chromium
def test_panel_in_jupyterlab(lab, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, token = lab
    shots = Path(os.environ.get("P2P_SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1300, "height": 1800})
        page.set_default_timeout(120_000)
        try:
            page.goto(f"{url}/lab/tree/panel.ipynb?token={token}")
            page.wait_for_function(  # the notebook's kernel session exists (each step may still be undefined)
                "window.jupyterapp && window.jupyterapp.shell.currentWidget"
                " && window.jupyterapp.shell.currentWidget.sessionContext"
                " && window.jupyterapp.shell.currentWidget.sessionContext.session"
                " && window.jupyterapp.shell.currentWidget.sessionContext.session.kernel"
            )
            page.wait_for_function(
                "window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.connectionStatus === 'connected'"
            )
            _run_cell(page, 0)
            generate = page.get_by_role("button", name="Generate")
            expect(generate).to_be_visible()
            status = page.locator(".p2p-status", has_text="done in")

            # 1. Generate: images and heatmaps appear.
            generate.click()
            expect(status).to_be_visible()
            expect(page.locator("img.p2p-images")).to_be_visible()
            heatmaps = page.locator("img.p2p-heatmaps")
            expect(heatmaps).to_be_visible()
            before = heatmaps.get_attribute("src")
            assert before
            page.screenshot(path=str(shots / "panel.png"), full_page=True)

            # 2. Scrub: move the step slider with the keyboard; the heatmaps change.
            handle = page.locator(".p2p-step").locator(".noUi-handle, .ui-slider-handle").first
            handle.focus()
            handle.press("ArrowRight")
            handle.press("ArrowRight")
            page.wait_for_function("(before) => document.querySelector('img.p2p-heatmaps').src !== before", arg=before)
            after = heatmaps.get_attribute("src")
            assert after != before
            page.screenshot(path=str(shots / "panel_scrubbed.png"), full_page=True)

            # 3. A long run: another cell runs meanwhile, then Cancel stops it.
            _run_cell(page, 1)
            page.wait_for_timeout(500)
            generate.click()
            expect(page.locator(".p2p-status", has_text="step ")).to_be_visible()
            _run_cell(page, 2)
            expect(page.get_by_text("kernel answers while running: True")).to_be_visible()
            page.get_by_role("button", name="Cancel").click()
            expect(page.locator(".p2p-status", has_text="cancelled at step")).to_be_visible()
            expect(generate).to_be_enabled()
            page.screenshot(path=str(shots / "panel_cancelled.png"), full_page=True)
        finally:
            browser.close()
