"""A busy LAN (issue 21): `python app.py` on loopback, one browser page (Debian's chromium through Playwright) and
nine HTTP clients polling the gauges (plain HTTP against Gradio's API) and queueing jobs (gradio_client, each its own
session) while one runs. Each gauge request is answered within 2 s, the jobs run one at a time in the order they
were submitted, and each page or client follows its own job to its own video."""
from __future__ import annotations

import concurrent.futures
import json
import re
import threading
import time
import urllib.request

import pytest

from framepack_ui.engine.video import count_frames
from conftest import CHROMIUM, CHROMIUM_ARGS
from test_ui_browser import fill_form, job_id_of, run_app, wait_text

CLIENTS = 9
# The bound for one gauge reading, request to answer, while jobs stream to ten sessions: GAUGE_ANSWER_S. A
# reading takes milliseconds when the cores are free (psutil, the jobs list); on 2 cores shared with other work the
# interpreter lock and the scheduler add to it, so the test holds 95 % of readings to the 2 s and every one
# to a generous 5 s. What used to break it (seconds with the lock held while the first job imported torch, and a
# full garbage collection at every model free) shows as a run of readings at each job's start, well past 5 %.
GAUGE_ANSWER_S = 2.0
GAUGE_ANSWER_MARGIN_S = 5.0
GAUGE_WITHIN_SHARE = 0.95
POLL_EVERY_S = 0.5
JOB_DONE = re.compile(r"Job (\d+) · Done: (\d+) frames in [\d.]+ s, saved as (\S+\.mp4)")


@pytest.fixture
def browser():
    from pathlib import Path

    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium (`sudo apt-get install chromium`)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


def tick(url: str) -> str:
    """One gauges reading through Gradio's HTTP API (POST the call, read its answer from the event stream): what a
    page's timer asks every second. Returns the answer's data line."""
    # its one input over HTTP: the browser's kept list of its own jobs (BrowserState; none for a plain client)
    call = urllib.request.Request(f"{url}gradio_api/call/tick", data=json.dumps({"data": [None]}).encode(),
                                  headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(call, timeout=60) as response:
        event_id = json.loads(response.read())["event_id"]
    with urllib.request.urlopen(f"{url}gradio_api/call/tick/{event_id}", timeout=60) as response:
        return next(line for line in response.read().decode().splitlines() if line.startswith("data:"))


def poll_gauges(url: str, stop: threading.Event, answer_times: list) -> None:
    """One client's gauges, asked as its page's timer would, until `stop`; each answer's time appended."""
    while not stop.is_set():
        asked_at, started = time.time(), time.monotonic()
        answer = tick(url)
        answer_times.append((time.monotonic() - started, time.strftime("%H:%M:%S", time.localtime(asked_at))
                             + f".{int(asked_at * 1000) % 1000:03d}"))
        assert "RAM" in answer, answer[:300]
        time.sleep(POLL_EVERY_S)


def client_job(url: str, image: str, number: int, turn: threading.Event, next_turn: threading.Event) -> dict:
    """One HTTP client's job: waits for its turn, queues a job with its own prompt, lets the next client go once
    its job has an id. Returns what its own stream showed: the job ids it named and its last progress line."""
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False, download_files=False)
    assert turn.wait(300), f"client {number} never got its turn"
    try:
        job = client.submit(handle_file(image), f"client {number} prompt", resolution=64, steps=2, seconds=1.2,
                            seed=number, api_name="/generate")
        seen_ids, last = set(), ""
        for _, _, progress, _ in job:
            if isinstance(progress, str) and progress:
                last = progress
                seen_ids |= set(re.findall(r"Job (\d+)", progress))
                if seen_ids:
                    next_turn.set()
    finally:
        next_turn.set()
    return {"number": number, "ids": seen_ids, "last": last}


def test_one_browser_and_nine_clients_each_follow_their_own_job_run_in_order_and_gauges_answer(
        tiny_models_dir, tmp_path, browser, start_image_128x96):
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    with run_app(tiny_models_dir, outputs, env={"GRADIO_TEMP_DIR": str(tmp_path / "gradio")},
                 name="app_busy") as (url, _):
        # the browser's job runs first, while the clients connect, poll and queue theirs behind it
        context = browser.new_context(viewport={"width": 1400, "height": 1500})
        try:
            page = context.new_page()
            page.goto(url)
            page.locator("#start_image input[type=file]").wait_for(state="attached", timeout=60_000)
            fill_form(page, start_image_128x96, seconds=2.4, prompt="browser page prompt")
            page.locator("#generate").click()
            browser_job = job_id_of(page)

            turns = [threading.Event() for _ in range(CLIENTS + 1)]
            turns[0].set()
            stop_polling = threading.Event()
            gauge_times: list[tuple[float, str]] = []  # (seconds to the answer, when asked)
            pollers = [threading.Thread(target=poll_gauges, args=(url, stop_polling, gauge_times), daemon=True)
                       for _ in range(CLIENTS)]
            for poller in pollers:
                poller.start()
            try:
                with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
                    futures = [pool.submit(client_job, url, start_image_128x96, n, turns[n], turns[n + 1])
                               for n in range(CLIENTS)]
                    done = wait_text(page, "progress", rf"Job {browser_job} · Done", timeout_s=300)
                    results = [f.result(timeout=600) for f in futures]
            finally:
                stop_polling.set()
                for poller in pollers:
                    poller.join(30)
        finally:
            context.close()
        log = (outputs.parent / "app_busy.log").read_text()

    # each session followed its own job, and only it, to its own video
    browser_name = JOB_DONE.search(done).group(3)
    own = {browser_job: ("browser page prompt", browser_name)}
    for result in results:
        assert len(result["ids"]) == 1, result  # its stream named one job: its own
        match = JOB_DONE.search(result["last"])
        assert match, result
        job_id, frames, name = match.groups()
        assert result["ids"] == {job_id} and int(frames) == 37
        own[job_id] = (f"client {result['number']} prompt", name)
    assert len(own) == CLIENTS + 1 and len({name for _, name in own.values()}) == CLIENTS + 1
    for job_id, (prompt, name) in own.items():
        assert json.loads((outputs / name).with_suffix(".json").read_text())["prompt"] == prompt, job_id
        assert count_frames(outputs / name) == (73 if job_id == browser_job else 37)

    # one at a time, in the order submitted: the browser's, then client 0, 1, ... (each queued after the one before)
    submitted = [browser_job] + [next(iter(r["ids"])) for r in results]
    assert submitted == sorted(submitted, key=int)
    ran = re.findall(r"job (\d+) (started|finished|stopped|failed)$", log, flags=re.MULTILINE)
    expected = [step for job_id in submitted for step in ((job_id, "started"), (job_id, "finished"))]
    assert ran == expected, ran

    # every gauge reading asked while the jobs ran was answered within the bound
    slowest = sorted(gauge_times, reverse=True)
    print(f"{len(gauge_times)} gauge readings: slowest {slowest[:5]}, median {slowest[len(slowest) // 2][0]:.3f} s")
    assert len(gauge_times) >= 10 * CLIENTS
    late = [(answer_s, asked) for answer_s, asked in slowest if answer_s >= GAUGE_ANSWER_S]
    assert len(late) <= (1 - GAUGE_WITHIN_SHARE) * len(slowest), (late, log)
    assert slowest[0][0] < GAUGE_ANSWER_MARGIN_S, (slowest[:10], log)
