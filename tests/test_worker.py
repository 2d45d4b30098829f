"""The worker: one thread, its own FIFO queue, events kept per job; the real F1 engine on tiny models."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from PIL import Image

from framepack_ui.engine import f1
from framepack_ui.engine.video import count_frames
from framepack_ui.errors import InputError
from framepack_ui.events import Failed, Finished, Phase, SectionSaved, Step, Stopped
from framepack_ui.spec import JobSpec
from framepack_ui.worker import Queued, Worker

FAST = dict(resolution=128, steps=2, seconds=1.2, seed=7)  # one section of a 128-px bucket
TIMEOUT_S = 120  # a 2-core machine shared with other work: generous, only hit when something hangs


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("img") / "start.png"
    y, x = np.mgrid[0:64, 0:80]
    Image.fromarray(np.stack([x * 3, y * 4, (x + y) % 255], axis=-1).astype(np.uint8)).save(path)
    return str(path)


@pytest.fixture
def make_worker(tiny_models_dir, tmp_path):
    workers = []

    def make(run_job=f1.run, manager=None):
        worker = Worker(tiny_models_dir, tmp_path / "outputs", device="cpu", run_job=run_job, manager=manager)
        workers.append(worker)
        return worker

    yield make
    for worker in workers:
        worker.shutdown()


def spec(image, prompt="a red square moves", **settings) -> JobSpec:
    return JobSpec(image=image, prompt=prompt, **{**FAST, **settings})


def all_events(worker, job_id) -> list:
    """Follow a job to its end (in a thread, so a hang fails the test instead of blocking it)."""
    out: list = []
    thread = threading.Thread(target=lambda: out.extend(worker.events(job_id)), daemon=True)
    thread.start()
    thread.join(TIMEOUT_S)
    assert not thread.is_alive(), f"job {job_id} did not end within {TIMEOUT_S} s"
    return out


def wait_until(condition, timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def gated(run_job, gate: threading.Event, started: list):
    """run_job that records which job starts and waits for `gate` first: lets a test hold a job 'running'."""
    def run(spec, out_path, manager, emit, cancel, **kwargs):
        started.append(spec.prompt)
        assert gate.wait(TIMEOUT_S)
        return run_job(spec, out_path, manager, emit, cancel, **kwargs)
    return run


def test_two_jobs_run_in_submission_order_and_free_the_models(make_worker, image):
    gate, started = threading.Event(), []
    worker = make_worker(gated(f1.run, gate, started))
    first = worker.submit(spec(image, "first"))
    second = worker.submit(spec(image, "second"))
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


def test_bad_input_raises_before_anything_is_queued(make_worker, image, tmp_path):
    worker = make_worker()
    with pytest.raises(InputError, match="steps must be 1 to 100"):
        worker.submit(spec(image, steps=0))
    with pytest.raises(InputError, match="image not found"):
        worker.submit(spec(str(tmp_path / "nope.png")))
    assert worker.jobs() == []


def test_cancel_a_queued_job_removes_it(make_worker, image):
    gate, started = threading.Event(), []
    worker = make_worker(gated(f1.run, gate, started))
    first = worker.submit(spec(image, "first"))
    wait_until(lambda: started)  # the first job is running (held at the gate)
    second = worker.submit(spec(image, "second"))
    third = worker.submit(spec(image, "third"))
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


def test_stop_a_running_job_keeps_its_finished_sections(make_worker, image):
    worker = make_worker()
    job_id = worker.submit(spec(image, seconds=3.6))  # 3 sections
    events = []
    for event in worker.events(job_id):
        events.append(event)
        if isinstance(event, SectionSaved) and event.section == 0:
            assert worker.cancel(job_id)
    result = events[-1]
    assert isinstance(result, Stopped), result
    assert result.frames == 37 and count_frames(result.path) == 37  # section 0 only, and it plays
    assert worker.job(job_id).status == "stopped"
    assert sum(isinstance(e, SectionSaved) for e in events) == 1


def test_a_crashing_run_job_fails_one_line_and_the_worker_goes_on(make_worker, image):
    calls = []

    def crash_once(spec, out_path, manager, emit, cancel, **kwargs):
        calls.append(spec.prompt)
        if len(calls) == 1:
            raise RuntimeError("boom\nwith a second line")
        return f1.run(spec, out_path, manager, emit, cancel, **kwargs)

    worker = make_worker(crash_once)
    crashed = worker.submit(spec(image, "crash"))
    fine = worker.submit(spec(image, "fine"))
    result = all_events(worker, crashed)[-1]
    assert isinstance(result, Failed) and result.reason == "internal"
    assert result.message == "internal error: RuntimeError: boom with a second line"
    assert isinstance(all_events(worker, fine)[-1], Finished)
    assert [j.status for j in worker.jobs()] == ["failed", "finished"]


def test_a_late_subscriber_replays_from_the_start(make_worker, image):
    worker = make_worker()
    job_id = worker.submit(spec(image, seconds=2.4))  # 2 sections
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
