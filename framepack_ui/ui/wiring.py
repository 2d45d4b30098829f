"""Event wiring: the page's handlers talk to the worker; present.py turns what comes back into updates.

Job state lives in the worker, not in the page. A page follows one job at a time (its own, or on load the job
that is running): it replays that job's events from the start and then follows it live, so a reloaded page or
a second browser shows the same progress. The worker queues and serialises jobs, so the handlers that submit
and stream take no Gradio concurrency limit; the gauges timer has its own concurrency id so it keeps ticking
while a job streams.
"""
from __future__ import annotations

import random
import time
from dataclasses import replace

import gradio as gr

from ..errors import ModelFilesError, UserError
from ..events import TERMINAL, Failed
from ..spec import SEED_MAX, Continuation, JobSpec, section_count
from ..telemetry import read_gauges, starved
from ..worker import DOWNLOAD_COMMAND
from . import present
from .layout import Page, build_page

CACHE_CLEANUP_S = (3600, 24 * 3600)  # (every, older than): Gradio's cache of shown videos and uploads
POLL_S = 1.0  # how often a waiting stream checks whether its page has moved on to another job
DOWNLOAD_POLL_S = 0.5


def build_ui(worker, offline: bool = False) -> gr.Blocks:
    """The whole app page for `worker` (see framepack_ui.worker.Worker). Launch it with `css=layout.CSS`.
    `offline`: nothing is downloaded; the card says which files to copy where."""
    # The growing section video is served in place under a new name per section (worker/live.py), never
    # copied; final videos, gallery videos and uploads go through Gradio's cache: drop them after a day.
    gr.set_static_paths([worker.live_dir()])
    with gr.Blocks(title="FramePack UI", delete_cache=CACHE_CLEANUP_S, analytics_enabled=False) as demo:
        gr.Markdown("# FramePack UI\nFramePack F1 image-to-video, on this machine.")
        page = build_page(_notice(worker, offline), worker.plan_choices(), worker.profile, worker.lora_files(),
                          str(worker.loras_dir), present.missing_files_text(worker.missing_model_files()), offline)
        _wire(demo, page, worker, offline)
    return demo


def _notice(worker, offline: bool = False) -> str:
    """The missing-models card ("" when nothing is missing)."""
    missing = worker.missing_model_files()
    return present.models_card(missing, *worker.download_need(), offline=offline) if missing else ""


def _wire(demo: gr.Blocks, page: Page, worker, offline: bool = False) -> None:
    following: dict[str, str] = {}  # page session -> the job it follows; a page follows one job at a time
    submitted: dict[str, set[str]] = {}  # page session -> the jobs it submitted (the jobs table lists them)
    removed: dict[str, set[str]] = {}  # page session -> ended jobs taken off its table

    def own(session: str, job_id: str) -> None:
        submitted.setdefault(session, set()).add(job_id)

    def follow(job_id: str, session: str):
        """Yield job_outputs() updates while this page follows `job_id` (replay first, then live)."""
        following[session] = job_id
        view, old, index = present.JobView(job_id=job_id), None, 0
        try:
            while True:
                batch = worker.wait_events(job_id, index, timeout_s=POLL_S)
                if following.get(session) != job_id:  # the page started (or reattached to) another job
                    return
                if batch or old is None:
                    index += len(batch)
                    view = present.fold(batch, view)
                    for event in batch:
                        if isinstance(event, Failed):
                            gr.Warning(event.message)
                    yield _updates(job_id if old is None else gr.skip(), served(present.changes(old, view), view))
                    old = view
                if batch and isinstance(batch[-1], TERMINAL):
                    return
                if not batch and worker.job(job_id).result is not None:
                    return
        finally:
            if following.get(session) == job_id:
                del following[session]

    def served(changed: dict, view: present.JobView) -> dict:
        """`changed`, with the growing section video under its name for this section (no copy per section)."""
        if changed.get("section_video"):
            changed["section_video"] = worker.section_video(changed["section_video"], view.sections_saved)
        return changed

    def generate(image, prompt, negative, seconds, seed, steps, gs, cfg, rs, teacache, teacache_threshold,
                 resolution, crf, sampler, prompt_blend, profile, storage, request: gr.Request, *more):
        # `more`: every LoRA slot's file, then every slot's strength (Page.lora_inputs), then the step cache
        # (Page.cache_inputs); Gradio puts the request in its place among the positional parameters
        loras, cache = split_more(more)
        try:
            spec = present.spec_from_inputs(image, prompt, negative, seconds, seed, steps, gs, cfg, rs, teacache,
                                            teacache_threshold, resolution, crf, sampler, prompt_blend)
            slots = len(page.lora_pickers)
            spec = replace(spec, loras=present.lora_choices(list(loras[:slots]), list(loras[slots:]),
                                                            worker.loras_dir))
            spec = present.with_cache(spec, *cache)
            if worker.missing_models():  # the full list (which files, which folder) is under the card at the top
                raise ModelFilesError(f"model files are missing: see the card at the top of the page, or run "
                                      f"`{DOWNLOAD_COMMAND}`")
            job_id = worker.submit(spec, profile=profile, plan_options={"fp8": present.FP8_OPTION.get(storage)})
        except UserError as exc:
            raise gr.Error(exc.message, print_exception=False) from None
        own(request.session_hash, job_id)
        yield from follow(job_id, request.session_hash)

    def generate_batch(images, prompts, image, prompt, negative, seconds, seed, steps, gs, cfg, rs, teacache,
                       teacache_threshold, resolution, crf, sampler, prompt_blend, profile, storage,
                       request: gr.Request, *more):
        """A job for each batch image x each batch prompt (the form's image or prompt where the batch has none), all
        with the form's settings; every one checked before any is queued. The page follows them in turn."""
        loras, cache = split_more(more)  # as generate's
        try:
            slots = len(page.lora_pickers)
            choices = present.lora_choices(list(loras[:slots]), list(loras[slots:]), worker.loras_dir)
            specs = [present.with_cache(replace(present.spec_from_inputs(
                path, text, negative, seconds, seed, steps, gs, cfg, rs, teacache, teacache_threshold, resolution,
                crf, sampler, prompt_blend), loras=choices), *cache).validate()
                     for path, text in present.batch_pairs(images, image, prompts, prompt)]
            if worker.missing_models():
                raise ModelFilesError(f"model files are missing: see the card at the top of the page, or run "
                                      f"`{DOWNLOAD_COMMAND}`")
            options = {"fp8": present.FP8_OPTION.get(storage)}
            job_ids = [worker.submit(spec, profile=profile, plan_options=options) for spec in specs]
        except UserError as exc:
            raise gr.Error(exc.message, print_exception=False) from None
        gr.Info(f"{len(job_ids)} jobs queued; their videos land in the past outputs")
        for job_id in job_ids:
            own(request.session_hash, job_id)
        for job_id in job_ids:
            yield from follow(job_id, request.session_hash)
            if request.session_hash in following:  # the page moved on to another job: it follows that one
                return

    def show_estimate(seconds, steps, resolution, cfg, teacache, threshold, profile, storage, images, prompts):
        shape = present.shape_from_inputs(seconds, steps, resolution, cfg, teacache, threshold)
        guess = worker.estimate(shape, profile, storage or "auto") if shape is not None else None
        batch = (len(images or []) or 1) * (len([line for line in (prompts or "").splitlines() if line.strip()]) or 1)
        return present.estimate_text(guess, batch)

    def plot_tick(job_id, seen):
        """The followed job's timeline, redrawn when it grew; kept once the job ended."""
        try:
            timeline = worker.timeline(job_id) if job_id is not None else None
        except KeyError:  # forgotten by the worker (more than its last jobs ago)
            timeline = None
        if timeline is None:
            return gr.skip(), seen
        signature = (job_id, len(timeline["t_s"]), len(timeline["phases"]), timeline["ended_s"])
        if signature == seen:
            return gr.skip(), seen
        return present.job_plot_html(timeline, f"Job {job_id}"), signature

    def show_past_plot(name):
        entry = find(name)
        timeline = entry.settings.get("timeline") if entry is not None else None
        return present.job_plot_html(timeline if isinstance(timeline, dict) else None, name or "")

    def continued(start: Continuation, spec, profile, storage, session: str):
        """Submit a job that continues a past output (the worker checks it first) and follow it."""
        try:
            job_id = worker.submit(spec, profile=profile, plan_options={"fp8": present.FP8_OPTION.get(storage)},
                                   start=start)
        except UserError as exc:
            raise gr.Error(exc.message, print_exception=False) from None
        own(session, job_id)
        yield from follow(job_id, session)

    def selected(name):
        entry = find(name)
        if entry is None or not entry.video:
            raise gr.Error("Select a past output with a video first.", print_exception=False)
        return entry

    def split_more(more: tuple) -> tuple[tuple, tuple]:
        """(the LoRA slots' values, the step cache's values) from the inputs after the form's."""
        count = len(page.cache_inputs())
        return more[:-count], more[-count:]

    def form_spec(form: tuple, image: str | None, seconds: float | None = None, more: tuple = ()):
        """The form's settings (present.spec_from_inputs's order, its image left out) with `image` as the start
        image: the source's, or the one picked for Extend; `more`: the LoRA slots (Page.lora_inputs) and the step
        cache (Page.cache_inputs)."""
        loras, cache = split_more(more)
        try:
            spec = present.spec_from_inputs(image or "(the video's own)", *form)
            slots = len(page.lora_pickers)
            spec = replace(spec, loras=present.lora_choices(list(loras[:slots]), list(loras[slots:]),
                                                            worker.loras_dir))
            spec = present.with_cache(spec, *cache)
        except UserError as exc:
            raise gr.Error(exc.message, print_exception=False) from None
        return present.continued_spec(spec, image, seconds)

    def resume(name, profile, storage, request: gr.Request):
        entry = selected(name)
        spec = JobSpec(image=entry.image or "", prompt="")  # the worker continues it with its saved settings
        yield from continued(Continuation("resume", entry.video), spec, profile, storage, request.session_hash)

    def branch(name, section, _image, prompt, negative, seconds, seed, steps, gs, cfg, rs, teacache, threshold,
               resolution, crf, sampler, prompt_blend, profile, storage, request: gr.Request, *more):
        entry = selected(name)
        form = (prompt, negative, seconds, seed, steps, gs, cfg, rs, teacache, threshold, resolution, crf, sampler,
                prompt_blend)
        spec = form_spec(form, entry.image, more=more)
        start = Continuation("branch", entry.video, int(section or 0))
        yield from continued(start, spec, profile, storage, request.session_hash)

    def extend(name, more_seconds, image, video, _image, prompt, negative, seconds, seed, steps, gs, cfg, rs, teacache,
               threshold, resolution, crf, sampler, prompt_blend, profile, storage, request: gr.Request, *more):
        source = video or selected(name).video
        form = (prompt, negative, seconds, seed, steps, gs, cfg, rs, teacache, threshold, resolution, crf, sampler,
                prompt_blend)
        spec = form_spec(form, image, more_seconds, more)
        yield from continued(Continuation("extend", source), spec, profile, storage, request.session_hash)

    def remove(name):
        entry = find(name)
        if entry is None:
            gr.Info("Select a past output first.")
            return gr.skip(), gr.skip()
        try:
            worker.remove_output(entry.name)
        except UserError as exc:
            raise gr.Error(exc.message, print_exception=False) from None
        return gr.update(choices=present.gallery_choices(worker.past_outputs()), value=None), None

    def reattach(request: gr.Request):
        """On page load: follow the running job, if any, from its start."""
        running = [job for job in worker.jobs() if job.status == "running"]
        if not running:
            yield _updates(gr.skip(), {})
            return
        yield from follow(running[0].id, request.session_hash)

    def stop(job_id):
        if job_id is None or not worker.cancel(job_id):
            gr.Info("This page has no queued or running job to stop.")

    def waiting(act, words: str, session: str):
        """Resume or cancel every job that waits since the app restarted; the page that did it lists them."""
        acted = [job.id for job in worker.jobs() if job.status == "waiting" and act(job.id)]
        for job_id in acted:
            own(session, job_id)
        if not acted:
            gr.Info(f"No jobs are waiting to be {words}.")

    def start_waiting(request: gr.Request):
        waiting(worker.resume, "started", request.session_hash)

    def drop_waiting(request: gr.Request):
        waiting(worker.cancel, "dropped", request.session_hash)

    def tick(previous, seen, stored, request: gr.Request):
        gauges = read_gauges(previous=previous)
        jobs = worker.jobs()
        warning = starved(gauges, generating=any(job.status == "running" for job in jobs))
        signature = worker.outputs_signature()
        gallery = gr.skip() if signature == seen else gallery_update()
        session = request.session_hash
        # this browser's jobs: those it submitted before a reload (kept in the browser) and since
        mine = (set(stored or ()) | submitted.get(session, set())) - removed.get(session, set())
        mine &= {job.id for job in jobs}  # the worker forgets nothing while it runs; a restart starts afresh
        listed = present.page_jobs(jobs, mine)
        keep = sorted(mine, key=int) if mine != set(stored or ()) else gr.skip()
        return present.gauges_html(gauges, warning), present.jobs_html(listed), gauges, gallery, signature, keep

    def job_action(evt: gr.EventData, request: gr.Request):
        """A Stop or Remove button of the jobs table: stop the running job, drop a queued one from the queue, or
        take an ended one off this page's table."""
        data = evt._data or {}
        job_id, act = str(data.get("job", "")), data.get("act")
        job = next((j for j in worker.jobs() if j.id == job_id), None)
        if job is None:
            return
        if job.status in ("running", "queued", "waiting"):
            if act == "stop" or job.status != "running":
                worker.cancel(job_id)
            return
        removed.setdefault(request.session_hash, set()).add(job_id)

    def download_card(status=None) -> tuple:
        """download_outputs: the banner, card, file list and buttons as the models folder and `status` say."""
        notice = _notice(worker, offline)
        running = status is not None and status.state == "running"
        files = present.missing_files_text(worker.missing_model_files()) if notice else ""
        return (gr.update(visible=bool(notice) or running), notice, files,
                present.download_html(status) if status is not None else gr.skip(),
                gr.update(visible=not offline and not running), gr.update(visible=running))

    def watch_download(start: bool):
        """Follow the download until it ends (starting it first if `start`): the progress per model, with Cancel
        shown only while it runs; the card as the folder then is."""
        if start:
            if not worker.missing_models():
                yield download_card(None)
                return
            worker.start_download()  # False when one is running already: this page then follows it
        status = worker.download_status()
        if status.state != "running":  # on load, with no download running: the card as it is
            yield download_card(None)
            return
        while status.state == "running":
            yield (gr.skip(), gr.skip(), gr.skip(), present.download_html(status), gr.update(visible=False),
                   gr.update(visible=True))
            time.sleep(DOWNLOAD_POLL_S)
            status = worker.download_status()
        if status.state == "failed":
            gr.Warning(status.message)
        yield download_card(status)

    def follow_download():
        yield from watch_download(start=False)

    def download():
        yield from watch_download(start=True)

    def cancel_download():
        if not worker.cancel_download():
            gr.Info("No download is running.")

    def show_plan(profile, resolution, storage, seconds, *loras):
        # `loras`: every LoRA slot's file, then every slot's strength (Page.lora_inputs): the plan places their memory.
        # `seconds`: the job's sections decide whether its decodes would pay back compiling the VAE decoder
        slots = len(page.lora_pickers)
        try:
            choices = present.lora_choices(list(loras[:slots]), list(loras[slots:]), worker.loras_dir)
        except UserError:
            choices = ()  # a strength being typed: the plan without the LoRAs until it is a number
        sections = section_count(float(seconds)) if isinstance(seconds, (int, float)) and seconds > 0 else None
        text = worker.plan_text(profile, int(resolution or 640), loras=choices, fp8=present.FP8_OPTION.get(storage),
                                sections=sections)
        return f"```\n{text}\n```"

    def gallery_update():
        return gr.update(choices=present.gallery_choices(worker.past_outputs()))

    def find(name):
        return next((e for e in worker.past_outputs() if e.name == name), None) if name else None

    def show_past(name):
        entry = find(name)
        return (entry.video if entry is not None else None), present.gallery_details(entry)

    def fill_form(name: str, settings: dict, image: str | None) -> tuple:
        """form_outputs() and the restore note for a past job's settings: one path for the gallery and a file."""
        values = present.restored_form(settings, worker.plan_choices())
        keys = (*present.FORM_KEYS, *present.RESTORED_EXTRAS)
        available = worker.lora_files()
        names, strengths, missing = present.lora_form_values(settings, available)
        if missing:
            gr.Info(f"Not in {worker.loras_dir}: {', '.join(missing)} (LoRA left out)")
        pickers = [gr.update(choices=[present.NO_LORA, *available], value=n) for n in names]
        return (image or gr.skip(), *(values.get(key, gr.skip()) for key in keys), *pickers, *strengths,
                present.restored_note(name, settings, image))

    def use_settings(name):
        entry = find(name)
        if entry is None:
            gr.Info("Select a past output first.")
            return tuple(gr.skip() for _ in range(len(page.form_outputs()) + len(page.lora_inputs()) + 1))
        return fill_form(entry.name, entry.settings, entry.image)

    def settings_from_file(path):
        """The form filled from a dropped file; the drop zone emptied for the next one."""
        if not path:
            return tuple(gr.skip() for _ in range(len(page.form_outputs()) + len(page.lora_inputs()) + 2))
        try:
            restored = worker.settings_from_file(path)
        except UserError as exc:  # one line; nothing in the form changes
            gr.Warning(exc.message)
            return (*(gr.skip() for _ in [*page.form_outputs(), *page.lora_inputs()]), f"⚠ {exc.message}", None)
        return (*fill_form(restored.name, restored.settings, restored.image), None)

    def rows_from_prompt(prompt, rows):
        new_rows = present.prompt_rows(prompt)
        if new_rows is None or present.prompt_from_rows(rows) == present.prompt_from_rows(new_rows):
            return gr.skip()  # unparsed (the timeline says why), or the rows say it already: they stay as they are
        return new_rows

    def prompt_from_rows(rows):
        return present.prompt_from_rows(rows)

    def list_loras(*current):
        available = worker.lora_files()
        return tuple(gr.update(choices=[present.NO_LORA, *available], value=value if value in available else present.NO_LORA[1])
                     for value in current)

    stream = dict(show_progress="hidden", concurrency_limit=None)  # the worker, not Gradio, serialises jobs
    estimate_inputs = [page.seconds, page.steps, page.resolution, page.cfg, page.teacache, page.teacache_threshold,
                       page.profile, page.storage, page.batch_images, page.batch_prompts]
    page.generate.click(generate, [*page.spec_inputs(), page.profile, page.storage, *page.lora_inputs(),
                                   *page.cache_inputs()], page.job_outputs(), **stream).then(
        show_estimate, estimate_inputs, page.estimate, queue=False, show_progress="hidden")  # its speed is booked
    page.batch_generate.click(generate_batch, [page.batch_images, page.batch_prompts, *page.spec_inputs(),
                                               page.profile, page.storage, *page.lora_inputs(),
                                               *page.cache_inputs()],
                              page.job_outputs(), **stream).then(
        show_estimate, estimate_inputs, page.estimate, queue=False, show_progress="hidden")
    # the hidden TeaCache checkbox follows the step cache's choice (older settings files hold only it)
    page.cache.change(lambda method: method == "teacache", page.cache, page.teacache, queue=False,
                      show_progress="hidden")
    demo.load(show_estimate, estimate_inputs, page.estimate, queue=False, show_progress="hidden")
    for control in estimate_inputs:
        control.change(show_estimate, estimate_inputs, page.estimate, queue=False, show_progress="hidden",
                       trigger_mode="always_last")
    page.timer.tick(plot_tick, [page.job_id, page.plot_seen], [page.job_plot, page.plot_seen],
                    show_progress="hidden", concurrency_id="plot", concurrency_limit=None)
    page.gallery.change(show_past_plot, page.gallery, page.gallery_plot, queue=False, show_progress="hidden")
    page.stop.click(stop, page.job_id, None, **stream)
    page.start_waiting.click(start_waiting, None, None, **stream)
    page.drop_waiting.click(drop_waiting, None, None, **stream)
    page.randomise.click(lambda: random.SystemRandom().randint(0, SEED_MAX), None, page.seed, queue=False)
    page.seconds.change(present.length_text, page.seconds, page.length, queue=False, show_progress="hidden")
    # The prompt box and the timeline editor follow each other: the rows follow every change of the prompt (a
    # textbox's `input` event can carry the value before the keystroke), the prompt follows the user's edits of
    # the rows; rows that already say what the prompt says are left alone, so neither echoes the other. The
    # timeline under the length follows the prompt, the length and the blend.
    quiet = dict(queue=False, show_progress="hidden", trigger_mode="always_last")  # the newest edit wins
    page.prompt.change(rows_from_prompt, [page.prompt, page.prompt_rows], page.prompt_rows, **quiet)
    page.prompt_rows.input(prompt_from_rows, page.prompt_rows, page.prompt, **quiet)
    timeline_inputs = [page.prompt, page.seconds, page.prompt_blend]
    for control in timeline_inputs:
        control.change(present.timeline_html, timeline_inputs, page.timeline, **quiet)
    gauges = dict(show_progress="hidden", concurrency_id="gauges", concurrency_limit=None)
    tick_io = ([page.last_gauges, page.gallery_seen, page.my_jobs],
               [page.gauges, page.jobs, page.last_gauges, page.gallery, page.gallery_seen, page.my_jobs])
    page.timer.tick(tick, *tick_io, **gauges)
    demo.load(tick, *tick_io, **gauges)
    page.jobs.click(job_action, None, None, queue=False)
    download_outputs = [page.models_banner, page.models_notice, page.models_files, page.download_progress,
                        page.download, page.download_cancel]
    demo.load(follow_download, None, download_outputs, **stream)
    demo.load(reattach, None, page.job_outputs(), **stream)
    page.download.click(download, None, download_outputs, **stream)
    page.download_cancel.click(cancel_download, None, None, **stream)
    planning = dict(show_progress="hidden", concurrency_id="plan", concurrency_limit=None)
    plan_inputs = [page.profile, page.resolution, page.storage, page.seconds, *page.lora_inputs()]
    demo.load(show_plan, plan_inputs, page.plan, **planning)
    for control in plan_inputs:  # a dragged slider plans once for where it stops, not for every value it passes
        control.change(show_plan, plan_inputs, page.plan, trigger_mode="always_last", **planning)
    page.gallery_refresh.click(gallery_update, None, page.gallery, queue=False).then(  # the selected one may have
        show_past, page.gallery, [page.gallery_video, page.gallery_settings], queue=False)  # grown (a resume)
    page.gallery.change(show_past, page.gallery, [page.gallery_video, page.gallery_settings], queue=False)
    restored = [*page.form_outputs(), *page.lora_inputs(), page.restore_note]
    page.use_settings.click(use_settings, page.gallery, restored, queue=False)
    page.settings_file.upload(settings_from_file, page.settings_file, [*restored, page.settings_file],
                              show_progress="hidden")
    page.lora_refresh.click(list_loras, page.lora_pickers, page.lora_pickers, queue=False)
    job_settings = [*page.spec_inputs(), page.profile, page.storage, *page.lora_inputs(), *page.cache_inputs()]
    page.resume.click(resume, [page.gallery, page.profile, page.storage], page.job_outputs(), **stream)
    page.branch.click(branch, [page.gallery, page.branch_section, *job_settings], page.job_outputs(), **stream)
    page.extend.click(extend, [page.gallery, page.extend_seconds, page.extend_image, page.extend_video,
                               *job_settings], page.job_outputs(), **stream)
    page.remove.click(remove, page.gallery, [page.gallery, page.gallery_video], queue=False)


def _updates(job_id, changed: dict) -> tuple:
    """job_outputs() values: the changed ones, gr.skip() for the rest."""
    return (job_id, *(changed[name] if name in changed else gr.skip() for name in present.OUTPUTS))
