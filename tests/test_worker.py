"""The worker: one thread, its own FIFO queue, events kept per job; the real F1 engine on tiny models."""
from __future__ import annotations

import hashlib
import json
import re
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from framepack_ui.engine import f1
from framepack_ui.engine.video import count_frames
from framepack_ui.sidecar import sidecar_path
from framepack_ui.errors import InputError
from framepack_ui.events import Failed, Finished, Phase, SectionSaved, Step, Stopped
from framepack_ui.spec import Continuation
from framepack_ui.ui import present
from framepack_ui.units import GB
from framepack_ui.worker import Queued
from framepack_ui.worker.events import Estimated
from framepack_ui.worker.speed import UNKNOWN, JobShape, machine_key, read_book
from worker_jobs import TIMEOUT_S, all_events, record_planned_sections, spec, wait_until


def gated(run_job, gate: threading.Event, started: list):
    """run_job that records which job starts and waits for `gate` first: lets a test hold a job 'running'."""
    def run(spec, out_path, manager, emit, cancel, **kwargs):
        started.append(spec.prompt)
        assert gate.wait(TIMEOUT_S)
        return run_job(spec, out_path, manager, emit, cancel, **kwargs)
    return run


def test_two_jobs_run_in_submission_order_and_free_the_models(make_worker, start_image_80x64):
    gate, started = threading.Event(), []
    worker = make_worker(gated(f1.run, gate, started))
    with worker._cond:  # both are queued before the worker thread can take the first (a busy machine)
        first = worker.submit(spec(start_image_80x64, "first"))
        second = worker.submit(spec(start_image_80x64, "second"))
    wait_until(lambda: started)
    assert [j.status for j in worker.jobs()] == ["running", "queued"]
    assert worker.job(second).position == 1
    gate.set()
    events_1, events_2 = all_events(worker, first), all_events(worker, second)
    assert started == ["first", "second"]
    assert isinstance(events_1[-1], Finished) and isinstance(events_2[-1], Finished)
    assert [e.position for e in events_2 if isinstance(e, Queued)] == [2, 1]  # moved up when the first started
    assert events_1[-1].path != events_2[-1].path  # same second and seed: still two files
    for result in (events_1[-1], events_2[-1]):
        assert count_frames(result.path) == result.frames == 37
    assert [j.status for j in worker.jobs()] == ["finished", "finished"]
    assert [j.result.path for j in worker.jobs()] == [events_1[-1].path, events_2[-1].path]
    # the queue is empty now: the worker gives the models' memory back
    wait_until(lambda: not worker._manager.is_loaded("transformer"))
    assert not worker._manager.is_loaded("transformer") and not worker._manager.is_loaded("vae")


def test_bad_input_raises_before_anything_is_queued(make_worker, start_image_80x64, tmp_path):
    worker = make_worker()
    with pytest.raises(InputError, match="steps must be 1 to 100"):
        worker.submit(spec(start_image_80x64, steps=0))
    with pytest.raises(InputError, match="image not found"):
        worker.submit(spec(str(tmp_path / "nope.png")))
    assert worker.jobs() == []


def test_cancel_a_queued_job_removes_it(make_worker, start_image_80x64):
    gate, started = threading.Event(), []
    worker = make_worker(gated(f1.run, gate, started))
    first = worker.submit(spec(start_image_80x64, "first"))
    wait_until(lambda: started)  # the first job is running (held at the gate)
    second = worker.submit(spec(start_image_80x64, "second"))
    third = worker.submit(spec(start_image_80x64, "third"))
    assert [j.position for j in worker.jobs()] == [None, 1, 2]
    assert worker.cancel(second)
    assert [j.position for j in worker.jobs()] == [None, None, 1]  # the third moved up
    assert worker.cancel(first)  # running: it stops at its first check, before any section is made
    gate.set()
    second_events = all_events(worker, second)
    assert isinstance(second_events[-1], Stopped) and second_events[-1].path is None
    assert not any(isinstance(e, (Phase, Step)) for e in second_events)
    assert all_events(worker, first)[-1] == Stopped(None, 0)
    assert isinstance(all_events(worker, third)[-1], Finished)
    assert started == ["first", "third"]
    assert [j.status for j in worker.jobs()] == ["stopped", "stopped", "finished"]
    assert not worker.cancel(second)  # already ended


def test_stop_a_running_job_keeps_its_finished_sections(make_worker, start_image_80x64):
    worker = make_worker()
    stops = []

    def stop_in_section_1(event) -> None:
        # asked in the job's own thread as section 1's first step ends (on_event runs where the event is emitted),
        # so the stop lands in section 1 however loaded the machine: a reader of the events may fall sections behind
        if isinstance(event, Step) and event.section == 1 and not stops:
            stops.append(worker.cancel(job_id))

    job_id = worker.submit(spec(start_image_80x64, seconds=3.6), on_event=stop_in_section_1)  # 3 sections
    events = list(worker.events(job_id))
    assert stops == [True]
    result = events[-1]
    assert isinstance(result, Stopped), result
    assert result.frames == 37 and count_frames(result.path) == 37  # section 0 only, and it plays
    assert worker.job(job_id).status == "stopped"
    assert sum(isinstance(e, SectionSaved) for e in events) == 1
    [entry] = worker.past_outputs()  # the gallery says how it ended, from the engine's settings file
    assert (entry.status, entry.frames, entry.video) == ("stopped", 37, str(Path(result.path).resolve()))
    assert present.gallery_status(entry) == "stopped, kept 37 frames"


def test_a_crashing_run_job_fails_one_line_and_the_worker_goes_on(make_worker, start_image_80x64):
    calls = []

    def crash_once(spec, out_path, manager, emit, cancel, **kwargs):
        calls.append(spec.prompt)
        if len(calls) == 1:
            raise RuntimeError("boom\nwith a second line")
        return f1.run(spec, out_path, manager, emit, cancel, **kwargs)

    worker = make_worker(crash_once)
    crashed = worker.submit(spec(start_image_80x64, "crash"))
    fine = worker.submit(spec(start_image_80x64, "fine"))
    result = all_events(worker, crashed)[-1]
    assert isinstance(result, Failed) and result.reason == "internal"
    assert result.message == "internal error: RuntimeError: boom with a second line"
    assert isinstance(all_events(worker, fine)[-1], Finished)
    assert [j.status for j in worker.jobs()] == ["failed", "finished"]


def test_what_the_worker_hands_the_engine_and_what_it_makes_of_a_bad_ending(make_worker, start_image_80x64):
    """At the engine's boundary: the job's own out-of-memory advice from its plan goes in; a long internal error
    comes back as one line of at most 300 characters; an engine that returns without a result (writing some of the
    video first) still ends the job, failed, keeping the file it wrote."""
    calls = []

    def engine(spec, out_path, manager, emit, cancel, **kwargs):
        calls.append(kwargs)
        if spec.prompt == "long":
            raise RuntimeError("x" * 400)
        Path(out_path).write_bytes(b"part of a video")
        return None

    worker = make_worker(engine)
    long_error = all_events(worker, worker.submit(spec(start_image_80x64, "long")))[-1]
    assert isinstance(long_error, Failed) and long_error.reason == "internal"
    assert long_error.message == ("internal error: RuntimeError: " + "x" * 400)[:300]
    no_result = worker.submit(spec(start_image_80x64, "no result"))
    ended = all_events(worker, no_result)[-1]
    assert isinstance(ended, Failed) and ended.message == "internal error: the job ended without a result"
    assert ended.path == str(worker.job(no_result).out_path) and worker.job(no_result).status == "failed"
    assert "start" not in calls[0]  # a new video, not a continuation
    # the plan's leaner_choices (on this CPU plan, only the last resort it always names)
    assert calls[0]["out_of_memory_advice"] == calls[1]["out_of_memory_advice"] == "close other programs using the GPU"


def test_waiting_for_a_jobs_next_event_gives_up_after_its_timeout(make_worker, start_image_80x64):
    """wait_events(timeout_s) returns an empty list once the time is up while the job goes quiet (the page's
    stream polls this way, and must come back to check whether its browser left)."""
    entered, release = threading.Event(), threading.Event()

    def quiet_engine(spec, out_path, manager, emit, cancel, **kwargs):
        entered.set()
        release.wait(TIMEOUT_S)
        return Stopped(None, 0)

    worker = make_worker(quiet_engine)
    job_id = worker.submit(spec(start_image_80x64, "quiet"))
    assert entered.wait(TIMEOUT_S)
    seen = len(worker.wait_events(job_id, 0, timeout_s=0))
    got = []
    waiter = threading.Thread(target=lambda: got.append(worker.wait_events(job_id, seen, timeout_s=0.3)), daemon=True)
    waiter.start()
    waiter.join(TIMEOUT_S / 4)
    release.set()
    assert not waiter.is_alive() and got == [[]]
    assert isinstance(all_events(worker, job_id)[-1], Stopped)


def test_the_pagefile_prewarm_is_said_in_the_running_jobs_events(make_worker, start_image_80x64):
    """The manager reports its Windows pagefile pre-warm (memory/prewarm.py) through the worker's hook: one Phase
    line in the running job's events, the reservation and how far the commit is. Untested on Windows itself: the
    report is injected at the manager's hook, as the pre-warm would send it."""
    from framepack_ui.memory.prewarm import PrewarmProgress

    managers = []

    def engine(spec, out_path, manager, emit, cancel, **kwargs):
        managers.append(manager)
        manager.on_prewarm(PrewarmProgress(reserved_bytes=int(1.5 * GB), target_bytes=30 * GB,
                                           available_bytes=int(10.5 * GB)))
        return Stopped(None, 0)

    worker = make_worker(engine)
    job_id = worker.submit(spec(start_image_80x64, "prewarm"))
    events = all_events(worker, job_id)
    said = [e.detail for e in events if isinstance(e, Phase) and e.name == "prewarm"]
    assert said == ["growing the pagefile: 1.50 GB reserved, 40% of 30.0 GB commit"]
    managers[0].on_prewarm(PrewarmProgress(GB, 2 * GB, GB))  # between jobs: nobody to tell, nothing breaks
    assert list(worker.events(job_id)) == events


def test_a_late_subscriber_replays_from_the_start(make_worker, start_image_80x64):
    worker = make_worker()
    job_id = worker.submit(spec(start_image_80x64, seconds=2.4))  # 2 sections
    live, late = [], []
    for event in worker.events(job_id):
        live.append(event)
        if isinstance(event, SectionSaved) and not late:  # a second page opens mid-job
            thread = threading.Thread(target=lambda: late.extend(worker.events(job_id)), daemon=True)
            thread.start()
    thread.join(TIMEOUT_S)
    assert isinstance(live[-1], Finished)
    assert late == live  # everything from Queued(1) on, in order, ending with the result
    assert isinstance(live[0], Queued) and isinstance(live[1], Phase)
    again = list(worker.events(job_id))  # after the end too
    assert again == live and list(worker.events(job_id, since=len(live) - 1)) == [live[-1]]
    steps = [e for e in again if isinstance(e, Step)]
    assert steps[-1].preview is not None and all(s.preview is None for s in steps[:-1])  # only the newest keeps it
    info = worker.job(job_id)
    assert info.status == "finished" and info.section.section == 1 and info.step is steps[-1]


def test_each_job_runs_under_the_plan_of_its_memory_profile(make_worker, start_image_80x64):
    worker = make_worker()
    assert worker.plan_choices() == ("auto", "gpu", "streamed", "mmap", "cpu")
    table = worker.plan_text("auto", 64)
    assert "resolution 64" in table and "no CUDA GPU" in table
    assert re.search(r"^transformer\s+mmap", table, re.M)  # no GPU here: auto computes from the file map
    assert re.search(r"^transformer\s+cpu", worker.plan_text("cpu", 64), re.M)
    no_fit = worker.plan_text("gpu", 64)  # a plan that cannot fit: one line saying why
    assert "\n" not in no_fit and "needs a CUDA GPU" in no_fit

    cpu_job = worker.submit(spec(start_image_80x64, "cpu", resolution=64), profile="cpu")
    assert isinstance(all_events(worker, cpu_job)[-1], Finished)
    assert worker._manager.plan.components["transformer"].where == "cpu"
    first_manager = worker._manager
    mmap_job = worker.submit(spec(start_image_80x64, "mmap", resolution=64), profile="mmap")
    assert isinstance(all_events(worker, mmap_job)[-1], Finished)
    assert worker._manager is not first_manager  # other placements: a new manager applies them
    assert worker._manager.plan.components["transformer"].where == "mmap"

    gpu_job = worker.submit(spec(start_image_80x64, "gpu", resolution=64), profile="gpu")
    failed = all_events(worker, gpu_job)[-1]
    assert isinstance(failed, Failed) and failed.reason == "memory" and "needs a CUDA GPU" in failed.message
    entry = worker.past_outputs()[0]  # failed before the engine started: the gallery still says so
    assert entry.status == "failed" and entry.video is None and "needs a CUDA GPU" in entry.message
    assert entry.settings["prompt"] == "gpu" and entry.image and present.gallery_status(entry).startswith("failed")
    with pytest.raises(InputError, match="memory profile must be one of"):
        worker.submit(spec(start_image_80x64), profile="fast")


def test_a_command_line_job_that_fails_as_its_engine_starts_leaves_a_failed_settings_file_with_its_image(
        make_worker, start_image_80x64, tmp_path):
    """The command line's worker writes no queued record; an engine that fails before it writes its settings file
    (injected) still leaves one saying failed, built from the job's settings, beside a copy of its image. An image
    gone by then leaves the settings file without one."""
    def fails_at_once(spec, out_path, manager, emit, cancel, **kwargs):
        if spec.prompt == "image gone":
            Path(spec.image).unlink()  # the upload removed while the job ran: its image cannot be copied any more
        raise RuntimeError("the engine broke (injected)")

    worker = make_worker(fails_at_once, serves_pages=False)
    failed = all_events(worker, worker.submit(spec(start_image_80x64, "breaks")))[-1]
    assert isinstance(failed, Failed) and failed.path is None  # nothing was written: no video to keep
    [settings_file] = (tmp_path / "outputs").glob("*.json")
    settings = json.loads(settings_file.read_text())
    assert (settings["status"], settings["frames"], settings["prompt"]) == ("failed", 0, "breaks")
    assert settings["message"] == failed.message and "the engine broke (injected)" in failed.message
    assert (settings_file.parent / settings["input_image_file"]).read_bytes() == Path(start_image_80x64).read_bytes()

    image = tmp_path / "gone.png"
    image.write_bytes(Path(start_image_80x64).read_bytes())
    job = worker.submit(spec(str(image), "image gone"))
    assert isinstance(all_events(worker, job)[-1], Failed) and not image.exists()
    settings = json.loads(sidecar_path(worker.job(job).out_path).read_text())
    assert (settings["status"], settings["prompt"], settings["input_image_file"]) == ("failed", "image gone", None)


def test_a_settings_file_the_engine_left_running_is_marked_failed_with_its_frames(make_worker, start_image_80x64):
    """An engine that dies mid-job after writing its settings file as running (injected): the worker marks that
    file failed with the job's message and keeps the frames it recorded; one it finished itself is left alone."""
    from framepack_ui.sidecar import write_sidecar

    def dies_mid_job(spec, out_path, manager, emit, cancel, **kwargs):
        write_sidecar(out_path, {**spec.settings(), "status": spec.prompt, "frames": 37}, spec.image)
        raise RuntimeError("died after a section (injected)")

    worker = make_worker(dies_mid_job)
    running = worker.submit(spec(start_image_80x64, "running"))
    failed = all_events(worker, running)[-1]
    settings = json.loads(sidecar_path(worker.job(running).out_path).read_text())
    assert (settings["status"], settings["frames"], settings["message"]) == ("failed", 37, failed.message)
    assert settings["input_image_file"] and settings["prompt"] == "running"
    stopped = worker.submit(spec(start_image_80x64, "stopped"))  # how the engine itself ended it: kept
    all_events(worker, stopped)
    settings = json.loads(sidecar_path(worker.job(stopped).out_path).read_text())
    assert (settings["status"], settings["frames"]) == ("stopped", 37) and "message" not in settings


def test_a_failed_jobs_video_is_kept_only_where_its_engine_wrote_frames(make_worker, start_image_80x64):
    """A job that fails after its engine wrote part of the video points at it (a playable file is never lost); an
    empty file it left, or none, is not a video to keep. The job's snapshot names it, its submit time and its id;
    the outputs' signature changes while it runs (the gallery refreshes)."""
    gate, signatures = threading.Event(), []

    def writes_then_fails(spec, out_path, manager, emit, cancel, **kwargs):
        signatures.append(worker.outputs_signature())
        assert gate.wait(TIMEOUT_S)
        Path(out_path).write_bytes(b"" if spec.prompt == "empty" else b"frames")
        raise RuntimeError("failed after writing (injected)")

    worker = make_worker(writes_then_fails)
    idle = worker.outputs_signature()
    before = time.time()
    ids = [worker.submit(spec(start_image_80x64, prompt)) for prompt in ("frames", "empty")]
    wait_until(lambda: signatures)
    assert signatures[0] != idle and signatures[0][0] == ids[0]  # the running job is part of it
    gate.set()
    kept, empty = (all_events(worker, job)[-1] for job in ids)
    assert kept.path == str(worker.job(ids[0]).out_path) and Path(kept.path).read_bytes() == b"frames"
    assert isinstance(empty, Failed) and empty.path is None
    info = worker.job(ids[0])
    assert info.id == ids[0] and info.result == kept and before <= info.submitted_at <= time.time()


def test_shutdown_stops_the_queued_jobs_and_the_running_one_and_names_each_device(make_worker, start_image_80x64):
    """Closing the app: the jobs still queued end stopped (not lost in the queue) and the running one is asked to
    stop. A worker's device name is what its jobs record: "cuda" means the first GPU."""
    gate, started = threading.Event(), []
    worker = make_worker(gated(f1.run, gate, started))
    running = worker.submit(spec(start_image_80x64, "running"))
    wait_until(lambda: started)
    queued = worker.submit(spec(start_image_80x64, "queued"))
    gate.set()  # the running job goes on to see its stop
    worker.shutdown()
    assert isinstance(all_events(worker, queued)[-1], Stopped) and worker.job(queued).status == "stopped"
    assert isinstance(all_events(worker, running)[-1], Stopped)
    assert started == ["running"]
    assert worker.device_name() == "cpu"
    assert make_worker(device="cuda").device_name() == "cuda:0"
    assert make_worker(device="cuda:1").device_name() == "cuda:1"


def test_the_workers_attention_goes_into_every_jobs_plan(make_worker):
    worker = make_worker()
    assert worker.attention_problem() is None  # none given
    worker.attention = "native"
    assert re.search(r"attention native", worker.plan_text("cpu", 64)) and worker.attention_problem() is None
    worker.attention = "cudnn_fp8"
    assert worker.attention_problem() == "--attention cudnn_fp8 needs the transformer on a CUDA GPU"


def test_past_outputs_newest_first_say_how_each_job_ended(make_worker, tmp_path):
    worker = make_worker(run_job=lambda *args, **kwargs: None)
    out = tmp_path / "outputs"
    out.mkdir()
    settings = dict(prompt="a cat", negative="", seconds=2.4, seed=5, steps=3, gs=10.0, cfg=1.0, rs=0.0,
                    teacache=False, teacache_threshold=0.1, resolution=64, crf=20, sampler="euler",
                    prompt_blend_sections=0, width=64, height=64, sections=2)

    def job(stem, age_s, video=True, image=False, **record):
        if video:
            (out / f"{stem}.mp4").write_bytes(b"\0" * 100)
        if image:
            (out / f"{stem}.input.png").write_bytes(b"png")
        json_path = sidecar_path(out / f"{stem}.mp4")
        json_path.write_text(json.dumps({**settings, **record,
                                         "input_image_file": f"{stem}.input.png" if image else None}))
        for path in out.glob(f"{stem}.*"):
            os.utime(path, (time.time() - age_s, time.time() - age_s))

    job("a_finished", 40, image=True, status="finished", frames=73)
    job("b_stopped", 30, status="stopped", frames=37)
    job("c_failed", 20, video=False, status="failed", frames=0, message="out of memory: try a lower resolution")
    job("d_crashed", 10, status="running")  # the app was closed mid-job
    (out / "e_bare.mp4").write_bytes(b"\0" * 10)  # a video without settings

    entries = worker.past_outputs()
    assert [e.name for e in entries] == ["e_bare.mp4", "d_crashed.mp4", "c_failed.mp4", "b_stopped.mp4",
                                         "a_finished.mp4"]
    assert [e.status for e in entries] == ["unknown", "interrupted", "failed", "stopped", "finished"]
    labels = [label for label, _ in present.gallery_choices(entries)]
    assert "stopped, kept 37 frames" in labels[3] and "failed: out of memory" in labels[2]
    assert "interrupted" in labels[1] and "finished, 73 frames" in labels[4] and "a cat" in labels[4]
    assert entries[2].video is None  # no section was written: nothing to play
    finished = entries[4]
    assert finished.image == str((out / "a_finished.input.png").resolve())
    assert present.form_values(finished.settings) == {k: settings[k] for k in present.FORM_KEYS}
    assert "| sampler | euler |" in present.gallery_details(finished)
    before = worker.outputs_signature()
    job("f_new", 0, status="finished", frames=37)
    assert worker.outputs_signature() != before and worker.past_outputs()[0].name == "f_new.mp4"


def test_download_in_the_background_fills_the_models_folder(make_worker, tiny_models_dir, tmp_path, monkeypatch):
    from fake_hub import FakeHub, guard_loopback_only, isolate_hf, repos_of

    repos = repos_of(tiny_models_dir)
    guard_loopback_only(monkeypatch)
    with FakeHub(repos) as hub:
        isolate_hf(monkeypatch, tmp_path, hub.url)
        worker = make_worker(models_dir=tmp_path / "models")
        assert "missing model files" in worker.missing_models()
        need, free = worker.download_need()
        assert need > 40e9 and free > 0  # the real models' size: what the banner says is needed
        seen = []
        assert worker.start_download()
        wait_until(lambda: seen.append(worker.download_status()) or seen[-1].state in ("done", "failed"))
        assert seen[-1].state == "done", seen[-1].message
        running = [s for s in seen if s.state == "running" and s.total_bytes > 0]
        assert running and re.match(r"Downloading: \d+% ", present.download_text(running[-1]))
        assert worker.missing_models() == "" and worker.download_need()[0] == 0
        # a bar per model, and the rate counted from this run's first report (one start time for the whole run)
        assert all(s.models and all(total > 0 for _, _, total in s.models) for s in running)
        assert {s.started_at_s for s in running} == {running[0].started_at_s} != {None}
        assert all(s.updated_at_s >= s.started_at_s for s in running)
        done = seen[-1]
        assert (done.file, done.message, done.done_bytes, done.total_bytes) == ("", "", running[-1].total_bytes,
                                                                                  running[-1].total_bytes)


@pytest.mark.parametrize("error, message", [
    (InputError("not enough disk space in /m: 40.1 GB needed, 3.0 GB free"),
     "not enough disk space in /m: 40.1 GB needed, 3.0 GB free"),
    (RuntimeError("the hub\nsaid no"), "download failed: RuntimeError: the hub said no"),
])
def test_a_failed_download_says_why_on_one_line(make_worker, tmp_path, monkeypatch, error, message):
    """A download that fails (a refusal the user can act on, or anything else) ends "failed" with one line, shown
    by the page as it is; the worker can start another."""
    from framepack_ui.weights import download

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(download, "ensure_models", fail)
    worker = make_worker(models_dir=tmp_path / "models")
    assert worker.start_download()
    wait_until(lambda: worker.download_status().state != "running")
    status = worker.download_status()
    assert (status.state, status.message) == ("failed", message)
    assert present.download_text(status) == f"Download failed: {message}"
    assert worker.start_download()  # not stuck: a second try starts


def test_keep_models_holds_them_for_the_idle_timeout_then_frees(make_worker, start_image_80x64):
    worker = make_worker(keep_models_s=4)
    events = all_events(worker, worker.submit(spec(start_image_80x64, "kept a while")))
    assert isinstance(events[-1], Finished)
    assert worker._manager.is_loaded("transformer")  # kept for a quick next job
    wait_until(lambda: not worker._manager.is_loaded("transformer"))  # then given back


def test_download_cancel_stops_mid_file_keeps_the_partial_and_a_later_start_resumes(make_worker, tiny_models_dir,
                                                                                     tmp_path, monkeypatch):
    from huggingface_hub import constants as hf_constants

    from fake_hub import FakeHub, guard_loopback_only, isolate_hf, repos_of
    from framepack_ui.weights import layout

    repos = repos_of(tiny_models_dir)
    shard = "diffusion_pytorch_model-00001-of-00003.safetensors"
    data = repos[layout.F1_REPO][shard]
    guard_loopback_only(monkeypatch)
    monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", 4096)  # several chunks per file: cancel lands mid-file
    # the client's read timeout (10 s) outlasts the hub's hold however slow a loaded machine is: a timed-out read
    # would resume on its own, racing the cancel (the hold is released by the test, not by time)
    monkeypatch.setattr(hf_constants, "HF_HUB_DOWNLOAD_TIMEOUT", 10 * TIMEOUT_S)
    with FakeHub(repos) as hub:
        isolate_hf(monkeypatch, tmp_path, hub.url)
        models = tmp_path / "models"
        worker = make_worker(models_dir=models)
        assert not worker.cancel_download()  # nothing to stop yet
        reached, release = hub.hold(layout.F1_REPO, shard, at=len(data) // 2)
        assert worker.start_download()
        assert reached.wait(TIMEOUT_S), "the download never reached the transformer shard"
        assert not worker.start_download()  # one at a time
        dest = layout.COMPONENTS["transformer"].folder(models) / shard

        def shard_written() -> int:  # the partial file's size: what the client has read (the hub holds at half)
            return sum(p.stat().st_size for p in dest.parent.glob(f"{shard}.*.incomplete"))

        wait_until(lambda: shard_written() >= len(data) // 4)
        assert worker.download_status().file.endswith(shard)
        assert worker.cancel_download()  # while the hub holds the rest of the shard back
        release.set()
        wait_until(lambda: worker.download_status().state != "running")
        stopped = worker.download_status()
        assert stopped.state == "stopped", stopped
        line = present.download_text(stopped)
        assert "\n" not in line and re.match(r"Download stopped at \d+%: .* press Download models to resume", line)
        assert not dest.exists()  # nothing half-fetched looks complete
        [partial] = dest.parent.glob(f"{shard}.*.incomplete")
        kept = partial.stat().st_size
        assert 0 < kept < len(data) and partial.read_bytes() == data[:kept]
        assert "transformer (" in worker.missing_models()

        hub.clear_log()
        reached, release = hub.hold(layout.F1_REPO, shard, at=(kept + len(data)) // 2)
        assert worker.start_download()
        assert reached.wait(TIMEOUT_S)
        wait_until(lambda: worker.download_status().updated_at_s is not None)
        resumed = worker.download_status()  # where this run started: the rate counts from there
        release.set()
        assert resumed.state == "running" and resumed.resumed_bytes >= kept
        assert resumed.started_done_bytes >= kept and resumed.done_bytes >= resumed.started_done_bytes
        wait_until(lambda: worker.download_status().state != "running")
        assert worker.download_status().state == "done", worker.download_status().message
        assert dest.read_bytes() == data and worker.missing_models() == ""
        ranges = [r.range for r in hub.requests if r.method == "GET" and r.origin == "cdn" and
                  r.path.endswith(hashlib.sha256(data).hexdigest())]
        assert ranges == [f"bytes={kept}-"]  # resumed where the partial file ended


def test_section_video_is_a_new_name_per_section_with_no_copy(make_worker, tmp_path):
    worker = make_worker(run_job=lambda *args, **kwargs: None)
    video = tmp_path / "outputs" / "20260101_120000_7.mp4"
    video.parent.mkdir(parents=True, exist_ok=True)
    video.write_bytes(b"section one")
    names = [worker.section_video(str(video), n) for n in (1, 2, 3)]
    assert len(set(names)) == 3 and all(Path(n).parent == worker.live_dir() for n in names)  # a new URL each
    video.write_bytes(b"section one, section two")  # the engine rewrites the file in place
    assert Path(names[-1]).read_bytes() == video.read_bytes() and os.path.samefile(names[-1], video)  # no copy
    assert sorted(p.name for p in worker.live_dir().iterdir()) == [Path(n).name for n in names[1:]]  # 2 kept
    assert [e.name for e in worker.past_outputs()] == [video.name]  # the links are not past outputs
    make_worker(run_job=lambda *args, **kwargs: None)  # the next start clears what an earlier run left
    assert not worker.live_dir().exists()


def test_each_job_is_planned_anew_and_an_fp8_plan_converts_first_with_progress(
        make_worker, models_copy, start_image_80x64, monkeypatch):
    """A machine that got busier plans fp8 for its next job (the transformer streamed, the bf16 blocks spilling from
    the page cache), and the worker converts the fp8 cache before the engine starts, as a phase with progress; the
    job's settings record the storage it ran with. The machine and weight sizes are injected (an 8 GB card in a
    32 GB laptop, the real transformer's size); the conversion is real, on the tiny transformer's files."""
    from dataclasses import replace

    from framepack_ui.events import Progress
    from framepack_ui.memory import fp8, probe
    from framepack_ui.memory.plan import real_weights
    from framepack_ui.weights.layout import COMPONENTS

    available = [30e9, 19e9]  # GB free at the first job, then at the second
    monkeypatch.setattr(probe, "probe_machine", lambda *args, **kwargs: replace(
        probe.Machine.supposed(32, 8), ram_total_bytes=32 * 2**30, ram_available_bytes=int(available.pop(0))))
    monkeypatch.setattr(probe, "weights_on_disk", lambda models_dir: real_weights())
    records = []

    def engine(spec, out_path, manager, emit, cancel, record=None, **kwargs):  # a scripted engine: no CUDA here
        records.append(record)
        emit(Finished(str(out_path), "", 0, 0.0))

    worker = make_worker(run_job=engine, models_dir=models_copy)
    folder = COMPONENTS["transformer"].folder(models_copy)
    first = all_events(worker, worker.submit(spec(start_image_80x64)))
    assert not any(isinstance(e, Progress) for e in first) and fp8.check_cache(folder) == "absent"
    second = all_events(worker, worker.submit(spec(start_image_80x64)))
    progress = [e for e in second if isinstance(e, Progress)]
    assert progress and progress[-1].done == progress[-1].total and fp8.check_cache(folder) is None
    phases = [e for e in second if isinstance(e, Phase) and e.name == "convert"]
    assert phases == [Phase("convert", "converting the transformer to fp8 (once)")]
    assert {p.task for p in progress} == {phases[0].detail}
    percents = [100 * p.done // p.total for p in progress]
    assert percents == sorted(set(percents))  # one event per percent, in order: a job's events stay few
    # time left: from the rate so far once a percent is written (unknown before), 0 at the end
    assert all((p.eta_s is None) == (percent == 0) for p, percent in zip(progress, percents))
    assert progress[-1].eta_s == 0 and all(p.eta_s < 600 for p in progress if p.eta_s is not None)
    assert [r["memory"]["transformer_storage"] for r in records] == ["bfloat16", "fp8"]
    # and why, in the plan's own words (the settings file keeps them beside the choice)
    assert any(note.startswith("transformer stored as fp8 (chosen automatically)") for note in
               records[1]["memory"]["notes"])
    assert not any("stored as fp8" in note for note in records[0]["memory"]["notes"])
    bar = present.progress_bar(progress[-1])  # what the page's progress line shows
    assert bar.startswith("Converting the transformer to fp8 (once): [####################] 100 % of"), bar


def test_a_stopped_fp8_conversion_keeps_nothing(make_worker, models_copy, start_image_80x64):
    """Stop during the conversion: the job ends stopped and no cache (or half-written file) is left to be used."""
    from framepack_ui.events import Progress
    from framepack_ui.memory import fp8
    from framepack_ui.weights.layout import COMPONENTS

    worker = make_worker(models_dir=models_copy)
    seen = []

    def stop_at_first_progress(event):
        seen.append(event)
        if isinstance(event, Progress):
            worker.cancel(job)

    with worker._cond:  # `job` is set before the worker thread can start it
        job = worker.submit(spec(start_image_80x64), plan_options={"fp8": True}, on_event=stop_at_first_progress)
    events = all_events(worker, job)
    assert isinstance(events[-1], Stopped) and any(isinstance(e, Progress) for e in seen)
    folder = COMPONENTS["transformer"].folder(models_copy)
    assert fp8.check_cache(folder) == "absent" and not list(folder.glob("fp8/*"))


def test_the_next_job_plans_with_the_memory_its_own_kept_models_hold(make_worker, start_image_80x64, monkeypatch):
    """An 8 GB card planned with the real transformer's sizes: after the first job its kept transformer holds VRAM
    and RAM, which the probe for the second job sees as taken. The worker counts what its own models hold as free
    (it frees them before placing others), so the second job gets the same plan and the same loaded models rather
    than fewer resident blocks and a reload. Loading is injected (no CUDA here): the scripted engine marks the
    transformer loaded, and the probe takes off what its plan says it holds."""
    from dataclasses import replace

    from framepack_ui.memory import probe
    from framepack_ui.memory.plan import real_weights

    held = {"ram": 0, "vram": 0}

    def probe_now(*args, **kwargs):
        machine = probe.Machine.supposed(32, 8)
        return replace(machine, ram_available_bytes=machine.ram_available_bytes - held["ram"],
                       vram_free_bytes=machine.vram_free_bytes - held["vram"])

    monkeypatch.setattr(probe, "probe_machine", probe_now)
    monkeypatch.setattr(probe, "weights_on_disk", lambda models_dir: real_weights())
    placements = []

    def engine(spec, out_path, manager, emit, cancel, record=None, **kwargs):
        transformer = manager.plan.components["transformer"]
        placements.append((id(manager), transformer.resident_blocks))
        manager._loaded["transformer"] = torch.nn.Identity()  # as if lent: held until the manager frees it
        held.update(ram=transformer.ram_bytes, vram=transformer.vram_bytes)
        emit(Finished(str(out_path), "", 0, 0.0))

    worker = make_worker(run_job=engine, keep_models_s=None, device="cuda")
    for _ in range(2):
        assert isinstance(all_events(worker, worker.submit(spec(start_image_80x64)))[-1], Finished)
    first, second = placements
    assert held["vram"] > 2 * GB and first[1] > 0  # the case: blocks resident, a large share of the card held
    assert second == first


# --- the timeline and the speed book (found unguarded by the mutation check, docs/mutation.md) ----------------------

def test_a_finished_jobs_timeline_goes_into_its_settings_on_one_line_and_its_speed_under_the_storage_it_asked(
        make_worker, start_image_80x64):
    """The settings file stays UTF-8 and indented, with the timeline on one line; a finished new job's speed is kept
    under this machine, its profile and the storage it asked for (auto, bf16, fp8), which the next job's estimate
    reads, or falls back to, saying what differs."""
    worker = make_worker()
    first = all_events(worker, worker.submit(spec(start_image_80x64, "café ☕ moves"), plan_options={"fp8": False}))
    assert isinstance(first[-1], Finished)
    text = sidecar_path(first[-1].path).read_text(encoding="utf-8")
    assert '"prompt": "café ☕ moves"' in text and '\n  "seed": ' in text
    assert len([line for line in text.splitlines() if line.startswith('  "timeline": {')]) == 1
    timeline = json.loads(text)["timeline"]
    assert timeline["sections"] and timeline == worker.timeline(worker.jobs()[0].id)
    bf16 = machine_key("cpu", worker.profile, "bf16")
    assert list(read_book(worker.speed_path)) == [bf16]

    same = all_events(worker, worker.submit(spec(start_image_80x64, "again"), plan_options={"fp8": False}))
    other = all_events(worker, worker.submit(spec(start_image_80x64, "again"), profile="mmap"))
    said = [next(e for e in events if isinstance(e, Estimated)) for events in (same, other)]
    assert said[0].source == f"measured on this machine (1 job, profile {worker.profile})" and said[0].total_s > 0
    assert said[1].source == (f"measured on this machine with profile {worker.profile}, not mmap and bf16 storage "
                              "asked, not auto") and said[1].total_s > 0
    book = read_book(worker.speed_path)
    assert list(book) == [bf16, machine_key("cpu", "mmap", "auto")] and len(book[bf16]) == 2
    # asked directly, for a profile nothing was measured under: the newest one stands in, named
    guess = worker.estimate(JobShape.of(spec(start_image_80x64)), profile="gpu", storage="auto")
    assert guess.source == "measured on this machine with profile mmap, not gpu"


def test_a_failing_estimate_says_unknown_and_the_job_runs(make_worker, start_image_80x64, monkeypatch):
    worker = make_worker()
    monkeypatch.setattr(worker, "estimate", lambda *args: 1 / 0)
    events = all_events(worker, worker.submit(spec(start_image_80x64)))
    assert isinstance(events[-1], Finished)
    assert next(e for e in events if isinstance(e, Estimated)) == Estimated(None, UNKNOWN)


def test_the_speed_books_machine_is_the_gpus_name_or_cpu(make_worker, monkeypatch):
    """The GPU's name as NVML reads it (read once per worker), or "cpu" for a worker on the CPU, without a reading,
    or where the reading has no GPU."""
    from framepack_ui.worker.worker import Worker

    readings = []

    class Reading:
        def __init__(self, available):
            self.gpu_available = available
            self.gpu_note = "NVIDIA GeForce RTX 4060 Laptop GPU" if available else "no GPU"

    def read(previous):
        readings.append(previous)
        return Reading(True)

    monkeypatch.setattr(Worker, "_read_gauges", staticmethod(read))
    gpu = make_worker(device="cuda")
    assert gpu._device_label() == gpu._device_label() == "NVIDIA GeForce RTX 4060 Laptop GPU"
    assert readings == [None]  # read once, no earlier reading
    assert make_worker(device=None)._device_label() == "NVIDIA GeForce RTX 4060 Laptop GPU"  # the default device
    assert make_worker(device="cpu")._device_label() == "cpu"
    monkeypatch.setattr(Worker, "_read_gauges", staticmethod(lambda previous: Reading(False)))
    assert make_worker(device="cuda")._device_label() == "cpu"
    monkeypatch.setattr(Worker, "_read_gauges", staticmethod(lambda previous: None))
    assert make_worker(device="cuda")._device_label() == "cpu"


def test_a_continuation_goes_to_a_new_file_and_never_reads_a_video_a_job_is_writing(make_worker, start_image_80x64):
    """A branch or an extension is a new output, not its source's file; nothing continues a video while a job
    writes it (here a job writing over a finished one). One line each, and nothing queued."""
    gate, started = threading.Event(), []
    worker = make_worker(gated(f1.run, gate, started))
    gate.set()
    source = Path(all_events(worker, worker.submit(spec(start_image_80x64, "the source")))[-1].path)
    refusals = {
        "branch": (Continuation("branch", str(source), from_section=1), "a branch"),
        "extend": (Continuation("extend", str(source)), "an extension")}
    for start, made in refusals.values():
        with pytest.raises(InputError) as refused:
            worker.submit(spec(start_image_80x64, seconds=1.2), out_path=source, start=start)
        assert str(refused.value) == f"{made} is a new output: choose another file than {source.name}"
    gate.clear()
    writing = worker.submit(spec(start_image_80x64, "written over"), out_path=source)
    with pytest.raises(InputError) as refused:
        worker.submit(spec(start_image_80x64, seconds=1.2), out_path=source.with_name("new.mp4"),
                      start=Continuation("extend", str(source)))
    assert str(refused.value) == f"{source.name} is being written by a job: wait for it to end"
    assert [j.id for j in worker.jobs()][-1] == writing  # nothing more queued
    gate.set()
    assert isinstance(all_events(worker, writing)[-1], Finished)
    # written: now it can be extended (ended jobs' files are not busy)
    extended = worker.submit(spec(start_image_80x64, seconds=1.2), out_path=source.with_name("new.mp4"),
                             start=Continuation("extend", str(source)))
    result = all_events(worker, extended)[-1]
    assert isinstance(result, Finished)
    assert count_frames(result.path) == count_frames(source) + 36  # the engine was handed the continuation


def test_a_job_left_queued_by_an_earlier_run_is_queued_again_only_by_an_open_worker(make_worker, start_image_80x64):
    """A job an earlier run of the app queued but never started comes back "waiting"; `resume` puts it first in
    line under the status the page shows ("queued"; no worker thread here, so nothing starts it meanwhile), once;
    a worker already shut down takes no resume and the job keeps waiting."""
    earlier = make_worker(background=False)
    earlier.submit(spec(start_image_80x64, "left queued"))  # the app closes before running it
    restored = make_worker(background=False)
    [waiting] = restored.jobs()
    assert (waiting.spec.prompt, waiting.status) == ("left queued", "waiting")
    assert restored.resume(waiting.id) and not restored.resume(waiting.id)
    queued = restored.job(waiting.id)
    assert (queued.status, queued.position) == ("queued", 1)
    closing = make_worker(background=False)  # the record is still on disk until the job starts
    [waiting_again] = closing.jobs()
    closing.shutdown()
    assert not closing.resume(waiting_again.id)
    assert closing.job(waiting_again.id).status == "waiting"


def test_a_resume_through_the_worker_writes_into_its_source_under_its_saved_settings(make_worker, start_image_80x64,
                                                                                     monkeypatch):
    """A resume continues the stopped video itself, as it was made: the job's file is the source whatever
    `out_path` says, its settings the saved ones (the prompt submitted with it is not used), and the video ends
    whole in that file. Its plan is made, and its time estimated, for the one section it samples, not the video's
    two."""
    from framepack_ui.errors import Cancelled

    planned_sections = record_planned_sections(monkeypatch)

    def stop_in_second_section(section):
        if section == 1:
            raise Cancelled()

    stopped_once = []

    def engine(spec_, out_path, manager, emit, cancel, **kwargs):
        if not stopped_once:
            stopped_once.append(True)
            kwargs["section_hook"] = stop_in_second_section
        return f1.run(spec_, out_path, manager, emit, cancel, **kwargs)

    worker = make_worker(engine)
    estimated_sections, real_estimate = [], worker.estimate

    def estimate(shape, *args, **kwargs):
        estimated_sections.append(shape.sections)
        return real_estimate(shape, *args, **kwargs)

    monkeypatch.setattr(worker, "estimate", estimate)
    first = all_events(worker, worker.submit(spec(start_image_80x64, "the saved prompt", seconds=2.4)))[-1]
    assert isinstance(first, Stopped)
    source = Path(first.path).resolve()
    assert count_frames(source) == 1 + 36
    resumed = worker.submit(spec(start_image_80x64, "not this prompt"), out_path=source.with_name("elsewhere.mp4"),
                            start=Continuation("resume", str(source)))
    job = worker.job(resumed)
    assert Path(job.out_path).resolve() == source
    assert (job.spec.prompt, job.spec.sections) == ("the saved prompt", 2)
    end = all_events(worker, resumed)[-1]
    assert isinstance(end, Finished) and Path(end.path).resolve() == source
    assert count_frames(source) == 1 + 36 * 2 and not source.with_name("elsewhere.mp4").exists()
    assert planned_sections == [2, 1]  # the first job's two sections, then the one the resume samples
    assert estimated_sections == [2, 1]


# --- the VAE decoder's compile in the idle time after a short job (memory/plan: ComponentPlan.compile_later) --------

def _plan_as_on_a_gpu(monkeypatch, ready_compiles: bool = True) -> list:
    """The plan's choice for a GPU whose decoder this process has not compiled, injected (no CUDA here, where the
    plan compiles nothing): a short job leaves the compile for later; once the decoder is ready, jobs decode
    compiled (the real choice from the probe's state and the job's sections: test_plan_placement.py). Returns the
    sections each plan was asked for."""
    from framepack_ui.compute import compile as compiled
    from framepack_ui.worker import worker as worker_module

    real_plan = worker_module.Worker._make_plan
    sections = []

    def plan(self, *args, **kwargs):
        sections.append(kwargs.get("sections"))
        made = real_plan(self, *args, **kwargs)
        if ready_compiles and compiled.decoder_compile_state("cpu", None) == compiled.READY:
            return made.with_component("vae", compile=True)
        return made.with_component("vae", compile_later=True)

    monkeypatch.setattr(worker_module.Worker, "_make_plan", plan)
    return sections


def test_a_short_jobs_decoder_compiles_while_the_worker_is_idle_and_serves_the_next_job(
        make_worker, start_image_80x64, monkeypatch, count_graphs):
    """The first job decodes eagerly; the worker then compiles the decoder on a small decode while idle; a job
    submitted meanwhile waits, is told why, and finds the decoder ready: it decodes compiled, compiling nothing
    more and saying nothing about a compile. torch.compile only counts graphs (conftest)."""
    from framepack_ui.compute import compile as compiled
    from framepack_ui.events import Notice
    from framepack_ui.memory.manager import VAE_COMPILE_NOTICE, ModelManager
    from framepack_ui.worker.worker import IDLE_COMPILE_NOTICE

    planned_sections = _plan_as_on_a_gpu(monkeypatch)
    gate, graphs_after_idle_compile = threading.Event(), []
    real_compile_now = ModelManager.compile_vae_decoder_now

    def gated_compile_now(self):
        assert gate.wait(TIMEOUT_S)
        ready = real_compile_now(self)
        graphs_after_idle_compile.append(len(count_graphs))
        return ready

    monkeypatch.setattr(ModelManager, "compile_vae_decoder_now", gated_compile_now)
    worker = make_worker()
    first = worker.submit(spec(start_image_80x64, "first"))
    assert isinstance(all_events(worker, first)[-1], Finished)
    assert count_graphs == [] and compiled.decoder_compile_state("cpu", None) == compiled.COLD
    wait_until(lambda: worker._idle_work is not None)  # compiling (held at the gate)
    second = worker.submit(spec(start_image_80x64, "second"))
    assert worker.job(second).status == "queued"
    gate.set()
    events = all_events(worker, second)
    assert isinstance(events[-1], Finished)
    assert events.index(Notice(IDLE_COMPILE_NOTICE)) < events.index(Phase("starting", "starting the engine"))
    assert graphs_after_idle_compile[0] >= 2 and len(count_graphs) == graphs_after_idle_compile[0]
    assert worker._manager.plan.components["vae"].compile and compiled.decoder_compile_state("cpu", None) == "ready"
    assert not any(isinstance(e, Phase) and e.detail == VAE_COMPILE_NOTICE for e in events)
    assert len(graphs_after_idle_compile) == 1  # the second job's plan left nothing for later
    assert planned_sections == [spec(start_image_80x64).sections] * 2  # each job planned with its own length


def test_a_command_line_worker_never_compiles_while_idle_and_a_failed_idle_compile_leaves_the_worker_working(
        make_worker, start_image_80x64, monkeypatch, caplog):
    """The command line's worker (compile_when_idle=False) ends after its job: no compile then. Nor after a job
    that failed (the user may be about to submit again). The app's worker compiles while idle; out of memory there
    (injected) is logged, the next job runs and ends as usual, and the compile is not tried again."""
    from framepack_ui.memory.manager import ModelManager
    from framepack_ui.worker.worker import IDLE_COMPILE_GRACE_S

    _plan_as_on_a_gpu(monkeypatch, ready_compiles=False)
    calls = []

    def out_of_memory(self):
        calls.append(self)
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(ModelManager, "compile_vae_decoder_now", out_of_memory)
    command_line = make_worker(compile_when_idle=False, background=False)
    command_line.submit(spec(start_image_80x64, "command line"))
    command_line.run_queued()
    assert [j.status for j in command_line.jobs()] == ["finished"] and calls == []

    def failing_engine(*args, **kwargs):
        raise RuntimeError("the engine broke (injected)")

    failed = make_worker(run_job=failing_engine, background=False)
    failed.submit(spec(start_image_80x64, "fails"))
    failed.run_queued()
    assert [j.status for j in failed.jobs()] == ["failed"] and calls == []
    app = make_worker()
    with caplog.at_level("ERROR"):
        assert isinstance(all_events(app, app.submit(spec(start_image_80x64, "first")))[-1], Finished)
        wait_until(lambda: calls and app._idle_work is None)
        assert isinstance(all_events(app, app.submit(spec(start_image_80x64, "second")))[-1], Finished)
    assert any("compiling the VAE decoder while idle failed" in r.message for r in caplog.records)
    wait_until(lambda: not app._manager.is_loaded("vae") and app._idle_work is None)
    time.sleep(2 * IDLE_COMPILE_GRACE_S)  # past the grace after the second job: a retry would have started
    assert len(calls) == 1
