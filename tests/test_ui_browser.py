"""The web app in a real browser: `python app.py` as its own process, Debian's chromium driven by Playwright.

Needs /usr/bin/chromium (Debian/Ubuntu: `sudo apt-get install chromium`; `python3 install.py --test` installs it
when run as root). Never `playwright install`. Only loopback traffic.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest

from framepack_ui.engine.video import count_frames
from framepack_ui.events import Finished, Phase, SectionSaved, Step, Stopped
from framepack_ui.sidecar import sidecar_path
from framepack_ui.ui import present
from framepack_ui.worker import Queued

REPO = Path(__file__).resolve().parent.parent
SERVER_START_S = 120  # importing gradio on a busy 2-core machine
JOB_S = 90  # the first job also imports torch and loads the tiny models
# The README's picture: refreshed only on request (FRAMEPACK_UI_SCREENSHOT=1), so test runs leave the tree clean.
README_SCREENSHOT = REPO / "docs" / "screenshot.png"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def run_app(models_dir, outputs, *args, env=None, name="app"):
    """`python app.py` on a free port, stopped by its pid afterwards; yields (url, pid)."""
    port = _free_port()
    log_path = outputs.parent / f"{name}.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "app.py", "--models", str(models_dir), "--outputs",
                                 str(outputs), "--port", str(port), *args], cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            assert proc.poll() is None, f"app.py exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"app.py did not answer in {SERVER_START_S} s"
            time.sleep(0.5)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(15)
        print(log_path.read_text()[-4000:])  # shown by pytest when a test failed


@pytest.fixture(scope="module")
def server(tiny_models_dir, tmp_path_factory):
    """The app on the tiny models, no password; yields (url, pid, outputs dir). Gradio's cache is the `gradio`
    folder beside the outputs."""
    outputs = tmp_path_factory.mktemp("outputs")
    cache = outputs.parent / "gradio"
    with run_app(tiny_models_dir, outputs, env={"GRADIO_TEMP_DIR": str(cache)}) as (url, pid):
        yield url, pid, outputs


def cached_copies(outputs: Path, name: str) -> list[Path]:
    """Copies of the video `name` in the server's Gradio cache."""
    return [p for p in (outputs.parent / "gradio").rglob("*.mp4") if p.name == name]


def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def fill_form(page, image: str, seconds: float, steps: int = 2, prompt: str = "a red square moves") -> None:
    page.locator("#start_image input[type=file]").set_input_files(image)
    page.locator("#start_image img").first.wait_for(timeout=30_000)  # uploaded and shown
    page.locator("#prompt textarea").fill(prompt)
    set_number(page, "seconds", seconds)
    set_number(page, "steps", steps)
    set_number(page, "resolution", 64)
    set_number(page, "seed", 42)


def text(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id}").inner_text()


def wait_text(page, elem_id: str, pattern: str, timeout_s: float = JOB_S) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        current = text(page, elem_id)
        if re.search(pattern, current):
            return current
        assert time.monotonic() < deadline, f"#{elem_id} never matched {pattern!r}; it says: {current!r}"
        time.sleep(0.2)


def video_src(page, elem_id: str, timeout_s: float = JOB_S) -> str:
    video = page.locator(f"#{elem_id} video")
    video.wait_for(timeout=timeout_s * 1000)
    return video.get_attribute("src")


def test_ui_imports_neither_torch_nor_the_engine():
    code = ("import sys; import framepack_ui.ui, framepack_ui.worker, app; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('framepack_ui.engine', "
            "'framepack_ui.memory'))]; assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_replayed_job_looks_as_if_watched_live_and_only_changes_are_sent():
    strip = np.zeros((4, 12, 3), np.uint8)
    events = [Queued(2), Queued(1), Phase("starting"), Phase("settings", "seed 42, 144x112, 2 sections, 73 frames"),
              Step(0, 2, 1, 2, 3.0, 3.0, strip), Step(0, 2, 2, 2, 4.0, 2.0, strip.copy()),
              SectionSaved(0, 2, "/out/a.mp4", 5, 6.0), Step(1, 2, 1, 2, 7.0, 1.0, strip.copy()),
              SectionSaved(1, 2, "/out/a.mp4", 41, 9.0), Finished("/out/a.mp4", "/out/a.json", 73, 9.5)]
    live, views = present.JobView(job_id="3"), []
    for event in events:
        live = present.apply(live, event)
        views.append(live)
    assert present.fold(events, present.JobView(job_id="3")) == live
    assert set(present.changes(None, views[0])) == set(present.OUTPUTS)  # a new job: every output starts over
    assert present.progress_text(views[0]) == "Job 3: waiting in the queue (position 2)."
    assert present.changes(views[4], views[4]) == {}
    step_changes = present.changes(views[4], views[5])
    assert set(step_changes) == {"preview", "progress"}  # the growing video is not re-sent at every step
    assert "section 1/2, step 2/2" in step_changes["progress"] and "ETA 2.0 s" in step_changes["progress"]
    assert "s/frame" in step_changes["progress"]
    assert present.changes(views[7], views[8])["section_video"] == "/out/a.mp4"  # same path, longer video
    assert present.changes(views[8], views[9])["final_video"] == "/out/a.mp4"
    assert present.progress_text(live) == "Job 3 · Done: 73 frames in 9.5 s, saved as a.mp4"
    stopped = present.apply(views[6], Stopped("/out/a.mp4", 37))
    assert "Stopped: kept 37 frames in a.mp4" in present.progress_text(stopped)
    assert present.length_text(2.4) == "2 sections, 73 frames (2.4 s at 30 fps)"
    assert present.length_text(1.0) == "1 section, 37 frames (1.2 s at 30 fps)"


def test_binds_to_loopback_by_default(server):
    _, pid, _ = server
    listening = [c.laddr for c in psutil.Process(pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert listening and all(address.ip == "127.0.0.1" for address in listening), listening


def test_generate_shows_preview_section_video_gauges_and_final_video(server, open_page, start_image_128x96):
    url, _, outputs = server
    page = open_page(url)
    page.locator("#generate").click()  # no image yet: one line says what to do, nothing is queued
    page.get_by_text("upload a start image first").wait_for(timeout=30_000)
    fill_form(page, start_image_128x96, seconds=2.4, steps=3)
    wait_text(page, "length", "2 sections, 73 frames", timeout_s=30)  # updated by a round trip after the change
    gauges_before = wait_text(page, "gauges", r"RAM\s+[\d.]+ / [\d.]+ GB", timeout_s=30)
    assert "no NVIDIA GPU found" in gauges_before  # this machine has none: the panel says so in words
    page.locator("#generate").click()

    page.locator("#preview img").wait_for(timeout=JOB_S * 1000)
    wait_text(page, "progress", r"section \d/2, step \d/3 .*s/frame.*ETA")
    first_src = video_src(page, "section_video")
    shot = page.screenshot(full_page=True)
    assert shot.startswith(b"\x89PNG")
    if os.environ.get("FRAMEPACK_UI_SCREENSHOT") == "1":
        README_SCREENSHOT.write_bytes(shot)
    deadline = time.monotonic() + 30
    while text(page, "gauges") == gauges_before:  # the timer keeps ticking while the job streams
        assert time.monotonic() < deadline, "the gauges did not change in 30 s"
        time.sleep(0.5)

    done = wait_text(page, "progress", r"Done: 73 frames")
    final_src = video_src(page, "final_video")
    assert final_src and final_src != first_src  # the section video was shown before the whole one
    name = re.search(r"saved as (\S+\.mp4)", done).group(1)
    assert count_frames(outputs / name) == 73
    # The growing video is served in place, under a new link name per section; Gradio's cache holds at most the
    # final video's one copy, never one per section (quadratic in the video's length).
    assert len(cached_copies(outputs, name)) <= 1
    assert "/.live/" in first_src and name.removesuffix(".mp4") in first_src
    assert video_src(page, "section_video") != first_src  # the second section: a new URL, so the browser reloads
    assert not [p for p in (outputs.parent / "gradio").rglob("*.mp4") if ".s1." in p.name or ".s2." in p.name]
    assert page.evaluate("""async () => {  // the browser can play what it was sent
        const v = document.querySelector('#final_video video');
        if (v.readyState < 1) await new Promise(r => v.addEventListener('loadedmetadata', r, {once: true}));
        return v.duration; }""") > 2
    wait_text(page, "jobs", r"finished\s+73 frames", timeout_s=10)  # the jobs list, refreshed by the timer


def test_stop_midway_keeps_a_playable_video(server, open_page, start_image_128x96):
    url, _, outputs = server
    page = open_page(url)
    fill_form(page, start_image_128x96, seconds=6.0, steps=3)  # 5 sections
    page.locator("#generate").click()
    video_src(page, "section_video")  # the first section is on disk
    page.locator("#stop").click()
    stopped = wait_text(page, "progress", r"Stopped: kept \d+ frames in \S+\.mp4")
    frames, name = re.search(r"kept (\d+) frames in (\S+\.mp4)", stopped).groups()
    assert 37 <= int(frames) < 1 + 36 * 5
    assert count_frames(outputs / name) == int(frames)
    video_src(page, "final_video")  # what was kept is shown


def job_id_of(page) -> str:
    """The id of the job this page follows, from its progress line (the shared server numbers jobs across the
    module's tests, so no test may assume a count)."""
    return re.search(r"Job (\d+)", wait_text(page, "progress", r"Job \d+")).group(1)


def test_two_pages_queue_two_jobs_and_both_finish(server, open_page, start_image_128x96):
    url, _, outputs = server
    first, second = open_page(url), open_page(url)  # two browser contexts: two users
    fill_form(first, start_image_128x96, seconds=1.2, prompt="first page")
    fill_form(second, start_image_128x96, seconds=4.8,
              prompt="second page")  # 4 sections: still running when `late` opens, also on a loaded CI machine
    first.locator("#generate").click()
    job_1 = job_id_of(first)
    second.locator("#generate").click()
    wait_text(second, "progress", r"waiting in the queue \(position 1\)|Starting|Encoding|section")
    job_2 = job_id_of(second)
    assert job_1 != job_2

    late = open_page(url)  # a page opened mid-job follows the running job: the first, or the second by then
    followed = wait_text(late, "progress", rf"Job ({job_1}|{job_2})\b", timeout_s=30)
    assert re.search(r"Job (\d+)", followed).group(1) in (job_1, job_2)

    done_1 = wait_text(first, "progress", rf"Job {job_1} · Done: 37 frames")
    done_2 = wait_text(second, "progress", rf"Job {job_2} · Done: 145 frames")
    names = [re.search(r"saved as (\S+\.mp4)", done).group(1) for done in (done_1, done_2)]
    assert names[0] != names[1]
    assert [count_frames(outputs / name) for name in names] == [37, 145]
    wait_text(second, "jobs", r"second page", timeout_s=10)


def test_closing_the_tab_mid_job_does_not_stop_it(server, browser, open_page, start_image_128x96):
    """The job lives in the worker, not in the tab: close the only page mid-job, open a new one, and it shows
    the same job going on and finishing."""
    url, _, outputs = server
    context = browser.new_context(viewport={"width": 1400, "height": 1500})
    try:
        page = context.new_page()
        page.goto(url)
        page.locator("#start_image input[type=file]").wait_for(state="attached", timeout=60_000)
        fill_form(page, start_image_128x96, seconds=8.4, steps=4,
                  prompt="tab closed mid-job")  # 7 sections: time to reopen
        page.locator("#generate").click()
        wait_text(page, "progress", r"section [1-3]/7")  # sampling, with most of the job still to come
        job = job_id_of(page)
        page.close()  # the tab, and with it the stream that followed the job
    finally:
        context.close()

    later = open_page(url)
    still = wait_text(later, "progress", rf"Job {job} · (?!Done)", timeout_s=30)  # found again, not yet ended
    assert "Stopped" not in still and "Failed" not in still
    done = wait_text(later, "progress", rf"Job {job} · Done: 253 frames")
    name = re.search(r"saved as (\S+\.mp4)", done).group(1)
    assert count_frames(outputs / name) == 253
    video_src(later, "final_video")


# A sitecustomize.py for the app's process (and any Python child): every name lookup or connection to a host
# that is not loopback is written to $FRAMEPACK_TEST_NET_LOG and refused as if there were no internet (a failed
# DNS lookup), so no test sends a packet out, and a test can see what the app tried.
NET_GUARD = """
import os, socket

_LOG = os.environ["FRAMEPACK_TEST_NET_LOG"]
_LOCAL = {None, "", "localhost", "::1", "::", "0.0.0.0"}


def _local(host):
    host = host.decode() if isinstance(host, bytes) else host
    return host in _LOCAL or str(host).startswith("127.")


def _refuse(host, port):
    with open(_LOG, "a", encoding="utf-8") as log:
        log.write(f"{host} {port}\\n")
    raise socket.gaierror(socket.EAI_NONAME, f"test: no internet ({host} is not loopback)")


_getaddrinfo, _connect, _connect_ex = socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex


def getaddrinfo(host, port, *args, **kwargs):
    if not _local(host):
        _refuse(host, port)
    return _getaddrinfo(host, port, *args, **kwargs)


def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
        _refuse(*address[:2])
    return _connect(self, address)


def connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
        _refuse(*address[:2])
    return _connect_ex(self, address)


socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex = getaddrinfo, connect, connect_ex
"""


def net_guard(folder: Path) -> tuple[dict, Path]:
    """(env for run_app, the log of refused non-loopback hosts): see NET_GUARD."""
    seam = folder / "net_guard"
    seam.mkdir()
    (seam / "sitecustomize.py").write_text(NET_GUARD)
    log = folder / "non_loopback.log"
    log.write_text("")
    path = os.pathsep.join(p for p in (str(seam), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "FRAMEPACK_TEST_NET_LOG": str(log)}, log


def test_start_and_a_page_load_contact_nothing_but_loopback(tiny_models_dir, tmp_path, open_page):
    """No analytics, no version check, no telemetry: app.py turns them off itself (here the shell asks for them),
    and the page fetches nothing from elsewhere (fonts, scripts)."""
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    env, refused = net_guard(tmp_path)
    env.update(GRADIO_ANALYTICS_ENABLED="True", HF_HUB_DISABLE_TELEMETRY="0")
    with run_app(tiny_models_dir, outputs, env=env, name="app_offline") as (url, pid):
        page = open_page(url)
        requested: list[str] = []
        page.on("request", lambda request: requested.append(request.url))
        page.reload()
        page.locator("#start_image input[type=file]").wait_for(state="attached", timeout=60_000)
        wait_text(page, "gauges", r"RAM\s+[\d.]+ / [\d.]+ GB", timeout_s=30)
        wait_text(page, "plan", r"no CUDA GPU", timeout_s=60)
        time.sleep(3)  # anything sent from a background thread at start has had its chance
        assert psutil.Process(pid).is_running()
    assert refused.read_text() == ""  # the seam works: see test_share_without_internet_... for a refused host
    hosts = {re.match(r"\w+://([^/:]+)", u).group(1) for u in requested if u.startswith(("http:", "https:"))}
    assert requested and hosts == {"127.0.0.1"}, hosts


def test_share_without_internet_says_so_in_one_line_and_serves_locally(tiny_models_dir, tmp_path):
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    env, refused = net_guard(tmp_path)
    with run_app(tiny_models_dir, outputs, "--share", env=env, name="app_share") as (url, pid):
        log_path = outputs.parent / "app_share.log"
        deadline = time.monotonic() + 60  # the warning follows the server's start
        while "share link" not in (log_text := log_path.read_text()):
            assert time.monotonic() < deadline, log_text[-2000:]
            time.sleep(0.2)
        status, body = http_get(url)
        assert status == 200 and b"FramePack UI" in body  # still serving, on this machine
        assert psutil.Process(pid).is_running()
    assert "api.gradio.app" in refused.read_text()  # it did try (and only loopback was reached)
    lines = log_text.splitlines()
    share_lines = [line for line in lines if re.search(r"share|gradio\.live|tunnel|public", line, re.I)]
    assert len(share_lines) == 1, lines
    assert "could not make a share link" in share_lines[0] and "serving locally" in share_lines[0]
    assert "Traceback" not in log_text and "running at http://127.0.0.1:" in log_text


def http_get(url: str) -> tuple[int, bytes]:
    """(status, body) of a GET from this test process (no cookies): what a stranger gets."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def choose(page, elem_id: str, option: str) -> None:
    """Pick `option` in a gr.Dropdown."""
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def test_memory_profile_shows_the_plan_and_reaches_the_job(server, open_page, start_image_128x96):
    url, _, _ = server
    page = open_page(url)
    wait_text(page, "plan", r"no CUDA GPU", timeout_s=60)  # auto: planned for this machine
    assert re.search(r"transformer\s+mmap", text(page, "plan"))  # without a GPU: computed from the file map
    choose(page, "memory_profile", "cpu")
    wait_text(page, "plan", r"transformer\s+cpu", timeout_s=30)
    choose(page, "memory_profile", "gpu")  # cannot fit here: one line saying why
    refused = wait_text(page, "plan", r"No memory plan fits", timeout_s=30).strip()
    assert "\n" not in refused and "needs a CUDA GPU" in refused
    fill_form(page, start_image_128x96, seconds=1.2)
    page.locator("#generate").click()  # the job gets the page's profile: planned before anything loads
    wait_text(page, "progress", r"Failed: .*needs a CUDA GPU")
    wait_text(page, "gallery", r"failed: .*needs a CUDA GPU", timeout_s=30)  # the past outputs say so too


CONVERT_MB = 400  # a transformer large enough that its fp8 conversion shows on the page for a few polls


def test_fp8_storage_converts_once_with_a_progress_bar_and_is_recorded(tmp_path, open_page, start_image_128x96):
    """The page's storage choice reaches the plan and the job: fp8 shows in the plan, the first fp8 job converts the
    transformer with a progress bar and time left on the progress line, and the settings file records the storage.
    (The automatic choice needs a streamed transformer, so a GPU: it is table-tested in test_memory_plan.py and run
    through the worker with injected machine readings in test_worker.py.)"""
    from framepack_ui.weights.tiny import make_tiny_models

    models, outputs = tmp_path / "models", tmp_path / "outputs"
    make_tiny_models(models, transformer_mb=CONVERT_MB, seed=0)
    outputs.mkdir()
    with run_app(models, outputs, name="fp8-app") as (url, _):
        page = open_page(url)
        wait_text(page, "plan", r"transformer\s+mmap", timeout_s=60)
        choose(page, "transformer_storage", "fp8 (half the size)")
        wait_text(page, "plan", r"fp8 e4m3 map", timeout_s=60)
        fill_form(page, start_image_128x96, seconds=1.2, steps=1)
        page.locator("#generate").click()
        bar = wait_text(page, "progress", r"\[[#.]{20}\] \d+ % of [\d.]+ GB", timeout_s=120)
        assert "Converting the transformer to fp8 (once)" in bar
        done = wait_text(page, "progress", r"Done: 37 frames")
    name = re.search(r"saved as (\S+)\.mp4", done).group(1)
    settings = json.loads((outputs / f"{name}.json").read_text())
    assert settings["memory"]["transformer_storage"] == "fp8"


def test_gallery_lists_past_outputs_and_fills_the_form(server, open_page, start_image_128x96):
    url, _, outputs = server
    failed = outputs / "19990101_000000_1.json"  # a job that failed before its first section: no video
    failed.write_text(json.dumps({"prompt": "old failure", "status": "failed", "frames": 0,
                                  "message": "out of memory: try a lower resolution"}))
    page = open_page(url)
    fill_form(page, start_image_128x96, seconds=1.2, prompt="gallery job")
    set_number(page, "seed", 4242)
    page.locator("#generate").click()
    done = wait_text(page, "progress", r"Done: 37 frames")
    name = re.search(r"saved as (\S+\.mp4)", done).group(1)

    other = open_page(url)  # another page, its form at the defaults
    wait_text(other, "gallery", re.escape(name), timeout_s=30)
    listing = text(other, "gallery")
    assert listing.index(name) < listing.index("19990101_000000_1.mp4")  # newest first
    assert "failed: out of memory" in listing  # how the job ended, from its settings file
    assert text(other, "gallery").count("finished, 37 frames") >= 1
    other.locator("#gallery label").filter(has_text=name).click()
    wait_text(other, "gallery_settings", r"finished, 37 frames", timeout_s=30)
    assert "gallery job" in text(other, "gallery_settings")
    assert video_src(other, "gallery_video", timeout_s=30)
    assert other.locator("#steps input[type=number]").input_value() == "25"
    other.locator("#use_settings").click()
    deadline = time.monotonic() + 30
    while other.locator("#prompt textarea").input_value() != "gallery job":
        assert time.monotonic() < deadline, "Use these settings did not fill the prompt"
        time.sleep(0.2)
    assert other.locator("#seed input[type=number]").input_value() == "4242"
    assert other.locator("#steps input[type=number]").input_value() == "2"
    assert other.locator("#resolution input[type=number]").input_value() == "64"
    assert float(other.locator("#seconds input[type=number]").input_value()) == 1.2
    other.locator("#start_image img").first.wait_for(timeout=30_000)  # the copy of the start image
    other.locator("#generate").click()  # and the filled form runs as it is
    wait_text(other, "progress", r"Done: 37 frames")


def test_lora_pickers_reach_the_job_are_recorded_and_come_back_with_use_these_settings(server, open_page,
                                                                                       start_image_128x96,
                                                                                       tiny_models_dir):
    """Two LoRAs of models/loras/ picked with a strength each: the job applies them (its Phase says so), the settings
    file records them, the past output lists them, and "Use these settings" puts them back in the pickers."""
    url, _, outputs = server
    page = open_page(url)
    for slot, option in ((0, "tiny-musubi-framepack.safetensors"), (2, "tiny-diffusers.safetensors")):
        page.locator(f"#lora_file_{slot} input").click()  # every picker lists the same files: pick in this one
        page.locator(f"#lora_file_{slot}").get_by_role("option", name=option, exact=True).click()
    set_number(page, "lora_strength_0", 0.6)
    fill_form(page, start_image_128x96, seconds=1.2, prompt="lora job")
    page.locator("#generate").click()
    done = wait_text(page, "progress", r"Done: 37 frames")
    name = re.search(r"saved as (\S+\.mp4)", done).group(1)
    loras = tiny_models_dir / "loras"
    assert json.loads((outputs / name).with_suffix(".json").read_text())["loras"] == [
        {"path": str(loras / "tiny-musubi-framepack.safetensors"), "strength": 0.6},
        {"path": str(loras / "tiny-diffusers.safetensors"), "strength": 1.0}]

    other = open_page(url)  # a fresh page: no LoRA picked
    assert other.locator("#lora_file_0 input").input_value() == "(none)"
    wait_text(other, "gallery", re.escape(name), timeout_s=30)
    other.locator("#gallery label").filter(has_text=name).click()
    wait_text(other, "gallery_settings", r"tiny-musubi-framepack\.safetensors x0\.6, tiny-diffusers\.safetensors x1",
              timeout_s=30)
    other.locator("#use_settings").click()
    deadline = time.monotonic() + 30
    while other.locator("#lora_file_0 input").input_value() != "tiny-musubi-framepack.safetensors":
        assert time.monotonic() < deadline, "Use these settings did not fill the LoRA picker"
        time.sleep(0.2)
    assert other.locator("#lora_strength_0 input[type=number]").input_value() == "0.6"
    assert other.locator("#lora_file_1 input").input_value() == "tiny-diffusers.safetensors"
    assert other.locator("#lora_file_2 input").input_value() == "(none)"


def test_without_auth_only_outputs_are_readable_over_http(server):
    url, _, outputs = server
    inside = outputs / "readable.json"
    inside.write_text('{"ok": true}')
    status, body = http_get(f"{url}gradio_api/file={inside}")
    assert (status, body) == (200, b'{"ok": true}')  # the control: outputs/ is served
    readme = REPO / "README.md"
    for route in ("gradio_api/file=", "file="):
        status, body = http_get(f"{url}{route}{readme}")
        assert status >= 400 and b"FramePack" not in body, (route, status, body[:200])


@pytest.fixture(scope="module")
def auth_server(tiny_models_dir, tmp_path_factory):
    """The app asking for a password from an --auth-file; yields (url, outputs dir)."""
    outputs = tmp_path_factory.mktemp("outputs_auth")
    users = outputs.parent / "users.txt"
    users.write_text("# who may use the app\nalice:wonderland\n\nbob:builder\n")
    with run_app(tiny_models_dir, outputs, "--auth-file", str(users), name="app_auth") as (url, _):
        yield url, outputs


def test_auth_file_a_stranger_gets_the_login_page_and_no_file(auth_server, browser):
    url, outputs = auth_server
    secret = outputs / "secret.json"
    secret.write_text('{"secret": 1}')
    status, body = http_get(f"{url}gradio_api/file={secret}")
    assert status in (401, 403) or b"secret" not in body, (status, body[:200])
    assert b'{"secret": 1}' not in body

    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(url)
        page.get_by_label("username").wait_for(timeout=60_000)  # the login page, not the app
        assert page.locator("#start_image").count() == 0
        page.get_by_label("username").fill("bob")
        page.get_by_label("password").fill("wrong")
        page.get_by_role("button", name="Login").click()
        page.get_by_text("Incorrect").first.wait_for(timeout=30_000)
        page.get_by_label("username").fill("bob")  # the second line of the file
        page.get_by_label("password").fill("builder")
        page.get_by_role("button", name="Login").click()
        page.locator("#start_image input[type=file]").wait_for(state="attached", timeout=60_000)
        response = page.request.get(f"{url}gradio_api/file={secret}")  # with the login cookie
        assert response.status == 200 and response.body() == b'{"secret": 1}'
    finally:
        context.close()


def test_auth_file_lines_are_read_and_a_bad_line_is_named(tmp_path):
    import app

    users = tmp_path / "users.txt"
    users.write_text("# comment\nalice:wonder:land\n\n  bob:builder  \n")
    args = app.parse_args(["--auth", "carol:x", "--auth-file", str(users)])
    assert args.credentials == [("carol", "x"), ("alice", "wonder:land"), ("bob", "builder")]
    users.write_text("alice:ok\nnocolon\n")
    with pytest.raises(ValueError, match="line 2"):
        app.read_auth_file(users)
    with pytest.raises(SystemExit):  # the command line says so and stops
        app.parse_args(["--auth-file", str(users)])


def test_listen_binds_all_interfaces_and_prints_the_lan_addresses(tiny_models_dir, tmp_path):
    """--listen: the socket is on 0.0.0.0 and the log names every LAN address (only loopback is contacted)."""
    outputs = tmp_path / "outputs_lan"
    outputs.mkdir()
    with run_app(tiny_models_dir, outputs, "--listen", "--auth", "a:b", name="app_lan") as (url, pid):
        listening = [c.laddr for c in psutil.Process(pid).net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN]
        assert listening and all(address.ip == "0.0.0.0" for address in listening), listening
        port = listening[0].port
        lan = sorted({a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                      if a.family == socket.AF_INET and not a.address.startswith("127.")})
        expected = [f"on the LAN: http://{address}:{port}" for address in lan]
        deadline = time.monotonic() + 15  # the lines follow the server's start by a moment
        while not all(line in (log_text := (outputs.parent / "app_lan.log").read_text()) for line in expected):
            assert time.monotonic() < deadline, log_text[-2000:]
            time.sleep(0.2)


def test_a_taken_port_gets_one_line_and_exit_code_1(tiny_models_dir, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "app.py", "--models", str(tiny_models_dir), "--outputs",
                               str(tmp_path / "outputs"), "--port", str(port)], cwd=REPO, capture_output=True,
                              text=True, timeout=SERVER_START_S,
                              env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-2000:]
    errors = [line for line in output.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "could not start the web server" in errors[0], output[-2000:]
    assert "Traceback" not in output


def test_an_attention_this_machine_cannot_run_stops_the_app_with_one_line(tiny_models_dir, tmp_path):
    proc = subprocess.run([sys.executable, "app.py", "--models", str(tiny_models_dir), "--outputs",
                           str(tmp_path / "outputs"), "--device", "cpu", "--attention", "cudnn_fp8"], cwd=REPO,
                          capture_output=True, text=True, timeout=SERVER_START_S,
                          env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-2000:]
    errors = [line for line in output.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "--attention cudnn_fp8 needs the transformer on a CUDA GPU" in errors[0], output
    assert "Traceback" not in output


def test_resume_branch_and_extend_a_past_output_from_the_gallery(server, open_page, tiny_models_dir, start_image):
    """A job stopped after its first section (the engine run here, on the same tiny models) is resumed in place,
    branched from its section 2 with the form's prompt and seed, and extended by a section, all from the gallery."""
    from conftest import cpu_manager
    from framepack_ui.engine import f1
    from framepack_ui.errors import Cancelled
    from framepack_ui.spec import JobSpec

    url, _, outputs = server
    stopped = outputs / "20000101_000000_stopped.mp4"

    def stop_second(section):
        if section == 1:
            raise Cancelled()

    spec = JobSpec(image=start_image, prompt="resume me", seconds=2.4, resolution=64, steps=2, seed=3)
    assert isinstance(f1.run(spec, stopped, cpu_manager(tiny_models_dir), lambda e: None, section_hook=stop_second),
                      Stopped)
    page = open_page(url)
    page.locator("#gallery_refresh").click()
    wait_text(page, "gallery", re.escape(stopped.name), timeout_s=30)
    page.locator("#gallery label").filter(has_text=stopped.name).click()
    wait_text(page, "gallery_settings", r"1 sections saved.*Resume continues it", timeout_s=30)
    page.locator("#resume").click()
    done = wait_text(page, "progress", rf"Done: 73 frames in .* saved as {re.escape(stopped.name)}")
    job = int(re.search(r"Job (\d+)", done).group(1))
    assert count_frames(stopped) == 73

    page.locator("#prompt textarea").fill("a branch")
    for elem_id, value in (("seconds", 2.4), ("steps", 2), ("resolution", 64), ("seed", 9), ("branch_section", 2)):
        set_number(page, elem_id, value)
    page.locator("#branch").click()
    done = wait_text(page, "progress", rf"Job {job + 1} · Done: 73 frames")
    branched = outputs / re.search(r"saved as (\S+\.mp4)", done).group(1)
    assert branched != stopped and count_frames(branched) == 73
    assert json.loads(branched.with_suffix(".json").read_text())["continued"]["from_section"] == 2

    page.locator("#gallery_refresh").click()  # the selected output grew: its details say so
    wait_text(page, "gallery_settings", r"finished, 73 frames.*\n.*\n2 sections saved", timeout_s=30)
    set_number(page, "extend_seconds", 1.2)
    page.locator("#extend").click()
    done = wait_text(page, "progress", rf"Job {job + 2} · Done: 109 frames")
    extended = outputs / re.search(r"saved as (\S+\.mp4)", done).group(1)
    assert count_frames(extended) == 73 + 36 and count_frames(stopped) == 73  # the source stays


def test_jobs_queued_before_a_restart_wait_on_the_page_until_started_or_dropped(tiny_models_dir, tmp_path,
                                                                                open_page, start_image_128x96):
    """Two jobs recorded as queued by an earlier run of the app (worker/queue_records.py) are listed as waiting;
    nothing runs until "Start waiting jobs" runs both; "Drop waiting jobs" then finds none."""
    from framepack_ui.spec import JobSpec
    from framepack_ui.worker import queue_records

    outputs = tmp_path / "outputs"
    for n, prompt in enumerate(("first waiting", "second waiting")):
        spec = JobSpec(image=start_image_128x96, prompt=prompt, seconds=1.2, steps=2, resolution=64, seed=n)
        queue_records.write(outputs / f"19990101_00000{n}_{n}.mp4", spec, "auto", {}, 1000.0 + n)
    with run_app(tiny_models_dir, outputs, name="app_waiting") as (url, _):
        page = open_page(url)
        jobs = wait_text(page, "jobs", r"waiting[\s\S]*waiting", timeout_s=30)
        assert "queued before the app closed" in jobs and "first waiting" in jobs and "second waiting" in jobs
        assert "running" not in jobs  # nothing started on its own
        page.locator("#start_waiting").click()
        wait_text(page, "jobs", r"finished[\s\S]*finished", timeout_s=2 * JOB_S)
        page.locator("#drop_waiting").click()
        page.get_by_text("No jobs are waiting to be dropped.").wait_for(timeout=30_000)
    assert sorted(json.loads(p.read_text())["status"] for p in outputs.glob("*.json")) == ["finished", "finished"]


def test_estimate_before_generate_the_jobs_plot_after_it_and_a_past_jobs_plot_in_the_gallery(
        tiny_models_dir, tmp_path, open_page, start_image_128x96):
    outputs = tmp_path / "outputs"  # an app of its own: no job has run on it yet
    with run_app(tiny_models_dir, outputs, name="estimate") as (url, _):
        page = open_page(url)
        fill_form(page, start_image_128x96, seconds=2.4, steps=3)
        wait_text(page, "estimate", "unknown until the first job on this machine", timeout_s=30)
        page.locator("#generate").click()
        wait_text(page, "progress", r"Done: 73 frames")
        # the plot of the job: its gauges over time (RAM here: no GPU), its phases and its two sections
        page.locator("#job_plot svg polyline[data-series=ram_used_gb]").wait_for(timeout=30_000)
        phases = page.locator("#job_plot svg rect.fp-phase title").evaluate_all("els => els.map(e => e.textContent)")
        assert any(t.startswith("Sampling") for t in phases) and any(t.startswith("Decoding") for t in phases)
        assert page.locator("#job_plot svg line.fp-section").count() == 2
        # the next estimate comes from the job just measured, and follows the controls
        first = wait_text(page, "estimate", r"Estimate: about .* measured on this machine \(1 job", timeout_s=30)
        set_number(page, "steps", 30)
        wait_text(page, "estimate", r"Estimate: about", timeout_s=30)
        deadline = time.monotonic() + 30
        while text(page, "estimate") == first:
            assert time.monotonic() < deadline, "the estimate did not follow the steps"
            time.sleep(0.2)
        # a past job's plot, from its settings file
        page.locator("#gallery label").first.click()
        page.locator("#gallery_plot svg polyline").first.wait_for(timeout=30_000)


def test_a_batch_of_two_images_and_two_prompts_gives_four_outputs(server, open_page, start_image_128x96,
                                                                   start_image_80x64):
    url, _, outputs = server
    before = set(outputs.glob("*.mp4"))
    page = open_page(url)
    fill_form(page, start_image_128x96, seconds=1.2, steps=2)
    page.get_by_text("Batch: several images").click()  # folded away by default
    page.locator("#batch_images input[type=file]").set_input_files([start_image_128x96, start_image_80x64])
    page.locator("#batch_prompts textarea").fill("a red square\na square in the dark")
    wait_text(page, "estimate", r"for the 4 jobs|unknown", timeout_s=30)
    page.locator("#batch_generate").click()
    deadline = time.monotonic() + 4 * JOB_S
    while True:
        made = set(outputs.glob("*.mp4")) - before
        finished = [p for p in made if sidecar_path(p).is_file()
                    and json.loads(sidecar_path(p).read_text()).get("status") == "finished"]
        if len(finished) == 4:
            break
        assert time.monotonic() < deadline, f"{len(finished)} of 4 batch jobs finished"
        time.sleep(0.5)
    settings = [json.loads(sidecar_path(p).read_text()) for p in made]
    assert sorted(s["prompt"] for s in settings) == sorted(["a red square", "a square in the dark"] * 2)
    assert len({(outputs / s["input_image_file"]).read_bytes() for s in settings}) == 2  # both images
    assert all(s["steps"] == 2 and s["resolution"] == 64 for s in settings)  # the form's settings for each
    wait_text(page, "progress", r"Done: 37 frames")  # the page followed them in turn, to the last
