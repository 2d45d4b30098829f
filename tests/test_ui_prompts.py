"""Prompts over time and settings from a file, on the page (issue 17): the timeline editor beside the prompt box, the
timeline under the length slider, a dropped past video or settings file filling every field (as "Use these
settings" does), and each bad input refused in one line with nothing started. A real browser on `python app.py`
(see test_ui_browser.py for the setup)."""
from __future__ import annotations

import json
import shutil
import time

import pytest

from test_ui_browser import JOB_S, choose, fill_form, run_app, set_number, text, wait_text

# every field of the form at a value other than its default, and what the page then shows
PROMPT = "[0s: a red square] [1.3s: a blue square]"
SETTINGS = dict(negative="blurry", seconds="2.4", seed="4321", steps="2", gs="8.5", cfg="1.5", rs="0.3",
                teacache_threshold="0.2", resolution="64", crf="20", prompt_blend="1")


@pytest.fixture(scope="module")
def server(tiny_models_dir, tmp_path_factory):
    outputs = tmp_path_factory.mktemp("outputs")
    with run_app(tiny_models_dir, outputs, env={"GRADIO_TEMP_DIR": str(outputs.parent / "gradio")},
                 name="prompts-app") as (url, _):
        yield url, outputs


def rows(page) -> list[str]:
    """The timeline editor's cells, row by row."""
    cells = page.locator("#prompt_rows [role=gridcell]").all_inner_texts()  # at once: the rows re-render
    return [cell.replace("⋮", "").strip() for cell in cells]


def wait_until(read, wanted, timeout_s: float = 30):
    deadline = time.monotonic() + timeout_s
    while (got := read()) != wanted:
        assert time.monotonic() < deadline, f"still {got!r}, wanted {wanted!r}"
        time.sleep(0.2)


def prompt_of(page) -> str:
    return page.locator("#prompt textarea").input_value()


def form_state(page) -> dict:
    """Every field of the form as the page shows it."""
    numbers = ("seconds", "seed", "steps", "gs", "cfg", "rs", "teacache_threshold", "resolution", "crf",
               "prompt_blend")
    state = {name: page.locator(f"#{name} input[type=number]").input_value() for name in numbers}
    state.update(prompt=prompt_of(page), negative=page.locator("#negative textarea").input_value(),
                 cache=page.locator("#cache input:checked").input_value(),
                 sampler=page.locator("#sampler input[type=radio]:checked").input_value(),
                 profile=page.locator("#memory_profile input").input_value(),
                 storage=page.locator("#transformer_storage input").input_value(), rows=rows(page),
                 image=page.locator("#start_image img").count() > 0)
    return state


def numbers_equal(state: dict) -> dict:
    """`state` with its numbers as floats (the page writes 64 or 64.0 as it likes)."""
    return {k: (float(v) if k in SETTINGS and k != "negative" else v) for k, v in state.items()}


def test_the_timeline_editor_follows_the_prompt_and_shows_where_changes_land(server, open_page):
    url, _ = server
    page = open_page(url, height=1800)
    set_number(page, "seconds", 4.8)
    page.locator("#prompt textarea").fill("[0s: a woman waves] [2.3s: she smiles]")
    wait_until(lambda: rows(page), ["0", "a woman waves", "2.3", "she smiles"])
    timeline = wait_text(page, "timeline", r"asked 2.3 s")
    assert "from 0.0 s, section 1: a woman waves" in timeline
    assert "from 2.4 s, section 3 (asked 2.3 s: lands at the nearest section boundary): she smiles" in timeline
    assert "▲ 2.4 s" in timeline  # the mark on the bar of sections 1-4
    assert page.locator("#timeline .fp-bar span").count() == 4

    cell = page.locator("#prompt_rows [data-testid=cell-1-1]")  # the editor's edit reaches the prompt box
    cell.dblclick()
    page.keyboard.press("Control+A")
    page.keyboard.type("she laughs")
    page.keyboard.press("Enter")
    wait_until(lambda: prompt_of(page), "[0s: a woman waves] [2.3s: she laughs]")
    wait_text(page, "timeline", r"section 3 .*: she laughs")

    set_number(page, "seconds", 2.4)  # now the change would land at the video's end: the timeline says so
    wait_text(page, "timeline", r"⚠ 2.3s is past the video's end")
    page.locator("#prompt textarea").fill("one prompt for the whole video")
    wait_until(lambda: rows(page), ["0", "one prompt for the whole video"])


def test_each_bad_input_is_refused_in_one_line_and_nothing_starts(server, open_page, start_image_128x96, tmp_path):
    url, _ = server
    page = open_page(url, height=1800)
    fill_form(page, start_image_128x96, seconds=2.4)
    for prompt, message in [("[0s: a] [2,4s: b]", "prompt time '2,4s' is not a time in seconds"),
                            ("[1.2s: b] [0s: a]", "prompt times out of order: 0s comes after 1.2s"),
                            ("[0s: a] [3s: b]", "3s is past the video's end"),
                            ("[0s: a] [1.2s: ]", "the prompt from 1.2s is empty")]:
        page.locator("#prompt textarea").fill(prompt)
        wait_text(page, "timeline", "⚠ " + message.replace("(", r"\(").replace("[", r"\["))  # said before Generate
        page.locator("#generate").click()
        page.get_by_text(message).last.wait_for(timeout=30_000)  # and refused by it
    time.sleep(2)  # the jobs list refreshes every second
    assert "No job yet" in text(page, "progress") and "No jobs yet." in text(page, "jobs")

    no_settings = tmp_path / "notes.json"
    no_settings.write_text(json.dumps({"hello": "world"}))
    not_a_video = tmp_path / "broken.mp4"
    not_a_video.write_bytes(b"not a video at all")
    for dropped, message in [(no_settings, "notes.json holds no FramePack settings"),
                             (not_a_video, "broken.mp4 is not a readable video")]:
        page.locator("#settings_file input[type=file]").set_input_files(str(dropped))
        page.get_by_text(message).last.wait_for(timeout=30_000)
    assert prompt_of(page) == "[0s: a] [1.2s: ]"  # the form kept what it had


def test_a_dropped_video_or_settings_file_and_the_gallery_restore_every_setting(server, open_page,
                                                                              start_image_128x96, tmp_path):
    url, outputs = server
    page = open_page(url, height=1800)
    fill_form(page, start_image_128x96, seconds=2.4, steps=2, prompt=PROMPT)
    for name, value in SETTINGS.items():
        if name == "negative":
            page.locator("#negative textarea").fill(value)
        else:
            set_number(page, name, value)
    page.locator("#cache input[value=off]").check()  # the step cache: off (the TeaCache box follows it, hidden)
    page.locator("#sampler label").filter(has_text="euler").click()
    choose(page, "memory_profile", "cpu")
    choose(page, "transformer_storage", "bf16 (as shipped)")
    wait_until(lambda: rows(page), ["0", "a red square", "1.3", "a blue square"])
    made = form_state(page)
    assert made["cache"] == "off" and made["sampler"] == "euler" and made["image"]
    page.locator("#generate").click()
    done = wait_text(page, "progress", r"Done: 73 frames", timeout_s=2 * JOB_S)
    name = done.split("saved as ")[1].split()[0].removesuffix(".mp4")

    # the video alone, away from its settings file and image: its metadata, the image from the outputs folder
    alone = tmp_path / f"{name}.mp4"
    shutil.copy(outputs / f"{name}.mp4", alone)
    sidecar = tmp_path / "elsewhere" / f"{name}.json"
    sidecar.parent.mkdir()
    shutil.copy(outputs / f"{name}.json", sidecar)
    for dropped in (alone, sidecar):
        fresh = open_page(url, height=1800)  # a form at its defaults
        assert form_state(fresh)["seed"] == "31337" and not form_state(fresh)["image"]
        fresh.locator("#settings_file input[type=file]").set_input_files(str(dropped))
        note = wait_text(fresh, "restore_note", r"restored", timeout_s=30)
        assert f"{dropped.name}" in note and "2 prompts over time" in note and f"{name}.input.png" in note
        fresh.locator("#start_image img").first.wait_for(timeout=30_000)
        wait_until(lambda: numbers_equal(form_state(fresh)), numbers_equal(made))
        wait_text(fresh, "timeline", r"from 1.2 s, section 2 \(asked 1.3 s")

    gallery = open_page(url, height=1800)  # "Use these settings" takes the same path
    gallery.locator("#gallery label").filter(has_text=f"{name}.mp4").click()
    wait_text(gallery, "gallery_settings", r"finished, 73 frames", timeout_s=30)
    gallery.locator("#use_settings").click()
    wait_text(gallery, "restore_note", rf"{name}\.mp4\*\* restored|{name}\.mp4 restored", timeout_s=30)
    gallery.locator("#start_image img").first.wait_for(timeout=30_000)
    wait_until(lambda: numbers_equal(form_state(gallery)), numbers_equal(made))
