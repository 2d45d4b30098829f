"""Event wiring: the page's handlers talk to the worker; present.py turns what comes back into updates.

Job state lives in the worker, not in the page. A page follows one job at a time (its own, or on load the job
that is running): it replays that job's events from the start and then follows it live, so a reloaded page or
a second browser shows the same progress. The worker queues and serialises jobs, so the handlers that submit
and stream take no Gradio concurrency limit; the gauges timer has its own concurrency id so it keeps ticking
while a job streams.
"""
from __future__ import annotations

import random

import gradio as gr

from ..errors import ModelFilesError, UserError
from ..events import Failed, Finished, Stopped
from ..spec import SEED_MAX
from ..telemetry import read_gauges, starved
from . import present
from .layout import Page, build_page, notice_text

DOWNLOAD_COMMAND = "python -m framepack_ui download"
CACHE_CLEANUP_S = (3600, 24 * 3600)  # (every, older than): Gradio's cache of shown videos and uploads
POLL_S = 1.0  # how often a waiting stream checks whether its page has moved on to another job
TERMINAL = (Finished, Stopped, Failed)


def build_ui(worker) -> gr.Blocks:
    """The whole app page for `worker` (see framepack_ui.worker.Worker). Launch it with `css=layout.CSS`."""
    # Every section shown copies the growing MP4 into Gradio's cache (a new name per content, so the browser
    # fetches the longer video): drop cached copies after a day (uploads too; queued jobs wait far less).
    with gr.Blocks(title="FramePack UI", delete_cache=CACHE_CLEANUP_S) as demo:
        gr.Markdown("# FramePack UI\nFramePack F1 image-to-video, on this machine.")
        page = build_page(worker.missing_models())
        _wire(demo, page, worker)
    return demo


def _wire(demo: gr.Blocks, page: Page, worker) -> None:
    following: dict[str, str] = {}  # page session -> the job it follows; a page follows one job at a time

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
                    yield _updates(job_id if old is None else gr.skip(), present.changes(old, view))
                    old = view
                if batch and isinstance(batch[-1], TERMINAL):
                    return
                if not batch and worker.job(job_id).result is not None:
                    return
        finally:
            if following.get(session) == job_id:
                del following[session]

    def generate(image, prompt, negative, seconds, seed, steps, gs, cfg, rs, teacache, teacache_threshold,
                 resolution, crf, sampler, request: gr.Request):
        try:
            spec = present.spec_from_inputs(image, prompt, negative, seconds, seed, steps, gs, cfg, rs, teacache,
                                            teacache_threshold, resolution, crf, sampler)
            if worker.missing_models():  # the full list (which files, which folder) is in the note at the top
                raise ModelFilesError(f"model files are missing: see the note at the top of the page, or run "
                                      f"`{DOWNLOAD_COMMAND}`")
            job_id = worker.submit(spec)
        except UserError as exc:
            raise gr.Error(exc.message, print_exception=False) from None
        yield from follow(job_id, request.session_hash)

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

    def tick(previous):
        gauges = read_gauges(previous=previous)
        jobs = worker.jobs()
        warning = starved(gauges, generating=any(job.status == "running" for job in jobs))
        return present.gauges_text(gauges, warning), present.jobs_table(jobs), gauges

    def refresh_notice():
        missing = worker.missing_models()
        return gr.update(value=notice_text(missing), visible=bool(missing))

    stream = dict(show_progress="hidden", concurrency_limit=None)  # the worker, not Gradio, serialises jobs
    page.generate.click(generate, page.spec_inputs(), page.job_outputs(), **stream)
    page.stop.click(stop, page.job_id, None, **stream)
    page.randomise.click(lambda: random.SystemRandom().randint(0, SEED_MAX), None, page.seed, queue=False)
    page.seconds.change(present.length_text, page.seconds, page.length, queue=False, show_progress="hidden")
    gauges = dict(show_progress="hidden", concurrency_id="gauges", concurrency_limit=None)
    page.timer.tick(tick, page.last_gauges, [page.gauges, page.jobs, page.last_gauges], **gauges)
    demo.load(tick, page.last_gauges, [page.gauges, page.jobs, page.last_gauges], **gauges)
    demo.load(refresh_notice, None, page.models_notice, queue=False)
    demo.load(reattach, None, page.job_outputs(), **stream)


def _updates(job_id, changed: dict) -> tuple:
    """job_outputs() values: the changed ones, gr.skip() for the rest."""
    return (job_id, *(changed[name] if name in changed else gr.skip() for name in present.OUTPUTS))
