"""Nothing lost under faults (issue 21): a fault injected at a boundary of the real engine on tiny models (out of GPU
memory at a section, a full disk at the writer, a killed process, broken weights, no memory at load), and each time
one line for the user, the finished sections playable and the next job running."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from framepack_ui.engine import f1
from framepack_ui.engine.video import count_frames
from framepack_ui.events import Failed, Finished, SectionSaved
from framepack_ui.memory.plan import PlanOverrides, leaner_choices, make_plan, real_weights
from framepack_ui.memory.probe import Machine
from framepack_ui.sidecar import sidecar_path
from framepack_ui.spec import JobSpec
from framepack_ui.worker import Worker
from job_settings import FAST_128PX

TIMEOUT_S = 120  # a 2-core machine shared with other work: generous, only hit when something hangs


@pytest.fixture
def make_worker(tiny_models_dir, tmp_path):
    workers = []

    def make(run_job=f1.run, **kwargs):
        worker = Worker(kwargs.pop("models_dir", tiny_models_dir), tmp_path / "outputs", device="cpu",
                        run_job=run_job, **kwargs)
        workers.append(worker)
        return worker

    yield make
    for worker in workers:
        worker.shutdown()


def spec(image, prompt="a red square moves", **settings) -> JobSpec:
    return JobSpec(image=image, prompt=prompt, **{**FAST_128PX, **settings})


def all_events(worker, job_id) -> list:
    """Follow a job to its end (in a thread, so a hang fails the test instead of blocking it)."""
    out: list = []
    thread = threading.Thread(target=lambda: out.extend(worker.events(job_id)), daemon=True)
    thread.start()
    thread.join(TIMEOUT_S)
    assert not thread.is_alive(), f"job {job_id} did not end within {TIMEOUT_S} s"
    return out


# --- out of GPU memory during a section --------------------------------------------------------------------------

def test_out_of_memory_advice_names_the_leaner_choice_of_the_plan():
    """The line after an out-of-memory names what is leaner than the plan the job ran under."""
    real = real_weights()

    def advice(ram_gb, vram_gb, **overrides):
        plan = make_plan(Machine.supposed(ram_gb, vram_gb), real, PlanOverrides(**overrides))
        return plan.components["transformer"], leaner_choices(plan)

    resident, said = advice(128, 80, plan="gpu")
    assert resident.where == "gpu" and resident.storage != "fp8"
    assert said == ("pick the 'streamed' memory profile (--plan streamed), or fp8 storage of the video model "
                    "(--fp8), or resolution 544 (this job ran at 640)")
    streamed, said = advice(64, 8, fp8=False, resolution=480)
    assert streamed.where == "gpu-streamed"
    assert said == ("close other programs using the GPU, or pick fp8 storage of the video model (--fp8), or "
                    "resolution 384 (this job ran at 480)")
    leanest, said = advice(64, 8, fp8=True, resolution=256)  # streamed, fp8, the smallest resolution: nothing left
    assert leanest.where == "gpu-streamed" and leanest.storage == "fp8"
    assert said == "close other programs using the GPU"
    _, said = advice(64, 0)  # no GPU: only the resolution is left to lower
    assert said == "pick resolution 544 (this job ran at 640)"


def test_out_of_gpu_memory_mid_job_names_the_leaner_plan_keeps_the_sections_and_the_next_job_runs(
        make_worker, start_image_80x64):
    """The first job runs out of GPU memory as its second section starts (injected at the engine's section
    boundary): it fails with one line ending in the leaner choices of the plan it ran under, its first section
    plays, and the queued job after it finishes."""
    calls = []

    def out_of_memory_in_the_first_job(spec, out_path, manager, emit, cancel, **kwargs):
        calls.append(spec.prompt)

        def hook(section):
            if len(calls) == 1 and section == 1:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\n(injected)")

        return f1.run(spec, out_path, manager, emit, cancel, section_hook=hook, **kwargs)

    worker = make_worker(out_of_memory_in_the_first_job)
    first = worker.submit(spec(start_image_80x64, "runs out", seconds=2.4))
    second = worker.submit(spec(start_image_80x64, "runs next"))
    events = all_events(worker, first)
    failed = events[-1]
    plan = worker._make_plan("auto", 128)  # the plan the job ran under (this machine, its profile, resolution)
    assert isinstance(failed, Failed) and failed.reason == "memory"
    assert failed.message == ("out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB (injected)): "
                              + leaner_choices(plan))
    assert failed.path and count_frames(failed.path) == 37  # the finished section plays
    assert [e.section for e in events if isinstance(e, SectionSaved)] == [0]
    settings = json.loads(sidecar_path(failed.path).read_text())
    assert (settings["status"], settings["frames"], settings["message"]) == ("failed", 37, failed.message)
    assert isinstance(all_events(worker, second)[-1], Finished)
    assert calls == ["runs out", "runs next"]
