"""The MLflow UI of a finished tiny study, in Debian's headless Chromium: the experiment's runs
table shows the study's parent run and, expanded, its trial runs (named by Ray trial id).

Starts a real lean ``mlflow server`` (the ``mlflow_server`` fixture) on 127.0.0.1 on a free
port and drives the browser with selenium through the system chromedriver (nothing downloaded).
The screenshot lands in the test's tmp folder and, when ``EMTUNE_ARTIFACTS_DIR`` is set, is
copied there. Skips when chromium or chromedriver is missing (``tests/install_browser.sh``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1600,1000"]
def _chromedriver() -> str | None:
    return shutil.which("chromedriver") or next(
        (p for p in ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver") if os.path.exists(p)), None)


def test_mlflow_ui_shows_parent_run_and_trials(finished_study: Path, tmp_path: Path, mlflow_server) -> None:
    driver_path = _chromedriver()
    if not os.path.exists(CHROMIUM) or driver_path is None:
        pytest.skip("needs Debian's chromium and chromium-driver (run tests/install_browser.sh as root)")
    from mlflow.tracking import MlflowClient
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait


    uri = f"sqlite:///{finished_study / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name("emtune/finished").experiment_id
    runs = client.search_runs([experiment_id])
    parent = next(r for r in runs if r.data.tags.get("emtune.role") == "study")
    trial_names = sorted(r.info.run_name for r in runs if r.data.tags.get("emtune.role") == "trial")
    assert parent.info.run_name == "finished" and len(trial_names) == 2

    server = mlflow_server(uri, str(finished_study / "mlartifacts"))
    driver = None
    try:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in CHROMIUM_ARGS + [f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}"]:
            options.add_argument(arg)
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
        # MLflow 3 opens new experiments in its GenAI view: ask for the classic runs table.
        driver.get(f"{server.url}/#/experiments/{experiment_id}/runs?workflowType=machine_learning")
        wait = WebDriverWait(driver, 60, poll_frequency=0.5)
        row = f'div[row-id="{parent.info.run_id}"]'
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, row))
        body = lambda d: d.find_element(By.TAG_NAME, "body").text  # noqa: E731
        assert "finished" in body(driver)
        for close in driver.find_elements(By.CSS_SELECTOR, '[data-component-id="mlflow.assistant.chat_panel.close"]'):
            close.click()  # the assistant side panel hides the table's columns in a screenshot
        # Trials are nested under the parent run: expand it (the "+" button in its name cell).
        expand = driver.find_element(By.CSS_SELECTOR, f'{row} button[data-component-id*="runnamecellrenderer"]')
        expand.click()
        wait.until(lambda d: all(name in body(d) for name in trial_names))
        text = body(driver)
        assert "finished" in text and all(name in text for name in trial_names)
        shot = tmp_path / "mlflow_ui.png"
        assert driver.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if os.environ.get("EMTUNE_ARTIFACTS_DIR"):
            target = Path(os.environ["EMTUNE_ARTIFACTS_DIR"])
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, target / "mlflow_ui.png")
    finally:
        if driver is not None:
            driver.quit()
