"""Many jobs in a row (issue 21, "Soak"): 30 short jobs through the web app's Worker on the tiny models, with
stops, cancels of queued jobs and a failing one mixed in. Every video and settings file a job leaves is there and
plays, and the process's RSS, threads and open files come back to their level after the first job."""
from __future__ import annotations

import ctypes
import json
import logging
import threading

import psutil
import torch

from framepack_ui.engine import f1
from framepack_ui.engine.video import count_frames
from framepack_ui.events import Failed, Finished, Step, Stopped
from framepack_ui.memory.manager import ModelManager
from framepack_ui.sidecar import sidecar_path
from framepack_ui.units import MB
from framepack_ui.worker import queue_records
from worker_jobs import TIMEOUT_S, all_events, spec

JOBS = 30
STOPPED = {4, 11, 18, 25}  # 2 sections, stopped at the second's first step
CANCELLED = {7, 14, 21, 28}  # queued behind the job before them, dropped before they start
FAILING = 16  # 2 sections, a fault injected as the second starts
RSS_SLACK_BYTES = 50 * MB  # the bounds on what may stay behind after the first job
THREADS_SLACK = 2
OPEN_FILES_SLACK = 5


def reading() -> dict:
    """This process's RSS, threads and open files (file descriptors), and torch's VRAM where there is a GPU (not on
    the CPU-only test machines: the VRAM bound is untested there). RSS is read after glibc's malloc_trim: glibc keeps
    freed heap memory for reuse, so RSS alone shows how high the heap once stood, not what is still held."""
    trim_heap()
    process = psutil.Process()
    vram = torch.cuda.memory_allocated() if torch.cuda.is_available() else None
    return {"rss": process.memory_info().rss, "threads": process.num_threads(), "files": process.num_fds(),
            "vram": vram}


def trim_heap() -> None:
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def within(level: dict, baseline: dict) -> list[str]:
    """What grew past its slack since `baseline`, in words ([] when nothing did)."""
    grown = []
    if level["rss"] > baseline["rss"] + RSS_SLACK_BYTES:
        grown.append(f"RSS {(level['rss'] - baseline['rss']) / MB:.0f} MB more")
    if level["threads"] > baseline["threads"] + THREADS_SLACK:
        grown.append(f"{level['threads'] - baseline['threads']} threads more")
    if level["files"] > baseline["files"] + OPEN_FILES_SLACK:
        grown.append(f"{level['files'] - baseline['files']} open files more")
    if level["vram"] is not None and level["vram"] > baseline["vram"] + RSS_SLACK_BYTES:
        grown.append(f"VRAM {(level['vram'] - baseline['vram']) / MB:.0f} MB more")
    return grown


def test_thirty_jobs_with_stops_cancels_and_a_failure_leave_playable_files_and_no_leaks(make_worker, tmp_path,
                                                                                         start_image_80x64,
                                                                                         monkeypatch, caplog):
    freed = threading.Event()  # the worker gave the models back after its queue emptied (app default: at once)
    release_after_job = ModelManager.release_after_job

    def release_and_tell(self, *args, **kwargs):
        release_after_job(self, *args, **kwargs)
        freed.set()

    monkeypatch.setattr(ModelManager, "release_after_job", release_and_tell)
    # pytest keeps every log record of a test, and the failing job's traceback with it, which holds that job's
    # frames (its models, its video encoder's threads) until the test ends; the app's log handler keeps none
    caplog.set_level(logging.CRITICAL, logger="framepack_ui")
    started: list[int] = []

    def run_job(job_spec, out_path, manager, emit, cancel, **kwargs):
        number = int(job_spec.prompt.split()[1])
        started.append(number)

        def fault(section):  # fault injection at the engine's section boundary
            if number == FAILING and section == 1:
                raise RuntimeError("injected fault (soak)")

        return f1.run(job_spec, out_path, manager, emit, cancel, section_hook=fault, **kwargs)

    worker = make_worker(run_job, prompt_cache_dir=tmp_path / "prompts")  # a new prompt each job: encoded each time
    ids: dict[int, str] = {}
    ended: dict[int, object] = {}
    levels: dict[int, dict] = {}  # job number -> the reading once it ended and the worker was idle again

    def stop_in_second_section(number):
        def listener(event):  # in the job's thread, before it checks for a stop: the stop lands in this section
            if isinstance(event, Step) and event.section == 1:
                worker.cancel(ids[number])
        return listener

    def submit(number):
        two_sections = number in STOPPED or number == FAILING
        settings = dict(resolution=64, steps=2, seconds=2.4 if two_sections else 1.2, seed=number)
        ids[number] = worker.submit(spec(start_image_80x64, f"job {number}", **settings),
                                    on_event=stop_in_second_section(number) if number in STOPPED else None)

    number = 1
    while number <= JOBS:
        freed.clear()
        submit(number)
        if number + 1 in CANCELLED:  # queued behind this one, dropped before it can start
            submit(number + 1)
            assert worker.job(ids[number + 1]).status == "queued"
            assert worker.cancel(ids[number + 1])
            ended[number + 1] = all_events(worker, ids[number + 1])[-1]
        ended[number] = all_events(worker, ids[number])[-1]
        assert freed.wait(TIMEOUT_S), f"the worker did not give the models back after job {number}"
        levels[number] = reading()
        number += 2 if number + 1 in CANCELLED else 1

    assert started == [n for n in range(1, JOBS + 1) if n not in CANCELLED]
    kinds = {n: type(result).__name__ for n, result in ended.items()}
    assert {n for n, kind in kinds.items() if kind == "Failed"} == {FAILING}
    assert {n for n, kind in kinds.items() if kind == "Stopped"} == STOPPED | CANCELLED
    assert len(kinds) == JOBS

    for number, result in ended.items():
        if number in CANCELLED:  # never started: nothing written, and no queue record left to come back
            assert result.path is None and result.frames == 0
            continue
        path = result.path
        assert path, (number, result)
        settings = json.loads(sidecar_path(path).read_text(encoding="utf-8"))
        frames = count_frames(path)  # PyAV decodes every frame: the file plays to its end
        if isinstance(result, Finished):
            assert (frames, settings["status"], settings["frames"]) == (37, "finished", 37), number
        elif isinstance(result, Stopped):
            assert (frames, settings["status"]) == (result.frames, "stopped") and 37 <= frames < 73, number
        else:
            assert isinstance(result, Failed) and "injected fault (soak)" in result.message
            assert (frames, settings["status"]) == (37, "failed")  # the finished section plays
    assert queue_records.read_all(worker.outputs_dir) == []  # no job comes back after a restart
    videos = sorted(p.name for p in worker.outputs_dir.glob("*.mp4"))
    assert len(videos) == JOBS - len(CANCELLED)

    baseline = levels[1]
    print("levels (job: RSS MB, threads, open files):",
          {n: (round(r["rss"] / MB), r["threads"], r["files"]) for n, r in levels.items()})
    # threads and open files at every job's end; memory (which a job's working set moves by tens of MB, freed or
    # not) after the last one, as the issue words it
    grown = {n: [g for g in within(level, baseline) if "RSS" not in g and "VRAM" not in g]
             for n, level in levels.items()}
    assert not {n: g for n, g in grown.items() if g}, grown
    assert not within(levels[JOBS], baseline), within(levels[JOBS], baseline)
