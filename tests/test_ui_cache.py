"""The step cache in the web app, in a real browser (the pattern and helpers of test_ui_browser.py): MagCache
chosen with calibration, the calls computed per section shown, the calibration stored and used by the next
MagCache job, and the choice restored by "Use these settings"."""
from __future__ import annotations

import json
import re
import shutil
import time

import pytest

from test_ui_browser import fill_form, run_app, set_number, wait_text


@pytest.fixture(scope="module")
def cache_server(tiny_models_dir, tmp_path_factory):
    """The app on a copy of the tiny models (a calibration writes under the models folder)."""
    root = tmp_path_factory.mktemp("cache_app")
    models = root / "models"
    shutil.copytree(tiny_models_dir, models)
    outputs = root / "outputs"
    outputs.mkdir()
    with run_app(models, outputs, env={"GRADIO_TEMP_DIR": str(root / "gradio")}, name="cache_app") as (url, pid):
        yield url, models, outputs


def _choose(page, method: str) -> None:
    page.locator(f"#cache input[value={method}]").check()


def test_magcache_calibrates_shows_computed_calls_and_the_next_job_uses_the_calibration(cache_server, open_page,
                                                                                         start_image_128x96):
    url, models, outputs = cache_server
    page = open_page(url)
    assert page.locator("#cache input:checked").input_value() == "teacache"  # the default stays TeaCache
    _choose(page, "magcache")
    page.locator("#cache_calibrate input").check()
    fill_form(page, start_image_128x96, seconds=1.2, steps=4, prompt="calibrated")
    page.locator("#generate").click()
    done = wait_text(page, "progress", r"Done: 37 frames")
    assert "Model calls computed per section (magcache): 4/4" in done  # calibrating: nothing skipped
    name = re.search(r"saved as (\S+\.mp4)", done).group(1)
    settings = json.loads((outputs / name).with_suffix(".json").read_text())
    assert (settings["cache"], settings["cache_calibrate"], settings["teacache"]) == ("magcache", True, False)
    [stored] = (models / ".cache" / "magcache").glob("*.json")

    page.locator("#cache_calibrate input").uncheck()
    set_number(page, "magcache_threshold", 1)
    page.locator("#generate").click()
    deadline = time.monotonic() + 90
    while True:  # the second job's own end (the first one's Done line names another file)
        done = wait_text(page, "progress", r"Done: 37 frames")
        second = re.search(r"saved as (\S+\.mp4)", done).group(1)
        if second != name:
            break
        assert time.monotonic() < deadline, "the second job did not finish"
        time.sleep(0.5)
    assert re.search(r"Model calls computed per section \(magcache\): \d/4", done)
    settings = json.loads((outputs / second).with_suffix(".json").read_text())
    assert settings["magcache_ratios"] == str(stored) and settings["magcache_threshold"] == 1

    other = open_page(url)  # a fresh page: TeaCache; the past output's settings bring MagCache back
    assert other.locator("#cache input:checked").input_value() == "teacache"
    wait_text(other, "gallery", re.escape(second), timeout_s=30)
    other.locator("#gallery label").filter(has_text=second).click()
    wait_text(other, "gallery_settings", re.escape(second), timeout_s=30)
    other.locator("#use_settings").click()
    deadline = time.monotonic() + 30
    while other.locator("#cache input:checked").input_value() != "magcache":
        assert time.monotonic() < deadline, "Use these settings did not bring the step cache back"
        time.sleep(0.2)
    assert other.locator("#magcache_threshold input[type=number]").input_value() == "1"
