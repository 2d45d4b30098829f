"""The page a person uses every day (issue 24): the first-run card and the download's progress per model, the gauges
as bars, the jobs table with Stop/Remove per job, the layouts at a 1366x768 laptop and a 390 px phone, and telling
the user that a job ended. The formatting (ui/present.py) is tested without a browser; the rest in one browser
(conftest.browser) driving `python app.py` on the tiny models, and a fake hub on loopback for the download.

FRAMEPACK_UI_SCREENSHOT=1 makes the layout test write docs/screenshots/desktop.png and phone.png (off by default, so a
test run leaves the tree clean).
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from framepack_ui.spec import JobSpec
from framepack_ui.telemetry.gauges import Gauges
from framepack_ui.ui import present
from framepack_ui.units import GB
from framepack_ui.worker.worker import DownloadStatus, JobInfo
from test_ui_browser import JOB_S, fill_form, run_app, text, wait_text

REPO = Path(__file__).resolve().parent.parent
SCREENSHOTS = REPO / "docs" / "screenshots"
LAPTOP = dict(width=1366, height=768)
PHONE = dict(width=390, height=844, is_mobile=True, has_touch=True)
# what a person must be able to reach on either screen (elem_ids)
KEY_CONTROLS = ("start_image", "prompt", "seconds", "generate", "stop", "steps", "memory_profile", "progress",
                "gauges", "jobs", "notify_sound", "gallery_refresh", "use_settings")
# Records notifications and tones instead of showing or playing them (the page cannot tell).
SPY_SCRIPT = """
window.__notified = [];
window.__tones = 0;
if (window.Notification) {
  const Real = window.Notification;
  window.Notification = class extends Real {
    constructor(title, options) { super(title, options); window.__notified.push(title); }
  };
}
if (window.AudioContext) {
  const create = AudioContext.prototype.createOscillator;
  AudioContext.prototype.createOscillator = function () { window.__tones += 1; return create.call(this); };
}
"""


# ------------------------------------------------------------------------------------------------ formatting

def gauges(**changes) -> Gauges:
    g = Gauges(taken_at_s=0.0, ram_used_bytes=8 * GB, ram_total_bytes=32 * GB, process_rss_bytes=2 * GB,
               swap_used_bytes=0, swap_total_bytes=0, commit_used_bytes=30 * GB, commit_limit_bytes=32 * GB,
               disk_read_bytes_total=0, disk_read_mb_s=450.0, gpu_available=True, gpu_note="RTX 4060 Laptop GPU",
               vram_used_bytes=int(6.9 * GB), vram_total_bytes=8 * GB, gpu_util_pct=9.0)
    return replace(g, **changes)


def bar(html_text: str, key: str) -> tuple[str, float, str]:
    """(level, percent, figure) of the bar `key` in gauges_html's or download_html's output."""
    match = re.search(rf'<div class="fp-gauge fp-(\w+)" data-gauge="{key}" data-pct="([\d.]+)">.*?'
                      rf'class="fp-gauge-figure">([^<]*)<', html_text)
    assert match, f"no {key} bar in {html_text}"
    return match.group(1), float(match.group(2)), match.group(3)


def test_gauges_are_bars_with_their_figures_coloured_near_a_limit():
    warning = "The GPU is waiting for the disk"
    shown = present.gauges_html(gauges(), warning)
    assert bar(shown, "ram") == ("ok", 25.0, "8.00 / 32.00 GB · app 2.00 GB")
    assert bar(shown, "commit")[:2] == ("near", 93.8)  # 30 of 32 GB: amber
    assert bar(shown, "vram")[:2] == ("near", 86.2)
    assert bar(shown, "gpu") == ("full", 9.0, "9% busy")  # starved: the GPU bar is red beside the warning
    assert bar(shown, "disk") == ("near", 45.0, "450 MB/s")
    assert f"⚠ {warning}" in shown and "GPU: RTX 4060 Laptop GPU" in shown
    full = present.gauges_html(gauges(ram_used_bytes=31 * GB, commit_used_bytes=40 * GB))
    assert bar(full, "ram")[:2] == ("full", 96.9) and bar(full, "commit")[:2] == ("full", 100.0)  # capped at 100
    assert bar(full, "gpu")[0] == "ok" and "⚠" not in full  # no warning: a busy or idle GPU is not coloured
    assert bar(full, "swap" if "Swap" in full else "pagefile")[2] == "none"
    no_gpu = present.gauges_html(gauges(gpu_available=False, gpu_note="no NVIDIA GPU found", disk_read_mb_s=None))
    assert 'data-gauge="vram"' not in no_gpu and 'data-gauge="gpu"' not in no_gpu
    assert bar(no_gpu, "disk")[2] == "n/a" and "GPU: no NVIDIA GPU found" in no_gpu
    assert [present.gauge_level(p) for p in (79.9, 80, 94.9, 95)] == ["ok", "near", "near", "full"]


def job(id_: str, status: str, prompt: str = "a cat", seconds: float = 2.4, **kwargs) -> JobInfo:
    fields = dict(position=None, out_path=f"/out/{id_}.mp4", submitted_at=0.0, step=None, section=None,
                  result=None, event_count=0)
    return JobInfo(id_, status, spec=JobSpec(image="a.png", prompt=prompt, seconds=seconds),
                   **{**fields, **kwargs})


def test_jobs_table_lists_this_pages_jobs_and_the_running_one_with_stop_or_remove():
    jobs = [job("1", "finished", "mine, done"), job("2", "running", "someone else's"),
            job("3", "queued", "someone else's, queued", position=1), job("4", "queued", "mine, queued", position=2),
            job("5", "waiting", "from before a restart")]
    listed = present.page_jobs(jobs, mine={"1", "4"})
    assert [j.id for j in listed] == ["1", "2", "4", "5"]  # not another page's queued job
    table = present.jobs_html(listed)
    rows = re.findall(r'<tr data-job="(\d+)">.*?data-act="(\w+)">(\w+)</button>', table)
    assert rows == [("5", "remove", "Remove"), ("4", "remove", "Remove"), ("2", "stop", "Stop"),
                    ("1", "remove", "Remove")]  # newest first
    assert re.findall(r"<th[^>]*>([^<]*)</th>", table) == ["#", "Status", "Progress", "Length", "Prompt", ""]
    assert '<td class="fp-length">2.4 s</td>' in table and 'title="mine, queued"' in table
    assert "position 2" in table
    long_prompt = present.jobs_html([job("9", "queued", "a <b>bold</b>\n" + "word " * 200, position=1)])
    assert "<b>" not in long_prompt and "&lt;b&gt;bold&lt;/b&gt; word" in long_prompt  # escaped, one line (CSS cuts)
    assert present.jobs_html([]) == '<p class="fp-jobs-empty">No jobs yet.</p>'


def test_download_progress_per_model_with_speed_time_left_and_where_it_resumed():
    status = DownloadStatus("running", "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
                            done_bytes=20 * GB, total_bytes=42 * GB,
                            models=(("text_encoder", 15 * GB, 15 * GB), ("transformer", 5 * GB, 25 * GB)),
                            resumed_bytes=12 * GB, started_at_s=100.0, started_done_bytes=12 * GB,
                            updated_at_s=180.0)
    shown = present.download_html(status)
    assert bar(shown, "text_encoder")[:2] == ("done", 100.0) and bar(shown, "transformer")[:2] == ("ok", 20.0)
    assert bar(shown, "transformer")[2] == "5.00 / 25.00 GB"
    # 8 GB in 80 s: 100 MB/s (the 12 GB resumed are not counted as speed); 22 GB left: 220 s
    assert present.download_speed(status) == "100.0 MB/s, about 3 min 40 s left"
    assert "100.0 MB/s" in shown
    assert present.download_text(status).endswith("now transformer/diffusion_pytorch_model-00001-of-00003."
                                                  "safetensors, resumed with 12.00 GB already here")
    fresh = replace(status, resumed_bytes=0, started_done_bytes=0)
    assert "resumed" not in present.download_text(fresh)
    assert present.download_speed(replace(status, updated_at_s=100.0)) == "measuring the speed..."
    stopped = present.download_html(replace(status, state="stopped"))
    assert "Download stopped at 48%" in stopped and "MB/s" not in stopped  # no speed once it ended
    assert bar(stopped, "transformer")[1] == 20.0  # where each model stands stays shown
    assert present.download_html(DownloadStatus()) == ""


def test_the_first_run_card_is_short_and_the_list_says_what_goes_where(tmp_path):
    folder = tmp_path / "models" / "lllyasviel" / "FramePack_F1_I2V_HY_20250503"
    missing = [SimpleNamespace(name="transformer", repo="lllyasviel/FramePack_F1_I2V_HY_20250503", folder=folder,
                               files=("config.json", "diffusion_pytorch_model-00001..00003-of-00003.safetensors"),
                               approx_bytes=int(25.7 * GB))]
    card = present.models_card(missing, int(42.8 * GB), 78 * GB)
    assert card == "**The models are not here yet:** 42.8 GB to download, 78.0 GB free on that disk."
    assert "not enough" in present.models_card(missing, int(42.8 * GB), 10 * GB)
    offline = present.models_card(missing, int(42.8 * GB), 78 * GB, offline=True)
    assert "`--offline`" in offline and "copy the files listed below" in offline and "download" not in offline.lower()
    assert present.models_card([], 0, 78 * GB) == ""
    files = present.missing_files_text(missing)
    assert f"into `{folder}`" in files and "  - `diffusion_pytorch_model-00001..00003-of-00003.safetensors`" in files
    assert "**transformer** (about 25.7 GB) from `lllyasviel/FramePack_F1_I2V_HY_20250503`" in files


# ------------------------------------------------------------------------------------------------ in the browser

@pytest.fixture(scope="module")
def server(tiny_models_dir, tmp_path_factory):
    outputs = tmp_path_factory.mktemp("outputs")
    with run_app(tiny_models_dir, outputs, env={"GRADIO_TEMP_DIR": str(outputs.parent / "gradio")},
                 name="page-app") as (url, _):
        yield url, outputs


def overflow(page) -> list[str]:
    """Elements that reach past the right edge of the screen (a page wider than the phone)."""
    return page.evaluate("""() => {
        const w = document.documentElement.clientWidth;
        const out = document.documentElement.scrollWidth > w ? ['document ' + document.documentElement.scrollWidth]
                                                             : [];
        for (const e of document.querySelectorAll('body *')) {
            const r = e.getBoundingClientRect();
            if (r.width > 0 && r.right > w + 1 && !e.closest('pre'))  // the plan's table scrolls in its own box
                out.push(`${e.tagName}#${e.id}.${String(e.className).slice(0, 40)} right=${Math.round(r.right)}`);
        }
        return out.slice(0, 10); }""")


def reachable(page, elem_id: str, width: int) -> None:
    """Scrolled to, `elem_id` lies within the screen's width and its middle is not covered by anything else."""
    box = page.locator(f"#{elem_id}")
    box.scroll_into_view_if_needed()
    bounds = box.bounding_box()
    assert bounds and bounds["width"] > 0 and bounds["x"] >= 0 and bounds["x"] + bounds["width"] <= width + 1, \
        (elem_id, bounds)
    assert box.evaluate("""e => { const r = e.getBoundingClientRect();
        const hit = document.elementFromPoint(r.left + r.width / 2, r.top + Math.min(r.height / 2, 20));
        return hit !== null && (e.contains(hit) || hit.contains(e)); }"""), f"#{elem_id} is covered"


def header_lines(page) -> dict[str, int]:
    """The jobs table's shown headers with the lines each takes (1: not wrapped)."""
    return page.evaluate("""() => Object.fromEntries([...document.querySelectorAll('#jobs th')]
        .filter(th => th.innerText.trim() && th.getClientRects().length).map(th => {
            const range = document.createRange(); range.selectNodeContents(th);
            return [th.innerText.trim(), new Set([...range.getClientRects()].map(r => Math.round(r.top))).size]; }))""")


def job_rows(page) -> dict[str, tuple[str, str]]:
    """{job id: (status, its button's text)} of the jobs table."""
    rows = page.evaluate("""() => Object.fromEntries([...document.querySelectorAll('#jobs tr[data-job]')].map(tr =>
        [tr.dataset.job, [tr.querySelector('.fp-status').innerText, tr.querySelector('button').innerText]]))""")
    return {job: tuple(row) for job, row in rows.items()}


def wait_for(read, ok, timeout_s: float = 30, what: str = ""):
    deadline = time.monotonic() + timeout_s
    while not ok(got := read()):
        assert time.monotonic() < deadline, f"{what}: still {got!r}"
        time.sleep(0.2)
    return got


def test_every_control_is_reachable_at_1366x768_and_390_px_without_sideways_scrolling(server, open_page):
    url, _ = server
    for name, viewport in (("desktop", LAPTOP), ("phone", PHONE)):
        page = open_page(url, **viewport)
        wait_text(page, "gauges", r"RAM\s+[\d.]+ / [\d.]+ GB", timeout_s=30)
        wait_text(page, "plan", r"Plan for this machine", timeout_s=60)
        assert overflow(page) == [], name
        for elem_id in KEY_CONTROLS:
            reachable(page, elem_id, viewport["width"])
        font_px = page.evaluate("() => Math.min(...[...document.querySelectorAll('#gauges span, #jobs, label span')]"
                                ".map(e => parseFloat(getComputedStyle(e).fontSize)))")
        assert font_px >= 11, (name, font_px)  # readable on a phone too
        page.evaluate("window.scrollTo(0, 0)")
        shot = page.screenshot(full_page=True)
        assert shot.startswith(b"\x89PNG")
        if os.environ.get("FRAMEPACK_UI_SCREENSHOT") == "1":
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            (SCREENSHOTS / f"{name}.png").write_bytes(shot)


def test_a_job_moves_the_bars_lists_itself_and_says_it_ended(server, open_page, start_image_128x96):
    """A laptop page runs a job: its bars move, its table lists it without wrapped headers, and when it ends the tab's
    title and a notification say so (and a tone, the box ticked). A phone page sees the running job, queues its
    own, which the laptop page does not see, and removes it with the table's button."""
    url, _ = server
    laptop = open_page(url, **LAPTOP, init_script=SPY_SCRIPT, permissions=["notifications"])
    laptop.locator("#notify_sound input").check()
    long_prompt = "laptop job: " + "a red square glides slowly across a calm blue sea at dawn, " * 4  # cut to fit
    fill_form(laptop, start_image_128x96, seconds=14.4, steps=4, prompt=long_prompt)  # 12 sections: time to look
    phone = open_page(url, **PHONE)
    fill_form(phone, start_image_128x96, seconds=1.2, prompt="phone job")  # ready before the laptop's job starts
    ram_fill = laptop.locator('#gauges [data-gauge="ram"] .fp-gauge-fill')
    before = ram_fill.get_attribute("style")
    laptop.locator("#generate").click()
    job = re.search(r"Job (\d+)", wait_text(laptop, "progress", r"Job \d+ · ")).group(1)
    wait_for(lambda: job_rows(laptop).get(job), lambda row: row == ("running", "Stop"), what="the laptop's row")
    wait_for(lambda: job_rows(phone).get(job), lambda row: row == ("running", "Stop"), what="the phone's table")
    phone.locator("#generate").click()
    queued = re.search(r"Job (\d+): waiting", wait_text(phone, "progress", r"Job \d+: waiting in the queue")).group(1)
    wait_for(lambda: ram_fill.get_attribute("style"), lambda s: s != before, what="the RAM bar during the job")
    assert set(header_lines(laptop).values()) == {1}, header_lines(laptop)
    wait_for(lambda: job_rows(phone).get(queued), lambda row: row == ("queued", "Remove"), what="the phone's job")
    assert set(header_lines(phone).values()) == {1}, header_lines(phone)
    assert overflow(phone) == []
    assert phone.evaluate("() => document.querySelector('#jobs table').getBoundingClientRect().right <= "
                          "document.querySelector('#jobs').getBoundingClientRect().right + 1")  # the prompt is cut
    assert queued not in job_rows(laptop)  # each page sees its own jobs and the running one
    phone.locator(f'#jobs button[data-job="{queued}"]').click()  # Remove a queued job: it leaves the queue
    wait_for(lambda: job_rows(phone).get(queued), lambda row: row == ("stopped", "Remove"), what="the removed job")
    phone.locator(f'#jobs button[data-job="{queued}"]').click()  # and an ended one leaves the table
    wait_for(lambda: job_rows(phone), lambda rows: queued not in rows and job in rows, what="the phone's table")

    assert not laptop.title().startswith("✓")
    wait_text(laptop, "progress", rf"Job {job} · Done: 433 frames", timeout_s=2 * JOB_S)
    title = wait_for(laptop.title, lambda t: t.startswith("✓"), timeout_s=10, what="the title")
    assert title == f"✓ Done: job {job} · FramePack UI"
    assert laptop.evaluate("window.__notified") == [f"FramePack UI: job {job} done"]
    assert laptop.evaluate("window.__tones") == 1
    wait_for(lambda: job_rows(laptop).get(job), lambda row: row == ("finished", "Remove"), what="the ended job")
    laptop.locator("#prompt textarea").click()  # the user is back: the title is the app's again
    assert laptop.title() == "FramePack UI"


def test_first_run_card_download_progress_cancel_and_resume_on_a_phone(tiny_models_dir, tmp_path, open_page,
                                                                       start_image_128x96):
    """No models: a short card (the file list folded away), Download; the bars move per model with the speed,
    Cancel shows only while it runs; the next Download says where it resumed, fetches nothing twice, and a job
    then runs. On a 390 px phone, against a fake hub on loopback."""
    from fake_hub import FakeHub, repos_of
    from framepack_ui.weights import layout

    repos = repos_of(tiny_models_dir)
    models, outputs = tmp_path / "models", tmp_path / "outputs"
    outputs.mkdir()
    home = tmp_path / "hf"
    te_shard, shard_1, shard_2 = ("text_encoder/model-00001-of-00004.safetensors",
                                  "diffusion_pytorch_model-00001-of-00003.safetensors",
                                  "diffusion_pytorch_model-00002-of-00003.safetensors")
    with FakeHub(repos) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
               "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0",
               "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1", "HF_TOKEN": ""}
        with run_app(models, outputs, env=env, name="app_download") as (url, _):
            page = open_page(url, **PHONE)
            card = r"The models are not here yet: [\d.]+ GB to download, [\d.]+ GB free on that disk\."
            wait_for(lambda: text(page, "models_notice").strip(), lambda t: re.fullmatch(card, t), what="the card")
            assert not page.locator("#models_files").is_visible()  # the file list is folded away
            assert page.locator("#download_models").is_visible()
            assert not page.locator("#download_cancel").is_visible()  # nothing is downloading
            page.locator("#models_files_box").get_by_text("Files, and where to copy them by hand").click()
            files = wait_text(page, "models_files", re.escape(str(models / layout.F1_REPO)), timeout_s=10)
            assert "diffusion_pytorch_model-00001..00003-of-00003.safetensors" in files
            assert overflow(page) == []
            fill_form(page, start_image_128x96, seconds=1.2)
            page.locator("#generate").click()  # refused in one line, nothing queued
            page.get_by_text("model files are missing: see the card at the top of the page").wait_for(timeout=30_000)

            def overall() -> float:
                return float(re.search(r"Downloading: (\d+)%", text(page, "download_progress")).group(1))

            def model_pct(name: str) -> float:
                return float(page.locator(f'#download_progress [data-gauge="{name}"]').get_attribute("data-pct"))

            # The hub holds a text-encoder shard, then a transformer shard, half-sent: two readings of the bars.
            half = {name: len(repos[repo][name]) // 2 for repo, name in
                    ((layout.HUNYUAN_REPO, te_shard), (layout.F1_REPO, shard_1), (layout.F1_REPO, shard_2))}
            reached_te, release_te = hub.hold(layout.HUNYUAN_REPO, te_shard, at=half[te_shard])
            reached_1, release_1 = hub.hold(layout.F1_REPO, shard_1, at=half[shard_1])
            page.locator("#download_models").click()
            assert reached_te.wait(120), "the download never reached the text encoder"
            wait_for(lambda: text(page, "download_progress"), lambda t: "text_encoder/model-00001" in t,
                     what="the progress line")
            first = overall()
            assert 0 < model_pct("text_encoder") < 100 and model_pct("transformer") == 0
            assert page.locator("#download_cancel").is_visible() and not page.locator("#download_models").is_visible()
            assert re.fullmatch(card, text(page, "models_notice").strip())  # the card stays as it was
            release_te.set()
            assert reached_1.wait(120), "the download never reached the transformer"
            wait_for(lambda: text(page, "download_progress"), lambda t: shard_1 in t, what="the progress line")
            assert overall() > first and model_pct("text_encoder") == 100 and 0 < model_pct("transformer") < 100
            assert re.search(r"[\d.]+ MB/s, about .+ left", text(page, "download_progress"))
            page.locator("#download_cancel").click()
            time.sleep(1)  # the click reaches the worker before the held bytes come
            release_1.set()
            stopped = wait_text(page, "download_progress", r"Download stopped", timeout_s=60)
            assert "press Download models to resume" in stopped and "MB/s" not in stopped
            wait_for(lambda: page.locator("#download_cancel").is_visible(), lambda shown: not shown, timeout_s=10,
                     what="Cancel once stopped")
            assert page.locator("#download_models").is_visible() and layout.missing(models)
            dest = layout.COMPONENTS["transformer"].folder(models) / shard_1
            assert not dest.exists()  # nothing half-fetched looks complete
            kept = {p for p in models.rglob("*") if p.is_file() and p.suffix != ".incomplete" and "lock" not in p.name}
            assert kept  # the files fetched before the cancel
            hub.clear_log()

            reached_2, release_2 = hub.hold(layout.F1_REPO, shard_2, at=half[shard_2])
            page.locator("#download_models").click()  # resumes: what was fetched is not fetched again
            assert reached_2.wait(120)
            resumed = wait_text(page, "download_progress", r"resumed with [\d.]+ MB already here", timeout_s=30)
            assert re.search(r"Downloading: \d+%", resumed)
            release_2.set()
            wait_text(page, "download_progress", r"Models downloaded", timeout_s=120)
            wait_for(lambda: page.locator("#models_banner").is_visible(), lambda shown: not shown, timeout_s=30,
                     what="the card once downloaded")
            assert layout.missing(models) == {}
            fetched_again = {(models / repo / path) for repo, path in hub.files_requested()}
            assert fetched_again and not fetched_again & kept and dest in fetched_again
            page.locator("#generate").click()  # the form as it was filled
            wait_text(page, "progress", r"Done: 37 frames")


def test_offline_the_card_says_which_files_to_copy_where(tmp_path, open_page):
    from framepack_ui.weights import layout

    models, outputs = tmp_path / "models", tmp_path / "outputs"
    outputs.mkdir()
    with run_app(models, outputs, "--offline", name="app_offline") as (url, _):
        page = open_page(url, **LAPTOP)
        card = wait_text(page, "models_notice", r"not here yet", timeout_s=30)
        assert "(`--offline`)" not in card and "--offline" in card and "copy the files listed below" in card
        files = text(page, "models_files")  # shown open: it is the way to get them
        for component in ("text_encoder", "transformer"):
            assert str(layout.COMPONENTS[component].folder(models)) in files
        assert "text_encoder/model-00001..00004-of-00004.safetensors" in files
        assert not page.locator("#download_models").is_visible()
        assert not page.locator("#download_cancel").is_visible()


def test_the_plan_shown_before_generate_counts_the_length_asked_for(make_worker, monkeypatch):
    """The page's plan (wiring's show_plan, fed the Length slider) plans the video's sections: on an 8 GB card whose
    VAE decoder is not compiled yet, a 5 s video leaves the decoder's compile to the idle time after it and a 100 s one
    compiles it in the job, as the job's own plan would. The machine and the weights' sizes are supposed (no GPU here,
    tiny models on disk)."""
    from framepack_ui.memory import probe
    from framepack_ui.memory.plan.catalogue import real_weights
    from framepack_ui.ui.wiring import build_ui

    worker = make_worker()
    supposed = replace(probe.Machine.supposed(64, 8), compile_supported=True, decoder_compile="cold")
    monkeypatch.setattr(worker, "_probe_machine", lambda device: supposed)
    monkeypatch.setattr(probe, "weights_on_disk", lambda models_dir: real_weights())
    demo = build_ui(worker)
    show_plan = next(f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "show_plan")
    no_loras = [present.NO_LORA[1]] * present.LORA_SLOTS + [1.0] * present.LORA_SLOTS

    def plan_for(seconds) -> str:
        return show_plan("auto", 640, present.STORAGE_CHOICES[0][1], seconds, *no_loras)

    short, long, unset = plan_for(4.8), plan_for(100.0), plan_for(None)
    assert "compiled for this job: 4 sections to make" in short
    assert "would not pay back" not in long and "would not pay back" not in unset  # unknown: as a long job
